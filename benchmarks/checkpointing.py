"""Activation checkpointing: bytes saved for backward, and the recompute time it costs.

A Hugging Face LLaMA built from a config (no download), trained one step (forward and
backward) in four ways, all built in one process and timed interleaved:

- ``hf``            the plain model;
- ``hf+ckpt``       the plain model with its own ``activation_checkpointing_enable()``;
- ``switchlora``    ``dl.transform(model, checkpoint=False)``;
- ``switchlora+ckpt`` ``dl.transform`` of the model with its flag on (``checkpoint="auto"`` follows it).

Saved bytes are distinct storages autograd saves in one step, the module's own parameters and
buffers left out (``dynlora_fx.testing.SavedTensors``); a checkpointed block's inputs count (torch saves
them through the same hooks). Step time is the median over ``--rounds`` rounds; ratios are
medians of per-round ratios, so drift on a shared machine cancels. ``--compile`` adds the two
SwitchLoRA variants under ``dl.compile``.

    python benchmarks/checkpointing.py --markdown
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import dynlora_fx as dl
from _common import code_version, human_bytes, log, machine_info, median, method_config, print_table, random_tokens, \
    write_json
from dynlora_fx.testing import SavedTensors

ROOT = Path(__file__).resolve().parent.parent


def build_hf(args: argparse.Namespace, checkpointing: bool) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=args.dim, intermediate_size=int(args.dim * 8 / 3) // 32 * 32,
                                   num_hidden_layers=args.layers, num_attention_heads=args.dim // 64,
                                   num_key_value_heads=args.dim // 64, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def one_step(module: torch.nn.Module, ids: torch.Tensor) -> Callable[[], int]:
    """A closure running forward + backward once; returns the bytes saved for backward."""
    own = [*module.parameters(), *module.buffers()]

    def step() -> int:
        with SavedTensors(exclude=own) as saved:
            logits = module(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1)[:-1], ids.flatten()[1:]).backward()
        module.zero_grad(set_to_none=True)
        return saved.bytes

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the SwitchLoRA variants under dl.compile")
    ap.add_argument("--out", default="benchmarks/results/checkpointing.json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    ids = random_tokens(args.batch, args.seq)
    config = method_config("switchlora", args.rank, tokens_per_step=ids.numel())

    log("building variants")
    variants: dict[str, torch.nn.Module] = {"hf": build_hf(args, False), "hf+ckpt": build_hf(args, True)}
    transformed: dict[str, Any] = {}
    for name, source in (("switchlora", "hf"), ("switchlora+ckpt", "hf+ckpt")):
        gm = dl.transform(variants[source], (), config, example_kwargs={"input_ids": ids, "use_cache": False})
        transformed[name] = gm
        variants[name] = gm
        if args.compile:
            variants[f"{name} compiled"] = dl.compile(gm)
    steps = {name: one_step(m, ids) for name, m in variants.items()}
    for name, step in steps.items():  # warm-up (and compilation)
        step()

    times: dict[str, list[float]] = {n: [] for n in steps}
    saved: dict[str, int] = {}
    names = list(steps)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            saved[name] = steps[name]()
            times[name].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{args.rounds}")

    def ratio(a: str, b: str) -> float | None:
        return median([x / y for x, y in zip(times[a], times[b])])

    base_of = {"hf": "hf", "hf+ckpt": "hf", "switchlora": "switchlora", "switchlora+ckpt": "switchlora",
               "switchlora compiled": "switchlora compiled", "switchlora+ckpt compiled": "switchlora compiled"}
    results = {}
    for name in names:
        base = base_of[name]
        results[name] = {
            "saved_bytes": saved[name], "saved_vs_hf": saved[name] / saved["hf"],
            "saved_vs_uncheckpointed": saved[name] / saved[base],
            "step_ms": 1e3 * median(times[name]), "time_vs_uncheckpointed": ratio(name, base),
            "checkpointed_blocks": list(transformed[gm_name].checkpointed) if (gm_name := name.split(" ")[0])
            in transformed else [],
        }
    report = {"benchmark": "checkpointing", "args": vars(args), "machine": machine_info(), "code": code_version(ROOT),
              "forms": sorted({i.form for i in dl.adapters(transformed["switchlora"])}), "results": results}
    write_json(args.out, report)
    headers = ["variant", "saved for backward", "vs plain HF", "vs same without ckpt", "step ms", "time vs without ckpt"]
    rows = [[n, human_bytes(v["saved_bytes"]), f"{v['saved_vs_hf']:.3f}x", f"{v['saved_vs_uncheckpointed']:.3f}x",
             f"{v['step_ms']:.0f}", f"{v['time_vs_uncheckpointed']:.2f}x"] for n, v in results.items()]
    title = (f"HF LLaMA {args.layers} layers d={args.dim}, {args.batch}x{args.seq} tokens, SwitchLoRA rank {args.rank} "
             f"({'/'.join(report['forms'])} form), {args.rounds} rounds, {args.threads} threads")
    print_table(title, headers, rows, markdown=args.markdown)
    return report


if __name__ == "__main__":
    main()
