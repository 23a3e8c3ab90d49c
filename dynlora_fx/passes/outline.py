"""Rewrite pass: outline each region of the graph into a module call of its own.

Each :class:`~dynlora_fx.passes.regions.Region` becomes one ``call_module`` to a
:class:`BlockRegion` whose body is the region's own subgraph, reading the same shared
state (``model``, ``adapters``, ``constants``) by ``get_attr``. A region is the unit both
scale features work on:

- activation checkpointing (``recompute=True``): the body runs under torch's non-reentrant
  checkpoint (RNG state preserved, so dropout recomputes the same mask); only the region's
  inputs are kept for backward;
- FSDP2 (``dl.fully_shard``): the body runs inside a forward method of the block's FSDP
  unit, so torch's own hooks gather the block's ``W``, ``A``, ``B`` before it and free them
  after it (and again around its backward).

Computations that depend on parameters alone and feed one region — the weight-space
adapter's ``W + s·B·A``, weight reshapes — move into that region, so they are recomputed
in backward instead of being held from forward to backward, and read gathered weights.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..capture import graph_module
from .regions import Region, RegionPlan, parameter_only

__all__ = ["BlockRegion", "outline_regions", "region_modules", "region_bodies"]

REGIONS_ATTR = "regions"


class BlockRegion(nn.Module):
    """One block of the graph as a module call. ``body`` is a GraphModule whose attributes are the
    transformed module's shared state trees; ``recompute`` runs it under ``torch.utils.checkpoint``
    (non-reentrant), and a ``unit`` (set by ``dl.fully_shard``: the block's FSDP module, whose
    ``run_block(fn, *args)`` is registered as an FSDP forward method) runs it between FSDP's
    pre- and post-forward hooks. The unit is not a registered submodule: its state is the shared
    state, which the module tree already holds once. ``compiled_run`` (``dl.compile`` of a
    sharded module: :meth:`runner` compiled) runs instead where set."""

    def __init__(self, body: fx.GraphModule, block: str, recompute: bool):
        super().__init__()
        self.body = body
        self.block = block
        self.recompute = recompute
        self.__dict__["unit"] = None
        self.__dict__["compiled_run"] = None

    def _run(self, *args: Any) -> Any:
        compiled = self.__dict__["compiled_run"]
        if compiled is not None:
            return compiled(*args)
        if self.recompute:
            return checkpoint(self.body, *args, use_reentrant=False)
        return self.body(*args)

    def runner(self) -> nn.Module:
        """What :meth:`_run` does, as a module of its own code (the body, or a graph calling it under
        checkpoint): something to compile alone, whose compiled frame no other region shares."""
        if not self.recompute:
            return self.body
        graph = fx.Graph()
        args = [graph.placeholder(n.name) for n in self.body.graph.nodes if n.op == "placeholder"]
        graph.output(graph.call_function(checkpoint, (graph.get_attr("body"), *args), {"use_reentrant": False}))
        return fx.GraphModule({"body": self.body}, graph)

    def forward(self, *args: Any) -> Any:
        unit = self.__dict__["unit"]
        return self._run(*args) if unit is None else self._run_sharded(unit, args)

    @torch.compiler.disable
    def _run_sharded(self, unit: nn.Module, args: tuple) -> Any:
        # FSDP2's hooks run eagerly (they are not traceable); ``dl.compile`` compiles each sharded
        # region's runner on its own (``compiled_run``), so no frame shared by all blocks is compiled
        return unit.run_block(self._run, *args)

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockRegion:
        # fx's GraphModule deepcopy would rebuild a private skeleton of the state it reads; the copy
        # must read the copied shared trees instead (already in ``memo`` when a DynLoRAModule is copied).
        # A copy is never sharded: the unit stays with the original.
        attrs = {name: copy.deepcopy(mod, memo) for name, mod in self.body._modules.items()}
        new = BlockRegion(graph_module(copy.deepcopy(self.body.graph, memo), attrs), self.block, self.recompute)
        memo[id(self)] = new
        return new

    def extra_repr(self) -> str:
        return f"block={self.block}, recompute={self.recompute}, sharded={self.__dict__['unit'] is not None}"


def _extract(gm: fx.GraphModule, region: Region, constant: set[fx.Node], name: str, recompute: bool) -> None:
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
    getattr(gm, REGIONS_ATTR).add_module(name, BlockRegion(graph_module(body, attrs), region.block, recompute))
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
    :class:`BlockRegion` call, recomputed in backward if ``recompute``. Parameter-only
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


def region_modules(gm: fx.GraphModule) -> list[BlockRegion]:
    """``gm``'s outlined regions, in graph order of creation."""
    regions = getattr(gm, REGIONS_ATTR, None)
    return [] if regions is None else [m for m in regions.children() if isinstance(m, BlockRegion)]


def region_bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The subgraphs of ``gm``'s regions (passes that rewrite every graph visit these too)."""
    return [m.body for m in region_modules(gm)]
