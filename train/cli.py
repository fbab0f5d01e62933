"""The command-line shape shared by `python -m train` and `python -m distill`.

Compose `configs/<config_name>.yaml` with Hydra, or with `--config-file RUN_DIR/config.yaml` run a
config composed and resolved once already (what `python -m launch` starts every rank with: style
rule 8). Bad input (a ValueError) ends with one `error:` line and exit code 2, no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf


def load_resolved(schema: type, path: str) -> Any:
    """A config.yaml written by a run (or the launcher), checked against the schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))


def job_main(schema: type, config_name: str, load_run: Callable[[], Callable[[Any], Any]]) -> Callable[[], None]:
    """main() for a job: `load_run()` returns the job's run(cfg) (imported late: it is heavy)."""

    def _run(make_cfg: Callable[[], Any]) -> None:
        try:
            load_run()(make_cfg())
        except ValueError as exc:           # bad input: one line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    configs = str(Path(__file__).resolve().parent.parent / "configs")

    @hydra.main(config_path=configs, config_name=config_name, version_base=None)
    def _hydra_main(dict_cfg: DictConfig) -> None:
        _run(lambda: OmegaConf.to_object(dict_cfg))

    def main() -> None:
        if len(sys.argv) == 3 and sys.argv[1] == "--config-file":
            path = sys.argv[2]
            _run(lambda: load_resolved(schema, path))
            return
        _hydra_main()

    return main
