"""The closing one-screen summary of a run (rich table) and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict, run_dir: Path) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    table = Table(title="v4forge run summary", show_header=False, min_width=60)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("steps", f"{summary['steps']:,}")
    table.add_row("tokens", f"{summary['tokens']:,}")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:,.0f}")
    if summary.get("final_loss") is not None:
        table.add_row("LM loss", f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f} "
                                 f"(ln vocab = {summary['ln_vocab']:.3f})")
    for name, value in sorted(summary.get("eval", {}).items()):
        table.add_row(f"eval {name}", f"{value:.3f}")
    if summary.get("resumed_from"):
        table.add_row("resumed from", summary["resumed_from"])
    table.add_row("run directory", str(run_dir))
    table.add_row("outputs", "config.yaml env.json metrics.jsonl eval.jsonl train.log checkpoints/ wandb/")
    Console().print(table)
