"""Capture: turn an arbitrary ``nn.Module`` into one FX graph per mode (train, eval).

``torch.fx.symbolic_trace`` is tried first (module-level graphs, readable); when it
fails, hides a weight, or disagrees with the model, ``torch.export`` (non-strict)
captures an ATen-level graph instead. Both modes are captured because a trace bakes
in ``self.training`` (dropout flags, batch-norm statistics, stochastic depth).

Every graph's ``get_attr``/``call_module`` targets point into one shared state tree:
``model.<fqn>`` (the copy of the user's model: its parameters and buffers, read at run
time so ``.to()``/``load_state_dict`` reach both graphs) and ``constants.<name>``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .errors import CaptureError

__all__ = ["Capture", "capture", "graph_module", "MODES"]

MODES = ("train", "eval")
# nn modules kept opaque by fx (their weights are read from the module); every other
# torch.nn module that owns a matrix is traced through so its weights become get_attr.
_FX_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)


@dataclass
class Capture:
    """The result of capturing a model: one graph module per mode sharing ``model``/``constants``."""

    graphs: dict[str, fx.GraphModule]
    method: str  # "symbolic_trace" | "export"
    constants: nn.Module
    notes: list[str] = field(default_factory=list)  # why a path was not taken


def graph_module(graph: fx.Graph, attrs: dict[str, nn.Module]) -> fx.GraphModule:
    """A GraphModule running ``graph`` whose attributes are exactly ``attrs`` (shared, not copied)."""
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    for name, mod in attrs.items():
        gm.add_module(name, mod)
    gm.graph = graph  # the setter recompiles; fx's constructor would have copied attributes
    return gm


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if not super().is_leaf_module(m, qualname):
            return False
        if type(m) in _FX_LEAVES:
            return True
        return not any(p.dim() >= 2 for p in m.parameters())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = next((t for t in text if t.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {line.strip()[:300]}"


def _identity_map(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> canonical qualified name (first name, as named_parameters dedups)."""
    out: dict[int, str] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out.setdefault(id(t), name)
    return out


