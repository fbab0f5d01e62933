"""cluster=deepspeed: a hostfile and the DeepSpeed launcher (`deepspeed --hostfile H --no_local_rank`).

The DeepSpeed launcher appends `--local_rank=N` to each rank's command line unless told not to;
the rank entry (`python -m train --config-file ...`) takes exactly that one argument (Hydra would
reject `--local_rank`), so `--no_local_rank` is always passed and the rank reads LOCAL_RANK from its
environment. The launcher runs here; with more than one host it reaches the others through
`deepspeed_launcher` (pdsh by default: passwordless ssh, the same paths on every host).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from launch.resolve import ResolvedRun, read_hostfile
from launch.torchrun import NodeCommand, rank_entry, run_processes


def hostfile_path(run: ResolvedRun) -> Path:
    return Path(run.cluster.hostfile).expanduser().absolute() if run.cluster.hostfile else run.run_dir / "hostfile"


def hostfile_text(run: ResolvedRun) -> str:
    """MPI-style lines 'host slots=N' (slots = ranks per node), node 0 first."""
    return "".join(f"{host} slots={run.topology.nproc_per_node}\n" for host in hosts(run))


def hosts(run: ResolvedRun) -> List[str]:
    """Host names, node 0 first: the hostfile's, cluster.hosts, or this machine as localhost."""
    if run.cluster.hostfile:
        return [name for name, _ in read_hostfile(run.cluster.hostfile)]
    return list(run.cluster.hosts) or ["localhost"]


def command(run: ResolvedRun) -> NodeCommand:
    c = run.cluster
    names = hosts(run)
    master = c.master_addr or ("127.0.0.1" if names == ["localhost"] else names[0])
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile_path(run)),
            "--master_addr", master, "--master_port", str(c.master_port), "--launcher", c.deepspeed_launcher,
            "--no_local_rank"]
    if len(names) == 1:
        argv += ["--no_ssh_check"]         # one host: ranks start here, nothing to reach over ssh
    if c.nproc_per_node is not None:
        argv += ["--num_gpus", str(c.nproc_per_node)]
    # --module takes the job module as the "script"; the runner passes the rest to every rank
    return NodeCommand(0, argv + ["--module", *rank_entry(run)[1:]], dict(c.env), str(Path.cwd()))


def dry_run_text(run: ResolvedRun) -> str:
    hostfile = f"# hostfile {hostfile_path(run)}\n"
    if not run.cluster.hostfile:
        hostfile += "".join(f"#   {line}\n" for line in hostfile_text(run).splitlines())
    return hostfile + command(run).shell()


def plan(run: ResolvedRun) -> dict:
    """What `start` runs, for run_dir/launch.json."""
    return {"hostfile": str(hostfile_path(run)), "hosts": hosts(run), "commands": [command(run).shell()]}


def start(run: ResolvedRun) -> int:
    if not run.cluster.hostfile:
        hostfile_path(run).write_text(hostfile_text(run))
    return run_processes([command(run)], grace_s=run.cluster.shutdown_timeout_s)
