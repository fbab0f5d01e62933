"""`v4-report RUN_DIR` (train/report.py) on a small synthetic run directory (issue: dashboards).

The run directory carries what makes a report worth having: a loss spike and a rollback (steps
11-14 logged twice), a non-finite loss written as the string "nan", anticipatory routing switched
on and off, mHC statistics every 5 steps and a last line cut short by a crash.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.report import PANELS, build_figure, expert_load_maps, load_run, main, write_report

ROOT = Path(__file__).resolve().parents[2]
STEPS, LAYERS, EXPERTS, UNITS = 30, 3, 4, 4
NAN_STEP, SPIKE_STEP, ROLLBACK_STEP = 20, 14, 14
DOMAINS = ("code", "math")


def expert_load(step: int):
    """Layer l routes a growing share to expert l: fractions that differ by layer and by step."""
    loads = []
    for layer in range(LAYERS):
        skew = 0.01 * step * (layer + 1) / STEPS
        row = [(1 - skew) / EXPERTS] * EXPERTS
        row[layer] += skew
        loads.append(row)
    return loads


def metrics_row(step: int, spike: float = 0.0) -> dict:
    loss = 6.0 - 0.05 * step + spike
    row = {"step": step, "loss": loss + 0.3, "lm_loss": loss, "mtp_loss": loss + 0.1, "balance_loss": 1e-4,
           "indexer_loss": 0.05, "lr": 1e-3 * min(1.0, step / 5), "grad_norm": 1.0 + spike,
           "tokens_per_s": 1000.0 + 10 * step, "tokens": 1024 * step, "step_time_s": 1.0, "mtp_weight": 0.3,
           "expert_load": expert_load(step), "mfu": 0.2 + 0.001 * step}
    row["load_imbalance"] = [max(r) / (sum(r) / len(r)) for r in row["expert_load"]]
    row["load_imbalance_max"] = max(row["load_imbalance"])
    if step % 5 == 1:
        row["sinkhorn_row_error"] = [1e-6 * (u + 1) * step for u in range(UNITS)]
        row["sinkhorn_row_error_max"] = max(row["sinkhorn_row_error"])
        row["comb_logit_max"] = 0.01 * step
    return row


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    lines = [metrics_row(s, spike=3.0 if s == SPIKE_STEP else 0.0) for s in range(1, ROLLBACK_STEP + 1)]
    lines += [metrics_row(s) for s in range(11, STEPS + 1)]       # rollback to step 10, steps 11.. again
    for row in lines:
        if row["step"] == NAN_STEP:
            row["loss"] = row["lm_loss"] = "nan"                      # how train/metrics.py writes nan
            row["grad_norm"] = "inf"
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 31, "loss": 4.'   # cut by a crash
    (root / "metrics.jsonl").write_text(text)
    (root / "eval.jsonl").write_text("".join(
        json.dumps({"step": s, **{f"{d}_loss": 5.0 - 0.03 * s + i for i, d in enumerate(DOMAINS)}}) + "\n"
        for s in (10, 20, 30)))
    events = [
        {"step": 5, "kind": "anticipatory_routing_on", "message": "routing from stale gate"},
        {"step": SPIKE_STEP, "kind": "loss_spike", "message": "loss 8.30 > 3 sigma <b>EMA</b>", "zscore": 7.5},
        {"step": ROLLBACK_STEP, "kind": "rollback", "message": "restored step_00000010", "to_step": 10},
        {"step": 25, "kind": "anticipatory_routing_off", "message": "stable again"},
    ]
    (root / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (root / "summary.json").write_text(json.dumps({
        "run_dir": str(root), "steps": STEPS, "tokens": 1024 * STEPS, "tokens_per_s": 1150.5, "first_loss": 5.95,
        "final_loss": 4.5, "ln_vocab": math.log(512), "eval": {"code_loss": 4.1, "math_loss": 5.1}}))
    (root / "config.yaml").write_text("model:\n  dim: 64\n  n_layers: 2\n  n_mtp_layers: 1\n  n_hash_layers: 1\n"
                                      "  n_routed_experts: 4\ntrain:\n  max_steps: 30\n  seq_len: 128\n")
    (root / "env.json").write_text(json.dumps({"git_commit": "abc123-dirty", "gpus": []}))
    return root


def test_reading_keeps_the_final_trajectory_and_parses_nan(run_dir):
    run = load_run(run_dir)
    assert [r["step"] for r in run.metrics] == list(range(1, STEPS + 1))
    assert [r["step"] for r in run.superseded] == [11, 12, 13, 14]
    assert run.superseded[-1]["lm_loss"] == pytest.approx(6.0 - 0.05 * SPIKE_STEP + 3.0)
    steps, lm = run.series("lm_loss")
    assert math.isnan(lm[NAN_STEP - 1]) and np.isfinite(np.delete(lm, NAN_STEP - 1)).all()
    assert math.isinf(run.series("grad_norm")[1][NAN_STEP - 1])
    assert run.warnings == ["metrics.jsonl: skipped 1 unreadable line(s)"]
    assert run.eval_domains() == ["code_loss", "math_loss"]


def test_figure_has_every_panel_with_the_run_data(run_dir):
    run = load_run(run_dir)
    fig, panels = build_figure(run, last_n=10)
    assert set(panels) == set(PANELS)

    loss = panels["loss"]
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert {"lm_loss", "eval code_loss", "eval math_loss"} <= set(lines)
    np.testing.assert_array_equal(lines["eval math_loss"].get_xdata(), [10, 20, 30])
    lm_y = np.asarray(lines["lm_loss"].get_ydata(), dtype=float)
    assert len(lm_y) == STEPS and math.isnan(lm_y[NAN_STEP - 1])
    # Events: a dashed vertical line per event at its step, a text label naming it.
    event_x = sorted((line.get_gid(), line.get_xdata()[0]) for line in loss.get_lines()
                     if (line.get_gid() or "").startswith("event:"))
    assert event_x == [("event:anticipatory_routing_off", 25), ("event:anticipatory_routing_on", 5),
                       ("event:loss_spike", SPIKE_STEP), ("event:rollback", ROLLBACK_STEP)]
    labels = [t.get_text() for t in loss.texts if t.get_gid() == "event_label"]
    assert labels == [" AR on @5", f" spike, rollback @{SPIKE_STEP}", " AR off @25"]   # same step: one label
    nonfinite = [line for line in loss.get_lines() if line.get_gid() == "nonfinite"]
    assert len(nonfinite) == 1 and list(nonfinite[0].get_xdata()) == [NAN_STEP]
    superseded = [line for line in loss.get_lines() if "superseded" in line.get_label()]
    assert list(superseded[0].get_xdata()) == [11, 12, 13, 14]

    # Heatmaps: load over the uniform share (x EXPERTS) of the last step and of the last 10 steps.
    latest = np.asarray(panels["expert_load_latest"].images[0].get_array())
    np.testing.assert_allclose(latest, np.array(expert_load(STEPS)) * EXPERTS, rtol=1e-12)
    mean = np.asarray(panels["expert_load_mean"].images[0].get_array())
    np.testing.assert_allclose(mean, np.mean([expert_load(s) for s in range(21, 31)], axis=0) * EXPERTS,
                               rtol=1e-12)
    assert [t.get_text() for t in panels["expert_load_latest"].get_yticklabels()] == ["0 hash", "1", "mtp 0"]

    # Per-layer / per-unit lines: one per MoE layer, one per mHC unit on the steps that logged them.
    imbalance = [line for line in panels["load_imbalance"].get_lines() if (line.get_gid() or "").startswith("MoE")]
    assert len(imbalance) == LAYERS
    sinkhorn = panels["sinkhorn_row_error"].get_lines()
    assert len(sinkhorn) == UNITS and list(sinkhorn[0].get_xdata()) == [1, 6, 11, 16, 21, 26]
    np.testing.assert_allclose(sinkhorn[3].get_ydata(), [4e-6 * s for s in (1, 6, 11, 16, 21, 26)])
    assert panels["sinkhorn_row_error"].get_yscale() == "log"
    comb = panels["comb_logit"].get_lines()[0]
    np.testing.assert_allclose(comb.get_ydata(), [0.01 * s for s in (1, 6, 11, 16, 21, 26)])
    # Throughput: MFU on a twin axis, in percent.
    twins = panels["throughput"].get_shared_x_axes().get_siblings(panels["throughput"])
    mfu_line = [line for ax in twins for line in ax.get_lines() if line.get_label() == "MFU (%)"]
    assert mfu_line and mfu_line[0].get_ydata()[-1] == pytest.approx(100 * (0.2 + 0.001 * STEPS))


def test_png_and_html_are_self_contained_and_list_the_events(run_dir, tmp_path):
    written = write_report(run_dir, tmp_path / "out")
    png = written["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 1
    assert "src=\"http" not in page and "<script" not in page
    for kind in ("loss_spike", "rollback", "anticipatory_routing_on", "anticipatory_routing_off"):
        assert f"<td>{kind}</td>" in page
    assert "loss 8.30 &gt; 3 sigma &lt;b&gt;EMA&lt;/b&gt;" in page          # messages are escaped
    assert "&quot;zscore&quot;: 7.5" in page and "<td>restored step_00000010</td>" in page
    assert "<th>final_loss</th><td>4.5</td>" in page and "<th>model.dim</th><td>64</td>" in page
    assert "abc123-dirty" in page and "skipped 1 unreadable line" in page
    assert "4 metrics line(s) were superseded" in page


def test_cli_formats_and_minimal_metrics(tmp_path, capsys):
    run = tmp_path / "bare"
    run.mkdir()
    # Oldest possible run: only step and loss, no eval, events, summary, MoE or mHC statistics.
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in (1, 2, 3)))
    main([str(run), "--format", "png"])
    assert (run / "report" / "report.png").is_file() and not (run / "report" / "report.html").exists()
    assert capsys.readouterr().out.strip() == str(run / "report" / "report.png")
    fig, panels = build_figure(load_run(run))
    assert expert_load_maps(load_run(run), 50) == (None, None, [])
    assert "no expert_load logged" in panels["expert_load_latest"].texts[0].get_text()
    assert "no mHC statistics" in panels["sinkhorn_row_error"].texts[0].get_text()

    with pytest.raises(SystemExit) as exc:
        main([str(run), "--format", "pdf"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --format 'pdf': choose a comma list of png, html (e.g. png,html)"


def test_missing_metrics_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no metrics.jsonl; pass the run directory that `v4-train` wrote "
        "(run.dir, or runs/<name>-<time>)"]
