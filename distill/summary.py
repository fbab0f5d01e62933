"""The closing one-screen summary of a distillation run (rich table) and summary.json.

Its point is the per-domain table: the student's held-out KL to each domain's teacher before
and after OPD, which must fall.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def kl_table(opd: dict) -> Table:
    """Per teacher: domain, KL(student‖teacher) on held-out prompts before → after OPD."""
    table = Table(title="student KL(student‖teacher) on held-out prompts, per domain", min_width=60)
    for column in ("teacher", "domain", "before OPD", "after OPD", "change"):
        table.add_column(column, justify="left" if column in ("teacher", "domain") else "right")
    first, last = opd["eval_kl_first"], opd["eval_kl_last"]
    for teacher in opd["teachers"]:
        name = teacher["name"]
        if name not in first or name not in last:
            continue
        change = (last[name] - first[name]) / first[name] * 100 if first[name] else 0.0
        table.add_row(name, teacher["domain"], f"{first[name]:.4f}", f"{last[name]:.4f}", f"{change:+.1f}%")
    return table


def print_summary(summary: dict, run_dir: Path) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console = Console()
    table = Table(title="v4forge distillation summary", show_header=False, min_width=60)
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, expert in summary.get("experts", {}).items():
        if expert.get("reused"):
            table.add_row(f"expert {name}", f"reused {expert['run_dir']}")
        elif expert.get("final_loss") is not None:
            evals = ", ".join(f"{k} {v:.3f}" for k, v in sorted(expert.get("eval", {}).items()))
            table.add_row(f"expert {name}", f"LM loss {expert['first_loss']:.3f} -> {expert['final_loss']:.3f}"
                                            f"{'; eval ' + evals if evals else ''}")
    opd = summary.get("opd")
    if opd:
        table.add_row("OPD", f"{opd['steps']} steps, loss {opd['loss_kind']} ({opd['loss_impl']}), "
                             f"{len(opd['teachers'])} teachers")
        if opd.get("train_kl_first") is not None:
            table.add_row("train KL (batch)", f"{opd['train_kl_first']:.4f} -> {opd['train_kl_last']:.4f}")
        seconds = opd["stage_seconds"]
        table.add_row("rollout", f"{seconds['rollout_s']:.1f} s, {opd['rollout_tokens_per_s']:,.0f} sampled tokens/s")
        table.add_row("teachers", f"{seconds['teacher_s']:.1f} s, {opd['teacher_tokens_per_s']:,.0f} tokens/s")
        table.add_row("loss", f"{seconds['loss_s']:.1f} s, {opd['loss_tokens_per_s']:,.0f} tokens/s")
        table.add_row("student checkpoint", opd["checkpoint"])
    table.add_row("run directory", str(run_dir))
    table.add_row("outputs", "config.yaml env.json distill.log tokenizer/ experts/<name>/ experts/teachers.json "
                             "opd/{metrics,eval}.jsonl opd/checkpoints/ opd/wandb/ summary.json")
    console.print(table)
    if opd:
        console.print(kl_table(opd))
