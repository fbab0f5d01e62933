"""`v4-report RUN_DIR`: a run's dashboard as one PNG and a self-contained HTML page, without wandb.

Renders from the run directory that train/loop.py and train/metrics.py write (train/rundir.py lists
its layout): metrics.jsonl (one object per optimizer step), eval.jsonl, events.jsonl, summary.json,
config.yaml and env.json. The panels mirror the wandb dashboard of the issue: loss with spike and
rollback events marked, LR and grad norm, throughput (and MFU when logged), the per-expert load
heatmap and load imbalance, and the per-unit mHC Sinkhorn row error and max comb logit.

Reading is tolerant by design: a report is most needed for runs that went wrong, so missing keys,
non-finite values written as strings ("nan", "inf"), a truncated last line and steps logged twice
(after a rollback or a resume) are all rendered rather than rejected.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import cm, colormaps, colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

FORMATS = ("png", "html")
PANELS = ("loss", "lr_grad_norm", "throughput", "load_imbalance", "sinkhorn_row_error",
          "comb_logit", "expert_load_latest", "expert_load_mean")
# Event kind -> (colour, short label) of its marker; kinds not listed are drawn grey.
EVENT_STYLE = {
    "loss_spike": ("tab:red", "spike"),
    "rollback": ("tab:purple", "rollback"),
    "anticipatory_routing_on": ("tab:orange", "AR on"),
    "anticipatory_routing_off": ("tab:orange", "AR off"),
}
MAX_EVENT_LABELS = 20   # more text labels than this overlap into a smudge; the lines still show


# ---------------------------------------------------------------- reading the run directory

def as_float(value: Any) -> float:
    """A logged scalar as float: numbers as they are, "nan"/"inf" strings parsed, anything else nan."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def as_float_matrix(rows: Sequence[Any]) -> np.ndarray:
    """Ragged per-step lists (list of floats, or list of lists of floats) -> nan-padded float array.

    rows: one entry per step; an entry that is not a list becomes a row of nan. Returns
    [steps, width] for lists of floats and [steps, height, width] for lists of lists.
    """
    nested = any(isinstance(r, list) and r and isinstance(r[0], list) for r in rows)
    if nested:
        height = max((len(r) for r in rows if isinstance(r, list)), default=0)
        width = max((len(inner) for r in rows if isinstance(r, list) for inner in r
                     if isinstance(inner, list)), default=0)
        out = np.full((len(rows), height, width), np.nan)
        for i, r in enumerate(rows):
            for j, inner in enumerate(r if isinstance(r, list) else []):
                if isinstance(inner, list):
                    out[i, j, :len(inner)] = [as_float(v) for v in inner]
        return out
    width = max((len(r) for r in rows if isinstance(r, list)), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        if isinstance(r, list):
            out[i, :len(r)] = [as_float(v) for v in r]
    return out


def read_jsonl(path: Path) -> Tuple[List[dict], int]:
    """The JSON objects of a .jsonl file and how many lines were unreadable (e.g. cut by a crash)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict) and "step" in obj and math.isfinite(as_float(obj["step"])):
            rows.append(obj)
        else:
            bad += 1
    return rows, bad


def keep_last_per_step(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """Split rows into the run's final trajectory (last row logged for each step, by step) and the
    superseded ones: steps logged again after a rollback or a resume replace the earlier lines."""
    last_index = {int(as_float(r["step"])): i for i, r in enumerate(rows)}
    kept = sorted((rows[i] for i in last_index.values()), key=lambda r: as_float(r["step"]))
    kept_ids = set(last_index.values())
    superseded = [r for i, r in enumerate(rows) if i not in kept_ids]
    return kept, superseded


@dataclass
class RunRecord:
    """What a run directory holds, parsed for plotting."""

    run_dir: Path
    metrics: List[dict]
    """Final trajectory: one metrics.jsonl row per optimizer step, sorted by step."""
    superseded: List[dict]
    """metrics.jsonl rows replaced by a later line for the same step (rolled back or resumed)."""
    evals: List[dict]
    """eval.jsonl rows, one per step (last wins), sorted by step."""
    events: List[dict]
    """events.jsonl rows in file order."""
    summary: dict
    config: dict
    env: dict
    warnings: List[str] = field(default_factory=list)
    """Problems met while reading (unreadable lines, unreadable files), shown in the HTML page."""

    def series(self, key: str, rows: Optional[List[dict]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar metric over the rows that carry it; values may hold nan."""
        rows = self.metrics if rows is None else rows
        have = [r for r in rows if key in r and not isinstance(r[key], (list, dict))]
        return (np.array([as_float(r["step"]) for r in have]), np.array([as_float(r[key]) for r in have]))

    def list_series(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        """(steps, nan-padded array) of a per-layer/per-unit list metric over the rows that carry it."""
        have = [r for r in self.metrics if isinstance(r.get(key), list)]
        return np.array([as_float(r["step"]) for r in have]), as_float_matrix([r[key] for r in have])

    def eval_domains(self) -> List[str]:
        return sorted({k for r in self.evals for k in r if k != "step" and k.endswith("_loss")})


def _read_json(path: Path, problems: List[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (json.JSONDecodeError, OSError) as exc:
        problems.append(f"{path.name} unreadable ({exc})")
        return {}


def _read_config(path: Path, problems: List[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        return data if isinstance(data, dict) else {}
    except Exception as exc:  # noqa: BLE001 - a broken config.yaml must not stop the report
        problems.append(f"config.yaml unreadable ({exc})")
        return {}


def load_run(run_dir: Path) -> RunRecord:
    """Parse a run directory; ValueError when it holds no readable metrics.jsonl."""
    run_dir = Path(run_dir).expanduser()
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl; pass the run directory that `v4-train` wrote "
                         "(run.dir, or runs/<name>-<time>)")
    problems: List[str] = []
    rows, bad = read_jsonl(metrics_path)
    if bad:
        problems.append(f"metrics.jsonl: skipped {bad} unreadable line(s)")
    if not rows:
        raise ValueError(f"{metrics_path} holds no readable step rows; the run stopped before its first "
                         "optimizer step (see train.log)")
    metrics, superseded = keep_last_per_step(rows)
    eval_rows, bad = read_jsonl(run_dir / "eval.jsonl")
    if bad:
        problems.append(f"eval.jsonl: skipped {bad} unreadable line(s)")
    events, bad = read_jsonl(run_dir / "events.jsonl")
    if bad:
        problems.append(f"events.jsonl: skipped {bad} unreadable line(s)")
    return RunRecord(run_dir=run_dir, metrics=metrics, superseded=superseded,
                     evals=keep_last_per_step(eval_rows)[0], events=events,
                     summary=_read_json(run_dir / "summary.json", problems),
                     config=_read_config(run_dir / "config.yaml", problems),
                     env=_read_json(run_dir / "env.json", problems), warnings=problems)


# ---------------------------------------------------------------- the figure

def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling median ignoring nan (throughput is noisy: first steps compile, CPUs are shared)."""
    if window <= 1 or len(values) < window:
        return values.copy()
    pad = window // 2
    padded = np.pad(values, (pad, window - 1 - pad), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(windows), windows, np.nan)
        out = np.full(len(values), np.nan)
        has = np.isfinite(finite).any(axis=1)
        out[has] = np.nanmedian(finite[has], axis=1)
    return out


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_events(ax: Axes, events: List[dict], labels: bool) -> None:
    """Vertical lines at event steps (labelled on the loss panel); anticipatory routing as spans.

    Events of one step (a spike and the rollback it caused) share one label so the texts don't overlap.
    """
    top = blended_transform_factory(ax.transData, ax.transAxes)
    on_since: Optional[float] = None
    label_at: Dict[float, List[str]] = {}
    colour_at: Dict[float, str] = {}
    for ev in events:
        step, kind = as_float(ev.get("step")), str(ev.get("kind", "event"))
        if not math.isfinite(step):
            continue
        if kind == "anticipatory_routing_on":
            on_since = step if on_since is None else on_since
        elif kind == "anticipatory_routing_off" and on_since is not None:
            ax.axvspan(on_since, step, color="tab:orange", alpha=0.08, lw=0)
            on_since = None
        colour, short = EVENT_STYLE.get(kind, ("0.45", kind))
        ax.axvline(step, color=colour, lw=1.0 if labels else 0.7, ls="--", alpha=0.8, gid=f"event:{kind}")
        label_at.setdefault(step, []).append(short)
        colour_at.setdefault(step, colour)
    if on_since is not None:
        ax.axvspan(on_since, ax.get_xlim()[1], color="tab:orange", alpha=0.08, lw=0)
    if labels:
        for step in list(label_at)[:MAX_EVENT_LABELS]:
            ax.text(step, 0.98, f" {', '.join(label_at[step])} @{int(step)}", transform=top, rotation=90,
                    va="top", ha="right", fontsize=7, color=colour_at[step], gid="event_label")


def _mark_nonfinite(ax: Axes, steps: np.ndarray, values: np.ndarray, what: str) -> None:
    """A red x at the bottom of the panel for each step whose value is nan/inf (the line has a gap)."""
    bad_steps = steps[~np.isfinite(values)] if len(steps) else np.array([])
    if len(bad_steps):
        bottom = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(bad_steps, np.full(len(bad_steps), 0.03), "x", color="red", ms=8, mew=2, transform=bottom,
                label=f"non-finite {what} ({len(bad_steps)} step(s))", gid="nonfinite")


def _plot_loss(ax: Axes, run: RunRecord) -> None:
    steps, lm = run.series("lm_loss")
    if run.superseded:
        s_steps, s_loss = run.series("lm_loss", run.superseded)
        ax.plot(s_steps, s_loss, "o", color="0.55", ms=3.5, label="lm_loss superseded (rolled back / resumed)")
    if len(steps):
        ax.plot(steps, lm, color="tab:blue", lw=1.2, label="lm_loss")
    t_steps, total = run.series("loss")
    if len(t_steps):
        ax.plot(t_steps, total, color="tab:blue", lw=0.8, alpha=0.45, label="loss (total: lm + mtp + aux)")
    for i, domain in enumerate(run.eval_domains()):
        have = [r for r in run.evals if domain in r]
        ax.plot([as_float(r["step"]) for r in have], [as_float(r[domain]) for r in have], "o-", ms=4, lw=1,
                color=f"C{(i + 2) % 10}", label=f"eval {domain}")
    _mark_nonfinite(ax, t_steps, total, "loss")
    ln_vocab = as_float(run.summary.get("ln_vocab"))
    if math.isfinite(ln_vocab):
        ax.axhline(ln_vocab, color="0.5", lw=0.8, ls=":", label=f"ln vocab = {ln_vocab:.2f}")
    _mark_events(ax, run.events, labels=True)
    ax.set_title("training loss (eval per domain; events marked)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="upper right", ncol=2)


def _plot_lr_grad_norm(ax: Axes, run: RunRecord) -> None:
    steps, grad_norm = run.series("grad_norm")
    lr_steps, lr = run.series("lr")
    if not len(steps) and not len(lr_steps):
        return _no_data(ax, "no lr / grad_norm logged")
    ax.plot(steps, grad_norm, color="tab:green", lw=1, label="grad norm")
    if np.any(np.isfinite(grad_norm) & (grad_norm > 0)):
        ax.set_yscale("log")
    _mark_nonfinite(ax, steps, grad_norm, "grad norm")
    ax.set_ylabel("grad norm", color="tab:green")
    ax.set_xlabel("step")
    _mark_events(ax, run.events, labels=False)
    lr_ax = ax.twinx()
    lr_ax.plot(lr_steps, lr, color="tab:gray", lw=1.2, label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    # Axis labels in the line colours name the two curves: a legend would sit on one of them, so
    # there is one only to explain non-finite markers.
    ax.set_title("grad norm (pre-clip, log) and learning rate")
    if np.any(~np.isfinite(grad_norm)):
        ax.legend(fontsize=7, loc="lower right")


def _plot_throughput(ax: Axes, run: RunRecord) -> None:
    steps, tok_s = run.series("tokens_per_s")
    if not len(steps):
        return _no_data(ax, "no tokens_per_s logged")
    window = max(1, len(steps) // 20)
    if window > 1:
        ax.plot(steps, tok_s, color="tab:cyan", lw=0.7, alpha=0.5, label="tokens/s")
        ax.plot(steps, rolling_median(tok_s, window), color="tab:blue", lw=1.5,
                label=f"tokens/s, rolling median of {window} steps")
    else:
        ax.plot(steps, tok_s, color="tab:blue", lw=1.5, label="tokens/s")
    ax.set_ylabel("tokens / s")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0]
    mfu_steps, mfu = run.series("mfu")
    if len(mfu_steps) and np.isfinite(mfu).any():
        # MFU is written as a fraction; show percent (a value above 1.5 means it already was one).
        percent = mfu * 100 if np.nanmax(mfu) <= 1.5 else mfu
        mfu_ax = ax.twinx()
        mfu_ax.plot(mfu_steps, percent, color="tab:red", lw=1.2, label="MFU (%)")
        mfu_ax.set_ylabel("MFU (%)", color="tab:red")
        mfu_ax.set_ylim(bottom=0)
        handles += mfu_ax.get_legend_handles_labels()[0]
    ax.set_title("throughput" + (" and MFU" if len(mfu_steps) else ""))
    ax.legend(handles=handles, fontsize=7, loc="lower right")


def _depth_lines(ax: Axes, steps: np.ndarray, values_SN: np.ndarray, what: str) -> None:
    """One line per layer/unit, coloured by depth, with a colour bar instead of an N-entry legend."""
    count = values_SN.shape[1]
    norm = colors.Normalize(vmin=0, vmax=max(count - 1, 1))
    cmap = colormaps["viridis"]
    for n in range(count):
        ax.plot(steps, values_SN[:, n], color=cmap(norm(n)), lw=0.9, alpha=0.85, marker="." if len(steps) < 30 else None,
                ms=3, gid=f"{what}:{n}")
    bar = ax.figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, fraction=0.05)
    if count <= 16:
        bar.set_ticks(range(count))
    bar.set_label(what, fontsize=8)


def _plot_load_imbalance(ax: Axes, run: RunRecord) -> None:
    steps, imbalance_SL = run.list_series("load_imbalance")
    if not len(steps) or imbalance_SL.shape[1] == 0:
        return _no_data(ax, "no load_imbalance logged (model without MoE layers?)")
    _depth_lines(ax, steps, imbalance_SL, "MoE layer")
    max_steps, imbalance_max = run.series("load_imbalance_max")
    ax.plot(max_steps, imbalance_max, color="black", lw=1.5, label="max over layers")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":", label="balanced")
    ax.set_title("expert load imbalance (max / mean load) per MoE layer")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean")
    ax.legend(fontsize=7, loc="upper right")


def _plot_sinkhorn(ax: Axes, run: RunRecord) -> None:
    steps, error_SU = run.list_series("sinkhorn_row_error")
    if not len(steps) or error_SU.shape[1] == 0:
        steps, error_max = run.series("sinkhorn_row_error_max")
        if not len(steps):
            return _no_data(ax, "no mHC statistics logged (train.stats_every=0?)")
        error_SU = error_max[:, None]
    _depth_lines(ax, steps, error_SU, "mHC unit (2 per block: attn, ffn)")
    positive = error_SU[np.isfinite(error_SU) & (error_SU > 0)]
    if positive.size:
        ax.set_yscale("log")
        # At least a decade either side: fp32 round-off (~1e-6) must not fill the panel like a trend.
        ax.set_ylim(positive.min() / 10, positive.max() * 10)
    ax.set_title("mHC Sinkhorn row error per unit (|row sum - 1|)")
    ax.set_xlabel("step")
    ax.set_ylabel("row error")


def _plot_comb_logit(ax: Axes, run: RunRecord) -> None:
    # loop.py logs the max over units as comb_logit_max; a per-unit list (max_comb_logit, as
    # model stats name it) is drawn per unit when a run carries it.
    steps, per_unit_SU = run.list_series("max_comb_logit")
    if len(steps) and per_unit_SU.shape[1]:
        _depth_lines(ax, steps, per_unit_SU, "mHC unit")
    max_steps, comb_max = run.series("comb_logit_max")
    if not len(steps) and not len(max_steps):
        return _no_data(ax, "no mHC statistics logged (train.stats_every=0?)")
    if len(max_steps):
        ax.plot(max_steps, comb_max, color="black", lw=1.5, marker="." if len(max_steps) < 30 else None,
                label="max over units")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_title("mHC max |comb logit|")
    ax.set_xlabel("step")
    ax.set_ylabel("|logit|")


def expert_load_maps(run: RunRecord, last_n: int) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], List[float]]:
    """(latest [L, E], mean over the last `last_n` logged steps [L, E], steps used), each as load over
    the uniform share 1/E so that 1.0 means balanced whatever the expert count; None without data."""
    # Only the window is parsed: a full-size run logs layers x experts numbers on every step.
    window_rows = [r for r in run.metrics if isinstance(r.get("expert_load"), list)][-max(last_n, 1):]
    load_SLE = as_float_matrix([r["expert_load"] for r in window_rows])
    if not window_rows or load_SLE.ndim != 3 or load_SLE.shape[2] == 0:
        return None, None, []
    n_experts = np.sum(np.isfinite(load_SLE), axis=2, keepdims=True).clip(min=1)
    relative_SLE = load_SLE * n_experts
    with warnings.catch_warnings():     # a layer missing from every row of the window stays nan
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_LE = np.nanmean(relative_SLE, axis=0)
    return relative_SLE[-1], mean_LE, [as_float(r["step"]) for r in window_rows]


def moe_layer_labels(run: RunRecord, count: int) -> List[str]:
    """Names of the expert_load rows: model.moe_layers() order is trunk layers, then MTP blocks, the
    first n_hash_layers hash-routed; plain indices when config.yaml does not account for `count`."""
    model = run.config.get("model") or {}
    n_layers, n_mtp = model.get("n_layers"), model.get("n_mtp_layers", 0)
    if not isinstance(n_layers, int) or not isinstance(n_mtp, int) or n_layers + n_mtp != count:
        return [str(i) for i in range(count)]
    n_hash = model.get("n_hash_layers", 0) if isinstance(model.get("n_hash_layers"), int) else 0
    return [f"{i} hash" if i < n_hash else str(i) for i in range(n_layers)] + [f"mtp {i}" for i in range(n_mtp)]


def _plot_heatmap(ax: Axes, load_LE: Optional[np.ndarray], norm: colors.Normalize, title: str,
                  layer_labels: Sequence[str] = ()) -> None:
    if load_LE is None:
        return _no_data(ax, "no expert_load logged (model without MoE layers?)")
    image = ax.imshow(load_LE, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    n_layers, n_experts = load_LE.shape
    if n_layers * n_experts <= 256:     # small grids: the numbers are readable, so print them
        for (i, j), value in np.ndenumerate(load_LE):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(float(norm(value)) - 0.5) > 0.3 else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers), list(layer_labels) if len(layer_labels) == n_layers else None)
    if n_experts <= 32:
        ax.set_xticks(range(n_experts))
    ax.set_title(title)
    bar = ax.figure.colorbar(image, ax=ax, pad=0.01, fraction=0.05)
    bar.set_label("load / uniform share (1 = balanced)", fontsize=8)


def build_figure(run: RunRecord, last_n: int = 50) -> Tuple[Figure, Dict[str, Axes]]:
    """The report figure and its panels by name (PANELS); not bound to pyplot, so nothing global."""
    fig = Figure(figsize=(20, 13), dpi=100, layout="constrained")
    grid = fig.add_gridspec(3, 3)
    panels = {
        "loss": fig.add_subplot(grid[0, :2]),
        "lr_grad_norm": fig.add_subplot(grid[0, 2]),
        "throughput": fig.add_subplot(grid[1, 0]),
        "load_imbalance": fig.add_subplot(grid[1, 1]),
        "sinkhorn_row_error": fig.add_subplot(grid[1, 2]),
        "expert_load_latest": fig.add_subplot(grid[2, 0]),
        "expert_load_mean": fig.add_subplot(grid[2, 1]),
        "comb_logit": fig.add_subplot(grid[2, 2]),
    }
    _plot_loss(panels["loss"], run)
    _plot_lr_grad_norm(panels["lr_grad_norm"], run)
    _plot_throughput(panels["throughput"], run)
    _plot_load_imbalance(panels["load_imbalance"], run)
    _plot_sinkhorn(panels["sinkhorn_row_error"], run)
    _plot_comb_logit(panels["comb_logit"], run)
    latest, mean, window_steps = expert_load_maps(run, last_n)
    finite_max = max((float(np.nanmax(m)) for m in (latest, mean) if m is not None and np.isfinite(m).any()),
                     default=2.0)
    norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, finite_max))
    last_step = f"step {int(window_steps[-1])}" if window_steps else ""
    labels = moe_layer_labels(run, latest.shape[0]) if latest is not None else []
    _plot_heatmap(panels["expert_load_latest"], latest, norm, f"expert load, latest ({last_step})", labels)
    span = f"steps {int(window_steps[0])}-{int(window_steps[-1])}" if window_steps else ""
    _plot_heatmap(panels["expert_load_mean"], mean, norm,
                  f"expert load, mean of last {len(window_steps)} logged steps ({span})", labels)
    last = run.metrics[-1]
    fig.suptitle(f"v4forge run {run.run_dir.name}: {len(run.metrics)} steps (last step {last['step']}), "
                 f"{len(run.events)} event(s)", fontsize=14)
    return fig, panels


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")      # a bare Figure saves through the Agg canvas
    return buffer.getvalue()


# ---------------------------------------------------------------- the HTML page

def _cell(value: Any) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:,.4g}" if math.isfinite(value) else str(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, default=str))
    return html.escape(str(value))


def _table(rows: List[Tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_cell(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def summary_rows(run: RunRecord) -> List[Tuple[str, Any]]:
    """Key facts of the run: summary.json, the config fields that size it, where it ran."""
    rows: List[Tuple[str, Any]] = [("run directory", str(run.run_dir))]
    for key in ("steps", "tokens", "tokens_per_s", "first_loss", "final_loss", "ln_vocab", "resumed_from",
                "stopped_by_signal"):
        if run.summary.get(key) is not None:
            rows.append((key, run.summary[key]))
    for name, value in sorted((run.summary.get("eval") or {}).items()):
        rows.append((f"eval {name}", value))
    if not run.summary:
        rows.append(("summary.json", "absent (run still going, or it crashed)"))
    wanted = {"model": ("dim", "n_layers", "n_routed_experts", "n_activated_experts", "vocab_size", "hc_mult"),
              "train": ("max_steps", "seq_len", "global_batch", "micro_batch"),
              "optim": ("lr", "warmup_steps"), "data": ("source",), "run": ("name", "seed")}
    for group, keys in wanted.items():
        section = run.config.get(group) or {}
        for key in keys:
            if key in section:
                rows.append((f"{group}.{key}", section[key]))
    for key in ("git_commit", "gpus", "world_size", "host"):
        if run.env.get(key) not in (None, [], ""):
            rows.append((key, run.env[key]))
    return rows


def events_table(events: List[dict]) -> str:
    if not events:
        return "<p>No events (no loss spikes, rollbacks or routing switches).</p>"
    head = "<tr><th>step</th><th>kind</th><th>message</th><th>details</th></tr>"
    body = []
    for ev in events:
        details = {k: v for k, v in ev.items() if k not in ("step", "kind", "message")}
        body.append(f"<tr class='event {html.escape(str(ev.get('kind', '')))}'><td>{_cell(ev.get('step'))}</td>"
                    f"<td>{_cell(ev.get('kind', ''))}</td><td>{_cell(ev.get('message', ''))}</td>"
                    f"<td>{_cell(details) if details else ''}</td></tr>")
    return f"<table class='events'>{head}{''.join(body)}</table>"


def eval_table(run: RunRecord) -> str:
    domains = run.eval_domains()
    if not domains:
        return "<p>No evaluations logged.</p>"
    head = "<tr><th>step</th>" + "".join(f"<th>{html.escape(d)}</th>" for d in domains) + "</tr>"
    body = "".join("<tr><td>" + _cell(r["step"]) + "</td>" +
                   "".join(f"<td>{_cell(as_float(r[d])) if d in r else ''}</td>" for d in domains) + "</tr>"
                   for r in run.evals)
    return f"<table class='events'>{head}{body}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
table.kv th{background:#f4f4f4}tr.loss_spike td{background:#fde8e8}tr.rollback td{background:#efe6f7}
.warn{color:#a15c00}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}"""


def render_html(run: RunRecord, png: bytes) -> str:
    """One self-contained page: the figure as a base64 data URI, summary, events and eval tables."""
    image = base64.b64encode(png).decode("ascii")
    warnings = "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in run.warnings)
    superseded = (f"<p>{len(run.superseded)} metrics line(s) were superseded by a later line for the same "
                  "step (rollback or resume); the plots show them in grey.</p>") if run.superseded else ""
    config_text = (run.run_dir / "config.yaml").read_text() if (run.run_dir / "config.yaml").is_file() else ""
    config_block = (f"<details><summary>config.yaml</summary><pre>{html.escape(config_text)}</pre></details>"
                    if config_text else "")
    title = f"v4forge report: {run.run_dir.name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
{f"<ul>{warnings}</ul>" if warnings else ""}
<h2>Summary</h2>{_table(summary_rows(run))}
<h2>Dashboard</h2><img alt="training dashboard" src="data:image/png;base64,{image}">{superseded}
<h2>Events ({len(run.events)})</h2>{events_table(run.events)}
<h2>Evaluations</h2>{eval_table(run)}
{config_block}
</body></html>
"""


# ---------------------------------------------------------------- command line

def parse_formats(text: str) -> List[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--format {text!r}: choose a comma list of {', '.join(FORMATS)} (e.g. png,html)")
    return formats


def write_report(run_dir: Path, out_dir: Optional[Path] = None, formats: Sequence[str] = FORMATS,
                 last_n: int = 50) -> Dict[str, Path]:
    """Render RUN_DIR's report into out_dir (default RUN_DIR/report); returns {format: path}."""
    run = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, _ = build_figure(run, last_n)
    png = figure_png(fig)
    written = {}
    if "png" in formats:
        written["png"] = out_dir / "report.png"
        written["png"].write_bytes(png)
    if "html" in formats:
        written["html"] = out_dir / "report.html"
        written["html"].write_text(render_html(run, png), encoding="utf-8")
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="v4-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run directory written by v4-train")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/report)")
    parser.add_argument("--format", default="png,html", help="comma list of png, html (default png,html)")
    parser.add_argument("--last-n", type=int, default=50,
                        help="average the expert-load heatmap over the last N logged steps (default 50)")
    args = parser.parse_args(argv)
    try:
        if args.last_n < 1:
            raise ValueError(f"--last-n {args.last_n}: must be at least 1")
        written = write_report(args.run_dir, args.out, parse_formats(args.format), args.last_n)
    except ValueError as exc:           # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for path in written.values():
        print(path)


if __name__ == "__main__":
    main()
