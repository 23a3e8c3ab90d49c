"""``dynlora-transform MODEL.py``: plan, check, train, merge and export from the command line.

``MODEL.py`` defines ``build_model()`` and ``example_inputs()``; optionally
``example_kwargs()``, ``batches()`` (an iterator of batches), ``loss_fn(output, batch)``,
``model_inputs(batch)`` (default: ``batch[0]``) and ``val_batches()``.
Results go to stdout, diagnostics and progress to stderr; a known error is one line
and exit code 1 (a traceback only with ``--debug``), a usage error exit code 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
import torch.nn as nn

from . import __version__
from .api import transform
from .compile import compile as dl_compile
from .config import AdapterConfig, LoRA, ReLoRA, SwitchLoRA
from .errors import DynLoRAError
from .module import DynLoRAModule, adapters
from .training import PRECISIONS, cast_inputs, cast_model

__all__ = ["main", "run", "build_parser", "load_model_file"]

_METHODS = {"switchlora": SwitchLoRA, "lora": LoRA, "relora": ReLoRA}


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
    m.add_argument("--method", choices=sorted(_METHODS), default="switchlora")
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
    t.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
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
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    from .console import make_console

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    out, err = make_console(stdout), make_console(stderr)
    try:
        return _run(args, out, err)
    except DynLoRAError as exc:
        if args.debug:
            raise
        print(f"dynlora-transform: error: {exc}", file=stderr)
        return 1
    except KeyboardInterrupt:  # outside training (which handles its own): nothing written yet
        if args.debug:
            raise
        print("dynlora-transform: interrupted", file=stderr)
        return 130


def _run(args: argparse.Namespace, out: Any, err: Any) -> int:
    t0 = time.perf_counter()
    from .checkpoint import ensure_parent, ensure_writable_dir

    if args.out:  # fail on a bad path now, not after training
        ensure_writable_dir(args.out, "--out")
    for flag, value in (("--onnx", args.onnx), ("--json", args.json)):
        if value:
            ensure_parent(value, flag)
    if args.resume and not args.out:
        raise DynLoRAError("--resume", "it needs the --out folder the checkpoint was written to",
                           "pass --out DIR together with --resume")
    config = _config(args)
    user = load_model_file(args.model_file)
    path = args.model_file
    model = _call(user, "build_model", path)
    if not isinstance(model, nn.Module):
        raise DynLoRAError(f"{path}: build_model()", f"returned {type(model).__name__}, not an nn.Module",
                           "return the model object")
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
    _print_plan(out, report)  # the plan first: training may take a while
    if args.dry_run:
        _print_report(out, report, args.json)
        return 0

    model.eval()
    gm.eval()
    with torch.no_grad():
        error = _rel_error(gm(*example, **kwargs), model(*example, **kwargs))
    # bf16 parameters: W is the bf16 rounding of W - s·B·A, so the outputs agree to bf16's precision
    report["equivalence"] = {"max_rel_error": error, "ok": error < (5e-2 if args.precision == "bf16" else 1e-4)}

    code = 0
    if args.train:
        code = _train(args, user, model, gm, report, err)
    if args.onnx and code == 0:
        from .export import export_onnx

        err.print("[dim]merging and exporting ONNX…[/]")
        rep = export_onnx(gm, example, args.onnx, example_kwargs=kwargs)
        report["onnx"] = {"path": rep.path, "dynamic_batch": rep.dynamic_batch, "max_rel_error": rep.max_rel_error,
                          "unchecked": rep.unchecked}
    if args.out and code == 0:
        from .checkpoint import write_bundle

        report["written"] = write_bundle(args.out, gm, {"config": config.to_dict(), "capture": gm.capture_method,
                                                        "adapters": report["adapters"]})
    _print_report(out, report, args.json)
    if not report["equivalence"]["ok"]:
        print(f"dynlora-transform: error: {path}: the transformed model differs from the original "
              f"(max rel. error {error:.2e}). Remedy: report this model; rerun with --debug", file=err.file)
        return 1
    return code


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
           report: dict[str, Any], err: Any) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .checkpoint import load_checkpoint, save_checkpoint
    from .training import Trainer, TrainSettings, default_model_inputs, skip

    path = args.model_file
    # Near-zero AdamW moments and probabilities become denormal floats, which x86 CPUs process
    # 5-20x slower (measured in benchmarks/pretrain.py); the CLI owns its process, so flush them.
    torch.set_flush_denormal(True)
    for fn in ("batches", "loss_fn"):
        if not callable(getattr(user, fn, None)):
            raise DynLoRAError(path, f"--train needs {fn}() in the model file",
                               "define batches() (an iterator of batches) and loss_fn(output, batch)")
    settings = TrainSettings(steps=args.train, lr=args.lr, lr_other=args.lr_other,
                             warmup=min(args.warmup, max(1, args.train // 10)), precision=args.precision)
    inputs_of = getattr(user, "model_inputs", default_model_inputs)
    runs = {"adapted": Trainer(dl_compile(gm) if args.compile else gm, gm.dynlora_config, settings, user.loss_fn,
                               inputs_of)}
    if args.baseline:
        base = copy.deepcopy(model).train()
        runs["baseline"] = Trainer(torch.compile(base) if args.compile else base, None, settings, user.loss_fn,
                                   inputs_of)
    start = 0
    if args.resume:
        state = load_checkpoint(args.out)
        gm.load_state_dict(state["adapted_module"])
        runs["adapted"].load_state_dict(state["adapted"])
        if "baseline" in runs and "baseline" in state:
            base.load_state_dict(state["baseline_module"])
            runs["baseline"].load_state_dict(state["baseline"])
        start = state["adapted"]["step"]
        err.print(f"[dim]resuming from step {start}[/]")
    streams = {name: skip(iter(_call(user, "batches", path)), trainer.step) for name, trainer in runs.items()}

    def checkpoint() -> None:
        if not args.out:
            return
        state = {"adapted_module": gm.state_dict(), "adapted": runs["adapted"].state_dict()}
        if "baseline" in runs:
            state["baseline_module"] = base.state_dict()
            state["baseline"] = runs["baseline"].state_dict()
        save_checkpoint(args.out, state)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:>8,.0f} {task.fields[unit]}/s"),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, transient=False) as progress:
            for name, trainer in runs.items():
                label = f"{gm.dynlora_config.method} r={args.rank}" if name == "adapted" else "full-rank"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
