"""Training runtime: per-vector AdamW, the switching schedule, and the switcher."""

from .optim import AdamW
from .schedule import expected_switches, relora_lr_multiplier, switch_interval, switch_rate
from .switcher import Switcher, attach

__all__ = ["AdamW", "Switcher", "attach", "switch_rate", "switch_interval", "expected_switches",
           "relora_lr_multiplier"]
