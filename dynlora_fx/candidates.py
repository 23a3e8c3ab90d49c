"""Adapter initialisation and candidate vectors (DESIGN.md §1).

Candidates never change, so instead of storing ``min(m, n)`` vectors per side per
weight we regenerate any of them from the key (seed, adapter uid, expert, side, index)
with a counter-based hash: generating vector 7 never depends on vectors 0..6, and every
rank of a data-parallel job computes the same bits. ``stored`` mode evaluates the same
function once for every index, so both modes hold identical values.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["switchlora_stds", "lora_a_bound", "base_keys", "candidate_keys", "candidate_vectors", "project_generator"]

_M32 = 0xFFFFFFFF
SIDE_A, SIDE_B = 0, 1


def switchlora_stds(fan_out: int, fan_in: int, rank: int) -> tuple[float, float]:
    """(std_A, std_B) such that s·B·A (s = 1/r) has a default nn.Linear weight's std
    and A·ΔB, ΔB·A updates have equal size."""
    g = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    m, n, r = fan_out, fan_in, rank
    std_a = (math.sqrt(m) * r / n**1.5) ** 0.25 * math.sqrt(g)
    std_b = (r / math.sqrt(m * n)) ** 0.25 * math.sqrt(g)
    return std_a, std_b


def lora_a_bound(fan_in: int) -> float:
    """Bound of kaiming_uniform_(a=sqrt(5)), what nn.Linear and LoRA use for A."""
    return 1.0 / math.sqrt(fan_in)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values (low bits survive wrap-around)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def base_keys(seed: int, uid: torch.Tensor | int, expert: torch.Tensor | int,
              device: torch.device | str | None = None) -> torch.Tensor:
    """The per-(adapter, expert) part of a candidate's key; broadcasts over ``uid`` and ``expert``."""
    def t(v):
        return torch.as_tensor(v, dtype=torch.int64, device=device) & _M32

    k = _mix32(t(seed) ^ 0x5BD1E995)
    k = _mix32(k ^ t(uid))
    return _mix32(k ^ t(expert))


def candidate_keys(base: torch.Tensor, side: int, index: torch.Tensor) -> torch.Tensor:
    """One uint32 key (in an int64 tensor) per candidate ``index`` of ``side``; ``base`` broadcasts."""
    return _mix32(base ^ (((index << 1) | side) & _M32))


@functools.lru_cache(maxsize=64)
def _position_hash(start: int, length: int, device: torch.device) -> torch.Tensor:
    return _mix32(torch.arange(start, start + length, dtype=torch.int64, device=device) + 0x9E3779B9)


def candidate_vectors(keys: torch.Tensor, length: int, bound: float | torch.Tensor,
                      dtype: torch.dtype = torch.float32, start: int = 0) -> torch.Tensor:
    """Entries ``start .. start+length`` of the vectors of ``keys``, shape ``(*keys.shape, length)``,
    uniform in ±bound: a pure function of the key and the entry's position, so a shard of a
    vector is generated alone (``bound`` is a float or a tensor broadcasting against ``keys``)."""
    bits = _mix32(keys.unsqueeze(-1) ^ _position_hash(start, length, keys.device))
    u = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 random bits -> exact float32 in [0, 1)
    if isinstance(bound, torch.Tensor):
        bound = bound.to(torch.float32).unsqueeze(-1)
    return ((2.0 * u - 1.0) * bound).to(dtype)


def project_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one stream of decisions, derived from the config seed only."""
    k = _mix32(torch.tensor(seed & _M32, dtype=torch.int64) ^ 0x2545F491)
    for s in stream:
        k = _mix32(k ^ (s & _M32))
    return torch.Generator().manual_seed(int(k))
