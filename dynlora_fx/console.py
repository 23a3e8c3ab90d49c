"""Terminal output: rich tables for the plan, parameter counts and results."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["plan_tables", "summary_table", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def plan_tables(report: dict[str, Any]) -> list[Table]:
    adapted = Table(title=f"Adapted weights ({len(report['adapters'])})", title_justify="left")
    for col in ("weight", "op", "shape", "rank", "form"):
        adapted.add_column(col, justify="right" if col == "rank" else "left")
    for a in report["adapters"]:
        adapted.add_row(a["weight"], a["op"], "x".join(map(str, a["shape"])), str(a["rank"]), a["form"])
    tables = [adapted]
    if report["skipped"]:
        skipped = Table(title=f"Skipped weights ({len(report['skipped'])})", title_justify="left")
        skipped.add_column("weight")
        skipped.add_column("reason")
        for s in report["skipped"]:
            skipped.add_row(s["weight"], s["reason"])
        tables.append(skipped)
    return tables


def summary_table(report: dict[str, Any]) -> Table:
    t = Table(title="Summary", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    p, m = report["params"], report["memory"]
    t.add_row("capture", report["capture"])
    if "precision" in report:
        blocks = report.get("checkpointed") or []
        t.add_row("precision / activation checkpointing",
                  f"{report['precision']} / {f'{len(blocks)} blocks' if blocks else 'off'}")
    d = report.get("distributed")
    if d:
        how = {"fsdp2": "FSDP2 (sharded)", "ddp": "DDP (replicated)"}.get(
            d["mode"], f"HSDP ({d.get('replicas')} replica groups, each sharded)")
        t.add_row("data parallel", f"{d['world_size']} ranks, {how}, each on 1/{d['world_size']} of every batch")
    t.add_row("parameters (total)", f"{p['total']:,}")
    t.add_row("trainable / frozen", f"{p['trainable']:,} / {p['frozen']:,}")
    r = m.get("per_rank")
    if r:  # sharded: what each rank holds (the unsharded totals would overstate it by the shard group's size)
        lo, hi = min(r["adapted_bytes"]), max(r["adapted_bytes"])
        held = human_bytes(lo) if lo == hi else f"{human_bytes(lo)}–{human_bytes(hi)}"
        full = max(r["full_rank_bytes"]) if "full_rank_bytes" in r else m["full_rank_bytes"] / r["shard_group"]
        t.add_row("training state per rank (params+grads+AdamW)",
                  f"{held} vs {'' if 'full_rank_bytes' in r else '≈'}{human_bytes(full)} full-rank sharded alike "
                  f"({hi / max(1, full):.2f}x)")
    else:
        t.add_row("training state (params+grads+AdamW)",
                  f"{human_bytes(m['adapted_bytes'])} vs {human_bytes(m['full_rank_bytes'])} full-rank "
                  f"({m['ratio']:.2f}x)")
    eq = report.get("equivalence")
    if eq:
        t.add_row("equivalence (eval, max rel. error)", f"{eq['max_rel_error']:.2e} {'ok' if eq['ok'] else 'FAILED'}")
    tr = report.get("training")
    if tr:
        t.add_row("steps", str(tr["steps"]))
        t.add_row("final train loss", f"{tr['final_loss']:.4f}")
        if tr.get("val_loss") is not None:
            t.add_row("validation loss", f"{tr['val_loss']:.4f}")
        if tr.get("baseline_val_loss") is not None:
            base = tr["baseline_val_loss"]
            # a ratio of two near-zero losses says nothing about the methods: give the difference
            versus = (f"ratio {tr['val_loss'] / base:.3f}" if base > 1e-2 else
                      f"difference {tr['val_loss'] - base:+.1e}; both near zero, the task is too easy to compare")
            t.add_row("validation loss, full-rank baseline", f"{base:.4f} ({versus})")
        unit = tr.get("throughput_unit", "tok")
        t.add_row("tokens/s" if unit == "tok" else f"{unit}/s", f"{tr['tokens_per_s']:,.0f}")
    if report.get("onnx"):
        o = report["onnx"]
        err = o.get("unchecked") or "n/a" if o["max_rel_error"] is None else f"{o['max_rel_error']:.2e}"
        t.add_row("ONNX", f"{o['path']} (dynamic batch: {o['dynamic_batch']}, rel. error {err})")
    return t


def make_console(file: Any) -> Console:
    return Console(file=file, width=None if getattr(file, "isatty", lambda: False)() else 120,
                   highlight=False)
