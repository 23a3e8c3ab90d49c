"""Export: merge first, then ONNX through ``torch.onnx`` (dynamo exporter), checked.

The merged module has no adapter node left, so the ONNX graph is the plain model's.
The batch dimension of every tensor input is exported as dynamic where the model
allows it; the file is validated with ``onnx.checker`` and, when ``onnxruntime`` is
installed, its outputs are compared with the merged model's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .api import merge
from .checkpoint import atomic_write, ensure_parent
from .errors import DynLoRAError
from .module import unwrap

__all__ = ["export_onnx", "OnnxReport", "rel_error"]


@dataclass(frozen=True)
class OnnxReport:
    path: str
    dynamic_batch: bool
    max_rel_error: float | None  # onnxruntime vs merged model; None without onnxruntime


def _batch_dynamic(args: tuple, kwargs: dict) -> dict[str, Any]:
    spec = lambda v: {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() > 0 else None  # noqa: E731
    out: dict[str, Any] = {}
    if args:
        out["args"] = tuple(pytree.tree_map(spec, a) for a in args)
    if kwargs:
        out["kwargs"] = {k: pytree.tree_map(spec, v) for k, v in kwargs.items()}
    return out


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def export_onnx(module: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                example_kwargs: dict[str, Any] | None = None, check: bool = True) -> OnnxReport:
    """Merge ``module``'s adapters, export the eval-mode model to ONNX at ``path``, check it."""
    import onnx  # runtime dependency; imported here so `import dynlora_fx` stays light

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    merged = merge(unwrap(module)).eval()
    path = os.fspath(path)
    ensure_parent(path, "ONNX path")
    program, dynamic = None, True
    errors = []
    for dyn in (True, False):  # a dynamic batch axis where the model allows one
        try:
            program = torch.onnx.export(merged, args, kwargs=kwargs or None, dynamo=True, verbose=False,
                                        dynamic_shapes=_batch_dynamic(args, kwargs) if dyn else None)
            dynamic = dyn
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    if program is None:
        lines = [ln.strip() for ln in str(errors[-1]).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "nsupported" in ln or ln.startswith("<class")), lines[0] if lines else "")
        raise DynLoRAError(f"ONNX export of {type(merged.model).__name__}",
                           f"torch.onnx could not export the merged model ({why[:300]})",
                           "check that the model's ops have ONNX equivalents (see torch.onnx's report)")
    atomic_write(Path(path), lambda tmp: program.save(str(tmp)))
    onnx.checker.check_model(path)
    err = _compare_with_onnxruntime(path, merged, args, kwargs) if check else None
    return OnnxReport(path, dynamic, err)


def _compare_with_onnxruntime(path: str, merged: nn.Module, args: tuple, kwargs: dict) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = _flat_tensors(merged(*args, **kwargs))
    worst = 0.0
    for g, w in zip(got, want):
        w = w.detach().float().cpu()
        g = torch.from_numpy(g).float()
        if g.shape != w.shape:
            raise DynLoRAError(f"ONNX file {path}", f"output shape {tuple(g.shape)} differs from the model's "
                               f"{tuple(w.shape)}", "report this model: the export changed its function")
        worst = max(worst, rel_error(g, w))
    return worst


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|: the error measure of every equivalence check."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
