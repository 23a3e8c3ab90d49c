"""Analysis pass: which parameters feed a matrix product, and why the others do not.

A *weight use* follows a parameter of >= 2 dims from each read (``get_attr`` or the
``call_module`` that owns it) through view-like ops to the op that consumes it.
A parameter is a target when every consumer is a matrix product (linear, convolution,
mm/bmm/matmul/addmm/einsum, RNN ops, packed attention, grouped-mm, or an op we do
not know — unknown ops get the weight-space form rather than silence). Everything
else is a skip with a reason. The uses are those of every mode's graph (a weight read
only in eval mode is still a weight), and a read inside a ``torch.no_grad`` region
(export's ``wrap_with_set_grad_enabled(False, ...)``) neither blocks nor justifies an
adapter: a weight read only there gets no gradient and is skipped as such. This pass
reads the graphs and never changes them.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..config import AdapterConfig, resolve_rank
from ..errors import TargetError

__all__ = ["WeightUse", "Target", "Skip", "TargetPlan", "find_targets", "weight_uses", "op_name", "match_pattern"]

_VIEW_OPS = {
    "t", "transpose", "permute", "view", "reshape", "_unsafe_view", "expand", "expand_as", "contiguous",
    "unsqueeze", "squeeze", "flatten", "unflatten", "chunk", "split", "split_with_sizes", "tensor_split",
    "unbind", "select", "slice", "narrow", "getitem", "to", "_to_copy", "type", "type_as", "float", "half",
    "bfloat16", "double", "alias", "detach", "clone", "view_as", "movedim", "swapaxes", "mT", "T",
    "numpy_T", "lift_fresh_copy", "_assert_tensor_metadata",
}
_TRANSPOSING = {"t", "transpose", "mT", "T", "swapaxes", "numpy_T"}
_METADATA_OPS = {"sym_size", "sym_numel", "sym_stride", "size", "dim", "numel", "stride", "shape", "dtype",
                 "device", "_assert_scalar", "requires_grad"}
_LINEAR = {"linear"}
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_MATRIX = _LINEAR | _CONV | {
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "mm", "bmm", "matmul", "addmm", "baddbmm",
    "addbmm", "addmv", "mv", "einsum", "tensordot", "bilinear", "lstm", "gru", "rnn_tanh", "rnn_relu",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_native_multi_head_attention",
    "multi_head_attention_forward", "_transformer_encoder_layer_fwd", "__matmul__", "__rmatmul__",
}
# (first, second) operand positions of products written x @ W: a weight in second place is (in, out)
_OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "__matmul__": (0, 1), "addmm": (1, 2),
             "baddbmm": (1, 2), "addbmm": (1, 2)}
_NOT_MATRIX = {
    "embedding", "embedding_bag", "cat", "concat", "stack", "index", "index_select", "gather", "scatter",
    "sum", "mean", "norm", "layer_norm", "native_layer_norm", "group_norm", "batch_norm", "rms_norm",
    "instance_norm", "where", "masked_fill", "copy_", "output", "add", "sub", "mul", "div", "truediv",
    "floordiv", "iadd", "isub", "imul", "pow", "neg", "abs", "softmax", "log_softmax", "dropout",
    "pad", "constant_pad_nd", "roll", "flip", "repeat", "tile", "max", "min", "amax", "amin", "exp",
    "sigmoid", "tanh", "relu", "gelu", "silu", "clamp", "zeros_like", "ones_like", "empty_like",
}
# ops whose matrix operand is one argument only: weight norm's g (the per-row magnitude) is not a matrix
_MATRIX_ARG = {"_weight_norm": 0, "_weight_norm_interface": 0}
_GRAD_REGION = "wrap_with_set_grad_enabled"  # export's grad-mode region: (enabled, subgraph, *inputs)


def op_name(node: fx.Node) -> str:
    """A short, capture-independent name for what ``node`` does (``aten.linear.default`` -> ``linear``)."""
    t = node.target
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(t)).__name__.lower()
    if node.op == "call_method":
        return str(t)
    if node.op == "output":
        return "output"
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    if t is getattr and len(node.args) > 1:
        return str(node.args[1])
    return getattr(t, "__name__", str(t))


def _is_pointwise(node: fx.Node) -> bool:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return torch.Tag.pointwise in t.tags
    return node.op == "call_function" and getattr(t, "__module__", "") in ("_operator", "operator") \
        and t not in (operator.getitem, operator.matmul)


def classify(node: fx.Node) -> str:
    """'view' | 'meta' | 'matrix' | 'other' for a node consuming a weight."""
    name = op_name(node)
    if name in _VIEW_OPS:
        return "view"
    if name in _METADATA_OPS:
        return "meta"
    if name in _MATRIX or "grouped_mm" in name or name.endswith("_mm"):
        return "matrix"
    if name in _NOT_MATRIX or _is_pointwise(node) or node.op == "call_module":
        return "other"
    return "matrix"  # unknown op consuming a matrix: adapt it in weight space rather than ignore it


@dataclass(frozen=True)
class WeightUse:
    """One consumer of a weight: the node, its op, and how the weight reaches it."""

    reader: fx.Node  # the get_attr / call_module that reads the parameter
    consumer: fx.Node
    op: str
    kind: str  # "matrix" | "other" | "nograd" (read inside a torch.no_grad region)
    direct: bool  # reader is the consumer's weight argument itself (activation branch possible)
    transposed: bool  # an odd number of transposes between reader and consumer


def _conv_groups(node: fx.Node) -> Any:
    if "groups" in node.kwargs:
        return node.kwargs["groups"]
    name = op_name(node)
    pos = 8 if name in ("convolution", "_convolution") else 6
    return node.args[pos] if len(node.args) > pos else 1


def _direct(reader: fx.Node, consumer: fx.Node, name: str) -> bool:
    weight_arg = consumer.args[1] if len(consumer.args) > 1 else consumer.kwargs.get("weight")
    if weight_arg is not reader:
        return False
    if name in _LINEAR:
        return True
    if name in ("conv1d", "conv2d", "conv3d"):
        return _conv_groups(consumer) == 1
    return False


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value reaches the output or a side effect (an in-place op, a module call):
    symbolic tracing keeps dead code, and a product nobody reads is no use of its weight."""
    def effectful(n: fx.Node) -> bool:
        if n.op in ("output", "call_module") or (n.op == "call_method" and str(n.target).endswith("_")):
            return True
        if n.op == "call_function":
            t = n.target
            if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
                return True
            return n.is_impure() or getattr(t, "__name__", "").endswith("_")
        return False

    live: set[fx.Node] = set()
    stack = [n for n in graph.nodes if effectful(n)]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    return live


