"""Fuzzing campaign: random small models through ``dl.transform``, every invariant checked.

    python benchmarks/fuzz.py --count N [--start S] [--out benchmarks/results/fuzz_S.json] [--shrink]
    python benchmarks/fuzz.py --summarize benchmarks/results/fuzz_*.json [--out benchmarks/results/fuzz.json] [--markdown]

Models come from ``dynlora_fx/testing/fuzz_models.py`` (seed ``S`` .. ``S+N-1``; the CI test runs a fixed
seeded subset of the same generator). The JSON holds, per model, its seed, features, capture
path, outcome and failed checks; with ``--shrink`` every failure is also reduced to a minimal
spec, ready to become a regression test. It is rewritten every 20 models, so a campaign cut
short keeps what it ran. ``--summarize`` merges chunk files into one table by feature.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from _common import code_version, log, machine_info, print_table, write_json
from dynlora_fx.testing import fuzz_models as fm

ROOT = Path(__file__).resolve().parents[1]


def run_one(seed: int, shrink: bool, checkpoint: bool = False) -> dict[str, Any]:
    spec = fm.draw_checkpoint_spec(seed) if checkpoint else fm.draw_spec(seed)
    t0 = time.perf_counter()
    try:
        res = fm.check_checkpointing(spec) if checkpoint else fm.check_spec(spec)
    except Exception as exc:  # noqa: BLE001 - a crash of the checker itself is a finding too
        res = {"outcome": "fail", "capture": None, "notes": [],
               "failures": [{"check": "crash", "detail": f"{type(exc).__name__}: {exc}"[:600]}]}
    row = {"seed": seed, "features": fm.features(spec), "capture": res["capture"], "outcome": res["outcome"],
           "seconds": round(time.perf_counter() - t0, 3), "failures": res["failures"],
           "notes": [n for n in res["notes"] if not n.startswith(("switched", "graph sets: "))]}
    sets = [int(n.split(": ")[1]) for n in res["notes"] if n.startswith("graph sets: ")]
    if sets:  # graph sets (guard sets) the module holds after the size check: 1 = the first capture took all
        row["graph_sets"] = sets[-1]
    if res["outcome"] == "fail":
        row["spec"] = spec
        if shrink:
            row["shrunk"] = fm.shrink(spec, {f["check"] for f in res["failures"]})
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_feature: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        for f in r["features"]:
            by_feature[f]["tried"] += 1
            by_feature[f][r["outcome"]] += 1
    checks = collections.Counter(f["check"] for r in rows for f in r["failures"])
    sets = sorted(r["graph_sets"] for r in rows if "graph_sets" in r)
    refused = [r["seed"] for r in rows if any(f["check"] == "batch" and "refused:" in f["detail"]
                                              for f in r["failures"])]
    return {
        "models_with_a_refused_size": len(refused),  # a size the model runs that the transformed module refused
        "refused_size_seeds": refused,
        "graph_sets": {"models": len(sets), "median": sets[len(sets) // 2] if sets else None,
                       "max": sets[-1] if sets else None, "histogram": dict(sorted(collections.Counter(sets).items())),
                       "recaptured": sum(n > 1 for n in sets)},
        "models": len(rows),
        "outcomes": dict(collections.Counter(r["outcome"] for r in rows)),
        "capture": dict(collections.Counter(str(r["capture"]) for r in rows)),
        "failed_checks": dict(checks),
        "seconds_total": round(sum(r["seconds"] for r in rows), 1),
        "seconds_median": sorted(r["seconds"] for r in rows)[len(rows) // 2] if rows else None,
        "by_feature": {k: dict(v) for k, v in sorted(by_feature.items())},
        "failures": [{k: r[k] for k in ("seed", "failures", "spec", "shrunk") if k in r}
                     for r in rows if r["outcome"] == "fail"],
    }


_GROUPS = (("blocks", lambda f: f in fm.BLOCKS or f in fm.CHECKPOINT_BLOCKS), ("raw parameter ops", lambda f: f.startswith("raw:")),
           ("layer classes", lambda f: (":" in f and f.split(":")[0] in ("rnn", "cell", "norm", "stem")) or f in
            ("conv_transpose", "grouped_conv", "tied_embedding_head")),
           ("inputs", lambda f: f.startswith("input:")), ("outputs", lambda f: f.startswith("output:")),
           ("dtype", lambda f: f.startswith("float")), ("method", lambda f: f.startswith("method:")),
           ("form", lambda f: f.startswith("form:")), ("rank", lambda f: f.startswith("rank:")))


def feature_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Models tried per feature, grouped; a feature's failures in parentheses when there are any."""
    rows = []
    for group, member in _GROUPS:
        cells = []
        for feat, c in summary["by_feature"].items():
            if member(feat):
                name = feat.split(":", 1)[1] if ":" in feat and group != "layer classes" else feat
                failed = f" ({c['fail']} failed)" if c.get("fail") else ""
                cells.append(f"{name} {c.get('tried', 0)}{failed}")
        rows.append([group, ", ".join(cells)])
    return rows


