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
- ``capture.recording_checkpointed_modules`` — the modules the model itself runs under
  ``torch.utils.checkpoint`` (Hugging Face's ``gradient_checkpointing_enable()``, or a
  user's own ``checkpoint(self.block, x)``), recorded while the model is captured.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .insert_adapters import META_KEY

__all__ = ["Region", "RegionPlan", "find_regions", "parameter_only", "repeated_blocks"]

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
    tag = node.meta.get(META_KEY)
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


# -- writes and aliases ----------------------------------------------------------------------------
# What each op writes in place and which of its arguments its result may alias (a view, or an in-place
# op's returned self) comes from its ATen schema's alias annotations: ``Tensor(a!)`` is written,
# ``Tensor(a)`` in and out is a view. Under fx a node's target is a torch function, a Tensor method name
# or an ``operator`` function, and its schema is that of the ATen op of the same name. Following
# aliases back from a written value gives the data the write lands on (its *roots*): a parameter,
# buffer or constant (``get_attr``), a graph input (``placeholder``), or a tensor some op created.

_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul}  # ``x += y`` on a tensor
# ops whose schemas do not declare that they update these arguments (the batch-norm family's entry points:
# batch_norm, native_batch_norm, batch_norm_update_stats, ...): written unless a flag named beside them
# (training, use_input_stats) is the constant False
_UNDECLARED_WRITES = (("running_mean", "running_var"), ("training", "use_input_stats"))


def _packet_schemas(name: str) -> list[Any]:
    packet = getattr(torch.ops.aten, name, None) if name and not name.startswith("__") else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return []
    return [getattr(packet, overload) for overload in packet.overloads()]


def _overloads(node: fx.Node) -> list[Any]:
    """The ATen overloads ``node`` may run: its target itself, or every overload of the ATen op its
    torch function or Tensor method is named after (their annotations are merged: a may-write)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return [target]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [getattr(target, o) for o in target.overloads()]
    if node.op == "call_method":
        return _packet_schemas(str(target))
    if node.op == "call_function" and getattr(target, "__module__", None) not in ("_operator", "operator", "builtins"):
        return _packet_schemas(getattr(target, "__name__", ""))
    return []


def _bound(node: fx.Node) -> dict[str, Any]:
    """``node``'s arguments by parameter name, where its Python function has a signature (``F.*``)."""
    try:
        return dict(inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments)
    except (TypeError, ValueError):
        return {}


def _schema_effects(overloads: list[Any], node: fx.Node) -> tuple[list[Any], list[Any]]:
    bound = _bound(node) if node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload) else {}
    args = node.args if node.op == "call_method" or not bound else ()
    kwargs = node.kwargs if not bound else bound
    first = node.args[0] if node.args else None
    written: list[Any] = []
    aliased: list[Any] = []
    for overload in overloads:
        if torch.Tag.inplace_view in overload.tags:  # detach_, squeeze_, ...: metadata only, no values
            aliased.append(first)
            continue
        schema = overload._schema
        positional = [a for a in schema.arguments if not a.kwarg_only]
        values: dict[str, Any] = {a.name: args[i] for i, a in enumerate(positional) if i < len(args)}
        values.update({k: v for k, v in kwargs.items() if k in {a.name for a in schema.arguments}})
        if bound and positional and positional[0].name not in values:
            values[positional[0].name] = first  # a Python wrapper's ``input`` is the op's ``self``
        returned = set().union(*(r.alias_info.before_set for r in schema.returns if r.alias_info is not None))
        for a in schema.arguments:
            info = a.alias_info
            if info is None or a.name not in values:
                continue
            if info.is_write:
                written.append(values[a.name])
            if info.before_set & returned or "*" in returned or "*" in info.after_set:
                aliased.append(values[a.name])
        if not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            names = {a.name for a in schema.arguments}
            stats, flags = _UNDECLARED_WRITES
            if values.get(next((f for f in flags if f in names), ""), True) is not False:
                written.extend(values[s] for s in stats if values.get(s) is not None)
    return written, aliased


