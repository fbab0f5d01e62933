"""torchrun on this machine (cluster=local) or one torchrun agent per node (cluster=torchrun).

local: `torchrun --standalone` (a c10d store on a free local port) with nproc_per_node ranks.
torchrun: every node runs the same agent command apart from --node-rank, rendezvousing through
c10d at master_addr:master_port; node 0 hosts the store (`--rdzv-conf is_host=...` says so
explicitly, so colocated agents do not race for the port). With c10d, torchrun orders the ranks
by rendezvous, not by --node-rank, which only labels the node. `--max-restarts N` restarts every
rank after a failure; the rank entry resumes from the newest checkpoint (run.resume=auto).

Agents start in their own session: a Ctrl-C or SIGTERM reaches the launcher only, which forwards
it once to each agent, which forwards it once to its ranks (a rank's second signal means "stop now").
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from launch.resolve import ResolvedRun

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class NodeCommand:
    """One node's launcher process: argv, extra environment, working directory."""

    node_rank: int
    argv: List[str]
    env: Dict[str, str]
    cwd: str

    def shell(self) -> str:
        """The exact command as one shell line (what --dry-run prints and other nodes run)."""
        env = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        return f"cd {shlex.quote(self.cwd)} && {shlex.join(env + self.argv)}"


def rank_entry(run: ResolvedRun) -> List[str]:
    """What each rank runs after the launcher's flags: the job's module on the resolved config."""
    return ["-m", run.job.module, "--config-file", str(run.config_path)]


def _supports_shutdown_timeout() -> bool:
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}


@dataclass(frozen=True)
class AgentSpec:
    """What the torchrun agents of one job share; `argv` adds the node's part."""

    entry: List[str]
    """The rank entry (`rank_entry`)."""
    nnodes: int
    nproc_per_node: int
    max_restarts: int
    shutdown_timeout_s: int
    rdzv_id: str

    def argv(self, node_rank: Optional[str] = None, endpoint: Optional[str] = None,
             is_host: Optional[str] = None) -> List[str]:
        """`python -m torch.distributed.run ...` for one node; endpoint None = --standalone (one node).

        is_host: whether this node hosts the rendezvous store; None = node_rank is 0.
        """
        if is_host is None:
            is_host = str(int(str(node_rank) == "0"))
        argv = [sys.executable, "-m", "torch.distributed.run"]
        if endpoint is None:
            argv += ["--standalone"]
        argv += ["--nnodes", str(self.nnodes), "--nproc-per-node", str(self.nproc_per_node)]
        if endpoint is not None:
            argv += ["--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                     "--rdzv-id", self.rdzv_id, "--rdzv-conf", f"is_host={is_host}"]
        argv += ["--max-restarts", str(self.max_restarts)]
        if _supports_shutdown_timeout():
            argv += ["--shutdown-timeout", str(self.shutdown_timeout_s)]
        return argv + self.entry


def agent_env(run: ResolvedRun) -> Dict[str, str]:
    """Environment the agents add for their ranks: cluster.env, plus a fix for elastic restarts.

    With --max-restarts, torchrun >= 2.5 hands the ranks its rendezvous store, whose keys survive a
    restart: the restarted ranks read the dead ranks' addresses and fail to connect (gloo
    "connectFullMesh ... Connection refused", NCCL alike; pytorch/pytorch#135712, reproduced with
    torch 2.13). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every attempt a fresh store.
    """
    env = dict(run.cluster.env)
    if run.cluster.max_restarts > 0:
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def agent_spec(run: ResolvedRun) -> AgentSpec:
    return AgentSpec(entry=rank_entry(run), nnodes=run.topology.nnodes,
                     nproc_per_node=run.topology.nproc_per_node, max_restarts=run.cluster.max_restarts,
                     shutdown_timeout_s=run.cluster.shutdown_timeout_s, rdzv_id=run.run_id)


def node_commands(run: ResolvedRun) -> List[NodeCommand]:
    """Every node's command, node 0 first."""
    c = run.cluster
    spec = agent_spec(run)
    cwd = str(Path.cwd())
    if c.kind == "local":
        return [NodeCommand(0, spec.argv(), agent_env(run), cwd)]
    endpoint = f"{c.master_addr or LOCALHOST}:{c.master_port}"
    return [NodeCommand(i, spec.argv(node_rank=str(i), endpoint=endpoint), agent_env(run), cwd)
            for i in range(c.nnodes)]


def dry_run_text(run: ResolvedRun) -> str:
    commands = node_commands(run)
    if len(commands) == 1:
        return commands[0].shell()
    return "\n".join(f"# node {cmd.node_rank}\n{cmd.shell()}" for cmd in commands)


def plan(run: ResolvedRun) -> dict:
    """What `start` runs, for run_dir/launch.json."""
    return {"commands": [cmd.shell() for cmd in node_commands(run)]}


def start(run: ResolvedRun) -> int:
    """Start this machine's agents (all of them when colocated, else node 0) and wait for them."""
    commands = node_commands(run)
    here = commands if run.cluster.colocate_nodes or len(commands) == 1 else commands[:1]
    for cmd in commands:
        what = "starting here" if cmd in here else f"run this on node {cmd.node_rank}"
        print(f"[launch] node {cmd.node_rank}: {what}\n  {cmd.shell()}", file=sys.stderr, flush=True)
    return run_processes(here, grace_s=run.cluster.shutdown_timeout_s + 30)


def run_processes(commands: List[NodeCommand], grace_s: float) -> int:
    """Run the commands to completion; forward SIGINT/SIGTERM; stop the rest once one fails.

    Returns 0 if all succeeded, else the first non-zero exit status (128 + signal if killed).
    """
    import subprocess

    procs = [subprocess.Popen(cmd.argv, cwd=cmd.cwd, env={**os.environ, **cmd.env}, start_new_session=True)
             for cmd in commands]

    def forward(signum, _frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed_at: Optional[float] = None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:            # a peer failed and this one did not notice: stop it
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
    return next((rc for rc in codes if rc != 0), 0)
