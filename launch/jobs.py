"""The jobs the launcher can start on every rank: `python -m <module> --config-file RUN_DIR/config.yaml`.

A job is a package with a Hydra root config in configs/ and an entry that runs an already resolved
config (`--config-file`, style rule 8). Its config package provides `register_configs()` (the root
schema in Hydra's ConfigStore) and `validate(cfg, world_size)` (cross-concern checks), and its root
config holds the `run` group (`train.config.RunConfig`: dir, name, resume, overwrite) and the
`parallel` group (`train.parallel.ParallelConfig`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """How to compose, check and start one kind of job."""

    name: str
    """Name on the command line (job=<name>)."""
    module: str
    """Package each rank runs with `python -m <module> --config-file RUN_DIR/config.yaml`."""
    config_name: str
    """Root config of the job in configs/ (composed once, by the launcher)."""
    config_module: str
    """Module providing `register_configs()` and `validate(cfg, world_size)`."""

    def load(self):
        """The job's config module, with its schema registered in Hydra's ConfigStore."""
        try:
            module = importlib.import_module(self.config_module)
        except ModuleNotFoundError as exc:
            raise ValueError(f"job={self.name} is not available: {exc.name} is missing (a job needs "
                             f"{self.config_module} with register_configs() and validate())") from None
        module.register_configs()
        return module

    def validate(self, cfg, world_size: int) -> None:
        """The job's own checks plus the parallel layout against the world size (one-line ValueError)."""
        from train.parallel.config import validate_layout

        if hasattr(cfg, "model"):        # a distillation config lays out each model itself
            validate_layout(cfg.parallel, world_size, cfg.model)
        self.load().validate(cfg, world_size)


JOBS = {
    "train": Job(name="train", module="train", config_name="config", config_module="train.config"),
    "distill": Job(name="distill", module="distill", config_name="distill", config_module="distill.config"),
}


def get_job(name: str) -> Job:
    if name not in JOBS:
        raise ValueError(f"job={name!r} is unknown; use one of {sorted(JOBS)}")
    return JOBS[name]
