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

from .._compat import checkpoint_calls

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


def _written(node: fx.Node) -> list[Any]:
    """The arguments ``node`` writes in place: those its ATen schema marks as written (``copy_``'s
    self, an ``out=``), ``x`` of a method ``x.add_()``, or a call to an in-place function."""
    schema = getattr(node.target, "_schema", None)
    if node.op == "call_function" and schema is not None:
        out = []
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                out.append(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
        return out
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("_") and node.args:
        return [node.args[0]]
    return []


def _in_place(node: fx.Node) -> bool:
    return bool(_written(node))


def _base(value: Any) -> fx.Node | None:
    """The graph value ``value`` is a view of (through up to 8 ops on its first argument)."""
    for _ in range(8):
        if not isinstance(value, fx.Node) or value.op in ("get_attr", "placeholder") or not value.args:
            break
        value = value.args[0]
    return value if isinstance(value, fx.Node) else None


def _subgraphs(node: fx.Node) -> list[fx.GraphModule]:
    """Graphs a higher-order op (``wrap_with_set_grad_enabled``, ``cond``, …) runs, read by get_attr."""
    return [sub for arg in node.all_input_nodes if isinstance(sub := _resolve(arg), fx.GraphModule)]


def mutated_state(graph: fx.Graph) -> set[str]:
    """Attribute targets the graph writes in place (buffers a forward updates: running statistics,
    power-iteration vectors, counters), followed through views, and into higher-order ops: one whose
    subgraph writes any of its inputs is taken to write every attribute it is given."""
    out: set[str] = set()
    for node in graph.nodes:
        bases = [_base(v) for v in _written(node)]
        subs = _subgraphs(node) if node.op == "call_function" else []
        if any(mutated_state(sub.graph) or _writes_placeholder(sub.graph) for sub in subs):
            bases += [a for a in node.all_input_nodes if not isinstance(_resolve(a), fx.GraphModule)]
        out.update(str(b.target) for b in bases if b is not None and b.op == "get_attr")
    return out


def _writes_placeholder(graph: fx.Graph) -> bool:
    return any(b is not None and b.op == "placeholder" for n in graph.nodes for b in map(_base, _written(n)))


def _resolve(node: fx.Node) -> Any:
    owner = node.graph.owning_module
    if node.op != "get_attr" or owner is None:
        return None
    try:
        return owner.get_submodule(str(node.target))
    except AttributeError:
        return None


def parameter_only(graph: fx.Graph, mutated: set[str] | None = None) -> set[fx.Node]:
    """Nodes computed from attribute reads alone (no graph input), without side effects, from state
    the graph does not update (``mutated``: :func:`mutated_state`, computed if not given): they can
    run wherever they are needed, e.g. inside the region that uses them."""
    mutated = mutated_state(graph) if mutated is None else mutated
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            if str(node.target) not in mutated:
                out.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and not node.is_impure() \
                and not _in_place(node) and all(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def find_regions(gm: fx.GraphModule, blocks: list[str], recompute: bool = True) -> RegionPlan:
    """The region of every block in ``blocks`` (qualified names in ``gm.model``) in ``gm``'s graph.

    Pure analysis: ``gm`` is not changed. A block's region runs from its first to its last op;
    ops of no block in between (shape reads, inserted nodes) belong to it. A block whose ops are
    interleaved with another block's, or that the graph never runs, is skipped with the reason;
    so is one that updates state in place or reads state the step updates, if its region is to
    be ``recompute`` d in backward.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    mutated = mutated_state(gm.graph)
    movable = parameter_only(gm.graph, mutated)  # export hoists weight computations; they follow their users
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
        if recompute and any(_mutates(gm, n) for n in span):
            skipped.append((block, "it updates state in place (e.g. batch-norm running statistics), which "
                                   "recomputation would repeat"))
            continue
        reads = _state_read(span, movable)
        if recompute and reads & mutated:
            skipped.append((block, f"it reads {sorted(reads & mutated)[0]}, which the step updates in place "
                                   "(e.g. spectral norm's power iteration): recomputation would read the new value"))
            continue
        regions.append(Region(block, tuple(span)))
    return RegionPlan(tuple(regions), tuple(skipped))


def _state_read(span: list[fx.Node], movable: set[fx.Node]) -> set[str]:
    """Attribute targets the region reads: directly, or through parameter-only nodes it would pull in."""
    out: set[str] = set()
    stack = [a for n in span for a in n.all_input_nodes]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            out.add(str(node.target))
        elif node in movable:
            stack.extend(node.all_input_nodes)
    return out


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