def weight_uses(gm: fx.GraphModule, param: torch.Tensor) -> list[WeightUse]:
    """Every live consumer of ``param`` in ``gm``, followed through view-like ops."""
    uses: list[WeightUse] = []
    live = live_nodes(gm.graph)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if _get(gm, node.target) is not param:
                continue
            stack = [(node, u, False) for u in node.users]
            while stack:
                src, user, transposed = stack.pop()
                kind = classify(user)
                name = op_name(user)
                if user not in live:
                    continue
                if kind == "view":
                    flip = transposed ^ (name in _TRANSPOSING)
                    stack.extend((user, u, flip) for u in user.users)
                elif kind != "meta":
                    if name in _MATRIX_ARG and (user.args[:1] or (None,))[0] is not src:
                        kind = "other"
                    elif name == _GRAD_REGION and user.args[:1] == (False,):
                        kind = "nograd"
                    uses.append(WeightUse(node, user, name, kind, src is node and _direct(node, user, name),
                                          transposed))
        elif node.op == "call_module":
            if any(p is param for p in gm.get_submodule(node.target).parameters()):
                uses.append(WeightUse(node, node, op_name(node), "other", False, False))
    return uses


def _get(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True)
class Target:
    """A weight that gets an adapter. Shapes are of the matrix view the adapter factorises:
    ``W.reshape(*batch, rows, cols) += s · B (*batch, rows, r) @ A (*batch, r, cols)``."""

    weight: str  # canonical qualified name in the model
    aliases: tuple[str, ...]  # every name of the same Parameter object (tied weights)
    shape: tuple[int, ...]
    op: str  # the consuming op (the first, if several)
    form: str  # "activation" | "weight"
    batch: tuple[int, ...]  # leading dims adapted independently (stacked experts); () otherwise
    rows: int
    cols: int
    rank: int
    fan_in_is_rows: bool  # the op contracts over rows (x @ W): init stds swap sides


