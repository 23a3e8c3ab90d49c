"""Training-step speed and memory: SwitchLoRA against full-rank, LoRA and the reference loop.

All variants of a setting live in one process and are timed interleaved — round-robin over
the variants (rotating the starting variant each round), several rounds. Times are medians over
the timed steps; ratios ("vs full-rank", "compiled/eager") are medians over rounds of the ratio
within a round, so load that drifts on a shared machine cancels. Variants never share state:
each gets a freshly built model (same init seed), its own optimizer and switcher, and is warmed
up before timing.

Variants (each ``eager`` and, unless ``--no-compile``, ``compiled``):

- ``full-rank``             torch.optim.AdamW on the plain model (torch.compile when compiled)
- ``lora``                  dl.LoRA, torch.optim.AdamW
- ``switchlora-seeded``     dl.SwitchLoRA(candidates="seeded"), dl.AdamW + dl.attach
- ``switchlora-stored``     dl.SwitchLoRA(candidates="stored"), dl.AdamW + dl.attach
- ``switchlora-reference``  dl.SwitchLoRA switched by the per-vector
                            Python loop: dl.attach(..., strategy="reference")

- ``switchlora-keep``       ``switchlora-seeded`` run under ``dynlora_fx.ops.keep_merged_weights()``: the
                            weight-space form as it was before it recomputed ``W'`` in backward
                            (autograd keeps every merged weight): the A/B for that change

Adapter configs keep ``form="auto"`` and get ``tokens_per_step`` = the setting's batch x seq,
so the library picks each weight's form as it would for a user; the forms it chose are listed.
Compiled variants use ``dynamic=False``; compile time is the first step minus the median step,
with Inductor's FX-graph / AOTAutograd caches off and an empty kernel cache (``--compile-cache``
to allow them).

Switching is measured at its *peak* rate: every run gets ``total_steps = 10**6`` so that
rate(t) stays ~1 during the measured steps (r / interval vectors per side per adapter per
step). For the run average, the switcher's hooks are also timed at a grid of positions
``x = t / T`` through a run and integrated over ``x`` (``switch ms/step, run avg``), and the
analytic ratio mean_t(r / interval(t)) / peak is reported.

A second part sweeps the adapter form per op: for every adapted weight shape of the model, rank
and tokens/step, the forward + backward of ``x @ W'.T`` (x needing its gradient, as inside a
network) with the activation branch (about 3·T·r·(m+n) multiply-adds on top of the frozen op)
and with the weight-space form as ``insert_adapters`` writes it (``addmm(W, s·B, A)``: r·m·n
forward and again in backward, where it is recomputed rather than kept, the factor gradients
2·r·m·n and the full weight gradient T·m·n), timed interleaved.
It reports the ratio, the form ``form="auto"`` picks (``find_targets.choose_form``), and where
the measured ratio crosses 1 next to where ``choose_form`` switches forms (found by bisection on
the library's own function, not re-derived here).

Usage::

    python benchmarks/speed.py                      # 4 layers, dim 256, rank 64; 8x128 and 32x128
    python benchmarks/speed.py --quick              # seconds-long smoke test (tiny model, eager)
    python benchmarks/speed.py --no-compile --threads 1 --markdown
    python benchmarks/speed.py --settings 8x128,8x512 --variants full-rank,switchlora-seeded
    python benchmarks/speed.py --settings "" --markdown   # the form sweep alone
    python benchmarks/speed.py --preset gpu --markdown    # one GPU, bf16 autocast, d=1024, 16k tokens/step

Writes JSON (``--out``, default ``benchmarks/results/speed.json``) and prints tables to
stdout (``--markdown``: GitHub markdown for the README); progress goes to stderr.
Memory: ``state`` is ``training_state_bytes`` (parameters + gradients + AdamW moments of
what trains, storage of what is frozen, stored candidates) — ``full_rank_state_bytes`` for
full-rank. ``saved for backward`` is what one step's forward (and loss) hands autograd, counted
with ``saved_tensors_hooks`` as bytes of distinct storages, parameters and buffers left out (they
are in ``state``); it is measured on every timed variant (compiled ones too) in its last warm-up
step. ``peak`` = state + saved: the memory a step needs at the end of its forward. A memory probe
per setting (eager, one step each, fresh builds) adds GaLore (galore-torch's AdamW at the same rank
on the weights the pass adapts; state measured after a step, projectors included), both adapter
forms forced, and every row again with per-block activation checkpointing
(``dl.transform(..., checkpoint=True)``; for full-rank and GaLore each block under
``torch.utils.checkpoint``); ratios are against full-rank with the same checkpointing, and
against full-rank without (``unchecked``). ``RSS Δ`` is what the process's RSS grew by while the variant was built and
warmed up (after a heap trim), ``RSS peak Δ`` the highest RSS seen meanwhile minus the RSS
before: both are process-wide (earlier variants stay resident, compiled variants include
compiler memory), so read them as rough per-variant costs.
"""

from __future__ import annotations

import os

# Sleep, don't spin, in OpenMP barriers (as benchmarks/pretrain.py): on a shared, oversubscribed
# 2-core machine spinning threads that wait for a descheduled sibling slow steps many-fold and
# make them erratic. Must be set before torch loads its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

HERE = Path(__file__).resolve().parent

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dynlora_fx as dl  # noqa: E402
from dynlora_fx.ops import enter_recompute_scope, exit_recompute_scope, keep_merged_weights, merged_weight  # noqa: E402
from dynlora_fx.passes.find_targets import choose_form  # noqa: E402
from dynlora_fx.runtime.schedule import expected_switches, switch_rate  # noqa: E402
from dynlora_fx.training import TrainSettings, autocast, full_rank_state_bytes, make_optimizer, \
    training_state_bytes  # noqa: E402

