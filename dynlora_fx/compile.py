"""``dl.compile``: torch.compile for a transformed module, set up so switching never recompiles.

Everything the runtime changes between steps — ``W``, ``A``, ``B``, indices, freeze
counters — is tensor data changed in place; scalings are tensors. A compiled graph
therefore guards only on shapes, dtypes and its inputs: one compile per graph.

What is compiled is per instance: each graph the module runs (one per mode and guard set,
``graphs.py``), each on its own when it first runs — never the ``forward`` method that
every transformed module shares, whose one code object would make Dynamo guard on every
instance and give up after its ``recompile_limit`` (8) of them. The module chooses the
graph eagerly (a few shape checks, or a capture for inputs no graph takes) and runs the
compiled one, so an input no graph can take is the same ``DynLoRAError`` as in eager mode.
``fullgraph=True`` holds for every captured graph except those that call RNN modules (Dynamo
refuses ``nn.LSTM``/``nn.GRU``/``nn.RNN`` objects; their weights are still read through
them), which compile with one graph break instead. A sharded module (``dl.fully_shard``)
compiles each block's region on its own, as one graph, and the rest around them: FSDP2's
hooks between them run eagerly.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import DynLoRAError
from .module import DynLoRAModule
from .passes import region_modules

__all__ = ["compile", "CompiledModule"]


class CompiledModule(nn.Module):
    """What ``dl.compile`` returns: the transformed module (``_orig_mod``, as in torch.compile's
    wrapper, so parameter names and ``state_dict`` keys are the same) run with compiled graphs.
    The module itself stays eager; attributes this one lacks come from it."""

    def __init__(self, module: DynLoRAModule, options: dict[str, Any]):
        super().__init__()
        self._orig_mod = module
        self._options = options
        self._compiled: dict[fx.GraphModule, Callable[..., Any]] = {}  # graphs live as long as the module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._modules["_orig_mod"].call_with_runner(self._runner, *args, **kwargs)

    def _runner(self, graph: fx.GraphModule) -> Callable[..., Any]:
        compiled = self._compiled.get(graph)
        if compiled is None:
            compiled = self._compiled[graph] = self._compile(graph)
        return compiled

    def _compile(self, graph: fx.GraphModule) -> Callable[..., Any]:
        options = dict(self._options)
        # a sharded block's region compiles on its own, between FSDP2's (eager) hooks ...
        on_their_own = [r.compile_with(lambda m: torch.compile(m, **options)) for r in region_modules(graph)]
        if any(on_their_own):
            options["fullgraph"] = False  # ... and the graph breaks where each of them runs
        # the graph module's generated forward is a code object of its own: a cache of its own in Dynamo
        return torch.compile(graph, **options)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_orig_mod" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["_orig_mod"], name)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledModule:
        return CompiledModule(copy.deepcopy(self._modules["_orig_mod"], memo), dict(self._options))


def compile(module: nn.Module, **torch_compile_kwargs: Any) -> CompiledModule:  # noqa: A001 - mirrors torch.compile
    """``module`` with each of its graphs run through ``torch.compile(graph, fullgraph=True, **kwargs)``,
    for a module ``dl.transform`` returned. ``module`` itself stays eager.

    Attach the switcher to the uncompiled module or to this result: both reach the
    same parameters. Compiling the module a second time is refused.
    """
    if hasattr(module, "_orig_mod"):
        raise DynLoRAError(type(module._orig_mod).__name__, "the module is already compiled",
                           "call dl.compile once, on the module dl.transform returned")
    if not isinstance(module, DynLoRAModule):
        raise DynLoRAError(type(module).__name__, "dl.compile takes a module produced by dl.transform",
                           "transform the model first: gm = dl.transform(model, example_inputs, config); "
                           "then dl.compile(gm) — or call torch.compile on a plain model yourself")
    has_rnn = any(isinstance(m, nn.RNNBase) for m in module.model.modules())
    return CompiledModule(module, {"fullgraph": not has_rnn, **torch_compile_kwargs})
