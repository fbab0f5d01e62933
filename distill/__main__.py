"""`python -m distill` (= `v4-distill`): compose configs/distill.yaml with Hydra, validate, distil.

`python -m distill --config-file RUN_DIR/config.yaml` runs a config that was composed and resolved
once already (e.g. to rerun a job, with run.resume=auto edited in).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from distill.config import DistillJobConfig, register_configs

register_configs()


def load_resolved(path: str) -> DistillJobConfig:
    """A config.yaml written by a distillation run, checked against the schema."""
    merged = OmegaConf.merge(OmegaConf.structured(DistillJobConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def _run(make_cfg) -> None:
    from distill.pipeline import run

    try:
        run(make_cfg())
    except ValueError as exc:           # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="../configs", config_name="distill", version_base=None)
def _hydra_main(dict_cfg: DictConfig) -> None:
    _run(lambda: OmegaConf.to_object(dict_cfg))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--config-file":
        path = sys.argv[2]
        _run(lambda: load_resolved(path))
        return
    _hydra_main()


if __name__ == "__main__":
    main()
