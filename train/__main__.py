"""`python -m train` (= `v4-train`): compose configs/config.yaml with Hydra, validate, train.

`python -m train --config-file RUN_DIR/config.yaml` runs a config composed and resolved once
already (train/cli.py).
"""

from __future__ import annotations

from train import cli
from train.config import Config, register_configs

register_configs()


def load_resolved(path: str) -> Config:
    return cli.load_resolved(Config, path)


def _run_fn():
    from train.loop import run
    return run


main = cli.job_main(Config, "config", _run_fn)

if __name__ == "__main__":
    main()
