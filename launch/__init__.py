"""Launching v4forge jobs on one machine, a bare multi-node cluster, SLURM or the DeepSpeed launcher (issue 7).

`python -m launch` (launch/__main__.py) composes and resolves the job's config once (resolve.py),
writes run_dir/config.yaml and starts every rank on it through one launcher per cluster kind:
torchrun.py (local and multi-node torchrun), slurm.py (submitit), deepspeed_launcher.py.
The cluster is described by `ClusterConfig` (config.py) and the group configs/cluster/.
"""