@dataclass(frozen=True)
class Skip:
    weight: str
    reason: str


@dataclass(frozen=True)
class TargetPlan:
    targets: tuple[Target, ...]
    skipped: tuple[Skip, ...]


def match_pattern(pattern: str, name: str) -> bool:
    """Exact name, ``.suffix`` (a whole-component suffix: ``.q.weight`` matches ``q.weight`` and
    ``layers.0.q.weight``) or ``re:regex`` (full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern.startswith("."):
        return name.endswith(pattern) or name == pattern[1:]
    return name == pattern


def _check_patterns(patterns: tuple[str, ...], field: str, names: list[str]) -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise TargetError(f"{field} pattern {p!r}", f"invalid regular expression ({exc})",
                                  "fix the regex after 're:'") from None
        if not any(match_pattern(p, n) for n in names):
            shown = ", ".join(names[:30]) + (" …" if len(names) > 30 else "")
            raise TargetError(f"{field} pattern {p!r}", "it matches no weight of the model",
                              f"use an exact name, a '.suffix' or 're:regex' over these names: {shown}")


def _matrix_view(shape: tuple[int, ...], conv_like: bool) -> tuple[tuple[int, ...], int, int]:
    if len(shape) == 2:
        return (), shape[0], shape[1]
    if conv_like:  # (out, in/groups, *kernel) -> (out, in/groups * prod(kernel))
        return (), shape[0], math.prod(shape[1:])
    return tuple(shape[:-2]), shape[-2], shape[-1]  # stacked experts: adapt each


def find_targets(graphs: fx.GraphModule | Sequence[fx.GraphModule] | Mapping[str, fx.GraphModule],
                 config: AdapterConfig, model_attr: str = "model") -> TargetPlan:
    """Plan which weights of ``<graph>.<model_attr>`` get adapters under ``config`` (reads only).

    ``graphs`` is one graph module or several sharing one model (a dict of them by mode, as
    capture makes): a weight's uses are the union of its uses in all of them."""
    if isinstance(graphs, fx.GraphModule):
        graphs = [graphs]
    elif isinstance(graphs, Mapping):
        graphs = list(graphs.values())
    gms = list({id(g): g for g in graphs}.values())
    if not gms:
        raise ValueError("find_targets needs at least one graph module")
    model = getattr(gms[0], model_attr)
    names_of: dict[int, list[str]] = {}
    params: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() >= 2:
            names_of.setdefault(id(p), []).append(name)
            params[id(p)] = p
    all_names = [n for ns in names_of.values() for n in ns]
    _check_patterns(config.targets, "targets", all_names)
    _check_patterns(config.exclude, "exclude", all_names)

    targets: list[Target] = []
    skipped: list[Skip] = []
    for pid, names in names_of.items():
        p, weight = params[pid], names[0]
        skip = lambda why: skipped.append(Skip(weight, why))  # noqa: E731
        if config.targets and not any(match_pattern(t, n) for t in config.targets for n in names):
            skip("not matched by the targets patterns")
            continue
        hit = next((e for e in config.exclude if any(match_pattern(e, n) for n in names)), None)
        if hit is not None:
            skip(f"excluded by pattern {hit!r}")
            continue
        if not p.is_floating_point():
            skip(f"not a floating-point weight ({p.dtype})")
            continue
        if not p.requires_grad:
            skip("frozen in the model (requires_grad=False); adapters are only added to trained weights")
            continue
        uses = [u for gm in gms for u in weight_uses(gm, p)]
        if not uses:
            skip("not used by forward")
            continue
        if all(u.kind == "nograd" for u in uses):
            skip(f"read only under torch.no_grad (node {uses[0].consumer.name}), so it gets no gradient; "
                 "it stays as is")
            continue
        others = [u for u in uses if u.kind == "other"]
        if others:
            o = others[0]
            if len(others) == len(uses):
                skip(f"used by {o.op} (node {o.consumer.name}), not by a matrix product; it trains full-rank")
            else:
                tied = " (tied to an embedding)" if "embedding" in o.op else ""
                skip(f"feeds a matrix product but also {o.op} (node {o.consumer.name}){tied}; it stays full-rank")
            continue
        uses = sorted(uses, key=lambda u: u.kind == "nograd")  # a product with gradients first
        conv_like = all(u.op in _CONV or u.op.startswith("conv") for u in uses if u.kind == "matrix")
        batch, rows, cols = _matrix_view(tuple(p.shape), conv_like)
        r = resolve_rank(config.rank, rows, cols)
        if r > min(rows, cols):
            skip(f"rank {r} exceeds min(m, n) = {min(rows, cols)} of its {rows}x{cols} matrix; "
                 "use a smaller int rank or a fractional rank")
            continue
        can_branch = all(u.direct for u in uses)
        form = choose_form(config.form, can_branch, rows, cols, r, config.tokens_per_step)
        targets.append(Target(weight, tuple(names), tuple(p.shape), uses[0].op, form, batch, rows, cols, r,
                              _fan_in_is_rows(uses[0])))
    return TargetPlan(tuple(targets), tuple(skipped))


