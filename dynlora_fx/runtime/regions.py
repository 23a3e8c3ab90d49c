"""Running an outlined region: one block of a graph as a module call, and what it runs under.

``passes/outline.py`` rewrites each region of a graph into a ``call_module`` to a
:class:`RegionRunner` holding the region's subgraph (``body``). The runner runs it the one way
its three scale features compose, each given to it by the stage that owns the feature:

- activation checkpointing (``recompute``, chosen by ``dl.transform``): the body runs under
  torch's non-reentrant checkpoint (RNG state preserved, so dropout recomputes the same mask);
  only the region's inputs are kept for backward;
- FSDP2 (:meth:`RegionRunner.shard_with`, called by ``dl.fully_shard``): the region is entered
  through the block's FSDP unit's forward method, so torch's own hooks gather the block's ``W``,
  ``A``, ``B`` before it and free them after it (and again around its backward);
- ``dl.compile`` (:meth:`RegionRunner.compile_with`): a sharded region runs its own compiled
  code between the unit's (eager) hooks.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..capture import graph_module

__all__ = ["RegionRunner"]

Run = Callable[..., Any]


def _enter_directly(run: Run, *args: Any) -> Any:
    """How an unsharded region is entered: nothing around it (torch.compile traces through it)."""
    return run(*args)


class RegionRunner(nn.Module):
    """One block of a graph as a module call. ``body`` is a GraphModule whose attributes are the
    transformed module's shared state trees; ``recompute`` runs it under ``torch.utils.checkpoint``
    (non-reentrant). The FSDP unit given by :meth:`shard_with` is not a registered submodule: its
    state is the shared state, which the module tree already holds once."""

    def __init__(self, body: fx.GraphModule, block: str, recompute: bool):
        super().__init__()
        self.body = body
        self.block = block
        self.recompute = recompute
        self._enter: Callable[..., Any] = _enter_directly
        self._compiled: Run | None = None

    def forward(self, *args: Any) -> Any:
        return self._enter(self._run, *args)

    def _run(self, *args: Any) -> Any:
        # chosen inside the entry, so a sharded region's choice stays out of the graph torch.compile traces
        return (self.run_eagerly if self._compiled is None else self._compiled)(*args)

    def run_eagerly(self, *args: Any) -> Any:
        """The body, under non-reentrant checkpoint when ``recompute``."""
        return checkpoint(self.body, *args, use_reentrant=False) if self.recompute else self.body(*args)

    @property
    def sharded(self) -> bool:
        """Whether the region runs through an FSDP unit (:meth:`shard_with`)."""
        return self._enter is not _enter_directly

    def shard_with(self, unit: nn.Module) -> None:
        """Enter the region through ``unit.run_block(run, *args)``: the block's FSDP unit, whose
        ``run_block`` ``dl.fully_shard`` registered as an FSDP forward method, so FSDP's hooks run
        around the block. They run eagerly (they are not traceable): a torch.compile of the graph
        breaks here, and :meth:`compile_with` compiles the region on its own instead."""
        self._enter = torch.compiler.disable(unit.run_block)

    def compile_with(self, compiler: Callable[[nn.Module], Run]) -> bool:
        """For a sharded region, run ``compiler(module)`` from now on, ``module`` being what
        :meth:`run_eagerly` does as a module of its own code (the body, or a graph calling it under
        checkpoint): compiled alone, its frame is shared by no other region. Whether the region is
        compiled on its own (an unsharded one is compiled as part of its graph: nothing to do)."""
        if self.sharded and self._compiled is None:
            self._compiled = compiler(self._own_code())
        return self.sharded

    def _own_code(self) -> nn.Module:
        if not self.recompute:
            return self.body
        graph = fx.Graph()
        args = [graph.placeholder(n.name) for n in self.body.graph.nodes if n.op == "placeholder"]
        graph.output(graph.call_function(checkpoint, (graph.get_attr("body"), *args), {"use_reentrant": False}))
        return fx.GraphModule({"body": self.body}, graph)

    def __deepcopy__(self, memo: dict[int, Any]) -> RegionRunner:
        # fx's GraphModule deepcopy would rebuild a private skeleton of the state it reads; the copy
        # must read the copied shared trees instead (already in ``memo`` when a DynLoRAModule is copied).
        # A copy is never sharded: the unit stays with the original.
        attrs = {name: copy.deepcopy(mod, memo) for name, mod in self.body._modules.items()}
        new = RegionRunner(graph_module(copy.deepcopy(self.body.graph, memo), attrs), self.block, self.recompute)
        memo[id(self)] = new
        return new

    def extra_repr(self) -> str:
        return f"block={self.block}, recompute={self.recompute}, sharded={self.sharded}"
