"""Compose and resolve a run's config once, pick its run directory once, write run_dir/config.yaml.

Style rule 8: Hydra meets torchrun once, here. Interpolations such as `${now:...}` resolve per process,
so a config composed by every rank would give ranks different values (and run directories); the
launcher resolves everything in one process, fixes `run.dir`, and every rank starts on the file.

Overrides `job=...`, `cluster=...` and `cluster.<field>=...` belong to the launcher (composed from
the ConfigStore root `launch` and configs/cluster/); all others go to the job's root config, composed
exactly as `python -m train` composes it.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config import KINDS, ClusterConfig, LaunchConfig, register_launch_configs
from launch.jobs import Job, get_job

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LAUNCHER_KEYS = ("job", "cluster")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _compose(config_name: str, overrides: List[str]):
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            return OmegaConf.to_object(compose(config_name=config_name, overrides=overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(_one_line(exc)) from None


def _parse(overrides: List[str]):
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ValueError(_one_line(exc)) from None


def expand_sweep(overrides: List[str], multirun: bool) -> List[List[str]]:
    """The override lists of every point of a Hydra sweep (`optim.lr=1e-3,3e-3` -> 2 points).

    Without multirun a sweep is an error, as in Hydra; with it, the cartesian product of the
    swept keys, in command-line order.
    """
    choices: List[List[str]] = []
    for text, override in zip(overrides, _parse(overrides)):
        if not override.is_sweep_override():
            choices.append([text])
            continue
        if not multirun:
            raise ValueError(f"{text} is a sweep; add -m (--multirun) to launch one job per point")
        if not override.is_discrete_sweep():
            raise ValueError(f"{text}: only choice and range sweeps are supported")
        key = override.get_key_element()
        choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return [list(point) for point in itertools.product(*choices)]


def split_overrides(overrides: List[str]) -> Tuple[List[str], List[str]]:
    """(launcher overrides: job, cluster, cluster.*), (job overrides: everything else)."""
    launcher, job = [], []
    for text, override in zip(overrides, _parse(overrides)):
        head = override.key_or_group.split(".")[0]
        (launcher if head in LAUNCHER_KEYS else job).append(text)
    return launcher, job


def compose_launch(overrides: List[str]) -> LaunchConfig:
    """The launcher's config: job name and `ClusterConfig` (checked here, before anything runs)."""
    register_launch_configs()
    launch_cfg: LaunchConfig = _compose("launch", overrides)
    check_cluster(launch_cfg.cluster)
    get_job(launch_cfg.job)
    return launch_cfg


def check_cluster(c: ClusterConfig) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"cluster: {msg}")

    if c.kind not in KINDS:
        fail(f"cluster.kind={c.kind!r} must be one of {KINDS}")
    if c.nnodes < 1:
        fail(f"cluster.nnodes={c.nnodes} must be >= 1")
    if c.kind == "local" and c.nnodes != 1:
        fail(f"cluster=local runs one node but cluster.nnodes={c.nnodes}; use cluster=torchrun or cluster=slurm")
    if c.nproc_per_node is not None and c.nproc_per_node < 1:
        fail(f"cluster.nproc_per_node={c.nproc_per_node} must be >= 1 (or null: one per GPU)")
    if c.max_restarts < 0:
        fail(f"cluster.max_restarts={c.max_restarts} must be >= 0")
    if c.kind == "torchrun" and c.nnodes > 1 and not c.master_addr and not c.colocate_nodes:
        fail("cluster=torchrun with cluster.nnodes > 1 needs cluster.master_addr (the address of node 0, "
             "reachable from every node), or cluster.colocate_nodes=true for a rehearsal on this machine")
    if c.kind == "slurm" and c.gpus_per_node < 0:
        fail(f"cluster.gpus_per_node={c.gpus_per_node} must be >= 0")
    if c.kind == "deepspeed" and c.hosts and c.hostfile:
        fail("set cluster.hosts or cluster.hostfile, not both")


@dataclass(frozen=True)
class Topology:
    """Nodes x ranks per node of one job."""

    nnodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def read_hostfile(path: str) -> List[Tuple[str, int]]:
    """(host, slots) pairs of an MPI-style hostfile ('host slots=N', '#' comments)."""
    hosts = []
    for line in Path(path).expanduser().read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, *rest = line.split()
        slots = [int(r.split("=")[1]) for r in rest if r.startswith("slots=")]
        hosts.append((name, slots[0] if slots else 1))
    if not hosts:
        raise ValueError(f"cluster.hostfile={path} lists no host")
    return hosts


def topology(c: ClusterConfig) -> Topology:
    """Nodes and ranks per node; unset ranks per node = GPUs (here, or slurm's gpus_per_node), else 1."""
    if c.kind == "slurm":
        return Topology(c.nnodes, c.nproc_per_node or max(c.gpus_per_node, 1))
    per_node = c.nproc_per_node or max(torch.cuda.device_count(), 1)
    if c.kind == "deepspeed":
        if c.hostfile:
            hosts = read_hostfile(c.hostfile)
            return Topology(len(hosts), c.nproc_per_node or hosts[0][1])
        return Topology(max(len(c.hosts), 1), per_node)
    return Topology(c.nnodes, per_node)


