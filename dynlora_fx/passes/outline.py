"""Rewrite pass: outline each region of the graph into a module call of its own.

Each :class:`~dynlora_fx.passes.regions.Region` becomes one ``call_module`` to a
:class:`~dynlora_fx.runtime.regions.RegionRunner` whose body is the region's own subgraph,
reading the same shared state (``model``, ``adapters``, ``constants``) by ``get_attr``. A
region is the unit activation checkpointing (``recompute=True``) and FSDP2 (``dl.fully_shard``)
work on; how it runs under them is the runner's job (``runtime/regions.py``).

Computations that depend on parameters alone and feed one region — the weight-space
adapter's ``W + s·B·A``, weight reshapes — move into that region, so they are recomputed
in backward instead of being held from forward to backward, and read gathered weights.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch.fx as fx
import torch.nn as nn

from ..capture import graph_module
from .regions import Region, RegionPlan, parameter_only

if TYPE_CHECKING:
    from ..runtime.regions import RegionRunner

__all__ = ["outline_regions", "region_modules", "region_bodies"]

REGIONS_ATTR = "regions"


def _extract(gm: fx.GraphModule, region: Region, constant: set[fx.Node], name: str, recompute: bool) -> None:
    # imported here, not at the top: runtime/'s package imports the module layer, which imports the passes
    from ..runtime.regions import RegionRunner

    inside = set(region.nodes)
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def bring(node: fx.Node) -> fx.Node:
        """The body's copy of an outside ``node``: recomputed there when parameter-only, else an input."""
        if node in env:
            return env[node]
        if node in constant:
            for dep in node.all_input_nodes:
                bring(dep)
            env[node] = body.node_copy(node, lambda a: env[a])
        else:
            assert node not in inside, f"region {region.block}: {node} used before it is computed"
            inputs.append(node)
            env[node] = body.placeholder(node.name, type_expr=node.type)
            env[node].meta.update(node.meta)
        return env[node]

    for node in region.nodes:  # placeholders first: fx wants them at the top
        for dep in node.all_input_nodes:
            if dep not in inside and dep not in constant:
                bring(dep)
    for node in region.nodes:
        for dep in node.all_input_nodes:
            if dep not in inside:
                bring(dep)
        env[node] = body.node_copy(node, lambda a: env[a])
    outputs = [n for n in region.nodes if any(u not in inside for u in n.users)]
    body.output(tuple(env[n] for n in outputs))

    attrs = {k: m for k, m in gm._modules.items() if k != REGIONS_ATTR}
    getattr(gm, REGIONS_ATTR).add_module(name, RegionRunner(graph_module(body, attrs), region.block, recompute))
    graph = gm.graph
    with graph.inserting_before(region.nodes[0]):
        call = graph.call_module(f"{REGIONS_ATTR}.{name}", tuple(inputs))
        for i, out in enumerate(outputs):
            item = graph.call_function(operator.getitem, (call, i))
            item.meta.update(out.meta)
            out.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region.nodes):
        graph.erase_node(node)


def outline_regions(gm: fx.GraphModule, plan: RegionPlan, recompute: bool) -> fx.GraphModule:
    """Mutates and returns ``gm``: every region of ``plan`` (found on this ``gm``) runs as one
    :class:`~dynlora_fx.runtime.regions.RegionRunner` call, recomputed in backward if ``recompute``. Parameter-only
    computations that fed a region move into it."""
    if not plan.regions:
        return gm
    if not hasattr(gm, REGIONS_ATTR):
        gm.add_module(REGIONS_ATTR, nn.Module())
    constant = parameter_only(gm.graph)
    for region in plan.regions:
        _extract(gm, region, constant, region.block.replace(".", "_"), recompute)
    # drop the parameter-only nodes now computed inside regions alone; not a general dead-code pass,
    # which would also drop in-place updates whose result goes unused (a counter's add_)
    for node in reversed(list(gm.graph.nodes)):
        if node in constant and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def region_modules(gm: fx.GraphModule) -> list[RegionRunner]:
    """The runners of ``gm``'s outlined regions, in graph order of creation."""
    regions = getattr(gm, REGIONS_ATTR, None)
    return [] if regions is None else list(regions.children())


def region_bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The subgraphs of ``gm``'s regions (passes that rewrite every graph visit these too)."""
    return [m.body for m in region_modules(gm)]
