"""Pre-training quality benchmark: full-rank vs LoRA vs ReLoRA vs SwitchLoRA vs GaLore.

A LLaMA-style byte-level decoder (``examples/tiny_llama.py``) is pre-trained from scratch
on the built-in stdlib byte corpus (:mod:`dynlora_fx.corpus`); quality is the validation
loss (and bits per byte = loss / ln 2) on the held-out split. Every method starts from the
same model initialisation, sees the same batches in the same order and takes the same
number of steps, with the same cosine schedule (linear warm-up, floor 0.1 x peak) and
gradient clipping at 1.0 (``dynlora_fx.training.Trainer``).

Methods (``--methods``, comma separated; ``default`` and ``all`` are shorthands):

    full                  full-rank AdamW (its matrices at ``lr``, the rest at ``lr_other``)
    lora                  dl.LoRA (W frozen at init)
    relora                dl.ReLoRA (merge + re-init every steps/4, jagged LR restarts)
    switchlora            dl.SwitchLoRA, candidates="seeded" (the project default)
    switchlora-stored     the same with candidates="stored" (must match seeded exactly)
    galore                galore-torch's GaLoreAdamW at the same rank on the weights the pass adapts
    ablations (all SwitchLoRA, seeded; they reuse switchlora's learning rate):
    switchlora-freeze0    freeze_steps=0 (interval >= 2*freeze_steps holds trivially)
    switchlora-noreset    reset_vector_state=False
    switchlora-lorainit   init="lora" (Kaiming A, zero B) instead of the balanced init
    switchlora-interval80 interval=80 (half as many switches)
    switchlora-decay0.2   decay_ratio=0.2 (switching decays twice as slowly)

Learning rates. Each method family (full, lora, relora, switchlora, galore) gets the peak LR
of its *matrices* (the adapters; W for full-rank; the GaLore-projected weights) from a small
sweep: a few values, short runs of the same recipe, chosen by validation loss and recorded
with every sweep point in the JSON. Everything that every method trains full-rank
(embeddings, RMSNorm gains, the head when it is not adapted) gets the same ``lr_other`` in
every method. Full-rank is swept exactly like the others.

Presets (``--preset``):

    smoke    seconds: 2 layers, d=64, rank 16, batch 4x64, 10 steps, 2-value sweep of 2 steps
    default  4 layers, d=192, 6 heads (1.87 M params), rank 48 on all 29 projections incl.
             lm_head, batch 16x128 bytes, 600 steps, 3-value sweeps of 100 steps, 1 seed:
             15 x 100 sweep steps + 6 x 600 final steps = 5100 steps + ~93 evaluations.
             Measured (AMD EPYC, AVX-512, torch 2.14.1 CPU, flush-denormal, 2 threads on a machine
             where other jobs left ~1 effective core): 0.40 s/step galore, 0.41 full, 0.43 relora,
             0.445 lora, 0.45 switchlora, 0.47 switchlora-stored; an evaluation (8 x 16x128) 1.0-1.4 s
             -> ~38 min. On 2 uncontended cores a full-rank step took 0.21 s -> estimate ~20-25 min.
             ``--seeds 2`` adds 3600 steps (~15 min uncontended, ~26 min at 1 core).
    gpu      one GPU, bf16 compute (--precision bf16-autocast): 8 layers, d=1024, rank 256,
             batch 64x256 = 16k tokens/step, 3000 steps, on CUDA

``--precision`` picks fp32 (default), bf16-autocast (fp32 parameters and optimizer state, bf16
compute: the recommended low-precision recipe) or bf16 (parameters cast to bf16; adapted weights
keep an exact fp32 master). Every method runs in the chosen precision.

The rank must bind: plain LoRA should end clearly (>= 2 %) worse than well-tuned full-rank;
the summary prints a WARNING line when it does not.

Output: ``--out`` JSON (per-method validation curves every ``--eval-every`` steps, final loss
and bpb, chosen LR and sweep, step time, training-state bytes), ``--plot`` PNG of the
validation curves, a rich table (``--markdown`` prints it as GitHub markdown instead).

CPU note: this model's softmax over 256 bytes drives the probabilities of bytes that never
occur towards 0, and the backward matmuls then run on denormal floats, which is ~10-20x
slower on x86. The benchmark therefore calls ``torch.set_flush_denormal(True)`` (disable
with ``--keep-denormals``).

    python benchmarks/pretrain.py --preset smoke
    python benchmarks/pretrain.py --preset default --out benchmarks/results/pretrain.json \\
        --plot benchmarks/results/pretrain.png
"""

