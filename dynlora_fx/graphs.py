"""A graph per guard set: the graphs a transformed module runs, and capturing again where they do not fit.

``torch.export`` specialises a capture where the model's code pins a size (``nn.LSTM``'s
sequence length, a branch on the batch size, a view to a constant). Its graph is then valid
only under *guards* — export's ``_guards_fn`` plus the static-size check capture adds. As
``torch.compile`` does with its guards, a :class:`GraphSet` (one graph per mode) is kept per
guard set, tried in order, and a call that breaks the guards of every set captures the model
again for those inputs (:func:`recapture`): the same shared state trees, the *same* adapters
(matched by weight name through the existing plan), verified like the first capture, then
through the same per-graph pipeline (:func:`adapt_graphs`) as ``dl.transform``'s own graphs:
adapters inserted, checkpointed blocks outlined as recomputed regions. ``dl.fully_shard``
outlines its FSDP units' regions in every graph of every set captured by then; a sharded
module does not capture again (its weights are shards): that is a ``DynLoRAError``. Graphs
hold no state of their own, so switching, resuming and ``state_dict`` do not see them.

Past ``gm.recapture_limit`` sets (default 8) a call is a ``DynLoRAError`` naming the dimension
that keeps changing and what to do.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .capture import graph_module, guard_checker, preserved_state, recapture, recording_checkpointed_modules
from .errors import DynLoRAError
from .passes import find_regions, functionalize_batch_norm, functionalize_leaves, insert_adapters, outline_regions, \
    training_batch_norms

if TYPE_CHECKING:
    from .module import DynLoRAModule

__all__ = ["GraphSet", "prepare_graphs", "adapt_graphs", "split_batch_norm", "recapture_for", "copy_sets", "input_shapes", "limit_error",
           "DEFAULT_RECAPTURE_LIMIT"]

DEFAULT_RECAPTURE_LIMIT = 8  # graph sets per module, as torch._dynamo's recompile_limit


@dataclass
class GraphSet:
    """One graph per mode (``train``/``eval``, the same object when they are equal) valid under one
    set of guards, with a checker per mode that returns the guard inputs break, or None when the graph
    takes them (no checker: no guard, as under fx), and the shapes of the inputs it was captured with."""

    graphs: dict[str, fx.GraphModule]
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    checks: dict[str, fx.GraphModule | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.checks:
            made: dict[int, fx.GraphModule | None] = {}
            for mode, g in self.graphs.items():
                if id(g) not in made:
                    made[id(g)] = guard_checker(g)
                self.checks[mode] = made[id(g)]

    def unique(self) -> list[fx.GraphModule]:
        return list({id(g): g for g in self.graphs.values()}.values())

    def broken(self, mode: str, args: tuple, kwargs: dict) -> str | None:
        """The guard these inputs break in ``mode`` (its condition), or None when the graph takes them."""
        if mode not in self.graphs:  # the model itself rejected the inputs of this set in this mode
            return f"a graph captured in {'eval' if mode == 'train' else 'train'} mode only"
        check = self.checks.get(mode)
        return None if check is None else check(*args, **kwargs)


def input_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(input path, shape)`` of every tensor among the inputs, named as ``forward``'s parameters."""
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs).arguments
    except TypeError:
        bound = {f"input{i}": a for i, a in enumerate(args)} | kwargs
    leaves, _ = pytree.tree_flatten_with_path(dict(bound))
    return tuple((pytree.keystr(path).strip("[]'").replace("']['", "."), tuple(t.shape))
                 for path, t in leaves if isinstance(t, torch.Tensor))


def prepare_graphs(graphs: dict[str, fx.GraphModule]) -> dict[str, fx.GraphModule]:
    """Normalise a fresh capture (both modes): functional linear/conv calls, and one graph for both
    modes when their code is the same (compiled once). Returns the new mode -> graph dict."""
    graphs = dict(graphs)
    for g in {id(g): g for g in graphs.values()}.values():
        functionalize_leaves(g)
    if len(graphs) == 2 and graphs["train"] is not graphs["eval"] and graphs["train"].code == graphs["eval"].code:
        graphs["eval"] = graphs["train"]  # mode-independent graph: keep (and later compile) one
    return graphs


def adapt_graphs(gm: DynLoRAModule, graphs: dict[str, fx.GraphModule], *, regions: bool = True) -> None:
    """The per-graph pipeline after capture, for ``dl.transform``'s graphs and every recaptured set alike:
    the module's adapters are inserted (its plan: weights matched by name, no new adapter) and, with
    ``regions``, the module's checkpointed blocks are outlined in the train graph as recomputed regions.
    (``dl.fully_shard`` outlines its units' regions in every graph of every set it finds.)"""
    for g in {id(g): g for g in graphs.values()}.values():
        g.add_module("adapters", gm.adapters)
        insert_adapters(g, gm.plan)
    if not regions:
        return
    if gm.checkpointed and "train" in graphs:
        train = split_batch_norm(graphs)
        outline_regions(train, find_regions(train, list(gm.checkpointed)), recompute=True)


