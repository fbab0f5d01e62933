"""`python -m train` (= `v4-train`): compose configs/ with Hydra, validate, train.

`python -m train --config-file RUN_DIR/config.yaml` skips composition and runs a config that was
composed and resolved once already (what `python -m launch` starts every rank with: style rule 8).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from train.config import Config, register_configs

register_configs()


def load_resolved(path: str) -> Config:
    """A config.yaml written by a run (or the launcher), checked against the schema."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def _run(make_cfg) -> None:
    from train.loop import run

    try:
        run(make_cfg())
    except ValueError as exc:           # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="../configs", config_name="config", version_base=None)
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
