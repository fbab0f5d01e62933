"""`python -m distill` (= `v4-distill`): compose configs/distill.yaml with Hydra, validate, distil.

`python -m distill --config-file RUN_DIR/config.yaml` runs a config composed and resolved once
already (e.g. to rerun a job, with run.resume=auto edited in); see train/cli.py.
"""

from __future__ import annotations

from distill.config import DistillJobConfig, register_configs
from train import cli

register_configs()


def load_resolved(path: str) -> DistillJobConfig:
    return cli.load_resolved(DistillJobConfig, path)


def _run_fn():
    from distill.pipeline import run
    return run


main = cli.job_main(DistillJobConfig, "distill", _run_fn)

if __name__ == "__main__":
    main()
