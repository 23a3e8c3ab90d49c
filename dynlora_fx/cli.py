"""``dynlora-transform MODEL.py``: plan, check, train, merge and export from the command line.

``MODEL.py`` defines ``build_model()`` and ``example_inputs()``; optionally
``example_kwargs()``, ``batches()`` (an iterator of batches), ``loss_fn(output, batch)``,
``model_inputs(batch)`` (default: ``batch[0]``) and ``val_batches()``.
Results go to stdout, diagnostics and progress to stderr; a known error is one line
and exit code 1 (a traceback only with ``--debug``), a usage error exit code 2.

Under ``torchrun`` (``WORLD_SIZE`` > 1; also ``python -m dynlora_fx.cli``) the run is data
parallel: the process group comes from torchrun's environment (gloo; nccl as well for CUDA
tensors), the transformed module is wrapped in DDP, or sharded with FSDP2 under ``--shard``
(``dl.parallelize``), and each rank trains on its own slice of every global batch
``batches()`` yields. Only rank 0 prints and writes files; the numbers are the global
batch's, as a single process would report them. ``--shard`` without torchrun is a 1-rank
FSDP2 run in a local gloo group; ``--shard --replicate N`` is HSDP (N replica groups of WORLD_SIZE/N
ranks). Under ``torchrun --max-restarts`` with ``--resume``, a restarted group continues from the last
complete checkpoint (``--save-every``), or starts fresh when there is none yet.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
import torch.nn as nn

from . import __version__
from .api import transform
from .config import METHODS, AdapterConfig, LoRA, ReLoRA, SwitchLoRA
from .errors import DynLoRAError
from .module import DynLoRAModule, adapters
from .parallel import data_parallel_mesh, parallelize
from .process_group import Membership, launcher_rank
from .training import PRECISIONS, cast_inputs, cast_model

__all__ = ["main", "run", "build_parser", "load_model_file"]



def _rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor a fraction like 0.25") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynlora-transform",
        description="Give every weight-bearing matrix product of a PyTorch model a SwitchLoRA adapter; "
                    "check, train, merge and export it.",
        epilog="Example: dynlora-transform examples/tiny_llama.py --train 300 --baseline --onnx runs/tiny_llama.onnx")
    p.add_argument("model_file", metavar="MODEL.py", help="defines build_model() and example_inputs()")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=sorted(METHODS), default="switchlora")
    m.add_argument("--rank", type=_rank, default=0.25, help="int, or a fraction of min(m, n) (default 0.25)")
    m.add_argument("--targets", nargs="+", default=(), metavar="PATTERN",
                   help="weights to adapt: exact name, .suffix or re:regex (default: all)")
    m.add_argument("--exclude", nargs="+", default=(), metavar="PATTERN", help="weights to leave full-rank")
    m.add_argument("--alpha", type=float, default=1.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--form", choices=("auto", "activation", "weight"), default="auto")
    m.add_argument("--interval", type=float, default=40.0, help="SwitchLoRA base switching interval")
    m.add_argument("--freeze-steps", type=int, default=5, help="SwitchLoRA freeze after a switch")
    m.add_argument("--candidates", choices=("seeded", "stored"), default="seeded")
    m.add_argument("--reset-every", type=int, default=200, help="ReLoRA merge period")
    t = p.add_argument_group("training")
    t.add_argument("--train", type=int, default=0, metavar="STEPS", help="train for STEPS optimizer steps")
    t.add_argument("--lr", type=float, default=3e-3, help="peak LR of the adapted matrices")
    t.add_argument("--lr-other", type=float, default=None, help="peak LR of embeddings/norms/head (default: --lr)")
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--baseline", action="store_true", help="also train the model full-rank, same steps and batches")
    t.add_argument("--compile", action="store_true", help="train the torch.compile'd module")
    t.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16-autocast: fp32 parameters, bf16 compute (recommended for low precision); "
                        "bf16: parameters in bf16, adapted weights keeping an exact fp32 master")
    t.add_argument("--checkpoint", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing per block: auto follows the model's own, on: every repeated block")
    t.add_argument("--save-every", "--checkpoint-every", dest="checkpoint_every", type=int, default=100,
                   metavar="STEPS", help="write a checkpoint to --out every STEPS steps (default 100)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out; with none there yet, start fresh (so the same "
                        "command serves torchrun --max-restarts)")
    d = p.add_argument_group("distributed (run under torchrun: torchrun --nproc-per-node N -m dynlora_fx.cli ...)")
    d.add_argument("--shard", action="store_true",
                   help="shard the model with FSDP2 (dl.fully_shard) instead of replicating it with DDP; "
                        "without torchrun a 1-rank FSDP2 run")
    d.add_argument("--replicate", type=int, default=1, metavar="N",
                   help="with --shard: HSDP, N replica groups of WORLD_SIZE/N ranks each (shard inside a group, "
                        "e.g. a node; only gradients cross between groups)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write generated code, weights (safetensors), config and checkpoints")
    o.add_argument("--onnx", metavar="PATH", help="export the merged model to ONNX")
    o.add_argument("--json", metavar="PATH", help="write the report as JSON")
    o.add_argument("--dry-run", action="store_true", help="show the plan only")
    o.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def load_model_file(path: str) -> ModuleType:
    """Import ``path`` as a module; every failure is a DynLoRAError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise DynLoRAError(path, "no such file", "pass the path of a Python file that defines build_model() "
                           "and example_inputs()")
    name = f"_dynlora_user_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise DynLoRAError(path, "not an importable Python file", "pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise DynLoRAError(f"{path}:{exc.lineno}", f"syntax error: {exc.msg}", "fix the file") from None
    except Exception as exc:  # noqa: BLE001
        raise DynLoRAError(path, f"importing it raised {type(exc).__name__}: {exc}",
                           "fix the error at import time (rerun with --debug for the traceback)") from exc
    for fn in ("build_model", "example_inputs"):
        if not callable(getattr(module, fn, None)):
            raise DynLoRAError(path, f"it defines no {fn}()",
                               "define build_model() -> nn.Module and example_inputs() -> tuple")
    return module