from __future__ import annotations

import os

# Sleep, don't spin, in OpenMP barriers: on a shared 2-core machine spinning threads that wait
# for a descheduled sibling made a 2-thread run ~20x slower (smoke preset: 178 s vs 10 s).
# Must be set before torch loads its OpenMP runtime; an explicit setting is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import dataclasses
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import dynlora_fx as dl
from _common import ABLATIONS, build_llama, llama_config, median, method_config, optimizer_state_bytes, print_table, \
    tiny_llama, write_json
from dynlora_fx import corpus as _corpus
from dynlora_fx.testing import load_galore
from dynlora_fx.training import PRECISIONS, Trainer, TrainSettings, cast_model, full_rank_state_bytes, \
    stored_candidate_bytes, training_state_bytes

SCHEMA = "dynlora-fx/benchmarks/pretrain/v1"
LN2 = math.log(2.0)
FAMILIES = ("full", "lora", "relora", "switchlora", "galore")
DEFAULT_METHODS = ("full", "lora", "relora", "switchlora", "switchlora-stored", "galore")
ALL_METHODS = DEFAULT_METHODS + tuple(ABLATIONS)
GALORE_MISSING = "skipped: galore-torch not installed"


# -- presets ------------------------------------------------------------------------------
@dataclass
class Preset:
    name: str
    n_layers: int
    dim: int
    n_heads: int
    rank: int
    batch_size: int
    seq_len: int
    steps: int
    eval_every: int
    val_batches: int
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    lr_other: float = 1e-2
    seeds: int = 1
    sweep_steps: int = 100
    grids: dict[str, list[float]] = field(default_factory=dict)
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None = torch's default
    precision: str = "fp32"  # dynlora_fx.training.PRECISIONS: fp32, bf16-autocast (fp32 params, bf16 compute), bf16


# Grids: three values per family, a factor 2 apart, centred on each family's optimum in
# 100-step exploratory runs of the default model (lr_other=1e-2, 1 seed): full-rank
# 5e-4/1e-3/2e-3/4e-3/8e-3/1.6e-2 -> 2.346/2.262/2.300/2.563/2.575/2.693; LoRA 2e-3/8e-3/3.2e-2 ->
# 2.679/2.447/3.045; SwitchLoRA -> 2.567/2.301/2.592; GaLore (scale 0.25) -> 2.559/2.315/2.435.
# (lr_other=3e-3 instead of 1e-2 was worse for full-rank at lr=2e-3: 2.553 vs 2.300.)
_GRIDS = {
    "full": [5e-4, 1e-3, 2e-3],
    "lora": [4e-3, 8e-3, 1.6e-2],
    "relora": [4e-3, 8e-3, 1.6e-2],
    "switchlora": [4e-3, 8e-3, 1.6e-2],
    "galore": [4e-3, 8e-3, 1.6e-2],
}

PRESETS = {
    "smoke": Preset("smoke", n_layers=2, dim=64, n_heads=2, rank=16, batch_size=4, seq_len=64, steps=10,
                    eval_every=5, val_batches=2, warmup_frac=0.2, seeds=1, sweep_steps=2,
                    grids={"full": [4e-3, 8e-3], **{f: [8e-3, 1.6e-2] for f in FAMILIES[1:]}},
                    galore_update_proj_gap=5, threads=1),
    "default": Preset("default", n_layers=4, dim=192, n_heads=6, rank=48, batch_size=16, seq_len=128, steps=600,
                      eval_every=50, val_batches=8, seeds=1, sweep_steps=100, grids=dict(_GRIDS)),
    # one GPU, bf16 compute: LLaMA-style d=1024, 8 layers, 64x256 = 16k tokens/step
    "gpu": Preset("gpu", n_layers=8, dim=1024, n_heads=16, rank=256, batch_size=64, seq_len=256, steps=3000,
                  eval_every=100, val_batches=16, seeds=2, sweep_steps=500, grids=dict(_GRIDS), device="cuda",
                  precision="bf16-autocast"),
}