def print_feature_table(s: dict[str, Any]) -> None:
    print_table(f"models tried per feature ({s['models']} models)", ["feature", "models tried"], feature_rows(s),
                ["l", "l"], markdown=True)


def _sizes_line(s: dict[str, Any]) -> str:
    g = s["graph_sets"]
    return (f"models with a refused size: {s['models_with_a_refused_size']}; graph sets per model: median {g['median']}, "
            f"max {g['max']} ({g['recaptured']} of {g['models']} models captured again; histogram {g['histogram']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--shrink", action="store_true", help="reduce every failure to a minimal spec")
    p.add_argument("--checkpoint", action="store_true",
                   help="check the checkpointing pass instead: checkpoint=True against False, one train step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="merge chunk files instead of running")
    p.add_argument("--markdown", action="store_true", help="print the per-feature table")
    a = p.parse_args()
    warnings.filterwarnings("ignore")  # export's warnings about the generated models are not findings

    if a.summarize:
        rows = [r for path in a.summarize for r in json.loads(Path(path).read_text())["results"]]
        rows = list({r["seed"]: r for r in rows}.values())
        out = {"sources": a.summarize, "summary": summarize(rows)}  # per-model rows stay in the chunk files
        write_json(a.out or ROOT / "benchmarks/results/fuzz.json", out)
        s = out["summary"]
        print(f"{s['models']} models: {s['outcomes']}; capture {s['capture']}; failed checks {s['failed_checks']}")
        print(_sizes_line(s))
        if a.markdown:
            print_feature_table(s)
        return

    torch.set_num_threads(a.threads)
    kind = "fuzz_checkpoint" if a.checkpoint else "fuzz"
    path = Path(a.out or ROOT / f"benchmarks/results/{kind}_{a.start}.json")
    header = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "start": a.start,
              "count": a.count, "machine": machine_info(), "code": code_version(ROOT)}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, seed in enumerate(range(a.start, a.start + a.count)):
        row = run_one(seed, a.shrink and not a.checkpoint, a.checkpoint)  # shrink() replays check_spec
        rows.append(row)
        if row["outcome"] == "fail":
            log(f"seed {seed}: FAIL {[f['check'] + ': ' + f['detail'][:120] for f in row['failures']]}")
        if (i + 1) % 20 == 0 or i + 1 == a.count:
            write_json(path, {**header, "done": len(rows), "wall_seconds": round(time.perf_counter() - t0, 1),
                              "summary": summarize(rows), "results": rows})
            log(f"{i + 1}/{a.count} models, {sum(r['outcome'] == 'fail' for r in rows)} failing, "
                f"{time.perf_counter() - t0:.0f} s")
    s = summarize(rows)
    print(f"{s['models']} models: {s['outcomes']}; capture {s['capture']}; failed checks {s['failed_checks']}")
    print(_sizes_line(s))
    if a.markdown:
        print_feature_table(s)


if __name__ == "__main__":
    main()