def _call(module: ModuleType, fn: str, path: str, *args: Any) -> Any:
    try:
        return getattr(module, fn)(*args)
    except DynLoRAError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DynLoRAError(f"{path}: {fn}()", f"raised {type(exc).__name__}: {exc}",
                           "fix it (rerun with --debug for the traceback)") from exc


def _config(args: argparse.Namespace) -> AdapterConfig:
    common = dict(rank=args.rank, alpha=args.alpha, seed=args.seed, targets=tuple(args.targets),
                  exclude=tuple(args.exclude), form=args.form)
    if args.method == "switchlora":
        return SwitchLoRA(**common, interval=args.interval, freeze_steps=args.freeze_steps,
                          candidates=args.candidates)
    if args.method == "relora":
        return ReLoRA(**common, reset_every=args.reset_every, warmup=min(20, args.reset_every - 1))
    return LoRA(**common)


def _rel_error(a: Any, b: Any) -> float:
    from torch.utils import _pytree as pytree

    from .export import rel_error

    pairs = zip(pytree.tree_leaves(a), pytree.tree_leaves(b))
    return max((rel_error(x, y) for x, y in pairs if isinstance(x, torch.Tensor) and x.is_floating_point()),
               default=0.0)


def build_report(model: nn.Module, gm: DynLoRAModule) -> dict[str, Any]:
    from .training import full_rank_state_bytes, training_state_bytes

    params = list(gm.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    adapted_bytes, full_bytes = training_state_bytes(gm), full_rank_state_bytes(model)
    return {
        "model": type(model).__name__,
        "capture": gm.capture_method,
        "config": gm.dynlora_config.to_dict(),
        "adapters": [{"weight": a.weight, "op": a.op, "shape": list(a.shape), "rank": a.rank, "form": a.form}
                     for a in adapters(gm)],
        "skipped": [{"weight": s.weight, "reason": s.reason} for s in gm.plan.skipped],
        "params": {"total": total, "trainable": trainable, "frozen": total - trainable,
                   "original": sum(p.numel() for p in model.parameters())},
        "memory": {"adapted_bytes": adapted_bytes, "full_rank_bytes": full_bytes,
                   "ratio": adapted_bytes / max(1, full_bytes)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if launcher_rank() == 0:
        args = parser.parse_args(argv)
    else:  # usage errors, --help and --version: printed once, by rank 0
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    from .console import make_console

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        ctx = Membership.start(args.shard)
    except DynLoRAError as exc:  # every rank fails alike here: rank 0 says so
        if args.debug:
            raise
        if launcher_rank() == 0:
            print(f"dynlora-transform: error: {exc}", file=stderr)
        return 1
    if not ctx.main:  # only rank 0 prints: the others write to nowhere, warnings included
        stdout = stderr = io.StringIO()
        warnings.simplefilter("ignore")
    out, err = make_console(stdout), make_console(stderr)
    error, code = None, 1
    try:
        code = _run(args, out, err, ctx)
    except DynLoRAError as exc:
        if args.debug and not ctx.on:
            raise
        error = f"dynlora-transform: error: {exc}"
        if ctx.main or not ctx.on:
            print(error, file=stderr)
        if args.debug:
            import traceback

            traceback.print_exc(file=stderr)
    except KeyboardInterrupt:  # outside training (which handles its own): nothing written yet
        if args.debug and not ctx.on:
            raise
        error, code = "dynlora-transform: interrupted", 130
        print(error, file=stderr)
    except Exception:
        # a collective broken because another rank failed (and said so): that rank's message is the one
        if ctx.on and ctx.peer_failed():
            error = "a peer failed"
            ctx.finish(error, grace=0.0)
            return 1
        if ctx.on:
            ctx.finish("internal error", grace=0.0)
        raise
    if ctx.on:
        main_failed = ctx.finish(error)
        if error and not ctx.main and not main_failed:  # a failure of this rank alone: it reports it
            print(error.replace("error: ", f"error: rank {ctx.rank}: ", 1), file=sys.stderr)
    return code


def _run(args: argparse.Namespace, out: Any, err: Any, ctx: Membership | None = None) -> int:
    ctx = ctx or Membership()
    t0 = time.perf_counter()
    from .checkpoint import ensure_parent, ensure_writable_dir

    if args.out:  # fail on a bad path now, not after training (every rank checks: every rank fails alike)
        ensure_writable_dir(args.out, "--out")
    for flag, value in (("--onnx", args.onnx), ("--json", args.json)):
        if value:
            ensure_parent(value, flag)
    if args.resume and not args.out:
        raise DynLoRAError("--resume", "it needs the --out folder the checkpoint was written to",
                           "pass --out DIR together with --resume")
    if args.replicate != 1:
        if args.replicate < 1 or not args.shard:
            raise DynLoRAError(f"--replicate {args.replicate}", "HSDP needs --shard and at least 1 replica group",
                               "pass --shard --replicate N with N >= 1 dividing the number of ranks")
        if ctx.world % args.replicate:
            raise DynLoRAError(f"--replicate {args.replicate}", f"{ctx.world} ranks do not split into "
                               f"{args.replicate} equal replica groups",
                               f"choose N dividing {ctx.world} (e.g. the number of nodes)")
    if ctx.on and args.shard and args.train:
        if args.precision == "bf16":
            raise DynLoRAError("--precision bf16 --shard", "FSDP2 keeps switching exact in fp32 shards, not in "
                               "bf16 parameters", "use --precision bf16-autocast (fp32 parameters, bf16 compute)")
    config = _config(args)
    user = load_model_file(args.model_file)
    path = args.model_file
    torch.manual_seed(args.seed)  # build_model() and batches() drawing from the global RNG: the same on every rank
    model = _call(user, "build_model", path)
    if not isinstance(model, nn.Module):
        raise DynLoRAError(f"{path}: build_model()", f"returned {type(model).__name__}, not an nn.Module",
                           "return the model object")
    if ctx.world > 1:
        _broadcast_module(model)  # every rank transforms the same model
    example = _call(user, "example_inputs", path)
    kwargs = _call(user, "example_kwargs", path) if hasattr(user, "example_kwargs") else {}
    example = example if isinstance(example, tuple) else (example,)
    cast_model(model, args.precision)
    example, kwargs = cast_inputs((example, kwargs), args.precision)
    err.print(f"[dim]capturing {type(model).__name__} and inserting adapters…[/]")
    gm = transform(model, example, config, example_kwargs=kwargs,
                   checkpoint={"auto": "auto", "on": True, "off": False}[args.checkpoint])
    report = build_report(model, gm)
    report["transform_seconds"] = round(time.perf_counter() - t0, 3)
    report["precision"], report["checkpointed"] = args.precision, list(gm.checkpointed)
    if ctx.on:
        report["distributed"] = {"world_size": ctx.world, "mode": "fsdp2" if args.shard else "ddp"}
        if args.shard and args.replicate > 1:
            report["distributed"].update(mode="hsdp", replicas=args.replicate)
    _print_plan(out, report)  # the plan first: training may take a while
    if args.dry_run:
        _print_report(out, report, args.json if ctx.main else None)
        return 0

    model.eval()
    gm.eval()
    with torch.no_grad():
        error = _rel_error(gm(*example, **kwargs), model(*example, **kwargs))
    # bf16 parameters: W is the bf16 rounding of W - s·B·A, so the outputs agree to bf16's precision
    report["equivalence"] = {"max_rel_error": error, "ok": error < (5e-2 if args.precision == "bf16" else 1e-4)}

    code = 0
    sharded = False
    if args.train:
        code = _train(args, user, model, gm, report, err, ctx)
        sharded = ctx.on and args.shard
    if sharded and code == 0 and (args.onnx or args.out):
        from .distributed import unsharded_copy

        gm = unsharded_copy(gm)  # collective: the whole transformed module (trained state) on every rank
    if args.onnx and code == 0 and ctx.main:
        from .export import export_onnx

        err.print("[dim]merging and exporting ONNX…[/]")
        rep = export_onnx(gm, example, args.onnx, example_kwargs=kwargs)
        report["onnx"] = {"path": rep.path, "dynamic_batch": rep.dynamic_batch, "max_rel_error": rep.max_rel_error,
                          "unchecked": rep.unchecked}
    if args.out and code == 0 and ctx.main:  # replicas are equal, a sharded module was gathered: rank 0 writes
        from .checkpoint import write_bundle

        report["written"] = write_bundle(args.out, gm, {"config": config.to_dict(), "capture": gm.capture_method,
                                                        "adapters": report["adapters"]})
    _print_report(out, report, args.json if ctx.main else None)
    if not report["equivalence"]["ok"]:
        print(f"dynlora-transform: error: {path}: the transformed model differs from the original "
              f"(max rel. error {error:.2e}). Remedy: report this model; rerun with --debug", file=err.file)
        return 1
    return code


def _broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (a build_model() that is not seeded, or draws
    from another generator, would otherwise give each rank its own model)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            t = t.data if isinstance(t, nn.Parameter) else t
            if t.is_contiguous():
                dist.broadcast(t, 0)
            else:
                tmp = t.contiguous()
                dist.broadcast(tmp, 0)
                t.copy_(tmp)


def _print_plan(out: Any, report: dict[str, Any]) -> None:
    from .console import plan_tables

    for table in plan_tables(report):
        out.print(table)


def _print_report(out: Any, report: dict[str, Any], json_path: str | None) -> None:
    from .console import summary_table

    out.print(summary_table(report))
    _write_json(json_path, report)


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        try:
            Path(path).write_text(json.dumps(report, indent=2, default=str))
        except OSError as exc:
            raise DynLoRAError(f"--json {path}", f"cannot write it ({exc.strerror or exc})",
                               "pass a path in a writable folder") from None


def _train(args: argparse.Namespace, user: ModuleType, model: nn.Module, gm: DynLoRAModule,
           report: dict[str, Any], err: Any, ctx: Membership | None = None) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .checkpoint import has_training_checkpoint, load_training, save_training
    from .training import Trainer, TrainSettings, default_model_inputs, skip

    ctx = ctx or Membership()
    path = args.model_file
    # Near-zero AdamW moments and probabilities become denormal floats, which x86 CPUs process
    # 5-20x slower (measured in benchmarks/pretrain.py); the CLI owns its process, so flush them.
    torch.set_flush_denormal(True)
    for fn in ("batches", "loss_fn"):
        if not callable(getattr(user, fn, None)):
            raise DynLoRAError(path, f"--train needs {fn}() in the model file",
                               "define batches() (an iterator of batches) and loss_fn(output, batch)")
    sharded = ctx.on and args.shard
    settings = TrainSettings(steps=args.train, lr=args.lr, lr_other=args.lr_other,
                             warmup=min(args.warmup, max(1, args.train // 10)), precision=args.precision)
    inputs_of = getattr(user, "model_inputs", default_model_inputs)
    mesh = data_parallel_mesh(args.replicate) if sharded else None  # the CLI trains on the CPU

    def parallel(module: nn.Module) -> nn.Module:  # under torchrun: DDP, or FSDP2 with --shard
        return parallelize(module, shard=sharded, compile=args.compile, mesh=mesh)

    gm.train()
    ranks = dict(rank=ctx.rank, world=ctx.world)
    runs = {"adapted": Trainer(parallel(gm), gm.dynlora_config, settings, user.loss_fn, inputs_of, **ranks)}
    base = copy.deepcopy(model).train() if args.baseline else None
    if base is not None:
        runs["baseline"] = Trainer(parallel(base), None, settings, user.loss_fn, inputs_of, **ranks)
    start = 0
    if args.resume and not has_training_checkpoint(args.out):  # a first attempt under torchrun --max-restarts
        err.print(f"[dim]no checkpoint in {args.out} yet: starting fresh[/]")
    elif args.resume:
        load_training(args.out, gm, base, runs, sharded=sharded)
        start = runs["adapted"].step
        err.print(f"[dim]resuming from step {start}[/]")
    streams = {name: skip(iter(_call(user, "batches", path)), trainer.step) for name, trainer in runs.items()}

    def checkpoint() -> None:
        if args.out:
            save_training(args.out, gm, base, runs, sharded=sharded)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:>8,.0f} {task.fields[unit]}/s"),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, transient=False, disable=not ctx.main) as progress:
            for name, trainer in runs.items():
                label = f"{gm.dynlora_config.method} r={args.rank}" if name == "adapted" else "full-rank"
                if ctx.world > 1:
                    label += f" ×{ctx.world} {'FSDP2' if args.shard else 'DDP'}"
                    if args.shard and args.replicate > 1:
                        label += f" HSDP {args.replicate}x{ctx.world // args.replicate}"
                task = progress.add_task(label, total=args.train, completed=trainer.step, loss=float("nan"), tps=0.0,
                                         unit=trainer.unit)
                while trainer.step < args.train:
                    loss = trainer.train_step(next(streams[name]))
                    progress.update(task, advance=1, loss=loss, tps=trainer.tokens / max(trainer.seconds, 1e-9),
                                    unit=trainer.unit)
                    if name == "adapted" and trainer.step % args.checkpoint_every == 0:
                        checkpoint()
            checkpoint()
    except KeyboardInterrupt:
        where = f"; the last checkpoint in {args.out} is intact: rerun with --resume" if args.out else ""
        print(f"dynlora-transform: interrupted at step {runs['adapted'].step}{where}", file=err.file)
        return 130
    adapted = runs["adapted"]
    training = {"steps": adapted.step, "final_loss": adapted.losses[-1] if adapted.losses else float("nan"),
                "tokens_per_s": adapted.tokens / max(adapted.seconds, 1e-9), "throughput_unit": adapted.unit,
                "losses": adapted.losses,
                "seconds": adapted.seconds}
    val = _call(user, "val_batches", path) if callable(getattr(user, "val_batches", None)) else None
    if val is not None:
        training["val_loss"] = adapted.evaluate(val)
        if "baseline" in runs:
            training["baseline_val_loss"] = runs["baseline"].evaluate(val)
            training["baseline_final_loss"] = runs["baseline"].losses[-1]
    if adapted.switcher is not None:
        training["switched"] = list(adapted.switcher.num_switched())
    report["training"] = training
    if sharded:  # what each rank holds, not the unsharded total
        report["memory"]["per_rank"] = _per_rank_state(runs, ctx, args.replicate)
    return 0


def _state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients (as large as the trainable parameters) + optimizer state this rank
    holds: the local shards of DTensors."""
    from .shards import local

    params = list({id(p): p for p in module.parameters()}.values())
    held = sum(local(p).numel() * local(p).element_size() * (2 if p.requires_grad else 1) for p in params)
    return held + sum(local(v).numel() * local(v).element_size() for st in optimizer.state.values()
                      for v in st.values() if isinstance(v, torch.Tensor))


def _per_rank_state(runs: dict[str, Any], ctx: Membership, replicas: int) -> dict[str, Any]:
    """Every rank's training state in bytes (a collective), for the adapted run and the baseline."""
    import torch.distributed as dist

    mine = {name: _state_bytes(trainer.module, trainer.optimizer) for name, trainer in runs.items()}
    every: list[Any] = [None] * ctx.world
    dist.all_gather_object(every, mine)
    out = {"adapted_bytes": [r["adapted"] for r in every], "shard_group": ctx.world // replicas}
    if "baseline" in runs:
        out["full_rank_bytes"] = [r["baseline"] for r in every]
    return out


if __name__ == "__main__":
    sys.exit(main())
