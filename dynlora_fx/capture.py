"""Capture: turn an arbitrary ``nn.Module`` into one FX graph per mode (train, eval).

``torch.fx.symbolic_trace`` is tried first (module-level graphs, readable); when it
fails, hides a weight, would lose module semantics it cannot represent (forward hooks
and pre-hooks, grad-mode changes such as ``with torch.no_grad():``), or disagrees with
the model, ``torch.export`` (non-strict) captures an ATen-level graph instead, which
runs hooks while tracing and keeps grad-mode regions. Both modes are captured because
a trace bakes in ``self.training`` (dropout flags, batch-norm statistics, stochastic depth).

Every captured graph is verified on the example inputs in both modes before it is
used: outputs, every parameter's gradient and every mutated buffer must match the
model's (same RNG seed for both runs). Backward hooks on modules survive neither
capture path and are refused.

Every graph's ``get_attr``/``call_module`` targets point into one shared state tree:
``model.<fqn>`` (the copy of the user's model: its parameters and buffers, read at run
time so ``.to()``/``load_state_dict`` reach both graphs) and ``constants.<name>``.

The model's own activation checkpointing (``torch.utils.checkpoint``) is seen through while
capturing under :func:`recording_checkpointed_modules`, which records the modules it covered.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ._compat import checkpoint_calls
from .errors import CaptureError

__all__ = ["Capture", "capture", "recapture", "recording_checkpointed_modules", "preserved_state", "guard_checker",
           "broken_guard", "graph_module", "MODES"]

MODES = ("train", "eval")
# nn modules kept opaque by fx (their weights are read from the module); every other
# torch.nn module that owns a matrix is traced through so its weights become get_attr.
_FX_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)
# parametrization modules (weight norm, orthogonal, ...) are traced through, so the functions of the
# originals they compute appear in the graph exactly as torch.export shows them
_PARAMETRIZE_MODULES = ("torch.nn.utils.parametrize", "torch.nn.utils.parametrizations")
_FORWARD_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"))
_BACKWARD_HOOKS = (("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


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
    """fx tracer that keeps only weight-free torch.nn modules (and Linear/Conv/Embedding) opaque,
    and records every node created under a grad mode other than the one tracing started in
    (``torch.no_grad``, ``enable_grad``, ``set_grad_enabled``, ``inference_mode``): fx drops those
    context managers, so such a graph would compute gradients the model does not."""

    def __init__(self) -> None:
        super().__init__()
        # buffers read as get_attr nodes: fx otherwise runs in-place updates of a buffer
        # (running statistics, counters) once while tracing and bakes the result in as a constant
        self.proxy_buffer_attributes = True
        self.grad_mode_nodes: list[str] = []
        self._grad_mode = torch.is_grad_enabled()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if torch.is_grad_enabled() != self._grad_mode or torch.is_inference_mode_enabled():
            self.grad_mode_nodes.append(node.name)
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__module__ in _PARAMETRIZE_MODULES or parametrize.is_parametrized(m):
            return False
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
    if not isinstance(obj, torch.Tensor):  # e.g. export's grad-mode region submodules
        i = 0
        while hasattr(constants, f"o{i}"):  # submodules live in _modules, not in vars()
            i += 1
        setattr(constants, f"o{i}", obj)
        return f"o{i}"
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


def _hooks(model: nn.Module, kinds: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """(module path, kind of hook) for every module of ``model`` holding a hook of ``kinds``."""
    found = []
    for name, m in model.named_modules():
        for attr, kind in kinds:
            if getattr(m, attr, None):
                found.append((name or type(model).__name__, kind))
    return found


def _close(ref: torch.Tensor | None, got: torch.Tensor | None, scale: float = 0.0) -> bool:
    """Equal up to float rounding, relative to ``ref`` and to ``scale`` (the magnitude of its peers:
    a bias gradient that is zero in theory, e.g. before a batch norm, is rounding noise of the size
    of the other gradients); a missing gradient equals a zero one."""
    if ref is None and got is None:
        return True
    ref = torch.zeros_like(got) if ref is None else ref
    got = torch.zeros_like(ref) if got is None else got
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return False
    if not (ref.is_floating_point() or ref.is_complex()):
        return torch.equal(ref, got)
    scale = max(scale, _magnitude(ref))
    return torch.allclose(got.detach(), ref.detach(), rtol=1e-4, atol=1e-5 * (1.0 + scale), equal_nan=True)


def _magnitude(t: torch.Tensor | None) -> float:
    if t is None or not t.numel() or not (t.is_floating_point() or t.is_complex()):
        return 0.0
    return float(t.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())


def _tree_allclose(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and not _close(x, y):
            return False
        if not isinstance(x, torch.Tensor) and x != y and not (isinstance(x, float) and math.isnan(x)):
            return False
    return True


_PROBE_SEED = 1234


def _probe(fn: Any, model: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, list, dict[str, torch.Tensor]]:
    """Run ``fn`` (the model or one of its graphs) under a fixed RNG seed with gradients on: returns
    the output, the gradient of a fixed random projection of the output w.r.t. each trained parameter,
    and the buffers after the call. The buffers are put back as they were."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() skips tied duplicates
    before = {k: b.detach().clone() for k, b in model.named_buffers()}
    cuda = sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            torch.manual_seed(_PROBE_SEED)
            out = fn(*args, **kwargs)
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad
                      and (t.is_floating_point() or t.is_complex())]
            grads: list = [None] * len(params)
            if leaves and params:
                gen = torch.Generator().manual_seed(_PROBE_SEED)
                loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).real.sum()
                           for t in leaves)
                grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        after = {k: b.detach().clone() for k, b in model.named_buffers()}
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in before and b.shape == before[k].shape:
                    b.copy_(before[k])
    return out, grads, after