def _effects(gm: fx.GraphModule | None, node: fx.Node) -> tuple[list[Any], list[Any]]:
    """(values ``node`` writes in place, values its result may alias)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target)) if gm is not None else None
        if getattr(module, "inplace", False) is True and node.args:  # nn.ReLU(inplace=True), ...
            return [node.args[0]], [node.args[0]]
        return [], list(node.all_input_nodes)  # nn.Identity, nn.Flatten, eval-mode dropout return their input
    if node.op not in ("call_function", "call_method"):
        return [], []
    target = node.target
    if target is operator.getitem:  # an element of a multi-output op, or tensor indexing: may be a view
        return [], node.args[:1]
    if target is operator.setitem:
        return node.args[:1], node.args[:1]
    if target in _IN_PLACE_OPERATORS:
        return node.args[:1], node.args[:1]
    if node.op == "call_function" and _subgraphs(node):
        return _higher_order_effects(node), list(node.all_input_nodes)
    aten = isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
    flag = node.kwargs.get("inplace", _bound(node).get("inplace") if node.op == "call_function" and not aten else None)
    if flag is True and node.args:  # F.relu(x, inplace=True)
        return node.args[:1], node.args[:1]
    overloads = _overloads(node)
    if overloads:
        return _schema_effects(overloads, node)
    name = str(target) if node.op == "call_method" else getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and node.args:  # an in-place method ATen lacks
        return node.args[:1], node.args[:1]
    if node.op == "call_function" and getattr(target, "__module__", None) in ("_operator", "operator", "builtins"):
        return [], []  # arithmetic, comparisons, getattr of sizes: new values
    return [], list(node.all_input_nodes)  # unknown: its result may be any of its inputs


def _higher_order_effects(node: fx.Node) -> list[Any]:
    """The operands a higher-order op (``wrap_with_set_grad_enabled``, ``cond``, …) writes: those its
    subgraphs write as placeholders (operands follow the last subgraph argument, in placeholder
    order), and the subgraph argument itself where one writes its own attributes (state)."""
    last = max(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and isinstance(_resolve(a), fx.GraphModule))
    operands: list[Any] = []
    for a in node.args[last + 1:]:
        operands.extend(a if isinstance(a, (tuple, list)) else [a])
    written: list[Any] = []
    for arg in node.args[:last + 1]:
        sub = _resolve(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(sub, fx.GraphModule):
            continue
        info = WriteAnalysis(sub.graph)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        hit = [i for i, p in enumerate(placeholders) if p in info.written_roots]
        if hit and len(placeholders) != len(operands):
            written.extend(a for a in node.all_input_nodes if not isinstance(_resolve(a), fx.GraphModule))
        written.extend(operands[i] for i in hit if len(placeholders) == len(operands))
        if any(r.op == "get_attr" for r in info.written_roots):
            written.append(arg)  # a get_attr: the write counts as a state write
    return written


class WriteAnalysis:
    """Alias analysis of one graph: for every node, what it writes in place and the data that lands on.

    ``roots[n]`` is the set of nodes whose data ``n`` may share: ``n`` itself when it creates its
    result, else the roots of what it is a view of. ``writes[n]`` lists (written value, its roots);
    ``written_roots`` is every root some node writes. A ``call_module`` on a module with buffers (a
    batch-norm module kept opaque by fx) writes those buffers: ``module_writes``."""

    def __init__(self, graph: fx.Graph):
        gm = graph.owning_module
        self.roots: dict[fx.Node, frozenset[fx.Node]] = {}
        self.writes: dict[fx.Node, list[tuple[Any, frozenset[fx.Node]]]] = {}
        self.module_writes: dict[fx.Node, list[str]] = {}
        for node in graph.nodes:
            written, aliased = _effects(gm, node)
            sources = [a for a in aliased if isinstance(a, fx.Node)]
            self.roots[node] = frozenset().union(*(self.roots[a] for a in sources)) if sources else frozenset([node])
            targets = [(v, self.roots_of(v)) for v in written if v is not None]
            if targets:
                self.writes[node] = targets
            if node.op == "call_module" and gm is not None:
                buffers = [f"{node.target}.{name}" for name, _ in gm.get_submodule(str(node.target)).named_buffers()]
                if buffers:
                    self.module_writes[node] = buffers
        self.written_roots: set[fx.Node] = {r for ws in self.writes.values() for _, roots in ws for r in roots}

    def roots_of(self, value: Any) -> frozenset[fx.Node]:
        """Roots of an argument value (a node, or the nodes in a list/tuple of them)."""
        if isinstance(value, fx.Node):
            return self.roots.get(value, frozenset([value]))
        if isinstance(value, (tuple, list)):
            return frozenset().union(*(self.roots_of(v) for v in value)) if value else frozenset()
        return frozenset()

    def state_written(self) -> set[str]:
        """Attribute targets written in place anywhere in the graph."""
        out = {str(r.target) for r in self.written_roots if r.op == "get_attr"}
        out.update(b for bufs in self.module_writes.values() for b in bufs)
        return out


def _subgraphs(node: fx.Node) -> list[fx.GraphModule]:
    """Graphs a higher-order op (``wrap_with_set_grad_enabled``, ``cond``, …) runs, read by get_attr."""
    return [sub for arg in node.all_input_nodes if isinstance(sub := _resolve(arg), fx.GraphModule)]


def mutated_state(graph: fx.Graph) -> set[str]:
    """Attribute targets the graph writes in place (buffers a forward updates: running statistics,
    power-iteration vectors, counters), through views only, and into higher-order ops' subgraphs."""
    return WriteAnalysis(graph).state_written()


def _resolve(node: fx.Node) -> Any:
    owner = node.graph.owning_module
    if node.op != "get_attr" or owner is None:
        return None
    try:
        return owner.get_submodule(str(node.target))
    except AttributeError:
        return None


