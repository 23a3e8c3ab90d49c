"""What differs between the torch releases this project supports, in one place.

Each entry detects the feature itself (never a version number), so a release that backports or
drops it is handled by what it has.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch.utils.checkpoint as torch_checkpoint

__all__ = ["checkpoint_runs_directly"]


@contextlib.contextmanager
def checkpoint_runs_directly(enter: Callable[[Any], None], leave: Callable[[], None]) -> Iterator[None]:
    """While active, ``torch.utils.checkpoint.checkpoint`` (both variants) runs its function
    directly, calling ``enter(function)`` before and ``leave()`` after it.

    torch >= 2.14 funnels both variants through ``_checkpoint_impl(function, args, kwargs, ...)``.
    Earlier releases call ``CheckpointFunction.apply(function, preserve, *args)`` (reentrant) or
    drive ``_checkpoint_without_reentrant_generator(function, ...)`` around their own
    ``function(*args, **kwargs)`` (non-reentrant): both are replaced there.
    """

    def run(function: Any, args: tuple, kwargs: dict) -> Any:
        enter(function)
        try:
            return function(*args, **kwargs)
        finally:
            leave()

    if hasattr(torch_checkpoint, "_checkpoint_impl"):
        patches = {"_checkpoint_impl": lambda function, args, kwargs, **_: run(function, args, kwargs)}
    else:
        class Direct:  # stands in for CheckpointFunction: only .apply is called
            @staticmethod
            def apply(function: Any, _preserve: bool, *args: Any) -> Any:
                return run(function, args, {})

        def around(function: Any, *_: Any, **__: Any) -> Iterator[None]:
            enter(function)  # checkpoint() calls the function between the generator's two steps
            try:
                yield
            finally:
                leave()

        patches = {"CheckpointFunction": Direct, "_checkpoint_without_reentrant_generator": around}
    originals = {name: getattr(torch_checkpoint, name) for name in patches}
    for name, patch in patches.items():
        setattr(torch_checkpoint, name, patch)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch_checkpoint, name, original)
