"""`python -m train` (= `v4-train`): compose configs/ with Hydra, validate, train."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from train.config import Config, register_configs

register_configs()


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def _hydra_main(dict_cfg: DictConfig) -> None:
    from train.loop import run

    try:
        cfg: Config = OmegaConf.to_object(dict_cfg)
        run(cfg)
    except ValueError as exc:           # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
