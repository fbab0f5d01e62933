"""The run directory: refuse to clobber an earlier run, record what produced this one (style rule 9).

Layout: config.yaml (the resolved config), env.json (git commit, package versions, hardware),
metrics.jsonl, eval.jsonl, events.jsonl, train.log, checkpoints/, wandb/, summary.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

PACKAGES = ("torch", "deepspeed", "megatron-core", "hydra-core", "datasets", "tokenizers", "wandb",
            "numpy", "triton", "tilelang")


def default_run_dir(name: str) -> Path:
    """runs/<name>-<UTC time>: chosen once, by the process that composes the config."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def holds_run(path: Path) -> bool:
    """A finished step, a checkpoint or a summary is a run; a start that failed before step 1 is not."""
    if not path.is_dir():
        return False
    metrics = path / "metrics.jsonl"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (path / "summary.json").exists()
            or any((path / "checkpoints").glob("step_*")))


def prepare_run_dir(path: Path, resume: str, overwrite: bool) -> Path:
    """Create the run directory; refuse one that holds a run unless resuming or overwriting.

    Overwriting moves the old run to <dir>.replaced-<n>: an earlier run's outputs are never deleted.
    """
    path = path.expanduser()
    if holds_run(path):
        if overwrite:
            n = 1
            while path.with_name(f"{path.name}.replaced-{n}").exists():
                n += 1
            path.rename(path.with_name(f"{path.name}.replaced-{n}"))
        elif resume == "never":
            raise ValueError(f"run directory {path} already holds a run; pass run.resume=auto to "
                             "continue it, run.overwrite=true to start afresh (the old run is moved "
                             "aside), or choose another run.dir")
    elif path.exists() and not path.is_dir():
        raise ValueError(f"run.dir={path} exists and is not a directory; choose another run.dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10)
        if out.returncode:
            return None
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Git commit, package versions and hardware of this process."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "packages": versions,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }


def write_run_record(run_dir: Path, cfg) -> None:
    """config.yaml (resolved) and env.json, written atomically."""
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    atomic_write_text(run_dir / "env.json", json.dumps(environment(), indent=2))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
