"""Each method's handler, by config type: the one table the switcher and ``make_optimizer`` read."""

from __future__ import annotations

import torch

from ..config import AdapterConfig, LoRA, ReLoRA, SwitchLoRA
from ..errors import ConfigError
from .handler import MethodHandler
from .lora import LoRAHandler
from .relora import ReLoRAHandler
from .switchlora import SwitchLoRAHandler

__all__ = ["HANDLERS", "handler_class", "optimizer_class"]

HANDLERS: dict[type[AdapterConfig], type[MethodHandler]] = {
    SwitchLoRA: SwitchLoRAHandler, LoRA: LoRAHandler, ReLoRA: ReLoRAHandler}


def handler_class(config: AdapterConfig) -> type[MethodHandler]:
    """The handler of ``config``'s method (of the nearest config class in the table)."""
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    raise ConfigError(f"config {type(config).__name__}", "no runtime handles this method",
                      f"use one of {', '.join(c.__name__ for c in HANDLERS)}")


def optimizer_class(config: AdapterConfig | None) -> type[torch.optim.Optimizer]:
    """The optimizer a run of ``config`` needs (None: full-rank training, torch's AdamW)."""
    return torch.optim.AdamW if config is None else handler_class(config).optimizer_class
