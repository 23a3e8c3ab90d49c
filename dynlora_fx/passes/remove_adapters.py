"""Rewrite pass: drop every adapter node, leaving the graph the base weights alone feed.

It changes the function unless the adapters were folded into their weights first
(``dl.merge`` does that); nodes are found by ``node.meta["dynlora"]``, never by name.
"""

from __future__ import annotations

import torch.fx as fx

from .insert_adapters import META_KEY

__all__ = ["remove_adapters"]


def remove_adapters(gm: fx.GraphModule) -> fx.GraphModule:
    """Mutates and returns ``gm`` with no node tagged ``dynlora`` left."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.meta.get(META_KEY, {}).get("role") == "output":
            base = node.args[0]  # the base is the first untagged node along the first arguments
            while META_KEY in base.meta:
                base = base.args[0]
            node.replace_all_uses_with(base)
    for node in reversed(list(graph.nodes)):
        if META_KEY in node.meta:
            if node.users:
                raise AssertionError(f"adapter node {node.name} still used by {list(node.users)}")
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
