"""The adapter layer: ``A``, ``B`` and the switching bookkeeping of each adapted weight.

``Adapter`` holds one weight's factors, scale, in-use candidate indices, freeze counters and
round-robin pointers, every one of them a tensor (switching changes data, never attributes);
``AdapterTree`` nests adapters under their weights' qualified names (``gm.adapters``), and
``AdapterInfo`` is what ``dl.adapters`` reports about each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .candidates import SIDE_A, SIDE_B, base_keys, candidate_keys, candidate_vectors, lora_a_bound, \
    project_generator, switchlora_stds
from .config import AdapterConfig
from .passes.find_targets import Target
from .shards import assign, gathered, local

__all__ = ["Adapter", "AdapterInfo", "AdapterTree", "adapter_infos"]


@dataclass(frozen=True)
class AdapterInfo:
    """One adapted weight. ``a``/``b`` are names in ``gm.named_parameters()``; ``A`` has shape
    ``(*batch, r, n)`` and ``B`` ``(*batch, m, r)`` for the ``(m, n)`` matrix view of the weight
    (``batch`` is non-empty only for stacked expert weights, each adapted on its own)."""

    weight: str
    a: str
    b: str
    shape: tuple[int, ...]
    rank: int
    op: str
    form: str


class Adapter(nn.Module):
    """``A``, ``B`` and their bookkeeping for one weight. Everything switching changes is a tensor."""

    def __init__(self, target: Target, uid: int, config: AdapterConfig, weight: torch.Tensor):
        super().__init__()
        self.target, self.uid = target, uid
        r, rows, cols, batch = target.rank, target.rows, target.cols, target.batch
        fan_out, fan_in = (cols, rows) if target.fan_in_is_rows else (rows, cols)
        std_a, std_b = switchlora_stds(fan_out, fan_in, r)
        if target.fan_in_is_rows:  # W stored as (in, out): storage A plays B's role and vice versa
            std_a, std_b = std_b, std_a
        self.bound_a, self.bound_b = math.sqrt(3) * std_a, math.sqrt(3) * std_b  # candidate ranges
        self.num_candidates = min(rows, cols)
        dd = {"dtype": weight.dtype, "device": weight.device}
        self.A = nn.Parameter(torch.empty(*batch, r, cols, **dd))
        self.B = nn.Parameter(torch.empty(*batch, rows, r, **dd))
        self.register_buffer("scale", torch.tensor(config.alpha / r, **dd))
        self.register_buffer("a_index", torch.empty(*batch, r, dtype=torch.long, device=weight.device))
        self.register_buffer("b_index", torch.empty(*batch, r, dtype=torch.long, device=weight.device))
        # switching bookkeeping (DESIGN.md §1): frozen steps left per row of A / column of B,
        # and the round-robin pointers (A from slot 0, B from slot r/2)
        self.register_buffer("a_frozen", torch.zeros(*batch, r, dtype=torch.int32, device=weight.device))
        self.register_buffer("b_frozen", torch.zeros(*batch, r, dtype=torch.int32, device=weight.device))
        self.register_buffer("a_ptr", torch.zeros(batch, dtype=torch.long, device=weight.device))
        self.register_buffer("b_ptr", torch.full(batch, r // 2, dtype=torch.long, device=weight.device))
        self.reset_parameters(config.seed, config.init)

    @torch.no_grad()
    def reset_parameters(self, seed: int, init: str, round_: int = 0) -> None:
        """Draw A and B (and the in-use candidate indices) from the project generator."""
        t = self.target
        gen = project_generator(seed, self.uid, round_)
        experts = math.prod(t.batch)
        a_idx = torch.stack([torch.randperm(self.num_candidates, generator=gen)[: t.rank] for _ in range(experts)])
        b_idx = torch.stack([torch.randperm(self.num_candidates, generator=gen)[: t.rank] for _ in range(experts)])
        self.a_index.copy_(a_idx.view(self.a_index.shape))
        self.b_index.copy_(b_idx.view(self.b_index.shape))
        # whole values, each rank of a sharded run keeping its slice of them
        if init == "switchlora":  # A's rows and B's columns are candidates
            assign(self.A, self.generate_candidates(seed, SIDE_A, self.a_index))
            assign(self.B, self.generate_candidates(seed, SIDE_B, self.b_index).transpose(-1, -2))
        else:  # LoRA: Kaiming-uniform A (as nn.Linear would), zero B
            bound = lora_a_bound(t.cols)
            assign(self.A, ((torch.rand(self.A.shape, generator=gen) * 2 - 1) * bound).to(self.A.dtype))
            assign(self.B, torch.zeros(self.B.shape, dtype=self.B.dtype))

    def base_keys(self, seed: int) -> torch.Tensor:
        """Per-expert key prefix ``(E,)`` of this adapter's candidates under the run's ``seed``."""
        experts = torch.arange(math.prod(self.target.batch), device=self.A.device)
        return base_keys(seed, self.uid, experts, device=self.A.device)

    def generate_candidates(self, seed: int, side: int, index: torch.Tensor) -> torch.Tensor:
        """Candidate vectors ``(*index.shape, length)`` for ``index`` (shape ``(*batch, k)``),
        regenerated from the run's ``seed`` (a stored table, when the switcher keeps one, holds the same)."""
        base = self.base_keys(seed).view(*self.target.batch, *([1] * (index.dim() - len(self.target.batch))))
        keys = candidate_keys(base, side, index)
        length = self.target.cols if side == SIDE_A else self.target.rows
        bound = self.bound_a if side == SIDE_A else self.bound_b
        return candidate_vectors(keys, length, bound, dtype=self.A.dtype)

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s · B @ A`` in the weight's own shape, computed in ``dtype`` (default: the factors').
        Sharded (``dl.fully_shard``): this rank's rows of it, from its rows of ``B`` and the whole
        ``A`` (gathered: a collective)."""
        a, b, s = gathered(self.A), local(self.B), self.scale
        if dtype is not None:
            a, b, s = a.to(dtype), b.to(dtype), s.to(dtype)
        shape = list(self.target.shape)
        shape[len(self.target.batch)] = b.shape[-2]  # W's rows are the matrix rows, as B's
        return (s * (b @ a)).reshape(shape)

    def extra_repr(self) -> str:
        t = self.target
        return f"weight={t.weight}, shape={t.shape}, rank={t.rank}, form={t.form}, op={t.op}"


class AdapterTree(nn.Module):
    """A node of ``gm.adapters``, mirroring the model's module paths. Sharded with its block as
    one FSDP unit (``dl.fully_shard``), :meth:`run_block` is that unit's FSDP forward method: the
    block's region runs through it, so FSDP's hooks gather the unit around the block."""

    def run_block(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def adapter_infos(adapters: list[Adapter], prefix: str = "") -> list[AdapterInfo]:
    """One ``AdapterInfo`` per adapter, parameter names under ``prefix`` (the transformed module's
    path inside what the user holds)."""
    out = []
    for ad in adapters:
        t = ad.target
        out.append(AdapterInfo(t.weight, f"{prefix}adapters.{t.weight}.A", f"{prefix}adapters.{t.weight}.B",
                               t.shape, t.rank, t.op, t.form))
    return out