def adapter_costs(rows: int, cols: int, rank: int, tokens: int) -> tuple[float, float]:
    """Multiply-adds per training step added to the frozen base op, (activation, weight-space).

    Activation branch: x·Aᵀ and ·Bᵀ forward, twice that backward: 3·T·r·(m+n); W stays frozen, so
    the base op computes no weight gradient. Weight-space form: B@A forward, again in backward (W' is
    recomputed rather than kept: ``dynlora_fx/ops.py``) and the dA, dB products (4·r·m·n), plus the
    base op's now-needed weight gradient (T·m·n). Products with inner
    or outer dim r run below the big ones' speed: ``skinny = min(1, sqrt(r/128))`` is fitted to the
    per-op sweep of ``benchmarks/speed.py`` on CPU (shapes 256x256, 704x256, 256x704; r 16, 64;
    256-4096 tokens/step), where it picks the measured faster form in every case with a >5%
    difference. For a square d×d weight at r = d/4 the weight-space form wins above ~d tokens
    per step (~1.5·d once r ≥ 128)."""
    skinny = min(1.0, math.sqrt(rank / 128.0))
    activation = 3.0 * tokens * rank * (rows + cols) / skinny
    weight = 4.0 * rank * rows * cols / skinny + tokens * rows * cols
    return activation, weight


def choose_form(requested: str, can_branch: bool, rows: int, cols: int, rank: int, tokens: int) -> str:
    if not can_branch or requested == "weight":
        return "weight"
    if requested == "activation":
        return "activation"
    activation, weight = adapter_costs(rows, cols, rank, tokens)
    return "activation" if activation <= weight else "weight"


def _fan_in_is_rows(use: WeightUse) -> bool:
    """Whether the op contracts over the weight's rows (only initial scales depend on it)."""
    operands = _OPERANDS.get(use.op) or ((0, 1) if "grouped_mm" in use.op else None)
    if operands is None:
        return use.transposed
    return _is_operand(use, operands[1]) != use.transposed


def _is_operand(use: WeightUse, pos: int) -> bool:
    """Whether the weight reaches ``use.consumer`` as its positional argument ``pos`` (possibly via views)."""
    arg = use.consumer.args[pos] if len(use.consumer.args) > pos else None
    node = arg
    while isinstance(node, fx.Node):
        if node is use.reader:
            return True
        if classify(node) != "view" or not node.args:
            return False
        node = node.args[0]
    return False
