"""Rewrite pass: split each training-mode batch norm into a pure normalisation and a statistics update.

A training-mode batch norm normalises with the batch's statistics and, as a side effect, updates
its running statistics in place: ``call_module`` to the module under ``torch.fx`` (which keeps it
opaque), ``aten.batch_norm`` under ``torch.export`` (whose schema does not even declare the
write). Recomputing its block in backward would repeat that update. After this pass each one is

- ``aten._native_batch_norm_legit.no_stats``: the normalisation, pure, recomputable;
- ``dynlora::update_batch_norm_stats`` (plus ``num_batches_tracked.add_(1)`` for a module): the
  update, on the same input, declared in its schema, so ``find_regions`` runs it once, after the
  block's region, instead of inside it.

Both run the kernels batch norm itself runs (on CPU the normalisation, its gradients and the
updated statistics are equal bit for bit). Only the train graph is rewritten: the pass bakes in
training mode, as ``torch.export`` does.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .functionalize import replace_node

__all__ = ["functionalize_batch_norm", "training_batch_norms", "update_batch_norm_stats"]

# exact types: a subclass may override forward; SyncBatchNorm decides at run time whether to
# synchronise statistics across processes, which a local normalisation baked in here would drop
_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.library.custom_op("dynlora::update_batch_norm_stats", mutates_args=("running_mean", "running_var"))
def update_batch_norm_stats(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                            momentum: float) -> None:
    """Batch norm's running-statistics update alone: ATen's ``batch_norm_update_stats`` (the kernel
    batch norm runs for it), under a schema that says what it writes."""
    torch.batch_norm_update_stats(input.detach(), running_mean, running_var, momentum)


@update_batch_norm_stats.register_fake
def _(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float) -> None:
    return None


def _module_call(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    module = gm.get_submodule(str(node.target))
    if type(module) not in _MODULES or module._forward_hooks or module._forward_pre_hooks \
            or not module.track_running_stats or module.momentum is None or len(node.args) != 1 or node.kwargs:
        return None  # momentum=None: the factor is 1/num_batches_tracked, read at run time
    t = node.target
    return {"input": node.args[0], "momentum": module.momentum, "eps": module.eps,
            "weight": f"{t}.weight" if module.affine else None, "bias": f"{t}.bias" if module.affine else None,
            "running_mean": f"{t}.running_mean", "running_var": f"{t}.running_var",
            "num_batches_tracked": f"{t}.num_batches_tracked"}


def _function_call(node: fx.Node) -> dict[str, Any] | None:
    """``aten.batch_norm`` (export) or ``F.batch_norm`` (fx) in training mode with running statistics."""
    if node.target is torch.ops.aten.batch_norm.default:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
        args = dict(zip(names, node.args))
        args.update({k: v for k, v in node.kwargs.items() if k in names})
    elif node.target is F.batch_norm:
        try:
            args = dict(inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs).arguments)
        except TypeError:
            return None
        args.setdefault("weight", None), args.setdefault("bias", None), args.setdefault("momentum", 0.1)
        args.setdefault("eps", 1e-5)
    else:
        return None
    if args.get("training") is not True or not isinstance(args.get("momentum"), float) \
            or not all(isinstance(args.get(k), fx.Node) for k in ("running_mean", "running_var")):
        return None
    return {**{k: args.get(k) for k in ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")},
            "num_batches_tracked": None}  # export writes it with an add_ of its own


def _split(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    if node.op == "call_module":
        return _module_call(gm, node)
    return _function_call(node) if node.op == "call_function" else None


def training_batch_norms(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes :func:`functionalize_batch_norm` would rewrite."""
    return [n for n in gm.graph.nodes if _split(gm, n) is not None]


def functionalize_batch_norm(gm: fx.GraphModule) -> fx.GraphModule:
    """Mutates and returns ``gm`` (a train graph): every training-mode batch norm with running statistics
    (an exact ``nn.BatchNorm{1,2,3}d`` module without hooks and with a momentum, ``F.batch_norm``,
    ``aten.batch_norm``) becomes a pure normalisation followed by its statistics update."""
    graph = gm.graph
    first_op = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    for node in list(graph.nodes):
        spec = _split(gm, node)
        if spec is None:
            continue
        new: list[fx.Node] = []
        with graph.inserting_before(node):
            def state(value: Any) -> Any:
                if not isinstance(value, str):
                    return value
                with graph.inserting_before(first_op):  # with the graph's other attribute reads
                    return graph.get_attr(value)

            weight, bias = state(spec["weight"]), state(spec["bias"])
            normalised = graph.call_function(torch.ops.aten._native_batch_norm_legit.no_stats,
                                             (spec["input"], weight, bias, True, spec["momentum"], spec["eps"]))
            out = graph.call_function(operator.getitem, (normalised, 0))
            mean, var = state(spec["running_mean"]), state(spec["running_var"])
            update = graph.call_function(torch.ops.dynlora.update_batch_norm_stats.default,
                                         (spec["input"], mean, var, spec["momentum"]))
            new += [normalised, out, update]
            if spec["num_batches_tracked"] is not None:
                new.append(graph.call_function(torch.ops.aten.add_.Tensor,
                                               (state(spec["num_batches_tracked"]), 1)))
        for n in new:
            n.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        replace_node(node, out)
    graph.lint()
    gm.recompile()
    return gm
