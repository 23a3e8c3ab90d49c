"""Normalisation pass: turn ``call_module`` Linear/Conv nodes into functional calls.

After it, every weight read is a ``get_attr`` node, on both capture paths, so the
analysis and rewrite passes handle fx and export graphs the same way.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["functionalize_leaves", "replace_node"]

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _has_forward_hooks(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def replace_node(node: fx.Node, new: fx.Node) -> None:
    """``new`` takes ``node``'s place in its graph: its metadata and its users; ``node`` is erased."""
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def functionalize_leaves(gm: fx.GraphModule) -> fx.GraphModule:
    """Mutates and returns ``gm``: each ``call_module`` on an exact nn.Linear/Conv{1,2,3}d without
    forward hooks becomes ``F.linear``/``F.conv*d`` over ``get_attr`` reads of its weight and bias."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not nn.Linear and type(mod) not in _CONV_FN:
            continue
        if _has_forward_hooks(mod):  # a functional call would drop them: keep it opaque (capture sends
            continue  # hooked models to torch.export, so this is a second line of defence)
        (x,) = node.args[:1] or (node.kwargs.get("input"),)
        with graph.inserting_before(node):
            w = graph.get_attr(f"{node.target}.weight")
            b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            if type(mod) is nn.Linear:
                new = graph.call_function(F.linear, (x, w, b))
            else:
                padding = mod.padding
                if mod.padding_mode != "zeros":  # what nn.ConvNd.forward does for other modes
                    x = graph.call_function(F.pad, (x, mod._reversed_padding_repeated_twice),
                                            {"mode": mod.padding_mode})
                    padding = 0
                new = graph.call_function(_CONV_FN[type(mod)],
                                          (x, w, b, mod.stride, padding, mod.dilation, mod.groups))
        replace_node(node, new)
    graph.lint()
    gm.recompile()
    return gm
