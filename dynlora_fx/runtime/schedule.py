"""The SwitchLoRA switching schedule (DESIGN.md §1), as pure functions of the step."""

from __future__ import annotations


__all__ = ["switch_rate", "switch_interval", "expected_switches", "relora_lr_multiplier"]


def switch_rate(step: int, total_steps: int, decay_ratio: float) -> float:
    """rate(t) = 0.3 ** ((t + 1) / (decay_ratio · T))."""
    return 0.3 ** ((step + 1) / (decay_ratio * total_steps))


def switch_interval(step: int, total_steps: int, interval: float, decay_ratio: float) -> float:
    """interval(t) = interval / rate(t): steps between two switches of the same vector slot."""
    return interval / switch_rate(step, total_steps, decay_ratio)


def expected_switches(step: int, total_steps: int, rank: int, interval: float, decay_ratio: float) -> float:
    """r / interval(t): rows of A (and as many columns of B) switched at step t, on average."""
    return rank / switch_interval(step, total_steps, interval, decay_ratio)


def relora_lr_multiplier(step: int, reset_every: int, warmup: int) -> float:
    """Jagged restart: 1 during the first cycle, then a linear warm-up after every reset."""
    if step < reset_every or warmup == 0:
        return 1.0
    since = step % reset_every
    return min(1.0, (since + 1) / warmup) if since < warmup else 1.0


