"""cluster=slurm: a batch job through submitit, one task (one torchrun agent) per node.

submitit writes the batch script (rendered here by the same function, so --dry-run prints exactly
what sbatch gets) and runs `NodeTask` on every node: a torchrun agent for the node's GPUs,
rendezvousing at the job's first host. Requeue: SLURM sends submitit's signal (USR2)
`signal_delay_s` before the time limit, and on pre-emption where the cluster is set up to.
The ranks ignore that signal; each node's task forwards one SIGTERM to its agent, whose ranks save
a checkpoint and exit, then submitit checkpoints `NodeTask` and requeues the job (`scontrol
requeue`), which restarts from run_dir/config.yaml with run.resume=auto (the newest checkpoint).
`#SBATCH --requeue` lets SLURM itself requeue the job after a pre-emption or node failure.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import submitit
from submitit.helpers import Checkpointable

from launch.resolve import ResolvedRun, update_launch_record
from launch.torchrun import AgentSpec, agent_env, agent_spec

PORT_SPREAD = 10000
"""Jobs sharing a node use master_port + SLURM_JOB_ID % PORT_SPREAD as rendezvous port."""
REQUEUE_MARGIN_S = 30
"""Seconds of signal_delay_s kept for submitit's checkpoint and `scontrol requeue` after the ranks stop."""


def submitit_folder(run: ResolvedRun) -> Path:
    """Batch script, pickled task and per-job logs: run_dir/slurm/<job id>/."""
    return run.run_dir / "slurm" / "%j"


def sbatch_parameters(run: ResolvedRun) -> Dict[str, Any]:
    """submitit's SLURM parameters (sbatch names) for the run: one task per node."""
    c = run.cluster
    params: Dict[str, Any] = {"job_name": run.run_id, "nodes": run.topology.nnodes, "ntasks_per_node": 1,
                              "time": c.time_min, "signal_delay_s": c.signal_delay_s, "stderr_to_stdout": True}
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.cpus_per_node:
        params["cpus_per_task"] = c.cpus_per_node
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(c, name):
            params[name] = getattr(c, name)
    if c.setup:
        params["setup"] = list(c.setup)
    extra: Dict[str, Any] = {}
    if c.mem_gb:
        extra["mem"] = f"{c.mem_gb}GB"
    if c.requeue:
        extra["requeue"] = True
    extra.update(c.sbatch_extra)
    if extra:
        params["additional_parameters"] = extra
    return params


def submit_command(folder: Path) -> str:
    """The command submitit puts in the batch script (SlurmExecutor._submitit_command_str)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def batch_script(run: ResolvedRun) -> str:
    """The sbatch script submitit writes for this run."""
    # submitit renders with this function; SlurmExecutor itself refuses to exist without srun
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(run)
    return _make_sbatch_string(command=submit_command(folder), folder=folder, **sbatch_parameters(run))


def node_task(run: ResolvedRun) -> "NodeTask":
    return NodeTask(agent=agent_spec(run), master_port=run.cluster.master_port, env=agent_env(run),
                    cwd=str(Path.cwd()), run_dir=str(run.run_dir),
                    stop_timeout_s=max(run.cluster.signal_delay_s - REQUEUE_MARGIN_S, 10))


def dry_run_text(run: ResolvedRun) -> str:
    task = node_task(run)
    node_cmd = shlex.join(task.agent.argv(
        node_rank="<SLURM_NODEID>", endpoint=f"<first host>:<{task.master_port} + SLURM_JOB_ID % {PORT_SPREAD}>",
        is_host="<1 on node 0, else 0>"))
    return (batch_script(run) + f"\n# each node's task runs (cwd {task.cwd}):\n#   {node_cmd}\n")


def check_available() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ValueError("sbatch/srun not found: this machine is not a SLURM login node, nothing was "
                         "submitted; run the same command there (add --dry-run to print the batch script)")


def plan(run: ResolvedRun) -> dict:
    """What `start` submits, for run_dir/launch.json."""
    return {"batch_script": batch_script(run)}


def start(run: ResolvedRun) -> int:
    """Submit the job (it runs on its own: nothing to wait for here); its id goes to launch.json."""
    update_launch_record(run, slurm_job_id=submit(run))
    return 0


def submit(run: ResolvedRun) -> str:
    """Submit the job; returns its SLURM job id."""
    check_available()
    executor = submitit.SlurmExecutor(folder=submitit_folder(run), max_num_timeout=run.cluster.max_timeouts)
    executor.update_parameters(**sbatch_parameters(run))
    job = executor.submit(node_task(run))
    print(f"[launch] submitted SLURM job {job.job_id} ({run.topology.nnodes} node(s) x "
          f"{run.topology.nproc_per_node} ranks); logs: {run.run_dir / 'slurm' / str(job.job_id)}", flush=True)
    return str(job.job_id)


def _preempt_signal() -> signal.Signals:
    # the signal submitit asks SLURM for (--signal=USR2@delay), overridable as in submitit
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


@dataclass
class NodeTask(Checkpointable):
    """Runs on every node of the job: this node's torchrun agent, until it exits."""

    agent: AgentSpec
    master_port: int
    env: Dict[str, str]
    cwd: str
    run_dir: str
    stop_timeout_s: int
    """Seconds the ranks get to checkpoint after the pre-emption signal (the time limit is near)."""

    def command(self, job_env) -> List[str]:
        port = self.master_port + int(os.environ.get("SLURM_JOB_ID", "0")) % PORT_SPREAD
        return self.agent.argv(node_rank=str(job_env.node), endpoint=f"{job_env.hostnames[0]}:{port}")

    def __call__(self) -> Optional[dict]:
        job_env = submitit.JobEnvironment()
        preempt = _preempt_signal()
        proc = subprocess.Popen(
            self.command(job_env), cwd=self.cwd, env={**os.environ, **self.env},
            # SLURM signals every process of the step; only this task should act on it
            preexec_fn=lambda: signal.signal(preempt, signal.SIG_IGN))
        submitit_handler = signal.getsignal(preempt)
        stopping = []

        def stop_ranks_then_requeue(signum, frame) -> None:
            stopping.append(signum)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)     # agent -> one SIGTERM per rank -> checkpoint, exit
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if callable(submitit_handler):           # node 0: checkpoint this task, requeue the job
                submitit_handler(signum, frame)

        signal.signal(preempt, stop_ranks_then_requeue)
        while proc.poll() is None:                   # poll, not wait(): the handler may wait on proc
            time.sleep(1.0)
        if proc.returncode != 0 and not stopping:   # an agent stopped by our SIGTERM exits non-zero
            raise RuntimeError(f"torchrun on node {job_env.node} exited with {proc.returncode}; "
                               f"see {self.run_dir}/train.log and the job log")
        summary = Path(self.run_dir) / "summary.json"
        return json.loads(summary.read_text()) if job_env.global_rank == 0 and summary.exists() else None