def _resolve(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _add_constant(constants: nn.Module, obj: Any) -> str:
    """Register a traced constant once; equal constants of the two modes share a name,
    so identical train/eval graphs generate identical code."""
    if not isinstance(obj, torch.Tensor):
        name = f"o{sum(1 for k in vars(constants) if k[:1] == 'o' and k[1:].isdigit())}"
        setattr(constants, name, obj)
        return name
    for name, existing in constants._buffers.items():
        if existing.dtype == obj.dtype and existing.shape == obj.shape and existing.device == obj.device \
                and torch.equal(existing, obj.detach()):
            return name
    name = f"c{len(constants._buffers)}"
    constants.register_buffer(name, obj.detach(), persistent=False)
    return name


def _retarget(graph: fx.Graph, src_root: nn.Module, model: nn.Module, constants: nn.Module,
              extra: dict[str, nn.Module]) -> None:
    """Point every attribute read of ``graph`` (captured from ``src_root``) into the shared tree."""
    ids = _identity_map(model)
    modules = {id(m): n for n, m in model.named_modules()}
    for node in graph.nodes:
        if node.op == "get_attr":
            obj = _resolve(src_root, node.target)
            if id(obj) in ids:
                node.target = f"model.{ids[id(obj)]}"
            elif isinstance(obj, nn.Module) and id(obj) in modules:
                node.target = f"model.{modules[id(obj)]}" if modules[id(obj)] else "model"
            else:  # a constant made by tracing: shared, and moved by .to() with the rest
                node.target = f"constants.{_add_constant(constants, obj)}"
        elif node.op == "call_module":
            obj = _resolve(src_root, node.target)
            if id(obj) in modules:
                node.target = f"model.{modules[id(obj)]}"
            else:  # export's input-guard module: stateless, kept per graph
                extra[node.target] = obj


def _tree_allclose(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
                return False
    return True


def _try_symbolic_trace(model: nn.Module, constants: nn.Module, args: tuple, kwargs: dict,
                        expected: Any) -> tuple[dict[str, fx.GraphModule] | None, str]:
    graphs: dict[str, fx.GraphModule] = {}
    was_training = model.training
    try:
        for mode in MODES:
            model.train(mode == "train")
            try:
                graph = _Tracer().trace(model)
            except Exception as exc:  # noqa: BLE001 - any tracing failure means "use export"
                return None, f"torch.fx.symbolic_trace failed: {_first_line(exc)}"
            seen: set[int] = set()
            for node in graph.nodes:
                if node.op == "get_attr":
                    seen.add(id(_resolve(model, node.target)))
                elif node.op == "call_module":
                    seen.update(id(p) for p in _resolve(model, node.target).parameters())
            hidden = [n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in seen]
            if hidden:
                return None, f"torch.fx.symbolic_trace does not show how {hidden[0]} is used"
            extra: dict[str, nn.Module] = {}
            _retarget(graph, model, model, constants, extra)
            graphs[mode] = graph_module(graph, {"model": model, "constants": constants, **extra})
    finally:
        model.train(was_training)
    if expected is not None:
        try:
            model.eval()  # fx leaf modules (dropout, batch norm) read the mode at run time
            with torch.no_grad():
                got = graphs["eval"](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            return None, f"the torch.fx.symbolic_trace graph fails on the example inputs: {_first_line(exc)}"
        finally:
            model.train(was_training)
        if not _tree_allclose(got, expected):
            return None, "the torch.fx.symbolic_trace graph's output differs from the model's (traced Python baked in a value)"
    return graphs, ""


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, dims: str) -> dict[str, Any] | None:
    """Dim.AUTO on every dim ('all') or dim 0 ('batch') of every tensor input, keyed by forward's names."""
    if dims == "none":
        return None
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return {i: torch.export.Dim.AUTO for i in (range(v.dim()) if dims == "all" else [0])}
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a view a copy with storage of its own (same values, dtype, grad flag)."""
    return t if t._base is None else t.detach().clone().requires_grad_(t.requires_grad)


def _try_export(model: nn.Module, constants: nn.Module, args: tuple, kwargs: dict
                ) -> tuple[dict[str, fx.GraphModule] | None, str]:
    graphs: dict[str, fx.GraphModule] = {}
    # A view as example input (e.g. batch[:2, :32]) makes torch.export guard on its base
    # (``x._base.size()[1] != x.size()[1]``), which every later call with a tensor of its own
    # fails inside the graph (``None.size()``): export from copies that own their storage.
    args, kwargs = pytree.tree_map_only(torch.Tensor, _own_storage, (args, kwargs))
    was_training = model.training
    try:
        for mode in MODES:
            model.train(mode == "train")
            errors = []
            ep = None
            for dims in ("all", "batch", "none"):  # prefer the most dynamic capture that works
                try:
                    ep = torch.export.export(model, args, kwargs,
                                             dynamic_shapes=_dynamic_shapes(model, args, kwargs, dims),
                                             strict=False)
                    break
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
            if ep is None:
                return None, f"torch.export failed: {_first_line(errors[-1])}"
            src = ep.module()
            graph = src.graph
            extra: dict[str, nn.Module] = {}
            _retarget(graph, src, model, constants, extra)
            graphs[mode] = graph_module(graph, {"model": model, "constants": constants, **extra})
    finally:
        model.train(was_training)
    return graphs, ""


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> Capture:
    """Capture ``model`` (which the graphs will share, so pass a copy) for both modes.

    ``args``/``kwargs`` are example inputs; without them only symbolic tracing is possible.
    Raises ``CaptureError`` when neither path works.
    """
    kwargs = dict(kwargs or {})
    have_inputs = bool(args) or bool(kwargs)
    expected = None
    if have_inputs:
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                expected = model(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"{type(model).__name__}.forward",
                               f"the model rejects the example inputs ({_first_line(exc)})",
                               "pass example_inputs (a tuple of positional inputs) and example_kwargs "
                               "with which model(*example_inputs, **example_kwargs) runs") from None
        finally:
            model.train(was_training)

    notes: list[str] = []
    constants = nn.Module()
    graphs, why = _try_symbolic_trace(model, constants, args, kwargs, expected)
    if graphs is not None:
        return Capture(graphs, "symbolic_trace", constants, notes)
    notes.append(why)
    if not have_inputs:
        raise CaptureError(f"{type(model).__name__}.forward", why,
                           "pass example_inputs (and example_kwargs) so torch.export can capture the model, "
                           "or make the traced code free of Python control flow on tensors")
    constants = nn.Module()
    graphs, why = _try_export(model, constants, args, kwargs)
    if graphs is None:
        notes.append(why)
        raise CaptureError(f"{type(model).__name__}.forward", "; ".join(notes),
                           "make forward exportable: replace data-dependent Python control flow with torch.cond "
                           "or tensor ops, return only tensors/containers of tensors (e.g. use_cache=False for "
                           "Hugging Face models), and check that the example inputs match forward's signature")
    return Capture(graphs, "export", constants, notes)
