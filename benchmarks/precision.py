"""Low-precision switching: does the model's function drift as switches accumulate?

The issue's setting: a 2-layer LLaMA-style model (d=64, rank 16, examples/tiny_llama.py),
learning rate 0, so only switching changes anything. The output is compared with its value
at step 0 after each of ``--steps``. Variants, all built in one process:

- ``fp32``                 parameters in fp32 (the reference: float rounding only);
- ``bf16``                 parameters in bf16; adapted W keep an exact fp32 master (the runtime);
- ``bf16 naive (ablation)`` parameters in bf16, W rounded to bf16 at every switch: the runtime
  with its master switched off, which is what it did before (``PrecisionPolicy(exact_master=False)``);
- ``fp32 + autocast bf16`` fp32 parameters, bf16 compute (the recommended recipe).

Also reported: bytes per adapted weight entry that each variant holds for W.

    python benchmarks/precision.py --markdown
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import dynlora_fx as dl
from _common import build_llama, code_version, llama_config, log, machine_info, method_config, print_table, \
    random_tokens, write_json
from dynlora_fx.runtime.precision import EXACT_MASTER, RESIDUAL, PrecisionPolicy

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("fp32", "bf16", "bf16 naive (ablation)", "fp32 + autocast bf16")


# the switcher without an fp32 master: W absorbs each switch in its own dtype (the old runtime)
NAIVE_BF16 = PrecisionPolicy(exact_master=False)


def run(variant: str, args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Any]:
    model = build_llama(llama_config(args.dim, args.layers, heads=4))
    if variant.startswith("bf16"):
        model = model.to(torch.bfloat16)
    gm = dl.transform(model, (ids,), method_config("switchlora", args.rank)).eval()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in variant)
    with torch.no_grad(), amp:
        start = gm(ids).float()
    opt = dl.AdamW(gm.parameters(), lr=0.0)
    sw = dl.attach(gm, opt, total_steps=max(args.steps), precision=NAIVE_BF16 if "naive" in variant else EXACT_MASTER)
    drift: dict[int, float] = {}
    for step in range(1, max(args.steps) + 1):
        opt.step()
        if step in args.steps:
            with torch.no_grad(), amp:
                out = gm(ids).float()
            drift[step] = ((out - start).norm() / start.norm()).item()
    weights = [gm.model.get_parameter(i.weight) for i in dl.adapters(gm)]
    entries = sum(w.numel() for w in weights)
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    if "naive" not in variant:
        w_bytes += sum(b.numel() * b.element_size() for n, b in gm.named_buffers() if n.endswith(RESIDUAL))
    return {"drift": drift, "switched": sw.num_switched(), "w_bytes_per_entry": w_bytes / entries}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="20,200,2000", help="comma-separated steps at which to measure")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    args.steps = sorted({int(s) for s in args.steps.split(",")})
    torch.set_num_threads(args.threads)
    ids = random_tokens(4, 64)
    results = {}
    for variant in VARIANTS:
        log(f"{variant}: {max(args.steps)} steps")
        results[variant] = run(variant, args, ids)
    report = {"benchmark": "precision", "args": vars(args), "machine": machine_info(), "code": code_version(ROOT),
              "results": results}
    write_json(args.out, report)
    headers = ["variant", *[f"drift @ {s} steps" for s in args.steps], "W bytes / entry"]
    pct = lambda x: f"{x:.2%}" if x >= 1e-4 else f"{100 * x:.0e}%"  # noqa: E731
    rows = [[v, *[pct(r['drift'][s]) for s in args.steps], f"{r['w_bytes_per_entry']:.0f}"]
            for v, r in results.items()]
    print_table(f"{args.layers}-layer LLaMA-style d={args.dim}, rank {args.rank}, lr 0: output change from step 0",
                headers, rows, markdown=args.markdown)
    return report


if __name__ == "__main__":
    main()
