"""Metrics sinks of a run: metrics.jsonl always, wandb (offline by default), events.jsonl.

Only rank 0 writes. wandb failures (missing login for online mode, read-only disk) fall back to
the local files with a warning: a dashboard problem never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


_PER_LAYER = {"sinkhorn_row_error": "mhc/sinkhorn_row_error", "max_comb_logit": "mhc/max_comb_logit",
              "load_imbalance": "moe/load_imbalance"}


def _per_layer_scalars(row: Dict[str, Any]) -> Dict[str, float]:
    """Lists per mHC unit / MoE layer become one wandb series each (e.g. mhc/sinkhorn_row_error/3)."""
    out = {}
    for key, prefix in _PER_LAYER.items():
        for i, value in enumerate(row.get(key) or []):
            if isinstance(value, (int, float)):
                out[f"{prefix}/{i}"] = value
    return out


def _load_heatmap(expert_load: List[List[float]], step: int):
    """Per-expert load (layers x experts, relative to a uniform share) as a wandb image."""
    import numpy as np
    import wandb
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    load = np.asarray(expert_load, dtype=float)
    load = load * load.shape[1]
    fig = Figure(figsize=(max(4, load.shape[1] * 0.25), max(2, load.shape[0] * 0.3)))
    ax = fig.add_subplot()
    image = ax.imshow(load, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load / uniform share, step {step}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    return wandb.Image(pixels)


class MetricsLogger:
    """Appends one JSON object per optimizer step to metrics.jsonl and mirrors it to wandb."""

    def __init__(self, run_dir: Path, logging_cfg, run_name: str, config: dict, enabled: bool = True,
                 resume: bool = False):
        self.run_dir, self.enabled = run_dir, enabled
        self.wandb = None
        if not enabled:
            return
        self._metrics = open(run_dir / "metrics.jsonl", "a")
        self._eval = open(run_dir / "eval.jsonl", "a")
        self._events = open(run_dir / "events.jsonl", "a")
        if logging_cfg.wandb and logging_cfg.wandb_mode != "disabled":
            try:
                import wandb
                run_id_file = run_dir / "wandb_run_id"
                run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else uuid.uuid4().hex[:8]
                run_id_file.write_text(run_id)
                self.wandb = wandb.init(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity,
                                        name=run_name, dir=str(run_dir), mode=logging_cfg.wandb_mode,
                                        config=config, id=run_id, resume="allow",
                                        settings=wandb.Settings(silent=True, console="off"))
                self._events_rows: List[list] = []
            except Exception as exc:  # noqa: BLE001 - any wandb failure must not stop training
                log.warning("wandb disabled for this run (%s); metrics stay in metrics.jsonl", exc)
                self.wandb = None

    def log_step(self, row: Dict[str, Any], extra_wandb: Optional[Dict[str, Any]] = None) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in row.items()}
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            try:
                payload = {k: v for k, v in clean.items() if isinstance(v, (int, float))}
                payload.update(_per_layer_scalars(clean))
                if clean.get("expert_load"):
                    payload["moe/expert_load_heatmap"] = _load_heatmap(clean["expert_load"], int(row["step"]))
                payload.update(extra_wandb or {})
                self.wandb.log(payload, step=int(row["step"]))
            except Exception as exc:  # noqa: BLE001 - a dashboard problem never stops training
                log.warning("wandb logging failed at step %s (%s); continuing with metrics.jsonl only",
                            row.get("step"), exc)
                self.wandb = None

    def log_eval(self, step: int, losses: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._eval.write(json.dumps({"step": step, **losses}) + "\n")
        self._eval.flush()
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in losses.items()}, step=step)

    def log_event(self, step: int, kind: str, message: str, **fields: Any) -> None:
        """A discrete event (loss spike, rollback, ...): events.jsonl, a wandb alert and table row."""
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "message": message, **{k: _plain(v) for k, v in fields.items()}}
        self._events.write(json.dumps(row) + "\n")
        self._events.flush()
        if self.wandb is not None:
            import wandb
            try:
                self.wandb.alert(title=f"v4forge: {kind}", text=f"step {step}: {message}",
                                 level=wandb.AlertLevel.WARN)
            except Exception as exc:  # noqa: BLE001 - alerts are unsupported offline in some versions
                log.debug("wandb.alert failed: %s", exc)
            self._events_rows.append([step, kind, message])
            self.wandb.log({"events": wandb.Table(columns=["step", "kind", "message"], data=self._events_rows)},
                           step=step)

    def close(self, summary: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        for f in (self._metrics, self._eval, self._events):
            f.close()
        if self.wandb is not None:
            if summary:
                for k, v in summary.items():
                    if isinstance(v, (int, float, str)):
                        self.wandb.summary[k] = v
            self.wandb.finish()
