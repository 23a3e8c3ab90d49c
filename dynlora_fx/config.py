"""Method configs: small frozen dataclasses, validated on construction, JSON round-trip.

A pass never mutates its config. ``rank`` is an int (the same rank everywhere) or a
float in (0, 1] (that fraction of each weight's ``min(m, n)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["AdapterConfig", "SwitchLoRA", "LoRA", "ReLoRA", "config_from_json", "resolve_rank"]


def _fail(cls: str, name: str, value: Any, why: str, fix: str) -> None:
    raise ConfigError(f"{cls}.{name}={value!r}", why, fix)


@dataclass(frozen=True)
class AdapterConfig:
    """Fields shared by every method."""

    rank: int | float = 8  # int >= 1, or float in (0, 1]: fraction of min(m, n) per weight
    alpha: float = 1.0  # scaling s = alpha / rank
    init: str = "switchlora"  # "switchlora" (balanced A/B, DESIGN.md §1) | "lora" (Kaiming A, zero B)
    seed: int = 0  # all adapter/candidate/switching randomness derives from it
    targets: tuple[str, ...] = ()  # weight names to adapt (exact, ".suffix" or "re:regex"); empty = all
    exclude: tuple[str, ...] = ()  # weight names to leave full-rank, same pattern rules
    form: str = "auto"  # "auto" (cheaper by the cost model below) | "activation" | "weight"
    tokens_per_step: int = 4096  # rows per optimizer step through each op, for form="auto"'s cost model

    method: ClassVar[str] = "adapter"

    def __post_init__(self) -> None:
        name = type(self).__name__
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            _fail(name, "rank", r, "rank must be an int or a float", "pass e.g. rank=64 or rank=0.25")
        if isinstance(r, int) and r < 1:
            _fail(name, "rank", r, "an int rank must be >= 1", "pass a positive rank such as 8, or a fraction such as 0.25")
        if isinstance(r, float) and not (0.0 < r <= 1.0 and math.isfinite(r)):
            _fail(name, "rank", r, "a float rank is a fraction of min(m, n) and must lie in (0, 1]",
                  "pass e.g. rank=0.25, or an int rank")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            _fail(name, "alpha", self.alpha, "alpha must be a positive finite number", "use alpha=1.0 (the default)")
        if self.init not in ("switchlora", "lora"):
            _fail(name, "init", self.init, "unknown initialisation", 'use "switchlora" or "lora"')
        if self.form not in ("auto", "activation", "weight"):
            _fail(name, "form", self.form, "unknown adapter form", 'use "auto", "activation" or "weight"')
        if not isinstance(self.tokens_per_step, int) or self.tokens_per_step < 1:
            _fail(name, "tokens_per_step", self.tokens_per_step, "must be an int >= 1",
                  "pass the batch size x sequence length of one optimizer step, e.g. 4096")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            _fail(name, "seed", self.seed, "seed must be an int", "pass e.g. seed=0")
        for fname in ("targets", "exclude"):
            value = getattr(self, fname)
            if isinstance(value, str):
                value = (value,)  # a lone pattern is a common slip; accept it
            if not all(isinstance(p, str) and p for p in value):
                _fail(name, fname, value, "patterns must be non-empty strings", 'pass e.g. (".q_proj.weight", "re:.*mlp.*")')
            object.__setattr__(self, fname, tuple(value))

    # -- JSON round-trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def switching(self) -> bool:
        return False


@dataclass(frozen=True)
class SwitchLoRA(AdapterConfig):
    """SwitchLoRA (Zhou, Wang, Xu, arXiv 2406.06564): LoRA whose vectors keep being switched."""

    interval: float = 40.0  # base switching interval, in steps, at rate 1
    decay_ratio: float = 0.1  # rate(t) = 0.3 ** ((t + 1) / (decay_ratio * T))
    freeze_steps: int = 5  # steps a vector's counterpart stays frozen after a switch
    candidates: str = "seeded"  # "seeded": regenerated from (seed, layer, side, index); "stored": kept in memory
    reset_vector_state: bool = True  # reset Adam moments and per-vector step of the frozen counterpart

    method: ClassVar[str] = "switchlora"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not (isinstance(self.interval, (int, float)) and self.interval > 0 and math.isfinite(self.interval)):
            _fail(name, "interval", self.interval, "interval must be a positive number of steps", "use interval=40")
        if not (isinstance(self.decay_ratio, (int, float)) and self.decay_ratio > 0):
            _fail(name, "decay_ratio", self.decay_ratio, "decay_ratio must be positive", "use decay_ratio=0.1")
        if not isinstance(self.freeze_steps, int) or self.freeze_steps < 0:
            _fail(name, "freeze_steps", self.freeze_steps, "freeze_steps must be an int >= 0", "use freeze_steps=5")
        if self.interval < 2 * self.freeze_steps:
            _fail(name, "interval", self.interval,
                  f"interval {self.interval} < 2*freeze_steps = {2 * self.freeze_steps}: a vector would be "
                  "switched again while its counterpart is still frozen",
                  f"raise interval to >= {2 * self.freeze_steps} or lower freeze_steps")
        if self.candidates not in ("seeded", "stored"):
            _fail(name, "candidates", self.candidates, "unknown candidate storage", 'use "seeded" or "stored"')

    @property
    def switching(self) -> bool:
        return True


@dataclass(frozen=True)
class LoRA(AdapterConfig):
    """Plain LoRA: adapters trained, W frozen at its initial value, no switching."""

    init: str = "lora"
    method: ClassVar[str] = "lora"


@dataclass(frozen=True)
class ReLoRA(AdapterConfig):
    """ReLoRA: every ``reset_every`` steps merge s·B·A into W, re-initialise, restart the LR."""

    init: str = "lora"
    reset_every: int = 200  # steps between merges
    warmup: int = 20  # steps of linear LR warm-up after each restart
    prune_ratio: float = 0.999  # fraction of adapter optimizer state zeroed at a restart (by magnitude)

    method: ClassVar[str] = "relora"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.reset_every, int) or self.reset_every < 1:
            _fail(name, "reset_every", self.reset_every, "reset_every must be an int >= 1", "use e.g. reset_every=200")
        if not isinstance(self.warmup, int) or not (0 <= self.warmup < self.reset_every):
            _fail(name, "warmup", self.warmup, f"warmup must be an int in [0, reset_every={self.reset_every})",
                  "use a warm-up shorter than the reset period, e.g. warmup=20")
        if not (0.0 <= self.prune_ratio <= 1.0):
            _fail(name, "prune_ratio", self.prune_ratio, "prune_ratio must lie in [0, 1]", "use prune_ratio=0.999")


# every method, by the name its config, the CLI (--method) and saved JSON use: defined here only
METHODS: dict[str, type[AdapterConfig]] = {c.method: c for c in (SwitchLoRA, LoRA, ReLoRA)}


def config_from_json(text_or_dict: str | dict[str, Any]) -> AdapterConfig:
    """Inverse of ``config.to_json()``."""
    d = json.loads(text_or_dict) if isinstance(text_or_dict, str) else dict(text_or_dict)
    method = d.pop("method", None)
    if method not in METHODS:
        raise ConfigError(f"config method={method!r}", "unknown method", f"use one of {sorted(METHODS)}")
    cls = METHODS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} JSON", f"unknown fields {unknown}", f"use only {sorted(known)}")
    for key in ("targets", "exclude"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)


def resolve_rank(rank: int | float, rows: int, cols: int) -> int:
    """The adapter rank for a (rows, cols) matrix: an int as given, a float as a fraction of min."""
    if isinstance(rank, float):
        return max(1, int(round(rank * min(rows, cols))))
    return int(rank)
