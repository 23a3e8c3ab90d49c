"""The test zoo as a table: capture path, weight-bearing parameters, adapter coverage, transform time.

    python benchmarks/zoo_table.py [--out benchmarks/results/zoo.json] [--markdown]

Coverage is counted by the independent oracle in dynlora_fx/testing/zoo.py (a torch.export graph walk that
does not use dynlora_fx), leaving out weights that are also embedding tables (tied heads).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import dynlora_fx as dl
from _common import print_table, write_json
from dynlora_fx.testing.zoo import ZOO, weight_bearing_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/zoo.json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    rows = []
    for case in ZOO:
        model = case.build()
        x, kw = case.inputs(2), case.kwargs(2)
        t0 = time.perf_counter()
        gm = dl.transform(model, x, dl.SwitchLoRA(rank=0.25), example_kwargs=kw)
        seconds = time.perf_counter() - t0
        oracle = weight_bearing_params(case.build(), x, kw, tied_embeddings=False)
        adapted = {a.weight for a in dl.adapters(gm)}
        total = sum(oracle.values())
        rows.append({"model": case.id, "capture": gm.capture_method, "weight_bearing_params": total,
                     "adapters": len(adapted), "skipped": len(gm.plan.skipped),
                     "coverage": sum(n for k, n in oracle.items() if k in adapted) / total,
                     "transform_seconds": round(seconds, 3),
                     "forms": sorted({a.form for a in dl.adapters(gm)})})
    write_json(args.out, {"meta": {"torch": torch.__version__, "cpus": os.cpu_count()}, "rows": rows})
    cols = ["model", "capture", "weight-bearing params", "coverage", "transform s", "forms"]
    vals = [[r["model"], r["capture"], f"{r['weight_bearing_params']:,}", f"{100 * r['coverage']:.1f}%",
             f"{r['transform_seconds']:.2f}", "+".join(r["forms"])] for r in rows]
    print_table("dynlora-fx zoo", cols, vals, ["l", "l", "r", "r", "r", "l"], markdown=args.markdown)


if __name__ == "__main__":
    main()
