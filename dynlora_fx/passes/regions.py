"""Analysis pass: recover the model's repeated blocks as regions of the captured graph.

Capture flattens a model into one graph, but its repeated blocks (the elements of a
``ModuleList``/``Sequential`` of blocks, Hugging Face decoder layers, ResNet stages) are
the units activation checkpointing recomputes and sharding gathers. A *region* is the
contiguous run of graph nodes that one block computes, found from the graph's own
metadata: ``node.meta["nn_module_stack"]`` (recorded by both ``torch.fx`` tracing and
``torch.export``) for the model's ops, ``node.meta["dynlora"]["weight"]`` for inserted
adapter nodes, and the attribute path for ``get_attr`` reads.

Which blocks to look for comes from one of two sources:

- :func:`repeated_blocks` — the children of the outermost block containers of the model;
- :func:`recording_checkpointed_modules` — the modules the model itself runs under
  ``torch.utils.checkpoint`` (Hugging Face's ``gradient_checkpointing_enable()``, or a
  user's own ``checkpoint(self.block, x)``), recorded while the model is captured. The
  same context inlines those calls, so capture sees through them.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

__all__ = ["Region", "RegionPlan", "find_regions", "parameter_only", "repeated_blocks", "recording_checkpointed_modules"]

_STATE_ROOTS = ("model.", "adapters.")  # where get_attr targets of a transformed graph point


@dataclass(frozen=True)
class Region:
    """One block's nodes: contiguous in graph order, ``block`` its qualified name in the model."""

    block: str
    nodes: tuple[fx.Node, ...]


@dataclass(frozen=True)
class RegionPlan:
    """Regions in graph order, and the blocks that could not become one, with the reason."""

    regions: tuple[Region, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def repeated_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's repeated blocks, in registration order.

    A block container is a ``ModuleList`` or ``Sequential`` (the model itself included) with two
    or more children of one type that own parameters; its children are blocks. Containers inside
    another container's block are not searched: the outermost blocks are the units.
    """
    blocks: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            types = [type(c) for _, c in children if any(True for _ in c.parameters())]
            if any(types.count(t) >= 2 for t in set(types)):
                blocks.extend(f"{prefix}{name}" for name, c in children if any(True for _ in c.parameters()))
                return
        for name, child in children:
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return blocks


def _owner(path: str, blocks: list[str]) -> str | None:
    for block in blocks:
        if path == block or path.startswith(block + "."):
            return block
    return None


def _node_path(node: fx.Node) -> str | None:
    """The model path a node belongs to: innermost module for ops, the attribute for reads."""
    tag = node.meta.get("dynlora")
    if tag is not None:
        return tag["weight"]
    if node.op == "get_attr":
        target = str(node.target)
        for root in _STATE_ROOTS:
            if target.startswith(root):
                return target[len(root):]
        return None
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return None


def _mutates(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes state in place: a mutating ATen op, or a module call on a module with
    buffers (an fx leaf such as batch norm, whose forward updates its running statistics)."""
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).buffers())
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def parameter_only(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from attribute reads alone (no graph input), without side effects: they
    can run wherever they are needed, e.g. inside the region that uses them."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            out.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and not node.is_impure() \
                and all(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def find_regions(gm: fx.GraphModule, blocks: list[str]) -> RegionPlan:
    """The region of every block in ``blocks`` (qualified names in ``gm.model``) in ``gm``'s graph.

    Pure analysis: ``gm`` is not changed. A block's region runs from its first to its last op;
    ops of no block in between (shape reads, inserted nodes) belong to it. A block whose ops are
    interleaved with another block's, that updates state in place, or that the graph never runs,
    is skipped with the reason.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    movable = parameter_only(gm.graph)  # export hoists weight computations; they follow their users
    owned: dict[str, list[fx.Node]] = {b: [] for b in blocks}
    owner_of: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node in movable:
            continue  # inputs and outputs stay outside
        path = _node_path(node)
        block = _owner(path, blocks) if path is not None else None
        if block is not None:
            owned[block].append(node)
            owner_of[node] = block
    nodes = list(gm.graph.nodes)
    regions, skipped = [], []
    for block in blocks:
        ops = owned[block]
        if not ops:
            skipped.append((block, "the captured graph runs none of its ops"))
            continue
        span = nodes[order[ops[0]]:order[ops[-1]] + 1]
        span = [n for n in span if n not in movable]
        foreign = next((owner_of[n] for n in span if owner_of.get(n, block) != block), None)
        if foreign is not None:
            skipped.append((block, f"its ops are interleaved with those of {foreign}"))
            continue
        if any(_mutates(gm, n) for n in span):
            skipped.append((block, "it updates state in place (e.g. batch-norm running statistics), which "
                                   "recomputation would repeat"))
            continue
        regions.append(Region(block, tuple(span)))
    return RegionPlan(tuple(regions), tuple(skipped))


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

    def run_directly(function: Any, args: tuple, kwargs: dict, **_: Any) -> Any:
        module = _module_of(function)
        if module is not None:
            recorded.add(id(module))
        pending.append(module is None)  # a closure: the first module it calls is the block
        try:
            return function(*args, **kwargs)
        finally:
            pending.pop()

    original = torch_checkpoint._checkpoint_impl
    handle = nn.modules.module.register_module_forward_pre_hook(first_module_entered)
    torch_checkpoint._checkpoint_impl = run_directly
    try:
        yield recorded
    finally:
        torch_checkpoint._checkpoint_impl = original
        handle.remove()