def _verify(model: nn.Module, graphs: dict[str, fx.GraphModule], args: tuple, kwargs: dict) -> str:
    """'' when every mode's graph matches ``model`` on the example inputs (outputs, parameter
    gradients, mutated buffers), else what differs. A mode in which the model itself rejects the
    inputs (e.g. batch norm on a batch of 1 in train mode) cannot be compared and is passed."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    was_training = model.training
    try:
        for mode in MODES:
            if mode not in graphs:
                continue
            model.train(mode == "train")  # fx leaf modules (dropout, batch norm) read the mode at run time
            try:
                ref = _probe(model, model, args, kwargs)
            except Exception:  # noqa: BLE001 - the model's own failure in this mode is not ours to judge
                continue
            try:
                # the generated forward, not the GraphModule's __call__, which prints the traceback
                got = _probe(graphs[mode].forward, model, args, kwargs)
            except Exception as exc:  # noqa: BLE001
                return f"its {mode}-mode graph fails on the example inputs: {_first_line(exc)}"
            if not _tree_allclose(got[0], ref[0]):
                return f"its {mode}-mode graph's output differs from the model's"
            scale = max((_magnitude(r) for r in ref[1]), default=0.0)
            for name, r, g in zip(names, ref[1], got[1]):
                if not _close(r, g, scale):
                    return f"its {mode}-mode graph gives {name} a different gradient than the model does"
            for name, r in ref[2].items():
                if not _close(r, got[2].get(name)):
                    return f"its {mode}-mode graph leaves buffer {name} different from the model"
    finally:
        model.train(was_training)
    return ""


def _try_symbolic_trace(model: nn.Module, constants: nn.Module) -> tuple[dict[str, fx.GraphModule] | None, str]:
    hooked = _hooks(model, _FORWARD_HOOKS)
    if hooked:  # fx runs a non-leaf module's hooks once while tracing and drops a leaf's entirely
        return None, f"torch.fx.symbolic_trace cannot keep the {hooked[0][1]} of {hooked[0][0]}"
    graphs: dict[str, fx.GraphModule] = {}
    seen: set[int] = set()  # parameters some mode's graph reads
    was_training = model.training
    try:
        for mode in MODES:
            model.train(mode == "train")
            tracer = _Tracer()
            try:
                graph = tracer.trace(model)
            except Exception as exc:  # noqa: BLE001 - any tracing failure means "use export"
                return None, f"torch.fx.symbolic_trace failed: {_first_line(exc)}"
            if tracer.grad_mode_nodes:
                return None, (f"forward changes the grad mode (torch.no_grad, enable_grad, set_grad_enabled or "
                              f"inference_mode) around node {tracer.grad_mode_nodes[0]}, which "
                              "torch.fx.symbolic_trace drops")
            for node in graph.nodes:
                if node.op == "get_attr":
                    seen.add(id(_resolve(model, node.target)))
                elif node.op == "call_module":
                    seen.update(id(p) for p in _resolve(model, node.target).parameters())
            extra: dict[str, nn.Module] = {}
            _retarget(graph, model, model, constants, extra)
            graphs[mode] = graph_module(graph, {"model": model, "constants": constants, **extra})
    finally:
        model.train(was_training)
    hidden = [n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in seen]
    if hidden:
        return None, f"torch.fx.symbolic_trace does not show how {hidden[0]} is used"
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


_GUARD_FAILED = "Guard failed:"  # how torch.export's input guards fail; check_static_dims fails the same way


def broken_guard(exc: BaseException) -> str | None:
    """The condition an input-guard failure names (torch.export's ``_guards_fn`` or
    :func:`check_static_dims`), or None when ``exc`` is anything else."""
    message = str(exc).strip()
    if isinstance(exc, AssertionError) and message.startswith(_GUARD_FAILED):
        return message[len(_GUARD_FAILED):].strip()
    return None


def check_static_dims(*inputs: Any, dims: tuple[tuple[int, int, int, str], ...],
                      guards: tuple[tuple[str, str], ...] | None = None) -> None:
    """Raise export's own kind of guard failure when an input's size differs where the graph
    was specialised to the example's size: ``(input index, dim, size, input name)`` per dim.
    ``guards`` (export's own, as ``(code over args[i], condition)``) are checked by its ``_guards_fn``
    in the graph; they ride along for :func:`guard_checker`."""
    for i, d, size, name in dims:
        if inputs[i].shape[d] != size:
            raise AssertionError(f"{_GUARD_FAILED} {name}.size()[{d}] == {size}")


def _guard_static_dims(graph: fx.Graph, guards: tuple[tuple[str, str], ...] | None) -> None:
    """torch.export turns a dimension static when the code pins it (an int in a view, a branch on
    it, a 0/1 specialisation) but its graph module does not check static sizes at call time: an
    input of another size runs and can silently broadcast against a baked-in shape. Check them
    after export's own guards, with the message its guards use."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    dims = []
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims += [(i, d, int(size), node.name) for d, size in enumerate(val.shape) if is_concrete_int(size)]
    if not dims and not guards:
        return
    anchor = next((n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), placeholders[-1])
    with graph.inserting_after(anchor):
        graph.call_function(check_static_dims, tuple(placeholders), {"dims": tuple(dims), "guards": guards})
    graph.lint()


def _export_module(ep: Any) -> tuple[fx.GraphModule, tuple[tuple[str, str], ...] | None]:
    """``ep.module()``, and its input guards as ``(Python code over args[i], condition)`` pairs, as
    export writes them into its ``_guards_fn`` (None where they could not be read)."""
    from torch.export import _unlift

    seen: list[tuple[list[str], list[Any]]] = []
    original = _unlift._convert_guards_code_to_fn

    def spy(guards_code: list[str], paths: list[Any]) -> Any:
        seen.append((list(guards_code), list(paths)))
        return original(guards_code, paths)

    _unlift._convert_guards_code_to_fn = spy
    try:
        src = ep.module()
    finally:
        _unlift._convert_guards_code_to_fn = original
    if len(seen) != 1:
        return src, None
    try:
        pairs = []
        for code in seen[0][0]:
            actual, shown = code, code
            for i, path in enumerate(seen[0][1]):  # as torch.export._unlift names the placeholders
                actual = actual.replace("L" + pytree.keystr(path), f"args[{i}]")
                shown = shown.replace("L" + pytree.keystr(path), path[0].key + pytree.keystr(path[1:]))
            pairs.append((actual, shown.replace("\n", "")))
    except Exception:  # noqa: BLE001 - an unexpected path kind: the checker falls back to _guards_fn
        return src, None
    return src, tuple(pairs)


def _broken_guard_fn(dims: tuple[tuple[int, int, int, str], ...], guards: tuple[tuple[str, str], ...]) -> Any:
    """A function of the graph's flat inputs returning the first guard they break (its condition) or
    None: plain comparisons of sizes, which torch.compile traces into guards of its own."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    lines = ["def broken_guard(*args):"]
    for i, d, size, name in dims:
        lines.append(f"    if args[{i}].shape[{d}] != {size}: return {f'{name}.size()[{d}] == {size}'!r}")
    for actual, shown in guards:
        lines.append(f"    if not ({actual}): return {shown!r}")
    lines.append("    return None")
    namespace = {**SYMPY_INTERP, "math": math, "inf": float("inf")}
    exec("\n".join(lines), namespace)  # noqa: S102 - export's own guard code, as its _guards_fn runs it
    return torch._dynamo.dont_skip_tracing(namespace["broken_guard"])


def _try_export(model: nn.Module, constants: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None,
                modes: tuple[str, ...] = MODES) -> tuple[dict[str, fx.GraphModule] | None, str]:
    graphs: dict[str, fx.GraphModule] = {}
    # A view as example input (e.g. batch[:2, :32]) makes torch.export guard on its base
    # (``x._base.size()[1] != x.size()[1]``), which every later call with a tensor of its own
    # fails inside the graph (``None.size()``): export from copies that own their storage.
    args, kwargs = pytree.tree_map_only(torch.Tensor, _own_storage, (args, kwargs))
    was_training = model.training
    try:
        for mode in modes:
            model.train(mode == "train")
            errors = []
            ep = None
            # prefer the most dynamic capture that works; the user's dynamic_shapes, when given, as they are
            for dims in ("all", "batch", "none") if dynamic_shapes is None else ("user",):
                try:
                    ep = torch.export.export(model, args, kwargs, strict=False,
                                             dynamic_shapes=dynamic_shapes if dims == "user"
                                             else _dynamic_shapes(model, args, kwargs, dims))
                    break
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
            if ep is None:
                return None, f"torch.export failed: {_first_line(errors[-1])}"
            src, guards = _export_module(ep)
            graph = src.graph
            _guard_static_dims(graph, guards)
            extra: dict[str, nn.Module] = {}
            _retarget(graph, src, model, constants, extra)
            graphs[mode] = graph_module(graph, {"model": model, "constants": constants, **extra})
    finally:
        model.train(was_training)
    return graphs, ""


def _state(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor, torch.Tensor | None]]:
    """Every buffer (with a copy of its value) and plain tensor attribute of ``model``'s modules:
    running the model while capturing it moves batch-norm statistics and counters, and hooks
    such as ``spectral_norm``'s rebind attributes to tensors that need gradients."""
    out = []
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None:
                out.append((m, "_buffers", name, b, b.detach().clone()))
        for name, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                out.append((m, "__dict__", name, v, None))
    return out


@torch.no_grad()
def _put_back(state: list[tuple[nn.Module, str, str, torch.Tensor, torch.Tensor | None]]) -> None:
    for m, where, name, obj, value in state:
        if where == "_buffers":
            m._buffers[name] = obj
            obj.copy_(value)
        else:  # back where _state found it: a plain attribute, set past any hook or property of the class
            m.__dict__[name] = obj


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """On exit, ``model``'s buffers (values and objects) and plain tensor attributes are as they were on entry."""
    state = _state(model)
    try:
        yield
    finally:
        _put_back(state)


@contextlib.contextmanager
def _requiring_grad(params: tuple[nn.Parameter, ...]) -> Iterator[None]:
    """``params`` require gradients while active (so verification checks theirs); then as they were."""
    flags = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _export_verified(model: nn.Module, constants: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                     modes: tuple[str, ...] = MODES) -> tuple[dict[str, fx.GraphModule] | None, str]:
    """``torch.export``'s graphs of ``modes`` and '' when they match ``model``; (None, why) when export
    fails; (graphs, why) when they do not match."""
    graphs, why = _try_export(model, constants, args, kwargs, dynamic_shapes, modes)
    if graphs is None:
        return None, why
    for g in {id(g): g for g in graphs.values()}.values():
        g.graph.lint()
    why = _verify(model, graphs, args, kwargs)
    return graphs, why and f"torch.export's graph is wrong: {why}"


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None, dynamic_shapes: Any = None) -> Capture:
    """Capture ``model`` (which the graphs will share, so pass a copy) for both modes.

    ``args``/``kwargs`` are example inputs; without them only symbolic tracing is possible.
    ``dynamic_shapes`` goes to ``torch.export`` as it is (by default every input dim is
    ``Dim.AUTO``, then the batch dims, then none). Raises ``CaptureError`` when neither path
    works. The model's buffers and tensor attributes are as they were when it returns.
    """
    with preserved_state(model):
        return _capture(model, args, dict(kwargs or {}), dynamic_shapes)


