"""Export: merge first, then ONNX through ``torch.onnx`` (dynamo exporter), checked.

The merged module has no adapter node left, so the ONNX graph is the plain model's.
The batch dimension of every tensor input is exported as dynamic where the model
allows it; the file is validated with ``onnx.checker`` and its outputs are compared with
the merged model's by ``onnxruntime`` (a dependency; the comparison is skipped only where
it is missing).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .api import merge
from .checkpoint import atomic_write, ensure_parent
from .errors import DynLoRAError
from .module import unwrap

__all__ = ["export_onnx", "OnnxReport", "rel_error"]


# torch.onnx looks up torchvision's ops (nms, roi_align, …) for every export and logs a warning
# per op when torchvision is absent; no model of ours needs them.
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_IRRELEVANT = "torchvision is not installed"


class _DropIrrelevant(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_IRRELEVANT)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Drop the exporter's "torchvision is not installed" warnings for the duration."""
    logger, noise = logging.getLogger(_REGISTRY_LOGGER), _DropIrrelevant()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


@dataclass(frozen=True)
class OnnxReport:
    path: str
    dynamic_batch: bool
    max_rel_error: float | None  # onnxruntime vs merged model; None when it could not run (see ``unchecked``)
    unchecked: str | None = None  # why onnxruntime did not compare, if it did not


def _batch_dynamic(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Dim.AUTO on dim 0 of every tensor input, keyed by the names of ``module.forward``'s signature."""
    spec = lambda v: {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() > 0 else None  # noqa: E731
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


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
            with _quiet_exporter():
                program = torch.onnx.export(merged, args, kwargs=kwargs or None, dynamo=True, verbose=False,
                                            dynamic_shapes=_batch_dynamic(merged, args, kwargs) if dyn else None)
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
    if not check:
        return OnnxReport(path, dynamic, None, "not asked for (check=False)")
    if any(p.dtype == torch.bfloat16 for p in merged.parameters()):  # nor can numpy hold the inputs
        return OnnxReport(path, dynamic, None, "onnxruntime has no CPU kernels for bfloat16; the file passed "
                          "onnx.checker only")
    err = _compare_with_onnxruntime(path, merged, args, kwargs)
    return OnnxReport(path, dynamic, err, None if err is not None else "onnxruntime is not installed")


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