@dataclass
class ResolvedRun:
    """One run, resolved: what to run, where, on how many ranks, and the directory it writes."""

    job: Job
    cluster: ClusterConfig
    cfg: Any
    """The job's config object (e.g. `train.config.Config`), every interpolation resolved."""
    run_dir: Path
    topology: Topology
    overrides: List[str]

    @property
    def run_id(self) -> str:
        """Names the rendezvous and the SLURM job; unique per run directory."""
        return "-".join(self.run_dir.parts[-2:]) if self.run_dir.name.isdigit() else self.run_dir.name

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"


class RunDirs:
    """Chooses each run's directory once, in the launching process.

    run.dir given: that directory, made absolute (ranks on other nodes have other working
    directories); otherwise runs/<run.name>-<UTC time of this launch>, with -2, -3, ... appended if
    it exists. A multirun puts point i in <that directory>/<i>.
    """

    def __init__(self, multirun: bool) -> None:
        self.multirun = multirun
        self.stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self._fresh: Dict[Path, Path] = {}

    def pick(self, run_cfg, index: int) -> Path:
        if run_cfg.dir:
            base = Path(run_cfg.dir).expanduser().absolute()
        else:
            base = self._unused(Path.cwd() / "runs" / f"{run_cfg.name}-{self.stamp}")
        return base / str(index) if self.multirun else base

    def _unused(self, wanted: Path) -> Path:
        if wanted not in self._fresh:        # every point of a sweep shares one base directory
            path, n = wanted, 1
            while path.exists():
                n += 1
                path = wanted.with_name(f"{wanted.name}-{n}")
            self._fresh[wanted] = path
        return self._fresh[wanted]


def resolve(overrides: List[str], run_dirs: RunDirs, index: int = 0) -> ResolvedRun:
    """Compose the launcher's and the job's config for one point and check them together."""
    launcher_overrides, job_overrides = split_overrides(overrides)
    launch_cfg = compose_launch(launcher_overrides)
    job = get_job(launch_cfg.job)
    job.load()
    cfg = _compose(job.config_name, job_overrides)
    topo = topology(launch_cfg.cluster)
    job.validate(cfg, topo.world_size)
    backend = cfg.parallel.backend
    if launch_cfg.cluster.kind == "local" and backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend=nccl needs GPUs and none is visible here; use "
                         "parallel.backend=auto (gloo without GPUs)")
    run_dir = run_dirs.pick(cfg.run, index)
    return ResolvedRun(job=job, cluster=launch_cfg.cluster, cfg=cfg, run_dir=run_dir, topology=topo,
                       overrides=list(overrides))


def prepare(run: ResolvedRun, dry_run: bool) -> None:
    """Check (dry run) or create the run directory and write run_dir/config.yaml for every rank.

    The written config fixes run.dir, and turns run.resume=never into auto: the directory is
    fresh or was moved aside here (run.overwrite), so `auto` starts afresh now and lets elastic
    restarts and SLURM requeues resume from the newest checkpoint.
    """
    from train.rundir import atomic_write_text, holds_run, prepare_run_dir

    run_cfg = run.cfg.run
    if dry_run:
        if holds_run(run.run_dir) and run_cfg.resume == "never" and not run_cfg.overwrite:
            raise ValueError(f"run directory {run.run_dir} already holds a run; pass run.resume=auto to "
                             "continue it, run.overwrite=true to start afresh, or choose another run.dir")
    else:
        prepare_run_dir(run.run_dir, run_cfg.resume, run_cfg.overwrite)
    run_cfg.dir = str(run.run_dir)
    run_cfg.resume = "auto" if run_cfg.resume == "never" else run_cfg.resume
    run_cfg.overwrite = False
    if not dry_run:
        atomic_write_text(run.config_path, OmegaConf.to_yaml(OmegaConf.structured(run.cfg)))


def write_launch_record(run: ResolvedRun, argv: List[str], plan: Dict[str, Any]) -> None:
    """run_dir/launch.json: the launcher's command line, cluster, topology and what it starts."""
    from dataclasses import asdict

    record = {"run_id": run.run_id, "job": run.job.name, "argv": argv, "overrides": run.overrides,
              "cluster": asdict(run.cluster), "nnodes": run.topology.nnodes,
              "nproc_per_node": run.topology.nproc_per_node, "world_size": run.topology.world_size,
              "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(), **plan}
    _write_json(run.run_dir / "launch.json", record)


def update_launch_record(run: ResolvedRun, **fields: Any) -> None:
    """Add fields known only once started (e.g. the SLURM job id) to run_dir/launch.json."""
    record = json.loads((run.run_dir / "launch.json").read_text())
    _write_json(run.run_dir / "launch.json", {**record, **fields})


def _write_json(path: Path, record: Dict[str, Any]) -> None:
    from train.rundir import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=2))

