"""Atomic, verifiable checkpoints: save, list, pick the newest valid one, prune (issue: resume).

A checkpoint is a directory checkpoints/step_<N>/ holding one torch file per part (model,
optimizer, trainer state, ...) and manifest.json with each file's size and SHA-256. It is written
under a temporary name and renamed into place, so a crash mid-save leaves the previous
checkpoints untouched and no half-written step_<N>; a truncated or corrupted file fails its
checksum and the checkpoint is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
KNOWN_GOOD = "KNOWN_GOOD"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, parts: Dict[str, Any], meta: Optional[dict] = None,
                    rank: int = 0, barrier: Callable[[], None] = lambda: None) -> Path:
    """Write parts (name -> picklable object) as checkpoints/step_<step>/ atomically.

    Several ranks may call it together, each with its own part names: rank 0 creates the
    temporary directory, every rank writes its parts, rank 0 then checksums all files, writes the
    manifest and renames the directory into place. `barrier` synchronizes the ranks.
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    for name, obj in parts.items():
        torch.save(obj, tmp / f"{name}.pt")
    barrier()
    if rank == 0:
        files = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                 for path in sorted(tmp.glob("*.pt"))}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"step": step, "files": files, "meta": meta or {}}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():        # a re-save of the same step (e.g. after a rollback) replaces it
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    barrier()
    return final


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if `path` is a complete checkpoint whose files match the manifest, else the reason."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete save)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest ({exc})"
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)"
        if _sha256(file) != entry["sha256"]:
            return f"{name} fails its SHA-256 check (corrupted)"
    return None


def list_checkpoints(root: Path) -> List[Path]:
    """Checkpoint directories under root, oldest first (temporary directories excluded)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_valid_checkpoint(root: Path) -> Optional[Path]:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def latest_known_good(root: Path, layout: Optional[dict] = None) -> Optional[Path]:
    """The newest checkpoint tagged known good (the rollback target), or None; with `layout`,
    only one written under that layout (a run resumed under a new layout skips the old ones)."""
    tagged = [p for p in list_checkpoints(root) if (p / KNOWN_GOOD).exists()
              and (layout is None or checkpoint_meta(p).get("layout") == layout)]
    return tagged[-1] if tagged else None


def _read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def checkpoint_meta(path: Path) -> dict:
    """The meta dict a checkpoint was saved with (layout, config), from its manifest."""
    return _read_manifest(path).get("meta", {})


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at, from its manifest."""
    return int(_read_manifest(path)["step"])


def load_checkpoint(path: Path, parts: Optional[List[str]] = None, verify: bool = True,
                    mmap: bool = False) -> Dict[str, Any]:
    """Load the named parts (all by default) of a checkpoint directory, verifying every file's
    checksum first unless the caller verified this checkpoint already. `mmap`: tensors stay in
    the files (the page cache, shared by the ranks of a node) until read."""
    problem = verify_checkpoint(path) if verify else None
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not usable: {problem}; pick another checkpoint or "
                         "run.resume=auto to take the newest valid one")
    manifest = _read_manifest(path)
    names = parts or [Path(n).stem for n in manifest["files"]]
    out = {name: torch.load(path / f"{name}.pt", map_location="cpu", weights_only=False, mmap=mmap) for name in names}
    out["_meta"] = manifest.get("meta", {})
    out["_step"] = manifest["step"]
    return out


def tag_known_good(path: Path) -> None:
    """Mark a checkpoint as known good (kept by pruning; rollback target)."""
    (path / KNOWN_GOOD).touch()


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, sparing those tagged known good."""
    if keep_last <= 0:
        return
    checkpoints = list_checkpoints(root)
    for path in checkpoints[:-keep_last]:
        if not (path / KNOWN_GOOD).exists():
            shutil.rmtree(path, ignore_errors=True)
    for stale in list(root.glob(".tmp-step_*")) + list(root.glob(".old-step_*")):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path, what: str = "checkpoint") -> Path:
    """A verified checkpoint: the directory `path` itself, or the newest valid checkpoint of the run
    directory `path`. Callers load it with `verify=False` (its files were just checksummed)."""
    found = Path(path).expanduser()
    if (found / "checkpoints").is_dir():
        newest = latest_valid_checkpoint(found / "checkpoints")
        if newest is None:
            raise ValueError(f"{what}={path}: the run has no valid checkpoint")
        return newest
    if not (found / MANIFEST).is_file():
        raise ValueError(f"{what}={path} is neither a checkpoint directory (with {MANIFEST}) nor a run "
                         "directory with checkpoints/; point it at one")
    problem = verify_checkpoint(found)
    if problem is not None:
        raise ValueError(f"{what}={path} is not usable: {problem}; point it at another checkpoint, or at its "
                         "run directory to take the newest valid one")
    return found
