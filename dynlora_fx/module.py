"""The transformed module: shared state plus one graph per mode, and its adapters.

``DynLoRAModule`` owns four state trees — ``model`` (the copy of the user's model,
base weights frozen where adapted), ``adapters`` (``A``, ``B``, ``scale`` and the
in-use candidate indices for every adapted weight, nested under the weight's own
qualified name), ``constants`` and ``switch_state`` (the switcher's step, generators
and counters) — and runs the train or eval graph by ``self.training``, of the first graph set
whose guards the inputs meet (another is captured when none does: ``graphs.py``). The graphs are
not registered submodules: state lives once, so ``.to()``, ``state_dict()`` and
``load_state_dict()`` see every tensor exactly once, and a framework that checkpoints
the module and its optimizer resumes switching exactly.

It behaves like the model it wraps where that is safe: attributes it lacks (``config``,
``device``, ``get_input_embeddings`` …) come from the wrapped model, as in PEFT, and
``forward`` shows the captured inputs to ``inspect.signature``.
"""

from __future__ import annotations

import copy
import inspect
import types
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .adapter import Adapter, AdapterInfo, AdapterTree, adapter_infos
from .capture import broken_guard, graph_module
from .graphs import DEFAULT_RECAPTURE_LIMIT, GraphSet, copy_sets, recapture_for
from .config import AdapterConfig
from .errors import DynLoRAError, StateError
from .passes.find_targets import TargetPlan
from .shards import is_sharded
from .switch_state import SwitchState

__all__ = ["DynLoRAModule", "adapters", "unwrap"]

_SHARED = ("model", "adapters", "constants")