def split_batch_norm(graphs: dict[str, fx.GraphModule]) -> fx.GraphModule:
    """The train graph of ``graphs`` with its training-mode batch norms split (passes/batch_norm.py), so
    their blocks can be recomputed; a graph it shared with eval mode (fx keeps batch norm a module call
    that reads the mode at run time) is first copied for eval, which keeps the module calls."""
    train = graphs["train"]
    if not training_batch_norms(train):
        return train
    if graphs.get("eval") is train:
        graphs["eval"] = graph_module(copy.deepcopy(train.graph), dict(train._modules))
    return functionalize_batch_norm(train)


def limit_error(gm: DynLoRAModule, shapes: tuple[tuple[str, tuple[int, ...]], ...], broken: str) -> DynLoRAError:
    """The error past ``gm.recapture_limit``: which dimension keeps changing, and the remedies."""
    sizes: dict[tuple[str, int], list[int]] = {}
    for s in [*(g.shapes for g in gm._graph_sets), shapes]:
        for name, shape in s:
            for d, n in enumerate(shape):
                sizes.setdefault((name, d), []).append(n)
    changing = [(k, v) for k, v in sizes.items() if len(set(v)) > 1]
    if changing:
        what = "; ".join(f"{name} dim {d} ({', '.join(str(n) for n in dict.fromkeys(v))})"
                         for (name, d), v in changing[:3])
    else:
        what = f"the condition {broken}"
    dims = ", ".join(f"'{name}': {{{d}: Dim.AUTO}}" for (name, d), _ in changing[:2]) or "'x': {1: Dim.AUTO}"
    return DynLoRAError(f"{type(gm.model).__name__} (transformed) call",
                        f"these inputs break the guards of all {len(gm._graph_sets)} graphs captured so far "
                        f"(last: {broken}) and the limit of {gm.recapture_limit} graphs is reached; the size "
                        f"that keeps changing: {what}",
                        "pad or bucket that dimension to a few sizes; or declare it dynamic up front, "
                        f"dl.transform(..., dynamic_shapes={{{dims}}}) (torch.export.Dim, passed to torch.export as it "
                        "is; a model that pins the size, such as nn.LSTM's length, still specialises); or raise the "
                        "limit: gm.recapture_limit = N")


@torch.compiler.disable
def recapture_for(gm: DynLoRAModule, mode: str, args: tuple, kwargs: dict, broken: str) -> fx.GraphModule:
    """Capture ``gm``'s model again for ``args``/``kwargs`` (which break every set's guards), add the
    new set and return its ``mode`` graph. The model's own failure on the inputs propagates as it is.
    Runs eagerly, also when called from code that torch.compile traces."""
    shapes = input_shapes(gm._graphs["train"], args, kwargs)
    if len(gm._graph_sets) >= gm.recapture_limit:
        raise limit_error(gm, shapes, broken)
    if gm.sharded:
        raise DynLoRAError(f"{type(gm.model).__name__} (transformed, sharded) call",
                           f"the inputs break a condition torch.export derived from the example inputs ({broken}), "
                           "and a sharded module cannot capture its model again (its weights are shards)",
                           "transform with example inputs shaped like these calls and capture every size before "
                           "dl.fully_shard (call the module once per size), or pad the inputs to a captured size")
    model = gm.model
    _run_model(model, mode, args, kwargs)  # the model's own error, if it has one for these inputs
    other = "eval" if mode == "train" else "train"
    try:  # a mode in which the model rejects the inputs (batch norm on one sample in training) has no graph
        _run_model(model, other, args, kwargs)
        modes = ("train", "eval")
    except Exception:  # noqa: BLE001 - the model's own failure in the other mode, met again if called so
        modes = (mode,)
    trained = tuple(model.get_parameter(t.weight) for t in gm.plan.targets)
    with recording_checkpointed_modules():  # see through the model's own checkpoint calls, as transform does
        graphs = recapture(model, gm.constants, args, kwargs, dynamic_shapes=gm.dynamic_shapes, trained=trained,
                           modes=modes)
    graphs = prepare_graphs(graphs)
    adapt_graphs(gm, graphs)
    new = GraphSet(graphs, shapes)
    if new.broken(mode, args, kwargs) is not None:  # export's own guards must admit the inputs it captured
        raise DynLoRAError(f"{type(model).__name__} (transformed) call",
                           f"the graph captured for these inputs does not take them ({new.broken(mode, args, kwargs)})",
                           "transform with example inputs shaped like these calls")
    gm._graph_sets.append(new)
    return graphs[mode]


def _run_model(model: torch.nn.Module, mode: str, args: tuple, kwargs: dict) -> None:
    """Run ``model`` on the inputs in ``mode`` without gradients, leaving its state and the RNG as they were."""
    was_training = model.training
    cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    with preserved_state(model):
        try:
            model.train(mode == "train")
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # dropout draws from the global RNG
                model(*args, **kwargs)
        finally:
            model.train(was_training)


def copy_sets(sets: list[GraphSet], rebuild: Any) -> list[GraphSet]:
    """The sets with every graph rebuilt by ``rebuild(graph)`` (once per graph object)."""
    done: dict[int, fx.GraphModule] = {}
    out = []
    for s in sets:
        graphs = {}
        for mode, g in s.graphs.items():
            if id(g) not in done:
                done[id(g)] = rebuild(g)
            graphs[mode] = done[id(g)]
        out.append(GraphSet(graphs, s.shapes))
    return out