def family_of(method: str) -> str:
    return "switchlora" if method.startswith("switchlora") else method


# -- one run ---------------------------------------------------------------------------------
def run_config(method: str, p: Preset, steps: int, seed: int) -> dl.config.AdapterConfig | None:
    """The method's config for a run of ``steps``: ReLoRA merges and restarts every quarter of it."""
    if method != "relora":
        return method_config(method, p.rank, seed=seed)
    reset_every = max(2, steps // 4)
    return method_config(method, p.rank, reset_every=reset_every, warmup=min(20, max(1, reset_every // 5)), seed=seed)


class Bench:
    def __init__(self, p: Preset, args: argparse.Namespace, console: Any):
        self.p, self.args, self.console = p, args, console
        self.device = torch.device(p.device)
        self.corpus = _corpus.load_corpus()
        self.val = [(x.to(self.device), y.to(self.device)) for x, y in
                    _corpus.val_batches(self.corpus.val, batch_size=p.batch_size, seq_len=p.seq_len,
                                        max_batches=p.val_batches)]
        self.example = (self.corpus.val[: 2 * min(64, p.seq_len)].long().view(2, -1).to(self.device),)
        self._models: dict[int, nn.Module] = {}
        self._transformed: dict[str, nn.Module] = {}
        self.transform_s: dict[str, float] = {}
        self._galore: tuple[Any, str] | None = None

    def model(self, seed: int) -> nn.Module:
        if seed not in self._models:
            cfg = llama_config(self.p.dim, self.p.n_layers, self.p.n_heads, max_seq_len=max(256, self.p.seq_len))
            self._models[seed] = cast_model(build_llama(cfg, seed).to(self.device), self.p.precision)
        return self._models[seed]

    def _transform_once(self, config: Any, seed: int, label: str) -> nn.Module:
        """The model transformed with ``config``, cached: callers that train on it copy it."""
        key = f"{seed}:{config.to_json()}"
        if key not in self._transformed:
            t0 = time.perf_counter()
            self._transformed[key] = dl.transform(self.model(seed), self.example, config)
            self.transform_s[f"{label}/seed{seed}"] = round(time.perf_counter() - t0, 3)
        return self._transformed[key]

    def transformed(self, config: Any, seed: int, label: str) -> nn.Module:
        """A fresh copy of the model transformed with ``config`` (one transform per config, copied)."""
        return copy.deepcopy(self._transform_once(config, seed, label))

    def adapted_weights(self, seed: int) -> list[str]:
        """The weights the pass adapts (what GaLore projects): those of a LoRA transform."""
        gm = self._transform_once(dl.LoRA(rank=self.p.rank, seed=seed), seed, "lora")
        return [a.weight for a in dl.adapters(gm)]

    def galore(self) -> tuple[Any, str]:
        if self._galore is None:
            self._galore = load_galore()
        return self._galore

    def settings(self, steps: int, lr: float) -> TrainSettings:
        p = self.p
        return TrainSettings(steps=steps, lr=lr, lr_other=p.lr_other, warmup=max(1, round(p.warmup_frac * steps)),
                             min_lr_ratio=p.min_lr_ratio, clip=p.clip, precision=p.precision)

    def trainer(self, method: str, steps: int, lr: float, seed: int) -> tuple[Trainer, nn.Module]:
        config = run_config(method, self.p, steps, seed)
        settings = self.settings(steps, lr)
        if config is None:
            module = copy.deepcopy(self.model(seed))
        else:
            module = self.transformed(config, seed, method)
        optimizer = None
        if method == "galore":
            GaLoreAdamW, _ = self.galore()
            targets = set(self.adapted_weights(seed))
            low, rest = [], []
            for name, prm in module.named_parameters():
                if prm.requires_grad:
                    (low if name in targets else rest).append(prm)
            groups = [{"params": low, "lr": settings.lr, "rank": self.p.rank,
                       "update_proj_gap": self.p.galore_update_proj_gap, "scale": self.p.galore_scale,
                       "proj_type": "std"},
                      {"params": rest, "lr": settings.lr_other}]
            optimizer = GaLoreAdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                    no_deprecation_warning=True)
        return Trainer(module, config, settings, tiny_llama().loss_fn, optimizer=optimizer), module

    def run(self, method: str, steps: int, lr: float, seed: int, curve: bool) -> dict[str, Any]:
        tr, module = self.trainer(method, steps, lr, seed)
        batches = _corpus.batches(self.corpus.train, batch_size=self.p.batch_size, seq_len=self.p.seq_len, seed=seed)
        points: list[dict[str, Any]] = []

        def evaluate(step: int) -> float:
            v = tr.evaluate(self.val)
            points.append({"step": step, "val_loss": _num(v), "val_bpb": _num(v / LN2)})
            return v

        t_start = time.perf_counter()
        load0 = _loadavg()
        if curve:
            evaluate(0)
        times: list[float] = []
        diverged = False
        for step in range(steps):
            x, y = next(batches)
            t0 = time.perf_counter()
            loss = tr.train_step((x.to(self.device), y.to(self.device)))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                diverged = True
                break
            if curve and (step + 1) % self.p.eval_every == 0 and step + 1 < steps:
                evaluate(step + 1)
        final = float("nan") if diverged else evaluate(steps) if curve else tr.evaluate(self.val)
        if not curve and not diverged:
            points.append({"step": steps, "val_loss": _num(final), "val_bpb": _num(final / LN2)})
        timed = times[3:] if len(times) > 6 else times
        out = {
            "seed": seed, "steps": len(times), "diverged": diverged, "curve": points,
            "final_val_loss": _num(final), "final_val_bpb": _num(final / LN2),
            "train_loss_last10": _num(sum(tr.losses[-10:]) / max(1, len(tr.losses[-10:]))),
            "mean_step_s": sum(timed) / max(1, len(timed)), "median_step_s": median(timed),
            "wall_s": time.perf_counter() - t_start, "loadavg_1min": [load0, _loadavg()],
        }
        out.update(self.state_bytes(method, module, tr))
        if tr.switcher is not None and isinstance(tr.config, dl.SwitchLoRA):
            out["switched_a_b"] = list(tr.switcher.num_switched())
        return out

    def state_bytes(self, method: str, module: nn.Module, tr: Trainer) -> dict[str, Any]:
        """Measured: parameters + gradients of trained ones + every optimizer-state tensor (+ GaLore
        projections, + stored candidates). Formula: the library's estimate (2 Adam slots)."""
        total = optimizer_state_bytes(module, tr.optimizer) + stored_candidate_bytes(module)
        if method == "full":
            formula = full_rank_state_bytes(module)
        elif method == "galore":
            formula = None
        else:
            formula = training_state_bytes(module)
        return {"state_bytes": total, "state_bytes_formula": formula}


def _num(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


# -- CLI ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--methods", default="default",
                    help=f"comma-separated; 'default' = {','.join(DEFAULT_METHODS)}; 'all' adds the ablations "
                         f"({','.join(ABLATIONS)})")
    ap.add_argument("--seeds", type=int, help="number of seeds (0..N-1) for the final runs")
    ap.add_argument("--steps", type=int, help="optimizer steps of the final runs")
    ap.add_argument("--sweep-steps", type=int, help="steps of each LR-sweep run (0: no sweep, middle grid value)")
    ap.add_argument("--sweep-lrs", action="append", default=[], metavar="FAMILY=LR,LR,...",
                    help=f"override a family's LR grid (families: {', '.join(FAMILIES)})")
    ap.add_argument("--lr", action="append", default=[], metavar="FAMILY=LR", help="fix a family's LR (no sweep)")
    ap.add_argument("--lr-other", type=float, help="peak LR of embeddings, norms, unadapted head (all methods)")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--device")
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="fp32; bf16-autocast: fp32 parameters, bf16 compute (recommended); bf16: bf16 parameters")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormals to zero (slow on CPU)")
    ap.add_argument("--out", default="benchmarks/results/pretrain.json")
    ap.add_argument("--plot", default="benchmarks/results/pretrain.png")
    ap.add_argument("--markdown", action="store_true", help="print the summary table as GitHub markdown")
    ap.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    return ap.parse_args(argv)


def _kv(items: list[str], what: str, many: bool) -> dict[str, Any]:
    out = {}
    for item in items:
        fam, sep, val = item.partition("=")
        if not sep or fam not in FAMILIES:
            raise SystemExit(f"{what} {item!r}: expected FAMILY=VALUE with FAMILY in {', '.join(FAMILIES)}")
        try:
            out[fam] = [float(v) for v in val.split(",") if v] if many else float(val)
        except ValueError:
            raise SystemExit(f"{what} {item!r}: not a number") from None
    return out


def resolve(args: argparse.Namespace) -> tuple[Preset, list[str], dict[str, float]]:
    p = copy.deepcopy(PRESETS[args.preset])
    for name in ("seeds", "steps", "sweep_steps", "lr_other", "rank", "eval_every", "device", "threads", "precision"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    if p.steps < 1 or p.seeds < 1 or p.sweep_steps < 0:
        raise SystemExit("--steps and --seeds must be >= 1, --sweep-steps >= 0")
    p.eval_every = max(1, min(p.eval_every, p.steps))
    p.grids.update(_kv(args.sweep_lrs, "--sweep-lrs", many=True))
    fixed = _kv(args.lr, "--lr", many=False)
    if p.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"preset {p.name} wants CUDA, which is not available; pass --device cpu")
    names: list[str] = []
    for tok in args.methods.split(","):
        tok = tok.strip()
        group = DEFAULT_METHODS if tok == "default" else ALL_METHODS if tok == "all" else (tok,) if tok else ()
        for m in group:
            if m not in ALL_METHODS:
                raise SystemExit(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
            if m not in names:
                names.append(m)
    return p, names, fixed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    p, methods, fixed = resolve(args)
    from rich.console import Console
    console = Console(stderr=True, quiet=args.quiet, width=max(120, Console(stderr=True).width))
    if not args.keep_denormals:
        torch.set_flush_denormal(True)
    if p.threads:
        torch.set_num_threads(p.threads)
    started = time.time()
    load_start = _loadavg()
    t_all = time.perf_counter()
    bench = Bench(p, args, console)
    warnings_: list[str] = []

    status: dict[str, str] = {m: "ok" for m in methods}
    galore_import = None
    if "galore" in methods:
        try:
            galore_import = bench.galore()[1]
        except ImportError:
            status["galore"] = GALORE_MISSING
            warnings_.append(f"galore: {GALORE_MISSING} (pip install 'dynlora-fx[bench]')")
    active = [m for m in methods if status[m] == "ok"]

    # 1. LR sweep, one per family in use
    families = [f for f in FAMILIES if any(family_of(m) == f for m in active)]
    sweeps: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, tuple[float, str]] = {}
    for fam in families:
        grid = p.grids[fam]
        if fam in fixed:
            chosen[fam] = (fixed[fam], "fixed (--lr)")
            continue
        if p.sweep_steps == 0 or len(grid) == 1:
            chosen[fam] = (grid[len(grid) // 2], "fixed (no sweep: middle of grid)")
            continue
        points = []
        for lr in grid:
            r = bench.run(fam, p.sweep_steps, lr, seed=0, curve=False)
            points.append({"lr": lr, "val_loss": r["final_val_loss"], "val_bpb": r["final_val_bpb"],
                           "diverged": r["diverged"], "wall_s": round(r["wall_s"], 2)})
            console.print(f"[dim]sweep[/] {fam:<11} lr={lr:<8.3g} val {_fmt(r['final_val_loss'])}  "
                          f"({r['wall_s']:.1f} s, {r['mean_step_s'] * 1e3:.0f} ms/step)")
        sweeps[fam] = points
        ok = [q for q in points if q["val_loss"] is not None]
        if not ok:
            chosen[fam] = (min(grid), "sweep: every value diverged, smallest taken")
            warnings_.append(f"{fam}: every LR of the sweep diverged")
            continue
        best = min(ok, key=lambda q: q["val_loss"])
        chosen[fam] = (best["lr"], "sweep")
        if best["lr"] in (min(grid), max(grid)) and len(grid) >= 3:
            warnings_.append(f"{fam}: best LR {best['lr']:g} is at the edge of the sweep grid {grid}")

    # 2. final runs
    results: dict[str, dict[str, Any]] = {}
    for m in methods:
        entry: dict[str, Any] = {"status": status[m], "family": family_of(m)}
        results[m] = entry
        if status[m] != "ok":
            continue
        cfg = run_config(m, p, p.steps, 0)
        entry["config"] = cfg.to_dict() if cfg is not None else (
            {"method": "galore", "rank": p.rank, "update_proj_gap": p.galore_update_proj_gap,
             "scale": p.galore_scale, "proj_type": "std", "import": galore_import} if m == "galore"
            else {"method": "full-rank AdamW"})
        lr, source = chosen[family_of(m)]
        entry["lr"] = lr
        entry["lr_other"] = p.lr_other
        entry["lr_source"] = source if family_of(m) == m else f"{source} of {family_of(m)}"
        entry["sweep"] = sweeps.get(family_of(m), [])
        runs = []
        for seed in range(p.seeds):
            r = bench.run(m, p.steps, lr, seed=seed, curve=True)
            runs.append(r)
            console.print(f"[bold]{m:<22}[/] seed {seed} lr={lr:<8.3g} val {_fmt(r['final_val_loss'])} "
                          f"bpb {_fmt(r['final_val_bpb'])}  ({r['wall_s']:.0f} s, "
                          f"{r['mean_step_s'] * 1e3:.0f} ms/step, total {time.perf_counter() - t_all:.0f} s)")
            if r["diverged"]:
                warnings_.append(f"{m} seed {seed}: training diverged (non-finite loss)")
        entry["runs"] = runs
        entry["final_val_loss"], entry["final_val_loss_std"] = _mean_std([r["final_val_loss"] for r in runs])
        entry["final_val_bpb"] = entry["final_val_loss"] / LN2 if entry["final_val_loss"] is not None else None
        entry["mean_step_s"] = sum(r["mean_step_s"] for r in runs) / len(runs)
        entry["state_bytes"] = runs[0]["state_bytes"]
        entry["state_bytes_formula"] = runs[0]["state_bytes_formula"]

    # 3. comparisons and checks
    full = results.get("full", {})
    for m, e in results.items():
        if e["status"] == "ok" and full.get("status") == "ok" and e["final_val_loss"] and full["final_val_loss"]:
            e["vs_full"] = {"val_loss_pct": 100 * (e["final_val_loss"] / full["final_val_loss"] - 1),
                            "step_time_ratio": e["mean_step_s"] / full["mean_step_s"],
                            "state_bytes_ratio": e["state_bytes"] / full["state_bytes"]}
    checks: dict[str, Any] = {}
    lora = results.get("lora", {})
    if full.get("status") == "ok" and lora.get("status") == "ok" and full["final_val_loss"] and lora["final_val_loss"]:
        gap = lora["final_val_loss"] / full["final_val_loss"] - 1
        checks["rank_binds"] = {"lora_vs_full_pct": 100 * gap, "threshold_pct": 2.0, "ok": gap >= 0.02}
        if gap < 0.02:
            warnings_.append(f"rank does not bind: LoRA ends only {100 * gap:+.2f}% vs full-rank (< +2%); "
                             "use a smaller rank, a wider model or more steps")
    else:
        checks["rank_binds"] = {"ok": None, "why": "needs both full and lora"}
    seeded, stored = results.get("switchlora", {}), results.get("switchlora-stored", {})
    if seeded.get("status") == "ok" and stored.get("status") == "ok":
        diffs = [abs(a["val_loss"] - b["val_loss"]) for ra, rb in zip(seeded["runs"], stored["runs"])
                 for a, b in zip(ra["curve"], rb["curve"]) if a["val_loss"] is not None and b["val_loss"] is not None]
        worst = max(diffs) if diffs else None
        checks["stored_matches_seeded"] = {"max_abs_val_loss_diff": worst, "ok": worst is not None and worst < 1e-4}
        if worst is None or worst >= 1e-4:
            warnings_.append(f"switchlora-stored differs from switchlora (seeded) by {worst} in validation loss")

    report = {
        "schema": SCHEMA,
        "preset": p.name,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": None,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "device": str(bench.device), "flush_denormal": not args.keep_denormals,
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                        "loadavg_1min_start_end": [load_start, _loadavg()],
                        "galore_import": galore_import, "corpus": {k: bench.corpus.meta.get(k) for k in
                                                                    ("train_bytes", "val_bytes", "python_version")}},
        "settings": {**{k: v for k, v in dataclasses.asdict(p).items() if k != "grids"},
                     "ffn_hidden": bench.model(0).config.ffn_hidden,
                     "params": sum(q.numel() for q in bench.model(0).parameters()),
                     "tokens_per_step": p.batch_size * p.seq_len,
                     "val_tokens": sum(x.numel() for x, _ in bench.val),
                     "warmup": bench.settings(p.steps, 0.0).warmup,
                     "sweep": {"steps": p.sweep_steps, "seed": 0, "grids": {f: p.grids[f] for f in families},
                               "select": "lowest final validation loss"},
                     "adapted_weights": len(bench.adapted_weights(0)),
                     "transform_s": bench.transform_s},
        "methods": results,
        "checks": checks,
        "warnings": warnings_,
    }
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    if args.out:
        write_json(args.out, report)
    if args.plot:
        plot(report, Path(args.plot))
    summary(report, markdown=args.markdown)
    return report


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


# -- output ----------------------------------------------------------------------------------
def rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "lr (matrices)", "val loss", "bpb", "Δ vs full", "ms/step", "× full", "state MB", "× full"]
    body = []
    for m, e in report["methods"].items():
        if e["status"] != "ok":
            body.append([m, "", e["status"], "", "", "", "", "", ""])
            continue
        vs = e.get("vs_full", {})
        loss = _fmt(e["final_val_loss"])
        if len(e["runs"]) > 1 and e["final_val_loss_std"] is not None:
            loss += f" ± {e['final_val_loss_std']:.4f}"
        body.append([m, f"{e['lr']:.3g}", loss, _fmt(e["final_val_bpb"]),
                     f"{vs['val_loss_pct']:+.2f}%" if vs else "—", f"{e['mean_step_s'] * 1e3:.0f}",
                     f"{vs['step_time_ratio']:.2f}" if vs else "—", f"{e['state_bytes'] / 2**20:.2f}",
                     f"{vs['state_bytes_ratio']:.2f}" if vs else "—"])
    return head, body


def summary(report: dict[str, Any], markdown: bool = False) -> None:
    head, body = rows(report)
    s = report["settings"]
    title = (f"pretrain ({report['preset']}): {s['n_layers']}L d={s['dim']} rank {s['rank']}, batch "
             f"{s['batch_size']}x{s['seq_len']}, {s['steps']} steps, {s['seeds']} seed(s); "
             f"lr_other={s['lr_other']:g}; {report['wall_s']:.0f} s")
    from rich.console import Console
    print_table(title, head, body, markdown=markdown, console=Console(width=max(130, Console().width)))
    sweeps = {e["family"]: e["sweep"] for e in report["methods"].values() if e.get("sweep")}
    for fam, pts in sweeps.items():
        print(f"sweep {fam}: " + ", ".join(f"{q['lr']:g} -> {_fmt(q['val_loss'])}" for q in pts))
    rb = report["checks"].get("rank_binds", {})
    if rb.get("ok") is not None:
        print(f"rank binds: LoRA {rb['lora_vs_full_pct']:+.2f}% vs full-rank (needs >= +2%): "
              f"{'yes' if rb['ok'] else 'NO'}")
    for w in report["warnings"]:
        print(f"WARNING: {w}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, e in report["methods"].items():
        if e["status"] != "ok":
            continue
        steps = [q["step"] for q in e["runs"][0]["curve"]]
        vals = []
        for i in range(len(steps)):
            col = [r["curve"][i]["val_loss"] for r in e["runs"] if i < len(r["curve"])]
            col = [v for v in col if v is not None]
            vals.append(sum(col) / len(col) if col else float("nan"))
        ax.plot(steps, vals, marker=".", label=f"{m} (lr {e['lr']:.3g}): {_fmt(e['final_val_loss'], '.3f')}",
                linestyle="--" if m.startswith("switchlora-") else "-")
    finals = [e["final_val_loss"] for e in report["methods"].values() if e["status"] == "ok" and e["final_val_loss"]]
    if finals:  # zoom on the interesting part: from a little above the worst final loss down
        lo, hi = min(finals), max(finals)
        ax.set_ylim(lo - 0.1 * (hi - lo + 0.05), hi + 1.5 * (hi - lo + 0.05) + 0.3)
    s = report["settings"]
    ax.set_title(f"validation loss, {s['n_layers']}L d={s['dim']} rank {s['rank']}, "
                 f"{s['batch_size']}x{s['seq_len']} bytes/step, {s['seeds']} seed(s)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
