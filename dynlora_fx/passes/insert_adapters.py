"""Rewrite pass: give every planned weight its adapter.

Activation branch (linear / ungrouped conv, weight read directly)::

    y = op(x, W, b)  ->  y + op_B(s · op_A(x))        op_A uses A as an (r, in, *k) kernel

Weight-space form (everything else: the weight read is replaced where it happens)::

    W  ->  merged_weight(W, B, A, s) = addmm(W as (m, n), s · B, A).reshape(W.shape)

``merged_weight`` (``dynlora_fx.ops``) is recomputed in backward rather than saved by the op
that consumes it; a graph with weight-space adapters runs between ``enter_recompute_scope``
and ``exit_recompute_scope`` nodes (role ``"scope"``, weight ``None``) for that.

Inserted nodes carry ``node.meta["dynlora"] = {"weight", "role", "form"}``; adapter
tensors are read with ``get_attr`` from ``gm.adapters.<weight qualified name>``.
"""

from __future__ import annotations


import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ops import enter_recompute_scope, exit_recompute_scope, merged_weight
from .find_targets import Target, TargetPlan, op_name, weight_uses

__all__ = ["insert_adapters", "META_KEY"]

META_KEY = "dynlora"
_CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}
_aten = torch.ops.aten


def _tag(node: fx.Node, target: Target, role: str, form: str) -> fx.Node:
    node.meta[META_KEY] = {"weight": target.weight, "role": role, "form": form}
    return node


def _arg(node: fx.Node, pos: int, name: str, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _insert_branch(graph: fx.Graph, consumer: fx.Node, target: Target, prefix: str) -> None:
    """``consumer`` is a linear/conv reading the weight directly: add s·B(A x) to its output."""
    name = op_name(consumer)
    x = _arg(consumer, 0, "input", None)
    tag = lambda n, role: _tag(n, target, role, "activation")  # noqa: E731
    with graph.inserting_before(consumer.next):  # a fixed anchor keeps the new nodes in order
        a = tag(graph.get_attr(f"{prefix}.A"), "A")
        b = tag(graph.get_attr(f"{prefix}.B"), "B")
        s = tag(graph.get_attr(f"{prefix}.scale"), "scale")
        # s multiplies the rank-r intermediate, the smallest tensor on the branch
        if name == "linear":
            h = tag(graph.call_function(_aten.linear.default, (x, a)), "down")
            scaled = tag(graph.call_function(_aten.mul.Tensor, (h, s)), "scaled")
            up = tag(graph.call_function(_aten.linear.default, (scaled, b)), "up")
        else:
            fn = _CONV_FN[name]
            kernel = target.shape[1:]
            a_k = tag(graph.call_function(_aten.view.default, (a, [target.rank, *kernel])), "down_kernel")
            h = tag(graph.call_function(fn, (x, a_k, None, _arg(consumer, 3, "stride", 1),
                                             _arg(consumer, 4, "padding", 0), _arg(consumer, 5, "dilation", 1), 1)),
                    "down")
            scaled = tag(graph.call_function(_aten.mul.Tensor, (h, s)), "scaled")
            ones = [1] * (len(kernel) - 1)
            b_k = tag(graph.call_function(_aten.view.default, (b, [target.rows, target.rank, *ones])), "up_kernel")
            up = tag(graph.call_function(fn, (scaled, b_k)), "up")
        out = tag(graph.call_function(_aten.add.Tensor, (consumer, up)), "output")
    consumer.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _insert_weight_delta(graph: fx.Graph, reader: fx.Node, target: Target, prefix: str) -> None:
    """Replace every use of the weight read ``reader`` by ``merged_weight(W, B, A, s)``: W + (s·B)@A in
    W's shape, one addmm (baddbmm for stacked experts) that backward recomputes instead of keeping
    (``dynlora_fx.ops``)."""
    tag = lambda n, role: _tag(n, target, role, "weight")  # noqa: E731
    with graph.inserting_before(reader.next):  # a fixed anchor keeps the new nodes in order
        a = tag(graph.get_attr(f"{prefix}.A"), "A")
        b = tag(graph.get_attr(f"{prefix}.B"), "B")
        s = tag(graph.get_attr(f"{prefix}.scale"), "scale")
        out = tag(graph.call_function(merged_weight, (reader, b, a, s)), "output")
    reader.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _insert_recompute_scope(graph: fx.Graph) -> None:
    """Open the scope in which saved ``W'`` become recipes after the inputs, close it before the output."""
    tag = {"weight": None, "role": "scope", "form": "weight"}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        scope = graph.call_function(enter_recompute_scope, ())
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        done = graph.call_function(exit_recompute_scope, (scope,))
    scope.meta[META_KEY] = dict(tag)
    done.meta[META_KEY] = dict(tag)


def insert_adapters(gm: fx.GraphModule, plan: TargetPlan, *, model_attr: str = "model",
                    adapters_attr: str = "adapters") -> fx.GraphModule:
    """Mutates and returns ``gm``. Precondition: ``gm.<adapters_attr>.<weight>`` holds each
    target's ``A``, ``B`` and ``scale``; the weights live in ``gm.<model_attr>``."""
    model = getattr(gm, model_attr)
    graph = gm.graph
    weight_form = False
    for target in plan.targets:
        prefix = f"{adapters_attr}.{target.weight}"
        param = model.get_parameter(target.weight)
        uses = weight_uses(gm, param)
        if not uses:
            continue  # not used in this mode's graph
        if target.form == "activation" and all(u.direct for u in uses):
            for use in {id(u.consumer): u for u in uses}.values():
                _insert_branch(graph, use.consumer, target, prefix)
        else:
            for reader in {id(u.reader): u.reader for u in uses}.values():
                _insert_weight_delta(graph, reader, target, prefix)
                weight_form = True
    if weight_form:
        _insert_recompute_scope(graph)
    graph.lint()
    gm.recompile()
    return gm
