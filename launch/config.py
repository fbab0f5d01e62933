"""`ClusterConfig`: where and how the ranks of one run start (issue 7; style rules 4, 5 and 8).

The launcher's own config is small: the job to run and the cluster. It is composed from Hydra's
ConfigStore root `launch` (schema `LaunchConfig`) plus the group `configs/cluster/*.yaml`, next to
(not inside) the job's own config, whose schema is the job's (`train.config.Config`), so that the
file every rank reads, run_dir/config.yaml, is exactly what `python -m train --config-file` accepts.
Fields marked (torchrun), (slurm) or (deepspeed) apply to that kind only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

KINDS = ("local", "torchrun", "slurm", "deepspeed")
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")


@dataclass
class ClusterConfig:
    """The machines of one run and the launcher that starts a rank on each of their processes."""

    kind: str = "local"
    """'local' (torchrun on this machine), 'torchrun' (one torchrun agent per node, c10d
    rendezvous), 'slurm' (a batch job through submitit) or 'deepspeed' (hostfile + DeepSpeed launcher)."""
    nnodes: int = 1
    """Nodes of the job (torchrun, slurm; deepspeed takes the number of hosts); local is one node."""
    nproc_per_node: Optional[int] = None
    """Ranks per node; None = one per GPU (slurm: gpus_per_node), 1 on a machine without GPUs."""
    max_restarts: int = 0
    """torchrun --max-restarts (local, torchrun, slurm): after a rank fails, restart every rank up to
    this many times; they resume from the newest checkpoint (the launcher sets run.resume=auto)."""
    shutdown_timeout_s: int = 120
    """torchrun --shutdown-timeout: seconds the ranks get to save a checkpoint after SIGTERM before SIGKILL."""
    master_addr: Optional[str] = None
    """(torchrun, deepspeed) Address of node 0, which hosts the rendezvous; None = 127.0.0.1 for a
    single node or colocated nodes, the first host for deepspeed; required for torchrun nnodes > 1."""
    master_port: int = 29500
    """Rendezvous port on node 0 (torchrun, deepspeed); slurm adds SLURM_JOB_ID % 10000 so that jobs
    sharing a node do not collide; local picks a free port itself (torchrun --standalone)."""
    colocate_nodes: bool = False
    """(torchrun) Start every node's agent on this machine (a multi-node rehearsal on one host);
    False = start node 0 here and print the command each other node runs."""
    env: Dict[str, str] = field(default_factory=dict)
    """Extra environment variables of every rank, e.g. {NCCL_SOCKET_IFNAME: eth0, OMP_NUM_THREADS: '8'}."""

    partition: Optional[str] = None
    """(slurm) Partition; None = the cluster's default."""
    account: Optional[str] = None
    """(slurm) Account charged for the job."""
    qos: Optional[str] = None
    """(slurm) Quality of service."""
    time_min: int = 240
    """(slurm) Wall-clock limit of one allocation in minutes; a requeued job gets a new allocation."""
    gpus_per_node: int = 8
    """(slurm) GPUs requested per node (0 on a CPU partition, then set nproc_per_node)."""
    cpus_per_node: Optional[int] = None
    """(slurm) CPU cores per node (the one task per node holds them all); None = the cluster's default."""
    mem_gb: Optional[int] = None
    """(slurm) Memory per node in GB; None = the cluster's default."""
    constraint: Optional[str] = None
    """(slurm) Node features the job needs, e.g. 'h200'."""
    requeue: bool = True
    """(slurm) Requeue the job when it is pre-empted or reaches time_min; it resumes from the newest checkpoint."""
    max_timeouts: int = 3
    """(slurm) Requeues after reaching time_min before giving up (pre-emptions do not count)."""
    signal_delay_s: int = 120
    """(slurm) Seconds before the time limit at which the ranks are told to checkpoint and stop; they
    get this minus 30 s, the rest is for the requeue."""
    setup: List[str] = field(default_factory=list)
    """(slurm) Shell lines run on the first node before the ranks start (module load ..., source .venv/bin/activate)."""
    sbatch_extra: Dict[str, Any] = field(default_factory=dict)
    """(slurm) More #SBATCH flags, e.g. {exclusive: true, mail-type: END}."""

    hosts: List[str] = field(default_factory=list)
    """(deepspeed) Hosts written to the hostfile, node 0 first; empty = this machine (localhost)."""
    hostfile: Optional[str] = None
    """(deepspeed) An existing hostfile ('host slots=N' lines) to use instead of hosts."""
    deepspeed_launcher: str = "pdsh"
    """(deepspeed) How the DeepSpeed launcher reaches the other hosts: pdsh, openmpi, mvapich, mpich, impi or slurm."""


@dataclass
class LaunchConfig:
    """Root of the launcher's own config (`python -m launch job=... cluster=...`)."""

    job: str = "train"
    """What every rank runs: 'train' (`python -m train`) or 'distill' (`python -m distill`)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register_launch_configs() -> None:
    """Register the root `launch` (schema + `cluster: local` by default) in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="launch_schema", node=LaunchConfig)
    cs.store(group="cluster", name="schema", node=ClusterConfig)
    cs.store(name="launch", node={"defaults": ["launch_schema", {"cluster": "local"}, "_self_"]})
