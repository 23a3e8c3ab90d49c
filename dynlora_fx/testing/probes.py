"""Probes of what a step holds in memory, for tests and benchmarks."""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["SavedTensors"]


class SavedTensors:
    """Context manager: what autograd saves for backward while it is open, as bytes of distinct
    storages (a tensor saved by several ops, or through several views, counts once). Storages of
    ``exclude`` (a model's parameters and buffers, alive whether saved or not) are left out and
    counted apart in ``excluded_bytes``. Works around ``torch.compile``d modules too: AOTAutograd
    hands its saved tensors to the active hooks."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, tuple[int, bool]] = {}  # data_ptr -> (bytes, excluded)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self._seen.setdefault(storage.data_ptr(), (storage.nbytes(), storage.data_ptr() in self._exclude))
        return t

    @property
    def bytes(self) -> int:
        return sum(n for n, excluded in self._seen.values() if not excluded)

    @property
    def excluded_bytes(self) -> int:
        return sum(n for n, excluded in self._seen.values() if excluded)

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__()
