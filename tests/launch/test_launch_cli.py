"""`python -m launch` without starting ranks: composition once, run directory, rendered commands (issue 7).

Everything here runs in-process and starts nothing: --dry-run output, the config file every rank
reads, sweeps, the SLURM batch script and the one-line errors for bad input.
"""

import shlex
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.__main__ import main
from launch.config import ClusterConfig, register_launch_configs
from launch.resolve import CONFIGS, RunDirs, expand_sweep, prepare, resolve
from train.__main__ import load_resolved

TINY = ["model=tiny", "train.global_batch=8", "train.micro_batch=2"]


def run_main(capsys, *argv):
    """(exit status, stdout, stderr) of `python -m launch ARGV`, in-process."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def command_lines(out):
    return [shlex.split(line.split(" && ", 1)[1]) for line in out.splitlines() if " && " in line]


def flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("path", sorted((CONFIGS / "cluster").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_cluster_option_composes_and_names_its_kind(path):
    register_launch_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cluster = OmegaConf.to_object(compose(config_name="launch", overrides=[f"cluster={path.stem}"])).cluster
    assert isinstance(cluster, ClusterConfig) and cluster.kind == path.stem


def test_local_dry_run_prints_one_torchrun_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = run_main(capsys, "--dry-run", "cluster=local", "cluster.nproc_per_node=2", f"run.dir={run_dir}",
                            *TINY)
    assert code == 0
    (argv,) = command_lines(out)
    assert argv[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert flag(argv, "--nproc-per-node") == "2" and flag(argv, "--nnodes") == "1"
    assert argv[-4:] == ["-m", "train", "--config-file", str(run_dir / "config.yaml")]
    assert not run_dir.exists()


def test_torchrun_dry_run_prints_one_command_per_node(tmp_path, capsys):
    code, out, _ = run_main(capsys, "--dry-run", "cluster=torchrun", "cluster.nnodes=3", "cluster.nproc_per_node=8",
                            "cluster.master_addr=10.1.2.3", "cluster.master_port=29400", "cluster.max_restarts=2",
                            f"run.dir={tmp_path / 'big'}", "model=tiny", "train.global_batch=96",
                            "train.micro_batch=4")
    assert code == 0
    nodes = command_lines(out)
    assert [flag(a, "--node-rank") for a in nodes] == ["0", "1", "2"]
    assert [flag(a, "--rdzv-conf") for a in nodes] == ["is_host=1", "is_host=0", "is_host=0"]
    for argv in nodes:
        assert flag(argv, "--nnodes") == "3" and flag(argv, "--nproc-per-node") == "8"
        assert flag(argv, "--rdzv-backend") == "c10d" and flag(argv, "--rdzv-endpoint") == "10.1.2.3:29400"
        assert flag(argv, "--rdzv-id") == "big" and flag(argv, "--max-restarts") == "2"
        assert argv[-4:] == ["-m", "train", "--config-file", str(tmp_path / "big" / "config.yaml")]


def test_slurm_batch_script_has_the_requested_resources(tmp_path, capsys):
    run_dir = tmp_path / "sl"
    code, out, _ = run_main(capsys, "--dry-run", "cluster=slurm", "cluster.nnodes=2", "cluster.gpus_per_node=4",
                            "cluster.partition=gpu", "cluster.account=team", "cluster.time_min=90",
                            "cluster.mem_gb=400", "cluster.cpus_per_node=32",
                            "cluster.setup=[module load cuda,source .venv/bin/activate]",
                            "+cluster.sbatch_extra.exclusive=true", f"run.dir={run_dir}", "model=tiny",
                            "train.global_batch=16", "train.micro_batch=2")
    assert code == 0
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=team", "#SBATCH --time=90", "#SBATCH --mem=400GB",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --requeue", "#SBATCH --exclusive",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=sl", "module load cuda",
                 "source .venv/bin/activate", "export SUBMITIT_EXECUTOR=slurm"):
        assert line in out.splitlines(), line
    assert f"#SBATCH --output={run_dir}/slurm/%j/%j_0_log.out" in out
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert srun.endswith(f"-u -m submitit.core._submit {run_dir}/slurm/%j")
    node = shlex.split(next(line for line in out.splitlines() if "torch.distributed.run" in line).lstrip("# "))
    assert flag(node, "--nnodes") == "2" and flag(node, "--nproc-per-node") == "4"
    assert node[-4:] == ["-m", "train", "--config-file", str(run_dir / "config.yaml")]
    assert not run_dir.exists()


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="sbatch exists here: this checks its absence")
def test_slurm_without_sbatch_stops_with_one_line_and_writes_nothing(tmp_path, capsys):
    code, out, err = run_main(capsys, "cluster=slurm", "cluster.gpus_per_node=1", f"run.dir={tmp_path / 'sl'}", *TINY)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: sbatch/srun not found") and "--dry-run" in err
    assert not (tmp_path / "sl").exists()


def test_deepspeed_dry_run_writes_hostfile_lines_and_passes_no_local_rank(tmp_path, capsys):
    run_dir = tmp_path / "ds"
    code, out, _ = run_main(capsys, "--dry-run", "cluster=deepspeed", "cluster.hosts=[gpu-a,gpu-b]",
                            "cluster.nproc_per_node=8", f"run.dir={run_dir}", "model=tiny", "train.global_batch=64",
                            "train.micro_batch=4")
    assert code == 0
    assert "#   gpu-a slots=8" in out and "#   gpu-b slots=8" in out
    (argv,) = command_lines(out)
    assert argv[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_local_rank" in argv
    assert flag(argv, "--hostfile") == str(run_dir / "hostfile") and flag(argv, "--master_addr") == "gpu-a"
    assert argv[-4:] == ["--module", "train", "--config-file", str(run_dir / "config.yaml")]


def test_config_is_resolved_once_and_every_rank_reads_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # ${now:} would differ between processes; the launcher resolves it once
    run = resolve(["model=tiny", "run.name=r${now:%H%M%S%f}", "optim.lr=0.002", "train.max_steps=7"],
                  RunDirs(multirun=False))
    prepare(run, dry_run=False)
    text = run.config_path.read_text()
    assert "${" not in text
    assert run.run_dir.parent == tmp_path / "runs" and run.run_dir.name.startswith(run.cfg.run.name + "-")
    loaded = load_resolved(str(run.config_path))
    assert loaded == run.cfg
    assert loaded.run.dir == str(run.run_dir) and loaded.run.resume == "auto" and not loaded.run.overwrite
    assert loaded.optim.lr == 0.002 and loaded.train.max_steps == 7


def test_multirun_makes_one_run_per_point(tmp_path, capsys):
    points = expand_sweep(["optim.lr=1e-3,3e-3", "model=tiny", "train.max_steps=5,6"], multirun=True)
    assert len(points) == 4
    run_dirs = RunDirs(multirun=True)
    runs = [resolve(p + [f"run.dir={tmp_path / 'sweep'}"], run_dirs, i) for i, p in enumerate(points)]
    for run in runs:
        prepare(run, dry_run=False)
    loaded = [load_resolved(str(run.config_path)) for run in runs]
    assert [(c.optim.lr, c.train.max_steps) for c in loaded] == [(1e-3, 5), (1e-3, 6), (3e-3, 5), (3e-3, 6)]
    assert [run.run_dir for run in runs] == [tmp_path / "sweep" / str(i) for i in range(4)]
    assert len({run.run_id for run in runs}) == 4

    code, out, _ = run_main(capsys, "--dry-run", "-m", "cluster=slurm", "cluster.gpus_per_node=1",
                            "optim.lr=1e-3,3e-3", f"run.dir={tmp_path / 'sw2'}", *TINY)
    assert code == 0 and out.count("#!/bin/bash") == 2
    assert "#SBATCH --job-name=sw2-0" in out and "#SBATCH --job-name=sw2-1" in out


@pytest.mark.parametrize("argv,needle", [
    (["optim.lr=1e-3,3e-3"], "add -m"),
    (["cluster=local", "cluster.nnodes=2"], "cluster.nnodes=2"),
    (["cluster=torchrun", "cluster.nnodes=2"], "cluster.master_addr"),
    (["cluster=nowhere"], "nowhere"),
    (["job=nope"], "job='nope'"),
    (["cluster.no_such_field=1"], "no_such_field"),
    (["cluster.nproc_per_node=3", "train.global_batch=8", "train.micro_batch=2"], "train.global_batch"),
    (["cluster.nproc_per_node=2", "parallel.tp=3"], "parallel.tp"),
])
def test_bad_input_is_one_line_naming_the_field(tmp_path, capsys, argv, needle):
    code, _, err = run_main(capsys, "--dry-run", f"run.dir={tmp_path / 'r'}", "model=tiny", *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_a_directory_holding_a_run_is_refused_unless_resuming(tmp_path, capsys):
    run_dir = tmp_path / "old"
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    code, _, err = run_main(capsys, "--dry-run", f"run.dir={run_dir}", *TINY)
    assert code == 2 and "already holds a run" in err and "run.resume=auto" in err
    code, out, _ = run_main(capsys, "--dry-run", f"run.dir={run_dir}", "run.resume=auto", *TINY)
    assert code == 0 and str(run_dir / "config.yaml") in out


def test_relative_run_dir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = resolve(["model=tiny", "run.dir=rel/run"], RunDirs(multirun=False))
    assert run.run_dir == tmp_path / "rel" / "run"
    assert Path(run.run_dir).is_absolute()