def parameter_only(graph: fx.Graph, analysis: WriteAnalysis | None = None) -> set[fx.Node]:
    """Nodes computed from attribute reads alone (no graph input), without side effects, whose data
    nothing in the graph writes in place (``analysis``: the graph's :class:`WriteAnalysis`, computed if
    not given): they can run wherever they are needed, e.g. inside the region that uses them."""
    analysis = WriteAnalysis(graph) if analysis is None else analysis
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if analysis.roots[node] & analysis.written_roots:
            continue
        if node.op == "get_attr":
            out.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and not node.is_impure() \
                and node not in analysis.writes and all(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def find_regions(gm: fx.GraphModule, blocks: list[str], recompute: bool = True) -> RegionPlan:
    """The region of every block in ``blocks`` (qualified names in ``gm.model``) in ``gm``'s graph.

    Pure analysis: ``gm`` is not changed. A block's region runs from its first to its last op;
    ops of no block in between (shape reads, inserted nodes) belong to it. A block whose ops are
    interleaved with another block's, or that the graph never runs, is skipped with the reason.
    If its region is to be ``recompute`` d in backward, in-place writes matter: one on data the
    block creates is recomputed with it, and one on state (a parameter, buffer, constant or graph
    input) that nothing after it in the block depends on (a counter's ``add_``, a statistics update)
    stays out of the region and runs once after it; any other write on state or on a value computed
    before the block skips the block, as does reading state the step writes.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    analysis = WriteAnalysis(gm.graph)
    mutated = analysis.state_written()
    movable = parameter_only(gm.graph, analysis)  # export hoists weight computations; they follow their users
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
        span = [n for n in span if n not in movable and n.op != "get_attr"]  # state comes in as an input
        foreign = next((owner_of[n] for n in span if owner_of.get(n, block) != block), None)
        if foreign is not None:
            skipped.append((block, f"its ops are interleaved with those of {foreign}"))
            continue
        if recompute:
            deferred, why = _writes_outside(span, analysis)
            if why is not None:
                skipped.append((block, why))
                continue
            span = [n for n in span if n not in deferred]
            if not span:
                skipped.append((block, "each of its ops writes state in place: none is left to recompute"))
                continue
            reads = _state_read(span, movable)
            if reads & mutated:
                skipped.append((block, f"it reads {sorted(reads & mutated)[0]}, which the step writes in place "
                                       "(e.g. spectral norm's power iteration): recomputation would read the new value"))
                continue
        regions.append(Region(block, tuple(span)))
    return RegionPlan(tuple(regions), tuple(skipped))


def _describe(node: fx.Node) -> str:
    target = node.target if node.op != "call_function" else getattr(node.target, "__name__", node.target)
    return f"{target} (graph node {node.name})"


def _writes_outside(span: list[fx.Node], analysis: WriteAnalysis) -> tuple[set[fx.Node], str | None]:
    """The span's writes on data it does not create: (state writes that can run once after the region,
    the reason the block cannot be recomputed, or None)."""
    inside = set(span)
    deferred: set[fx.Node] = set()
    kept_after: list[fx.Node] = []  # span nodes after the current one that stay in the region
    for node in reversed(span):
        if node in analysis.module_writes:
            module = analysis.module_writes[node][0].rsplit(".", 1)[0]
            kind = type(node.graph.owning_module.get_submodule(module)).__name__
            return deferred, (f"its call of {module.removeprefix('model.')} ({kind}, a module kept opaque) may "
                              "update the module's buffers in place (e.g. running statistics), which recomputation "
                              "would repeat")
        outside = {r for _, roots in analysis.writes.get(node, ()) for r in roots if r not in inside}
        if not outside:
            kept_after.append(node)
            continue
        temporary = next((r for r in outside if r.op not in ("get_attr", "placeholder")), None)
        if temporary is not None:
            return deferred, (f"{_describe(node)} writes in place {temporary.name}, a value computed before the "
                              "block, which recomputation would write a second time")
        if _deferrable(node, outside, kept_after, deferred, analysis):
            deferred.add(node)
            continue
        state = sorted(r.target.removeprefix("model.") if r.op == "get_attr" else f"the graph input {r.name}"
                       for r in outside)[0]
        return deferred, (f"{_describe(node)} writes {state} in place and the rest of the block depends on it, so "
                          "recomputation would repeat the write")
    return deferred, None


def _deferrable(node: fx.Node, written: set[fx.Node], kept_after: list[fx.Node], deferred: set[fx.Node],
                analysis: WriteAnalysis) -> bool:
    """Whether a state write can run after the region instead of inside it: no later op of the region
    uses its result or reads what it writes, none writes what it reads, and it draws no random numbers
    (which would shift the region's dropout masks)."""
    if any(u not in deferred and u in set(kept_after) for u in node.users):
        return False
    if any(isinstance(o, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in o.tags
           for o in _overloads(node)):
        return False
    reads = analysis.roots_of(list(node.all_input_nodes))
    for later in kept_after:
        if analysis.roots_of(list(later.all_input_nodes)) & written:
            return False
        if any(roots & reads for _, roots in analysis.writes.get(later, ())):
            return False
    return True


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