from _common import (add_model_flags, benchmark_parser, build_llama, chosen, code_version, current_rss, fill_defaults,
                     human_bytes, llama_config, log, machine_info, max_rss, median, method_config, optimizer_state_bytes,
                     print_table, publish, quantile, RssSampler, settle, token_batches, trim_heap)  # noqa: E402
from dynlora_fx.testing import SavedTensors, load_galore  # noqa: E402

METHODS = ("full-rank", "lora", "switchlora-seeded", "switchlora-keep", "switchlora-stored", "switchlora-reference")
# positions x = t / T at which the switcher's hooks are timed for the run average
RUN_GRID = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
def variant_context(method: str) -> contextlib.AbstractContextManager:
    """What the variant's forward and backward run under: ``switchlora-keep`` keeps every merged
    ``W'`` for backward, as the weight-space form did before it recomputed them (dynlora_fx.ops)."""
    return keep_merged_weights() if method == "switchlora-keep" else contextlib.nullcontext()


@dataclass
class Variant:
    method: str
    mode: str  # "eager" | "compiled"
    label: str
    module: nn.Module  # what the loop calls (possibly compiled)
    inner: nn.Module  # the plain model or the transformed module (uncompiled)
    optimizer: torch.optim.Optimizer
    switcher: Any  # dl.Switcher (batched or reference strategy) or None
    config: Any
    hook_s: dict[str, float] = field(default_factory=lambda: {"pre": 0.0, "post": 0.0})
    steps: list[dict[str, float]] = field(default_factory=list)  # timed steps
    info: dict[str, Any] = field(default_factory=dict)
    batch_i: int = 0
    recompiles: int = 0
    precision: str = "fp32"  # dynlora_fx.training.PRECISIONS; bf16-autocast runs the forward under autocast

    @property
    def compiled(self) -> bool:
        return self.mode == "compiled"