def _untie_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: a tensor that appears under two names (a tied weight) appears the second
    time as a copy, so every entry owns its memory and ``safetensors.torch.save_file`` takes the dict
    (views into the runtime's stacked storage are disjoint, which safetensors accepts as they are)."""
    seen: set[tuple] = set()
    for name, t in state_dict.items():
        if not name.startswith(prefix) or not isinstance(t, torch.Tensor) or t.device.type == "meta" \
                or is_sharded(t):  # a shard owns its storage
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            state_dict[name] = t.detach().clone()
        else:
            seen.add(key)


# methods of the wrapped model that would run or save it *without* its adapters
_UNADAPTED = {
    "generate": "generation runs the wrapped model's own forward, which has no adapters",
    "save_pretrained": "the wrapped model holds W − s·B·A, not the trained weights",
    "push_to_hub": "the wrapped model holds W − s·B·A, not the trained weights",
}


class DynLoRAModule(nn.Module):
    """What ``dl.transform`` returns: the user's model with low-rank adapters, as FX graphs."""

    # The graphs take exactly the captured inputs: no loss kwargs such as num_items_in_batch
    # (transformers.Trainer reads this instead of inspecting forward for **kwargs).
    accepts_loss_kwargs = False
    checkpointed: tuple[str, ...] = ()  # blocks recomputed in backward (dl.transform's checkpoint=)
    sharded: tuple[str, ...] = ()  # blocks that are FSDP units of their own (dl.fully_shard)

    recapture_limit: int = DEFAULT_RECAPTURE_LIMIT  # graph sets (guard sets) at most; set it on an instance to change
    dynamic_shapes: Any = None  # dl.transform's dynamic_shapes, for torch.export (again when capturing again)
    merge_template: Any = None
    """Set by ``dl.fully_shard`` (``distributed.MergeTemplate``): this module as it was before sharding, on
    the meta device, which ``dl.merge``/``merge_and_unload`` fill with the gathered state. None when unsharded."""
    _graph_runner: Callable[[fx.GraphModule], Callable[..., Any]] | None = None  # during call_with_runner only

    def __init__(self, model: nn.Module, constants: nn.Module, graphs: dict[str, fx.GraphModule],
                 capture_method: str, config: AdapterConfig, plan: TargetPlan):
        super().__init__()
        self.model = model
        self.adapters = AdapterTree()
        self.constants = constants
        first = next(iter(model.parameters()), None)
        self.switch_state = SwitchState(config.seed, None if first is None else first.device)
        # plain containers on purpose: graphs hold no state of their own. ``_graphs`` is the example's
        # set (what merge and export take); ``_graph_sets`` every guard set, tried in order (graphs.py)
        self._graphs = graphs
        self._graph_sets = [GraphSet(graphs)]
        self.capture_method = capture_method
        self.dynlora_config = config
        self.plan = plan
        for gm in self._unique_graphs():
            gm.add_module("adapters", self.adapters)
        self.register_state_dict_post_hook(_untie_aliases)
        self._expose_signature()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = "train" if self.training else "eval"
        if torch.compiler.is_exporting():  # torch.export / ONNX of the module: the example's graph
            return self._graphs[mode](*args, **kwargs)
        if torch.compiler.is_dynamo_compiling():  # the user's torch.compile: the checks are traced as guards
            return self._graph_for(mode, args, kwargs)(*args, **kwargs)
        try:
            graph = self._graph_for(mode, args, kwargs)
            return (graph if self._graph_runner is None else self._graph_runner(graph))(*args, **kwargs)
        except (TypeError, AssertionError) as exc:
            error = self._input_error(exc, args, kwargs)
            if error is None:
                raise
            raise error from None

    def call_with_runner(self, runner: Callable[[fx.GraphModule], Callable[..., Any]], *args: Any,
                         **kwargs: Any) -> Any:
        """``self(*args, **kwargs)`` with the graph chosen for the inputs run as ``runner(graph)`` (``dl.compile``:
        that graph compiled). Through ``__call__``, so hooks (FSDP2's root ones too) run as they would."""
        self._graph_runner = runner
        try:
            return self(*args, **kwargs)
        finally:
            del self._graph_runner

    def _graph_for(self, mode: str, args: tuple, kwargs: dict) -> fx.GraphModule:
        """The ``mode`` graph of the first guard set that takes these inputs; captured anew when none does."""
        broken = None
        for graph_set in self._graph_sets:
            broken = graph_set.broken(mode, args, kwargs)
            if broken is None:
                return graph_set.graphs[mode]
        return recapture_for(self, mode, args, kwargs, broken)  # eagerly, also under torch.compile

    # -- being a good citizen of the wrapped model's ecosystem ------------------------------
    def _expose_signature(self) -> None:
        """Bind ``forward`` on this instance as a function whose ``__signature__`` is the captured
        graph's, so ``inspect.signature(gm.forward)`` lists the captured inputs (Trainer's column
        filtering, accelerate and others read it). The code run is :meth:`DynLoRAModule.forward`."""
        cls_forward = DynLoRAModule.forward
        # a code object of its own: torch.compile caches (and counts recompiles) per code object, so
        # compiling one instance's forward never evicts or guards on another's
        fn = types.FunctionType(cls_forward.__code__.replace(), cls_forward.__globals__, "forward",
                                cls_forward.__defaults__, cls_forward.__closure__)
        fn.__qualname__, fn.__doc__ = cls_forward.__qualname__, cls_forward.__doc__
        params = list(self.captured_signature().parameters.values())
        fn.__signature__ = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
        self.forward = types.MethodType(fn, self)

    def captured_signature(self) -> inspect.Signature:
        """The inputs the graphs were captured with (what ``forward`` accepts)."""
        return inspect.signature(self._graphs["train"].forward)

    def _input_error(self, exc: BaseException, args: tuple, kwargs: dict) -> DynLoRAError | None:
        """A DynLoRAError for a call whose inputs do not fit what was captured, or None when ``exc``
        comes from somewhere else."""
        part = f"{type(self.model).__name__} (transformed) call"
        sig = self.captured_signature()
        names = ", ".join(sig.parameters) or "none"
        condition = broken_guard(exc)
        if condition is not None:
            return DynLoRAError(part, f"the inputs break a condition torch.export derived from the example inputs "
                                f"({condition}); the captured graph is only valid where it holds (the model's "
                                "code branches on or specialises to these sizes)",
                                "call it with inputs that meet the condition, or transform with example inputs "
                                "shaped like the calls you will make (e.g. the batch size and sequence length "
                                "you train with)")
        if not isinstance(exc, TypeError):
            return None
        try:
            sig.bind(*args, **kwargs)
        except TypeError as why:
            extra = [k for k in kwargs if k not in sig.parameters]
            if extra:
                cause = (f"{', '.join(extra)} {'was' if len(extra) == 1 else 'were'} not among the inputs captured "
                         f"by dl.transform ({names})")
            else:
                cause = f"the inputs do not fit the captured ones ({names}): {why}"
            return DynLoRAError(part, cause, "pass the same inputs the module was transformed with, or transform "
                                "again with every input you will call it with: positional ones in example_inputs, "
                                "keyword ones in example_kwargs (e.g. example_kwargs={'input_ids': ids, "
                                "'attention_mask': mask, 'labels': ids})")
        return None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)  # e.g. config, generation_config, device, get_input_embeddings

    def _refuse(self, method: str) -> DynLoRAError:
        return DynLoRAError(f"{type(self.model).__name__}.{method} on the transformed module",
                            _UNADAPTED[method],
                            f"call it on the merged model: dl.merge_and_unload(gm).{method}(...) (the user's own "
                            "class with the adapters folded in); to resume training later, save gm.state_dict() "
                            "and the optimizer's state_dict() instead")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("generate")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("save_pretrained")

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("push_to_hub")

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Activation checkpointing is chosen at ``dl.transform``; the graphs ignore the wrapped
        model's flag, so this only accepts a module that already checkpoints."""
        if self.__dict__.get("checkpointed"):
            return
        raise DynLoRAError(f"{type(self.model).__name__}.gradient_checkpointing_enable on the transformed module",
                           "the captured graph does not read the wrapped model's checkpointing flag",
                           "call model.gradient_checkpointing_enable() before dl.transform (checkpoint='auto' "
                           "follows it) or pass checkpoint=True to dl.transform; with transformers.Trainer, leave "
                           "gradient_checkpointing=False in its arguments")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("forward", None)  # a per-instance bound method: rebuilt on load
        state.pop("_graph_runner", None)  # dl.compile's, for the duration of a call
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._expose_signature()

    def graph_module(self, mode: str = "train") -> fx.GraphModule:
        """The FX graph module run in ``mode`` ("train" or "eval")."""
        return self._graphs[mode]

    def _unique_graphs(self) -> list[fx.GraphModule]:
        """Every graph of every guard set, each once."""
        return list({id(g): g for s in self._graph_sets for g in s.graphs.values()}.values())

    def adapter(self, weight: str) -> Adapter:
        return self.adapters.get_submodule(weight)

    def iter_adapters(self) -> list[Adapter]:
        return [m for m in self.adapters.modules() if isinstance(m, Adapter)]

    def __deepcopy__(self, memo: dict[int, Any]) -> DynLoRAModule:
        # fx's own GraphModule deepcopy re-creates attribute paths, which would split the
        # shared state; copy the state once and rebuild the graph modules around it.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        skip = ("_graphs", "_graph_sets", "forward", "_graph_runner")
        new.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in skip}, memo))
        shared = {k: getattr(new, k) for k in _SHARED}

        def rebuild(gm: fx.GraphModule) -> fx.GraphModule:
            extra = {k: copy.deepcopy(m, memo) for k, m in gm._modules.items() if k not in _SHARED}
            return graph_module(copy.deepcopy(gm.graph, memo), {**shared, **extra})

        new._graph_sets = copy_sets(self._graph_sets, rebuild)
        new._graphs = new._graph_sets[0].graphs
        new._expose_signature()
        return new

    def __repr__(self) -> str:
        n = len(self.iter_adapters())
        return (f"DynLoRAModule({type(self.model).__name__}, method={self.dynlora_config.method}, adapters={n}, "
                f"capture={self.capture_method})")


def unwrap(module: nn.Module) -> DynLoRAModule:
    """The DynLoRAModule inside ``module`` (itself, a torch.compile wrapper, or DDP)."""
    seen = module
    for _ in range(4):
        if isinstance(seen, DynLoRAModule):
            return seen
        seen = getattr(seen, "_orig_mod", None) or getattr(seen, "module", None)
        if seen is None:
            break
    raise StateError(f"{type(module).__name__}", "this module was not produced by dl.transform",
                     "pass the module dl.transform returned (or a torch.compile / DDP wrapper of it)")


def adapters(module: nn.Module) -> list[AdapterInfo]:
    """One ``AdapterInfo`` per adapted weight of a transformed module, in graph order."""
    gm = unwrap(module)
    return adapter_infos(gm.iter_adapters(), _prefix_of(module, gm))


def _prefix_of(outer: nn.Module, inner: nn.Module) -> str:
    if outer is inner:
        return ""
    for name, m in outer.named_modules():
        if m is inner:
            return f"{name}." if name else ""
    return ""
