"""What a method does around each optimizer step: the interface the switcher dispatches to.

One handler per method, each in its own file (``lora.py``, ``switchlora.py``, ``relora.py``),
chosen by config type from ``runtime/handlers.py``'s table. The switcher owns the hooks, the
state and the reporting; a handler owns its method's policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .switcher import Switcher

__all__ = ["MethodHandler"]


class MethodHandler:
    """The default: nothing happens around a step (plain LoRA's behaviour)."""

    optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW  # what training.make_optimizer builds

    def __init__(self, switcher: Switcher, strategy: str = "batched"):  # strategy: passed check_strategy
        self.switcher = switcher

    @classmethod
    def check_optimizer(cls, optimizer: torch.optim.Optimizer) -> None:
        """Raise a StateError if the method cannot run on ``optimizer``."""

    @classmethod
    def check_strategy(cls, strategy: str, method: str) -> None:
        """Raise a ConfigError unless the method runs with switching strategy ``strategy`` (a known
        one): only SwitchLoRA switches, so the others take the default alone."""
        if strategy != "batched":
            raise ConfigError(f"dl.attach strategy={strategy!r}", f"switching strategies apply to SwitchLoRA, this "
                              f"run uses {method}", "leave strategy at its default")

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs before ``optimizer.step()`` (the step is ``switcher.step``)."""

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs after ``optimizer.step()``, before the switcher counts the step."""