def _time_hooks(v: Variant, device: torch.device) -> None:
    """Time the switcher's optimizer-step hooks, accumulated in ``v.hook_s`` (through the
    switcher's ``around_hook``), the device settled before and after each."""
    @contextlib.contextmanager
    def timed(phase: str) -> Iterator[None]:
        settle(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            settle(device)
            v.hook_s[phase] += time.perf_counter() - t0

    v.switcher.around_hook = timed


def build_variant(method: str, mode: str, cfg: Any, example: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> Variant:
    model = build_llama(cfg).to(device)  # seeds the global RNG with 0: same init for every variant
    # tokens per optimizer step feed form="auto"'s cost model
    config = method_config(method, args.rank, tokens_per_step=example.numel(), form="auto")
    inner = model if config is None else dl.transform(model, (example,), config)
    del model
    optimizer = make_optimizer(inner, config, TrainSettings(steps=args.total_steps, lr=args.lr))
    switcher = None
    if isinstance(config, dl.SwitchLoRA):
        strategy = "reference" if method == "switchlora-reference" else "batched"
        switcher = dl.attach(inner, optimizer, total_steps=args.total_steps, strategy=strategy)
    if mode == "compiled":
        module = (torch.compile(inner, fullgraph=True, dynamic=False) if config is None
                  else dl.compile(inner, dynamic=False))
    else:
        module = inner
    v = Variant(method, mode, f"{method}/{mode}", module, inner, optimizer, switcher, config,
                precision=args.precision)
    if switcher is not None:
        _time_hooks(v, device)
    # memory the method needs in principle (parameters, gradients, AdamW moments, candidates)
    if config is None:
        v.info["state_bytes"] = full_rank_state_bytes(inner)
    else:
        v.info["state_bytes"] = training_state_bytes(inner)
        infos = dl.adapters(inner)
        v.info["adapters"] = len(infos)
        v.info["adapter_forms"] = {f: sum(a.form == f for a in infos) for f in sorted({a.form for a in infos})}
        v.info["trainable_params"] = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    if method == "switchlora-reference":  # its stored candidate tables are part of its state
        v.info["reference_tables_bytes"] = switcher.method.strategy.held_bytes()
        v.info["state_bytes"] += v.info["reference_tables_bytes"]
    return v


def state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: alive through the whole step, so not counted as saved for backward."""
    return list(module.parameters()) + list(module.buffers())


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - private counter moved
        return -1


def train_step(v: Variant, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
               probe: SavedTensors | None = None) -> dict[str, float]:
    """One forward + backward + optimizer step (with the switcher's hooks); phase times in s.
    ``probe`` (a SavedTensors) counts what the forward saves for backward."""
    x, y = batches[v.batch_i % len(batches)]
    v.batch_i += 1
    pre0, post0 = v.hook_s["pre"], v.hook_s["post"]
    graphs0 = _dynamo_graphs() if v.compiled else 0
    settle(device)
    with variant_context(v.method):
        t0 = time.perf_counter()
        with probe or contextlib.nullcontext(), autocast(v.module, v.precision):
            out = v.module(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        settle(device)
        t1 = time.perf_counter()
        loss.backward()
        settle(device)
        t2 = time.perf_counter()
    v.optimizer.step()
    settle(device)
    t3 = time.perf_counter()
    v.optimizer.zero_grad(set_to_none=True)
    settle(device)
    t4 = time.perf_counter()
    if v.compiled:
        v.recompiles += max(0, _dynamo_graphs() - graphs0)
    v.info["last_loss"] = float(loss.detach())
    return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "zero": t4 - t3, "total": t4 - t0,
            "pre": v.hook_s["pre"] - pre0, "post": v.hook_s["post"] - post0}


def build_and_warm(specs: list[tuple[str, str]], cfg: Any, batches: list, args: argparse.Namespace,
                   device: torch.device, failures: list[dict[str, Any]]) -> list[Variant]:
    """Build each variant in turn, measuring what it adds to RSS, and warm it up; a variant that
    raises is logged, appended to ``failures`` and left out."""
    variants = []
    for method, mode in specs:
        try:
            variants.append(_build_and_warm_one(method, mode, cfg, batches, args, device))
        except Exception as exc:  # one broken variant must not cost the others' numbers
            label = f"{method}/{mode}"
            log(f"  FAILED {label}: {type(exc).__name__}: {exc}")
            failures.append({"method": method, "mode": mode, "label": label,
                             "error": f"{type(exc).__name__}: {exc}"})
            trim_heap()
    return variants


def _build_and_warm_one(method: str, mode: str, cfg: Any, batches: list,
                        args: argparse.Namespace, device: torch.device) -> Variant:
    trim_heap()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)
    rss0 = current_rss()
    warm = max(2, args.warmup + (args.compiled_extra_warmup if mode == "compiled" else 0))
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        v = build_variant(method, mode, cfg, batches[0][0], args, device)
        build_s = time.perf_counter() - t0
        first = train_step(v, batches, device)["total"]
        for _ in range(warm - 2):
            train_step(v, batches, device)
        probe = SavedTensors(state_tensors(v.inner))
        train_step(v, batches, device, probe)  # the last warm-up step: its forward's saved bytes
    trim_heap()
    v.info.update(saved_bytes=probe.bytes, peak_bytes=v.info["state_bytes"] + probe.bytes)
    v.info.update(build_s=build_s, first_step_s=first, warmup_steps=warm, rss_before=rss0,
                  rss_delta=current_rss() - rss0, rss_peak_delta=sampler.peak - rss0)
    if device.type == "cuda":
        v.info.update(cuda_state_delta=torch.cuda.memory_allocated(device) - cuda0,
                      cuda_peak_delta=torch.cuda.max_memory_allocated(device) - cuda0)
    v.recompiles = 0  # count only those during the timed steps
    log(f"  built {v.label:<34} build {build_s:6.2f} s, first step {first:7.2f} s, "
        f"RSS +{human_bytes(v.info['rss_delta'])}")
    return v


def timed_rounds(variants: list[Variant], batches: list, rounds: int, per_round: int, device: torch.device) -> None:
    for v in variants:
        if v.switcher is not None:
            v.info["switched_before"] = v.switcher.num_switched()
            v.info["switch_step_first"] = v.switcher.step
    for v in variants:
        v.info["steps_per_round"] = per_round
    for r in range(rounds if variants else 0):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate who goes first
            for _ in range(per_round):
                v.steps.append(train_step(v, batches, device))
        log(f"  round {r + 1}/{rounds} done")
    for v in variants:
        if v.switcher is not None:
            a0, b0 = v.info.pop("switched_before")
            a1, b1 = v.switcher.num_switched()
            n, ads = len(v.steps), max(1, v.info.get("adapters", 1))
            v.info["switched_per_adapter_step"] = ((a1 - a0) + (b1 - b0)) / 2 / n / ads
            t_first, t_last = v.info.pop("switch_step_first"), v.switcher.step
            cfg = v.config
            r = v.switcher.adapters[0].target.rank
            v.info["expected_per_adapter_step"] = {
                "first": expected_switches(t_first, v.switcher.total_steps, r, cfg.interval, cfg.decay_ratio),
                "last": expected_switches(t_last, v.switcher.total_steps, r, cfg.interval, cfg.decay_ratio)}


@torch.no_grad()
def run_average_switch(v: Variant, calls: int, device: torch.device) -> dict[str, Any]:
    """Time the post-step hook (the switching) at positions x = t/T through a run and integrate
    over x; the pre-step hook (a check that the stacked bookkeeping is current) costs the same at every rate."""
    sw, opt = v.switcher, v.optimizer
    saved = sw.step
    per_x = []
    for x in RUN_GRID:
        ts = []
        for _ in range(calls):
            sw.step = min(sw.total_steps - 1, int(round(x * sw.total_steps)))
            settle(device)
            t0 = time.perf_counter()
            sw._post_step(opt, (), {})
            settle(device)
            ts.append(time.perf_counter() - t0)
        per_x.append(sum(ts) / len(ts))
    sw.step = saved
    area = sum((RUN_GRID[i + 1] - RUN_GRID[i]) * (per_x[i] + per_x[i + 1]) / 2 for i in range(len(RUN_GRID) - 1))
    pre = median([s["pre"] for s in v.steps]) or 0.0
    return {"grid": list(RUN_GRID), "post_ms": [t * 1e3 for t in per_x], "post_ms_run_avg": area * 1e3,
            "switch_ms_run_avg": (pre + area) * 1e3}


def summarize(v: Variant, tokens: int) -> dict[str, Any]:
    col = lambda k: [s[k] * 1e3 for s in v.steps]  # noqa: E731
    step, sw = col("total"), [s["pre"] + s["post"] for s in v.steps]
    sw_ms = [t * 1e3 for t in sw]
    step_ms = median(step)
    rec: dict[str, Any] = {
        "method": v.method, "mode": v.mode, "timed_steps": len(v.steps),
        "step_ms": step_ms, "step_ms_p25": quantile(step, 0.25), "step_ms_p75": quantile(step, 0.75),
        "step_ms_min": min(step),
        "fwd_ms": median(col("fwd")), "bwd_ms": median(col("bwd")), "opt_ms": median(col("opt")),
        "zero_grad_ms": median(col("zero")),
        "switch_ms": median(sw_ms) if v.switcher is not None else 0.0,
        "switch_pre_ms": median(col("pre")) if v.switcher is not None else 0.0,
        "switch_post_ms": median(col("post")) if v.switcher is not None else 0.0,
        "tokens_per_s": tokens / (step_ms / 1e3),
        "step_ms_all": step, "steps_per_round": v.info["steps_per_round"],
    }
    # median of per-step shares, not a ratio of medians
    rec["switch_share"] = median([a / b for a, b in zip(sw_ms, step)]) if v.switcher is not None else 0.0
    rec["opt_excl_switch_ms"] = median([s["opt"] * 1e3 - (s["pre"] + s["post"]) * 1e3 for s in v.steps])
    info = dict(v.info)
    if v.compiled:
        info["compile_s"] = max(0.0, info["first_step_s"] - step_ms / 1e3)
        info["recompiles_during_timing"] = v.recompiles
    rec.update(info)
    return rec


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over rounds of a's mean step time over b's in the same round: both ran back to back,
    so load that drifts over the run cancels (the ratio of overall medians would keep it)."""
    k = a["steps_per_round"]
    rounds = lambda r: [sum(r["step_ms_all"][i:i + k]) for i in range(0, len(r["step_ms_all"]), k)]  # noqa: E731
    return median([x / y for x, y in zip(rounds(a), rounds(b))])


def add_ratios(records: list[dict[str, Any]]) -> None:
    by = {(r["method"], r["mode"]): r for r in records}
    for r in records:
        full = by.get(("full-rank", r["mode"]))
        full_eager = by.get(("full-rank", "eager"))
        if full:
            r["step_vs_full"] = paired_ratio(r, full)
            r["saved_vs_full"] = r["saved_bytes"] / full["saved_bytes"]
            r["peak_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
        if full_eager:
            r["state_vs_full"] = r["state_bytes"] / full_eager["state_bytes"]
        lora = by.get(("lora", r["mode"]))
        if lora:
            r["step_vs_lora"] = paired_ratio(r, lora)
        kept = by.get(("switchlora-keep", r["mode"]))
        if kept and r["method"] == "switchlora-seeded":  # the same variant but for recomputing W'
            r["step_vs_kept"] = paired_ratio(r, kept)
        eager = by.get((r["method"], "eager"))
        if r["mode"] == "compiled" and eager:
            r["compiled_vs_eager"] = paired_ratio(r, eager)
        if "switch_ms_run_avg" in r:
            r["step_ms_run_avg"] = r["step_ms"] - r["switch_ms"] + r["switch_ms_run_avg"]
            r["switch_share_run_avg"] = r["switch_ms_run_avg"] / r["step_ms_run_avg"]
            if full:
                r["step_vs_full_run_avg"] = r["step_vs_full"] * r["step_ms_run_avg"] / r["step_ms"]


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------
def model_config(args: argparse.Namespace, seq: int) -> Any:
    """The tiny LLaMA of a setting: rotary tables as long as its sequences (16 at least)."""
    return llama_config(args.dim, args.layers, args.heads, max_seq_len=max(seq, 16))


def run_setting(batch: int, seq: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    tokens = batch * seq
    log(f"setting {batch}x{seq} ({tokens} tokens/step)")
    if args.compile:
        torch._dynamo.reset()  # a fresh cache per setting: no shape-driven recompiles across settings
    cfg = model_config(args, seq)
    batches = token_batches(batch, seq, args.data_batches, args.seed, device)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    specs = [(m, mode) for mode in modes for m in args.variants]
    failures: list[dict[str, Any]] = []
    variants = build_and_warm(specs, cfg, batches, args, device, failures)
    timed_rounds(variants, batches, args.rounds, args.steps_per_round, device)
    run_avg = {}
    for v in variants:
        if v.switcher is not None:
            run_avg[v.label] = run_average_switch(v, args.run_avg_calls, device)
    records = []
    for v in variants:
        rec = summarize(v, tokens)
        if v.label in run_avg:
            rec["run_average_profile"] = run_avg[v.label]
            rec["switch_ms_run_avg"] = run_avg[v.label]["switch_ms_run_avg"]
        records.append(rec)
    add_ratios(records)
    del variants
    trim_heap()
    first = (batch, seq) == args.setting_list[0]
    memory = run_memory_probe(cfg, batches[0], args, device) if args.memory_probe and (first or not args.quick) else []
    out = {"name": f"{batch}x{seq}", "batch": batch, "seq": seq, "tokens_per_step": tokens,
           "model": {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "ffn_hidden": cfg.ffn_hidden,
                     "max_seq_len": cfg.max_seq_len, "vocab": cfg.vocab,
                     "params": sum(p.numel() for p in build_llama(cfg).parameters())},
           "variants": records, "memory": memory, "failed": failures, "max_rss_after": max_rss()}
    return out


class CheckpointedBlock(nn.Module):
    """A plain block run under torch.utils.checkpoint: full-rank's per-block activation checkpointing,
    the counterpart of ``dl.transform(..., checkpoint=True)``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)


# (variant, form) of the memory probe, each run without and with per-block checkpointing
MEMORY_ROWS = (("full-rank", None), ("galore", None), ("lora", "auto"), ("switchlora-seeded", "auto"),
               ("switchlora-seeded", "weight"), ("switchlora-seeded", "activation"), ("switchlora-keep", "weight"))


def _galore_optimizer(model: nn.Module, low: list[torch.Tensor], args: argparse.Namespace) -> torch.optim.Optimizer:
    """galore-torch's AdamW at the adapters' rank on ``low``, the weights the pass adapts (as
    benchmarks/pretrain.py does), torch's AdamW update on the rest."""
    GaLoreAdamW, _ = load_galore()
    rest = [p for p in model.parameters() if not any(p is q for q in low)]
    return GaLoreAdamW([{"params": low, "rank": args.rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
                        {"params": rest}], lr=args.lr, no_deprecation_warning=True)


def probe_memory(method: str, form: str | None, checkpointed: bool, cfg: Any, batch: tuple,
                 targets: set[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One training step of a fresh variant (eager): the bytes its forward saves for backward and its
    training state; peak = state + saved."""
    x, y = batch
    model = build_llama(cfg).to(device)
    config = method_config(method, args.rank, tokens_per_step=x.numel(), form=form or "auto")
    module = model if config is None else dl.transform(model, (x,), config, checkpoint=checkpointed)
    low = [p for n, p in model.named_parameters() if n in targets]  # GaLore's, named before wrapping
    if config is None and checkpointed:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = CheckpointedBlock(block)
    probe = SavedTensors(state_tensors(module))
    with variant_context(method):
        with probe, autocast(module, args.precision):
            out = module(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        loss.backward()
    rec: dict[str, Any] = {"method": method, "form": form, "checkpoint": checkpointed, "saved_bytes": probe.bytes}
    if method == "galore":  # projector and moments exist once it has stepped
        optimizer = _galore_optimizer(module, low, args)
        optimizer.step()
        rec["state_bytes"] = optimizer_state_bytes(module, optimizer)
    elif config is None:
        rec["state_bytes"] = full_rank_state_bytes(module)
    else:
        rec["state_bytes"] = training_state_bytes(module)
        rec["adapter_forms"] = {f: sum(a.form == f for a in dl.adapters(module)) for f in ("activation", "weight")}
    rec["peak_bytes"] = rec["state_bytes"] + rec["saved_bytes"]
    return rec


def run_memory_probe(cfg: Any, batch: tuple, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every MEMORY_ROWS variant without and with per-block checkpointing (the form before
    recomputation only without: checkpointing recomputes every W' anyway)."""
    x = batch[0]
    t0 = time.perf_counter()
    targets = {a.weight for a in dl.adapters(dl.transform(build_llama(cfg).to(device), (x,), method_config("lora", args.rank)))}
    rows = []
    for checkpointed in (False, True):
        for method, form in MEMORY_ROWS:
            if checkpointed and method == "switchlora-keep":
                continue
            try:
                rows.append(probe_memory(method, form, checkpointed, cfg, batch, targets, args, device))
            except Exception as exc:  # e.g. galore-torch missing: the other rows still count
                log(f"  memory probe {method}/{form}/checkpoint={checkpointed} FAILED: {type(exc).__name__}: {exc}")
                rows.append({"method": method, "form": form, "checkpoint": checkpointed,
                             "error": f"{type(exc).__name__}: {exc}"})
            trim_heap()
    full = {r["checkpoint"]: r for r in rows if r["method"] == "full-rank" and "error" not in r}
    for r in rows:
        if "error" in r or not full:
            continue
        same, plain = full.get(r["checkpoint"]), full.get(False)
        if same:
            r["saved_vs_full"] = r["saved_bytes"] / same["saved_bytes"]
            r["peak_vs_full"] = r["peak_bytes"] / same["peak_bytes"]
        if plain:
            r["peak_vs_full_unchecked"] = r["peak_bytes"] / plain["peak_bytes"]
    log(f"  memory probe: {len(rows)} variants in {time.perf_counter() - t0:.0f} s")
    return rows


def _crossover(tokens: list[int], ratios: list[float]) -> float | None:
    """Tokens/step where ratio (weight/activation) crosses 1, interpolated in log-log; None if it doesn't."""
    for (t0, r0), (t1, r1) in zip(zip(tokens, ratios), zip(tokens[1:], ratios[1:])):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            l0, l1 = math.log(r0), math.log(r1)
            f = l0 / (l0 - l1)
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return None


def predicted_crossover(rows: int, cols: int, rank: int, limit: int = 1 << 24) -> int | None:
    """The fewest tokens/step at which the library's own choice (``choose_form("auto", ...)``) is the
    weight-space form; None: it keeps the activation branch up to ``limit``. Bisection: the choice
    flips once as tokens grow (the branch's cost grows with T faster than the weight-space form's)."""
    def weight(tokens: int) -> bool:
        return choose_form("auto", True, rows, cols, rank, tokens) == "weight"

    if not weight(limit):
        return None
    lo, hi = 0, limit  # weight(hi) holds; weight(lo) does not (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if weight(mid) else (mid, hi)
    return hi


def time_op_forms(rows: int, cols: int, rank: int, tokens: int, rounds: int,
                  device: torch.device) -> dict[str, float]:
    """Median fwd+bwd ms of one adapted matrix product ``x @ W.T`` (x: tokens x cols, needing its
    gradient as inside a network) in each form, the two timed interleaved."""
    g = torch.Generator().manual_seed(rows * 7919 + cols * 31 + rank)
    W = (torch.randn(rows, cols, generator=g) / math.sqrt(cols)).to(device)
    A = (torch.randn(rank, cols, generator=g) / math.sqrt(cols)).to(device).requires_grad_()
    B = (torch.randn(rows, rank, generator=g) / math.sqrt(rank)).to(device).requires_grad_()
    x = torch.randn(tokens, cols, generator=g).to(device).requires_grad_()
    dy = torch.randn(tokens, rows, generator=g).to(device)
    s = 1.0 / rank
    s_t = torch.tensor(s, device=device)

    def activation() -> None:  # s on the rank-r intermediate, as insert_adapters writes it
        (F.linear(x, W) + F.linear(F.linear(x, A) * s, B)).backward(dy)

    def weight() -> None:  # as insert_adapters writes it: one addmm, s on the (m, r) factor, recomputed
        scope = enter_recompute_scope()  # in backward rather than kept (dynlora_fx.ops)
        y = F.linear(x, merged_weight(W, B, A, s_t))
        exit_recompute_scope(scope)
        y.backward(dy)

    times: dict[str, list[float]] = {"activation": [], "weight": []}
    for i in range(rounds + 1):  # round 0 warms up
        for name, fn in (("activation", activation), ("weight", weight))[:: 1 if i % 2 else -1]:
            x.grad = A.grad = B.grad = None
            settle(device)
            t0 = time.perf_counter()
            fn()
            settle(device)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {k: median(v) * 1e3 for k, v in times.items()}


def run_form_sweep(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Both adapter forms on every adapted weight shape of the model, per op: measured ratio,
    the form ``form="auto"`` picks (``choose_form``), and the crossover measured vs predicted."""
    cfg = model_config(args, args.seq)
    example = torch.zeros(1, 8, dtype=torch.long)
    gm = dl.transform(build_llama(cfg), (example,), method_config("lora", max(args.form_ranks), form="weight"))
    shapes = sorted({(a.shape[0], math.prod(a.shape[1:])) for a in dl.adapters(gm)})
    del gm
    log(f"adapter form sweep: shapes {shapes}, tokens/step {args.form_tokens}, ranks {args.form_ranks}")
    rows, crossover = [], {}
    for m, n in shapes:
        for r in args.form_ranks:
            ratios = []
            for tokens in args.form_tokens:
                t = time_op_forms(m, n, r, tokens, args.form_rounds, device)
                chosen = choose_form("auto", True, m, n, r, tokens)
                ratio = t["weight"] / t["activation"]
                ratios.append(ratio)
                rows.append({"rows": m, "cols": n, "rank": r, "tokens_per_step": tokens,
                             "activation_ms": t["activation"], "weight_ms": t["weight"],
                             "ratio_weight_vs_activation": ratio, "auto_picks": chosen,
                             "measured_faster": "weight" if ratio < 1 else "activation"})
            crossover[f"{m}x{n}/r{r}"] = {"measured_tokens": _crossover(args.form_tokens, ratios),
                                          "predicted_tokens": predicted_crossover(m, n, r)}
    picks = [x for x in rows if abs(x["ratio_weight_vs_activation"] - 1) > 0.05]  # clear wins only
    return {"rows": rows, "crossover": crossover, "rounds": args.form_rounds,
            "auto_agrees": sum(x["auto_picks"] == x["measured_faster"] for x in picks), "clear_cases": len(picks)}


def rate_analytics(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dl.SwitchLoRA(rank=args.rank)
    T = args.run_steps
    rates = [switch_rate(t, T, cfg.decay_ratio) for t in range(T)]
    peak = rates[0]
    measured_last = args.warmup + args.compiled_extra_warmup + args.rounds * args.steps_per_round
    return {"run_steps": T, "interval": cfg.interval, "decay_ratio": cfg.decay_ratio,
            "peak_per_adapter_side": args.rank / cfg.interval,
            "mean_rate_over_peak": sum(rates) / T / peak,
            "rate_at_measured_steps_min": switch_rate(measured_last, args.total_steps, cfg.decay_ratio),
            "benchmark_total_steps": args.total_steps,
            "formula": "rate(t) = 0.3 ** ((t+1) / (decay_ratio*T)); switched per side = r/interval * rate(t)"}


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def setting_rows(s: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    speed_h = ["variant", "mode", "step ms (p25–p75)", "fwd/bwd/opt ms", "switch ms (share)",
               "switch ms run avg (share)", "tokens/s", "vs full-rank", "vs full, run avg", "compiled/eager",
               "vs W' kept"]
    mem_h = ["variant", "mode", "adapters (form)", "state", "vs full-rank", "saved for backward", "vs full-rank",
             "peak", "vs full-rank", "RSS Δ", "RSS peak Δ", "build s", "compile s", "recompiles",
             "switched/adapter/step"]
    speed, mem = [], []
    for r in s["variants"]:
        has_sw = r["method"].startswith("switchlora")
        speed.append([
            r["method"], r["mode"],
            f"{r['step_ms']:.1f} ({r['step_ms_p25']:.0f}–{r['step_ms_p75']:.0f})",
            f"{r['fwd_ms']:.0f}/{r['bwd_ms']:.0f}/{r['opt_ms']:.0f}",
            f"{r['switch_ms']:.1f} ({100 * r['switch_share']:.1f}%)" if has_sw else "–",
            f"{r['switch_ms_run_avg']:.1f} ({100 * r['switch_share_run_avg']:.1f}%)" if has_sw else "–",
            f"{r['tokens_per_s']:,.0f}",
            _f(r.get("step_vs_full"), ".2f", "x"),
            _f(r.get("step_vs_full_run_avg"), ".2f", "x") if has_sw else "–",
            _f(r.get("compiled_vs_eager"), ".2f", "x"),
            _f(r.get("step_vs_kept"), ".2f", "x"),
        ])
        extra = r.get("reference_tables_bytes")
        state = human_bytes(r["state_bytes"]) + (f" (incl. {human_bytes(extra)} tables)" if extra else "")
        forms = r.get("adapter_forms") or {}
        mem.append([
            r["method"], r["mode"], " + ".join(f"{n} {f[:3]}" for f, n in forms.items()) or "–", state,
            _f(r.get("state_vs_full"), ".2f", "x"), human_bytes(r["saved_bytes"]), _f(r.get("saved_vs_full"), ".2f", "x"),
            human_bytes(r["peak_bytes"]), _f(r.get("peak_vs_full"), ".2f", "x"),
            human_bytes(r["rss_delta"]), human_bytes(r["rss_peak_delta"]), f"{r['build_s']:.2f}",
            _f(r.get("compile_s"), ".1f"), str(r.get("recompiles_during_timing", "–")),
            _f(r.get("switched_per_adapter_step"), ".2f") if has_sw else "–",
        ])
    return speed_h, speed, mem_h, mem


def memory_rows(s: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    h = ["variant", "form", "checkpointing", "state", "saved for backward", "saved vs full-rank", "peak",
         "peak vs full-rank", "peak vs full-rank unchecked"]
    rows = []
    for r in s.get("memory", []):
        if "error" in r:
            rows.append([r["method"], r["form"] or "–", "per block" if r["checkpoint"] else "none", "failed: "
                         + r["error"][:60], "", "", "", "", ""])
            continue
        forms = r.get("adapter_forms") or {}
        form = r["form"] or "–"
        if r["form"] == "auto":
            form = "auto: " + " + ".join(f"{n} {f[:3]}" for f, n in forms.items() if n)
        rows.append([r["method"], form, "per block" if r["checkpoint"] else "none", human_bytes(r["state_bytes"]),
                     human_bytes(r["saved_bytes"]), _f(r.get("saved_vs_full"), ".2f", "x"),
                     human_bytes(r["peak_bytes"]), _f(r.get("peak_vs_full"), ".2f", "x"),
                     _f(r.get("peak_vs_full_unchecked"), ".2f", "x")])
    return h, rows


def form_rows(fs: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    h = ["weight (m x n)", "rank", "tokens/step", "activation ms", "weight-space ms", "weight/activation",
         "auto picks"]
    rows = [[f"{x['rows']}x{x['cols']}", str(x["rank"]), str(x["tokens_per_step"]), f"{x['activation_ms']:.2f}",
             f"{x['weight_ms']:.2f}", f"{x['ratio_weight_vs_activation']:.2f}",
             x["auto_picks"] + ("" if x["auto_picks"] == x["measured_faster"] else " (slower)")]
            for x in fs["rows"]]
    return h, rows


def form_notes(fs: dict[str, Any]) -> list[str]:
    def tok(v: float | None, none: str) -> str:
        return none if v is None else f"~{v:.0f}"
    notes = [f"{key}: crossover measured {tok(c['measured_tokens'], 'outside the sweep')}, "
             f"predicted {tok(c['predicted_tokens'], 'never (activation always cheaper)')} tokens/step"
             for key, c in fs["crossover"].items()]
    notes.append(f"form=\"auto\" picked the measured faster form in {fs['auto_agrees']} of {fs['clear_cases']} "
                 "cases where one form was >5% faster")
    return notes


def print_report(result: dict[str, Any], markdown: bool) -> None:
    """Every table and note of ``result``: GitHub markdown for the README, or rich tables."""
    from rich.console import Console
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)

    def say(md: str, plain: str) -> None:
        if markdown:
            print(md)
        else:
            console.print(plain, markup=False)

    a = result["analytic"]
    head = (f"model: {result['args']['layers']} layers, dim {result['args']['dim']}, rank {result['args']['rank']}; "
            f"torch {result['machine']['torch']}, {result['machine']['torch_threads']} threads, "
            f"{result['machine']['cpu_count']} CPUs; medians of {result['args']['rounds']} rounds x "
            f"{result['args']['steps_per_round']} steps, interleaved")
    rate = (f"switching at peak rate ({a['peak_per_adapter_side']:.2f} vectors/side/adapter/step); over a "
            f"{a['run_steps']}-step run the rate averages {a['mean_rate_over_peak']:.3f} x peak")
    say(f"<!-- speed.py: {head} -->\n\n_{head}. {rate}._\n", f"{head}\n{rate}")
    for s in result["settings"]:
        sh, sr, mh, mr = setting_rows(s)
        ph, pr = memory_rows(s)
        for title, h, rows, left in ((f"{s['name']} ({s['tokens_per_step']} tokens/step), speed", sh, sr, 2),
                                     (f"{s['name']}, memory and compile", mh, mr, 2),
                                     (f"{s['name']}, peak training memory = state + saved for backward "
                                      "(eager, one step)", ph, pr, 3)):
            if rows:
                print_table(title, h, rows, ["l"] * left + ["r"] * (len(h) - left), markdown=markdown, console=console)
        for f in s.get("failed", []):
            say(f"- **{f['label']} failed**: `{f['error']}`", f"{f['label']} failed: {f['error']}")
    if result.get("form_sweep"):
        fh, fr = form_rows(result["form_sweep"])
        print_table("Adapter form per op: weight-space vs activation branch (fwd+bwd, eager)", fh, fr,
                    ["l"] + ["r"] * (len(fh) - 2) + ["l"], markdown=markdown, console=console)
        for note in form_notes(result["form_sweep"]):
            say(f"- {note}", note)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, HERE / "results" / "speed.json", "tiny model, few steps, eager only: a smoke test")
    add_model_flags(p, rank="adapter rank (default 64; quick 8)", batch="batch of the first setting (default 8; quick 2)",
                    seq="sequence length of the first setting (default 128; quick 32)")
    p.add_argument("--settings", help="comma list of BATCHxSEQ (default: BATCHxSEQ and (4*BATCH)xSEQ, "
                                      "i.e. 8x128 and 32x128 = 1024 and 4096 tokens/step; \"\" for none, e.g. "
                                      "to run only the form sweep)")
    p.add_argument("--variants", default=",".join(METHODS), help=f"comma list out of {', '.join(METHODS)}")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="also time compiled variants (default, except with --quick)")
    comp.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only")
    p.add_argument("--compile-cache", action="store_true",
                   help="let torch.compile use its FX-graph / AOTAutograd caches (default: off, cold compile times)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 2)")
    p.add_argument("--steps-per-round", type=int, help="steps per variant per round (default 2; quick 1)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default 2; quick 1)")
    p.add_argument("--compiled-extra-warmup", type=int, default=1, help="extra untimed steps for compiled variants")
    p.add_argument("--total-steps", type=int, default=10**6,
                   help="total_steps given to every switcher: large, so switching runs at its peak rate")
    p.add_argument("--run-steps", type=int, default=10_000, help="run length T for the run-averaged rate")
    p.add_argument("--run-avg-calls", type=int, help="switch-hook calls per run position (default 5; quick 1)")
    p.add_argument("--no-form-sweep", dest="form_sweep", action="store_false", help="skip the adapter form sweep")
    p.add_argument("--no-memory-probe", dest="memory_probe", action="store_false",
                   help="skip the per-setting peak-memory probe (forms, GaLore, per-block checkpointing)")
    p.add_argument("--form-tokens", type=_ints, help="tokens/step of the form sweep (default 256,1024,4096)")
    p.add_argument("--form-ranks", type=_ints, help="ranks of the form sweep (default 16,64)")
    p.add_argument("--form-rounds", type=int, help="timed rounds per op of the form sweep (default 9; quick 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of the random byte batches")
    p.add_argument("--data-batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--precision", choices=("fp32", "bf16-autocast"), default="fp32",
                   help="bf16-autocast: fp32 parameters and state, bf16 compute")
    p.add_argument("--preset", choices=("gpu",), help="gpu: one-GPU bf16 setting (LLaMA-style d=1024, 8 layers, "
                   "16 heads, rank 256, 64x256 = 16k tokens/step, CUDA, bf16-autocast); flags given win")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero (on x86 CPUs they slow some steps 5-20x and "
                        "make timings erratic; see benchmarks/pretrain.py)")
    args = p.parse_args(argv)

    if args.preset == "gpu":
        for k, v in GPU_PRESET.items():
            if getattr(args, k) is None or (k in ("device", "precision") and getattr(args, k) == p.get_default(k)):
                setattr(args, k, v)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}{' (--preset gpu)' if args.preset else ''} needs CUDA, which is not "
                "available here; pass --device cpu")
    defaults = dict(dim=(64, 256), layers=(2, 4), heads=(2, 4), rank=(8, 64), batch=(2, 8), seq=(32, 128),
                    rounds=(2, 5), steps_per_round=(1, 2), warmup=(1, 2), run_avg_calls=(1, 5),
                    form_tokens=([64, 256], [256, 1024, 4096]), form_ranks=([4, 8], [16, 64]),
                    form_rounds=(3, 9))
    fill_defaults(args, defaults)
    if args.compile is None:
        args.compile = not args.quick
    if args.settings is None:
        args.settings = f"{args.batch}x{args.seq},{4 * args.batch}x{args.seq}"
    try:
        args.setting_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.settings.split(",") if s]
        assert all(len(s) == 2 and min(s) > 0 for s in args.setting_list)
    except (ValueError, AssertionError):
        p.error(f"--settings: expected e.g. 8x128,32x128, got {args.settings!r}")
    args.variants = chosen(p, "--variants", args.variants, METHODS)
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        p.error(f"--dim {args.dim} must split into --heads {args.heads} even-sized heads")
    return args


# one GPU, bf16 compute, at a size where SwitchLoRA pays off: d=1024, 8 layers, 16k tokens/step
GPU_PRESET = dict(dim=1024, layers=8, heads=16, rank=256, batch=64, seq=256, settings="64x256", device="cuda",
                  precision="bf16-autocast", form_tokens=[4096, 16384], form_ranks=[64, 256])


def process_warmup(args: argparse.Namespace, device: torch.device) -> None:
    """One untimed step of a full-rank and a SwitchLoRA model, thrown away, so that one-off
    process costs (kernel and library loading, export machinery) land on no variant's numbers."""
    batch, seq = args.setting_list[0] if args.setting_list else (args.batch, args.seq)
    batches = token_batches(batch, seq, 1, args.seed, device)
    for method in ("full-rank", "switchlora-seeded"):
        v = build_variant(method, "eager", model_config(args, seq), batches[0][0], args, device)
        train_step(v, batches, device)
        del v
    if args.compile:  # compiler start-up (imports, toolchain checks) would otherwise land on the first variant
        tiny = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).to(device)
        torch.compile(tiny, fullgraph=True, dynamic=False)(torch.randn(4, 8, device=device)).sum().backward()
        del tiny
        torch._dynamo.reset()
    trim_heap()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_denormals:
        torch.set_flush_denormal(True)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "speed", "machine": machine_info(device),
                              "code": code_version(HERE.parent),
                              "args": {k: v for k, v in vars(args).items() if k != "setting_list"},
                              "analytic": rate_analytics(args), "settings": []}
    cache_dir = None
    if args.compile and not args.compile_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # a fresh kernel cache: no hits from earlier runs of this script (hits within this run
        # remain possible: variants compiled later may reuse kernels identical to earlier ones)
        cache_dir = tempfile.mkdtemp(prefix="speed-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    process_warmup(args, device)
    result["machine"]["rss_at_start"] = current_rss()
    with contextlib.ExitStack() as stack:
        if args.compile and not args.compile_cache:
            # cold compiles: otherwise LoRA and SwitchLoRA (identical graphs up to parameter values)
            # and reruns of this script hit Inductor's and AOTAutograd's caches
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        for batch, seq in args.setting_list:
            result["settings"].append(run_setting(batch, seq, args, device))
    if args.form_sweep:
        result["form_sweep"] = run_form_sweep(args, device)
    result["max_rss"] = max_rss()
    result["runtime_s"] = time.perf_counter() - t_start
    result["machine"]["load_average_end"] = machine_info()["load_average"]
    result["notes"] = [
        "All timings are wall-clock medians over interleaved rounds in one process; the machine may be shared.",
        "switch ms: time inside the switcher's optimizer-step hooks (pre: mask frozen gradients; post: switch), "
        "at the peak switching rate (total_steps = benchmark_total_steps).",
        "switch ms run avg: pre-hook median + post-hook time integrated over run positions x = t/T.",
        "state: parameters + gradients + AdamW moments of trained tensors, storage of frozen ones, stored "
        "candidate buffers; for the reference switcher, its own stored candidate tables "
        "(reference_tables_bytes, included in state).",
        "RSS deltas are process-wide: measured while each variant was built and warmed up, after a heap trim.",
        "compile s: first step minus the median step; Inductor's FX-graph and AOTAutograd caches are off and its "
        "kernel cache starts empty (unless --compile-cache), but later variants may reuse kernels compiled for "
        "earlier ones in the same process.",
    ]
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return publish(args.out, result, print_report, args.markdown)


if __name__ == "__main__":
    main()
