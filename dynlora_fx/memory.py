"""Measuring what a training step holds: bytes autograd saves for backward."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["saved_bytes"]


def saved_bytes(step: Callable[[], Any], module: nn.Module | None = None) -> tuple[Any, int]:
    """Run ``step()`` (a forward) and return its result and the bytes autograd saves for backward:
    distinct storages, counted once however many ops save them. With ``module``, its parameters
    and buffers are left out (they are held anyway); a merged ``W + s·B·A`` is not a parameter
    and counts. Tensors a checkpointed region keeps as inputs count too (torch saves them
    through the same hooks)."""
    held = set()
    if module is not None:
        held = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return out, sum(seen.values())
