"""`python -m launch` (= `v4-launch`): one command for a laptop, a bare multi-node cluster and SLURM.

    python -m launch [--dry-run] [-m] [job=train|distill] [cluster=local|torchrun|slurm|deepspeed]
                     [cluster.<field>=...] [any override of `python -m train`]

For each run (each point of a -m sweep): compose and resolve the config once, fix run.dir, write
run_dir/config.yaml, then start every rank on that file with `python -m <job> --config-file ...`
(style rule 8) through the cluster's launcher. --dry-run prints the per-node commands or the batch
script and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from launch import deepspeed_launcher, slurm, torchrun
from launch.resolve import RunDirs, expand_sweep, prepare, resolve, write_launch_record

LAUNCHERS = {"local": torchrun, "torchrun": torchrun, "slurm": slurm, "deepspeed": deepspeed_launcher}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch", description=__doc__.split("\n\n")[0],
        epilog="Examples: cluster=local cluster.nproc_per_node=2 | cluster=torchrun cluster.nnodes=2 "
               "cluster.master_addr=node0 | cluster=slurm cluster.nnodes=4 cluster.partition=gpu | "
               "-m optim.lr=1e-3,3e-3 cluster=slurm")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the exact per-node commands or the batch script; start and write nothing")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="expand Hydra sweeps (key=a,b) and launch one job per point")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: job=, cluster=, cluster.<field>=, "
                                                     "and those of `python -m train`")
    return parser.parse_args(argv)


def launch(overrides: List[str], dry_run: bool, multirun: bool, argv: List[str]) -> int:
    """Launch every point; returns the first non-zero exit status of a run started here, else 0."""
    points = expand_sweep(overrides, multirun)
    run_dirs = RunDirs(multirun=multirun)
    runs = [resolve(point, run_dirs, index) for index, point in enumerate(points)]  # all checked first
    status = 0
    for run in runs:
        launcher = LAUNCHERS[run.cluster.kind]
        if dry_run:
            prepare(run, dry_run=True)
            header = f"# run {run.run_id}: {run.job.name} on {run.topology.nnodes} node(s) x " \
                     f"{run.topology.nproc_per_node} ranks, config {run.config_path}"
            if multirun:
                header += f"\n# point: {' '.join(run.overrides)}"
            print(header + "\n" + launcher.dry_run_text(run), flush=True)
            continue
        if run.cluster.kind == "slurm":
            slurm.check_available()           # before anything is written
        prepare(run, dry_run=False)
        print(f"[launch] {run.job.name} run {run.run_dir} ({run.cluster.kind}, {run.topology.nnodes} node(s) x "
              f"{run.topology.nproc_per_node} ranks)", file=sys.stderr, flush=True)
        write_launch_record(run, argv, launcher.plan(run))
        rc = launcher.start(run)
        status = status or rc
    return status


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        status = launch(args.overrides, args.dry_run, args.multirun, argv)
    except ValueError as exc:               # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


if __name__ == "__main__":
    main()
