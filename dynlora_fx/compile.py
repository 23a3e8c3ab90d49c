"""``dl.compile``: torch.compile for a transformed module, set up so switching never recompiles.

Everything the runtime changes between steps — ``W``, ``A``, ``B``, indices, freeze
counters — is tensor data changed in place; scalings are tensors. The compiled graph
therefore guards only on shapes, dtypes and ``self.training``: one compile per mode.
``fullgraph=True`` holds for every captured graph except those that call RNN modules
(Dynamo refuses ``nn.LSTM``/``nn.GRU``/``nn.RNN`` objects; their weights are still read
through them), which compile with one graph break instead. A sharded module
(``dl.fully_shard``) compiles each block's region on its own, as one graph, and the rest
around them: FSDP2's hooks between them run eagerly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .errors import DynLoRAError
from .module import DynLoRAModule
from .passes import region_modules

__all__ = ["compile"]


def compile(module: nn.Module, **torch_compile_kwargs: Any) -> nn.Module:  # noqa: A001 - mirrors torch.compile
    """``torch.compile(module, fullgraph=True, **kwargs)`` for a module ``dl.transform`` returned.

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
    kwargs = {"fullgraph": not has_rnn, **torch_compile_kwargs}
    if module.sharded:  # each block's body on its own, between FSDP2's (eager) hooks
        for graph in module._unique_graphs():
            for region in region_modules(graph):
                if region.__dict__["unit"] is not None:
                    region.__dict__["compiled_run"] = torch.compile(region.runner(), **kwargs)
        kwargs["fullgraph"] = False  # the graph breaks where each sharded block runs
    return torch.compile(module, **kwargs)