def recapture(model: nn.Module, constants: nn.Module, args: tuple, kwargs: dict, *, dynamic_shapes: Any = None,
              trained: tuple[nn.Parameter, ...] = (), modes: tuple[str, ...] = MODES) -> dict[str, fx.GraphModule]:
    """Capture ``model`` again with ``torch.export`` for other inputs: the graphs of ``modes``, reading
    the same ``model``/``constants`` trees as the first capture, verified against ``model`` like it.
    ``trained`` (parameters frozen since the first capture: adapted weights) get their gradients
    checked too. Raises ``CaptureError``; buffers and tensor attributes are put back."""
    with preserved_state(model), _requiring_grad(trained):
        graphs, why = _export_verified(model, constants, args, dict(kwargs), dynamic_shapes, modes)
    if why:
        raise CaptureError(f"{type(model).__name__}.forward", f"capturing it again for inputs outside the first "
                           f"capture's conditions failed ({why})",
                           "transform with example inputs shaped like these calls, or pad the inputs to a size "
                           "already captured")
    return graphs


def guard_checker(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A module taking ``gm``'s inputs that returns the first of ``gm``'s input guards they break
    (torch.export's ``_guards_fn`` and the static-size check), as its condition, or None when ``gm``
    takes them: plain size comparisons, no exception, so torch.compile traces the choice of a graph.
    None when ``gm`` has no guard (an fx capture)."""
    checks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is check_static_dims]
    if not checks:
        return None
    dims, guards = checks[0].kwargs["dims"], checks[0].kwargs.get("guards")
    graph = fx.Graph()
    inputs = [graph.node_copy(n) for n in gm.graph.nodes if n.op == "placeholder"]
    if guards is None:  # export's guards as code were not read: ask its _guards_fn (eagerly only)
        graph.output(graph.call_function(_broken_guard_eager, (graph.get_attr("_guards_fn"), *inputs),
                                         {"dims": dims}))
    else:
        graph.output(graph.call_function(_broken_guard_fn(dims, guards), tuple(inputs)))
    codegen = copy.copy(gm.graph._codegen)
    info = getattr(codegen, "pytree_info", None)
    if info is not None:  # same inputs, flattened the same way; the result as it is
        codegen.pytree_info = info._replace(out_spec=None)
    graph._codegen = codegen
    return graph_module(graph, {"_guards_fn": gm._guards_fn} if hasattr(gm, "_guards_fn") else {})


def _broken_guard_eager(guards_fn: Any, *inputs: Any, dims: tuple[tuple[int, int, int, str], ...]) -> str | None:
    try:
        guards_fn(*inputs)
        check_static_dims(*inputs, dims=dims)
    except AssertionError as exc:
        condition = broken_guard(exc)
        if condition is None:
            raise
        return condition
    return None


def _capture(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None) -> Capture:
    have_inputs = bool(args) or bool(kwargs)
    if have_inputs:
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"{type(model).__name__}.forward",
                               f"the model rejects the example inputs ({_first_line(exc)})",
                               "pass example_inputs (a tuple of positional inputs) and example_kwargs "
                               "with which model(*example_inputs, **example_kwargs) runs") from None
        finally:
            model.train(was_training)

    backward = _hooks(model, _BACKWARD_HOOKS)
    if backward:
        where, kind = backward[0]
        raise CaptureError(where, f"it has a {kind}, which no captured graph runs (gradients would silently "
                                  "bypass it)",
                           "remove the hook before dl.transform and register it on the transformed module instead")
    notes: list[str] = []
    constants = nn.Module()
    graphs, why = _try_symbolic_trace(model, constants)
    if graphs is not None and have_inputs:
        why = _verify(model, graphs, args, kwargs)
        if why:
            graphs, why = None, f"torch.fx.symbolic_trace's graph is wrong: {why}"
    if graphs is not None:
        return Capture(graphs, "symbolic_trace", constants, notes)
    notes.append(why)
    if not have_inputs:
        raise CaptureError(f"{type(model).__name__}.forward", why,
                           "pass example_inputs (and example_kwargs) so torch.export can capture the model, "
                           "or make the traced code free of Python control flow on tensors")
    constants = nn.Module()
    graphs, why = _export_verified(model, constants, args, kwargs, dynamic_shapes)
    if graphs is None:
        notes.append(why)
        raise CaptureError(f"{type(model).__name__}.forward", "; ".join(notes),
                           "make forward exportable: replace data-dependent Python control flow with torch.cond "
                           "or tensor ops, return only tensors/containers of tensors (e.g. use_cache=False for "
                           "Hugging Face models), and check that the example inputs match forward's signature")
    if why:
        notes.append(why)
        raise CaptureError(f"{type(model).__name__}.forward", "; ".join(notes),
                           "make forward a function of its inputs, parameters and buffers only (no Python-side "
                           "state, no hooks or RNG outside torch); a captured graph cannot reproduce the rest")
    return Capture(graphs, "export", constants, notes)


# -- the model's own checkpointing ---------------------------------------------------------------

def _module_of(function: Any) -> nn.Module | None:
    """The module a checkpointed callable runs: ``block``, ``block.forward``, ``partial(...)`` of
    either, or ``partial(Block.forward, block)`` (Hugging Face checkpoints ``forward`` this way)."""
    for _ in range(8):
        if isinstance(function, nn.Module):
            return function
        owner = getattr(function, "__self__", None)
        if isinstance(owner, nn.Module):
            return owner
        if isinstance(function, functools.partial):
            if function.args and isinstance(function.args[0], nn.Module):
                return function.args[0]
            function = function.func
            continue
        return None
    return None


@contextlib.contextmanager
def recording_checkpointed_modules() -> Iterator[set[int]]:
    """While active, ``torch.utils.checkpoint.checkpoint`` (both variants, and
    ``checkpoint_sequential``) runs its function directly, and the ids of the modules it was
    asked to checkpoint are added to the yielded set. Capture inside it sees through the model's
    own checkpointing; the set says where that checkpointing was."""
    recorded: set[int] = set()
    pending: list[bool] = []

    def first_module_entered(module: nn.Module, args: Any) -> None:
        if pending and pending[-1]:
            recorded.add(id(module))
            pending[-1] = False

    @contextlib.contextmanager
    def running(function: Any) -> Iterator[None]:
        module = _module_of(function)
        if module is not None:
            recorded.add(id(module))
        pending.append(module is None)  # a closure: the first module it calls is the block
        try:
            yield
        finally:
            pending.pop()

    handle = nn.modules.module.register_module_forward_pre_hook(first_module_entered)
    try:
        with checkpoint_calls(running):
            yield recorded
    finally:
        handle.remove()
