"""What differs between the torch releases pyproject.toml admits, in one place.

Each helper names the newest behaviour and says which release brought it; code elsewhere calls
the helper and never checks torch's version itself.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator

import torch.utils.checkpoint as torch_checkpoint

# checkpoint(function, *args, **kwargs) and checkpoint_sequential both end in
# _checkpoint_impl(function, args, kwargs, **options) since torch 2.14; 2.13 does the work inside
# checkpoint() itself, through CheckpointFunction.apply (reentrant) or
# _checkpoint_without_reentrant_generator (non-reentrant).
_HAS_CHECKPOINT_IMPL = hasattr(torch_checkpoint, "_checkpoint_impl")


@contextlib.contextmanager
def checkpoint_calls(around: Callable[[Any], ContextManager[Any]]) -> Iterator[None]:
    """While active, every ``torch.utils.checkpoint.checkpoint`` (either variant, and through
    ``checkpoint_sequential``) runs its function directly, inside ``around(function)``, instead
    of checkpointing it. Patched where the call ends up rather than ``checkpoint`` itself, which
    models (transformers) hold by reference from import time."""
    if _HAS_CHECKPOINT_IMPL:
        def run(function: Any, args: tuple, kwargs: dict, **_: Any) -> Any:
            with around(function):
                return function(*args, **kwargs)

        saved = torch_checkpoint._checkpoint_impl
        torch_checkpoint._checkpoint_impl = run
        try:
            yield
        finally:
            torch_checkpoint._checkpoint_impl = saved
        return

    class Direct:  # stands in for CheckpointFunction: checkpoint() only calls .apply(function, preserve, *args)
        @staticmethod
        def apply(function: Any, _preserve: Any, *args: Any) -> Any:
            with around(function):
                return function(*args)

    def generator(function: Any, *_: Any, **__: Any) -> Iterator[None]:
        # checkpoint() itself calls function(*args, **kwargs) between this one yield and the end
        with around(function):
            yield

    saved_classic = torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator
    torch_checkpoint.CheckpointFunction = Direct
    torch_checkpoint._checkpoint_without_reentrant_generator = generator
    try:
        yield
    finally:
        torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator = saved_classic
