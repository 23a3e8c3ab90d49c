"""Precision policy for adapted weights: what ``W`` absorbs is summed exactly in fp32, whatever
dtype ``W`` is stored in.

Switching adds ``s·B·A`` into ``W`` thousands of times. A bf16 ``W`` would round every entry
at every switch and the rounding would add up (a 2-layer model drifts 2% in 2,000 steps at
learning rate 0). So an adapted bf16 ``W`` is a pair:

- the bf16 parameter the graph reads: an fp32 *master* rounded to nearest, and
- an int16 *residual* buffer: the master's bits minus the bf16 bits shifted into place,
  ``master_bits = (bf16_bits << 16) + residual``, exact for every finite value.

Every write to ``W`` (the initial ``W − s·B·A``, a switch, a ReLoRA merge, ``dl.merge``) joins
the pair to the fp32 master, updates it and splits it again. Cost: 2 bytes per adapted
weight entry, so ``W`` holds 4 bytes per entry as an fp32 ``W`` would; the forward pass reads
the bf16 parameter itself (no fp32 copy, no cast in the graph). fp16 has too few exponent
bits for a 16-bit split of an fp32 value and is refused; fp32 and fp64 weights are their own
master.

The runtime writes ``W`` through a :class:`PrecisionPolicy` (``dl.attach(..., precision=)``);
the default is the exact master above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = ["PrecisionPolicy", "EXACT_MASTER", "RESIDUAL", "check_weight_dtype", "residual_of", "master_dtype", "update_weight", "master_weight",
           "split_master", "join_master"]

RESIDUAL = "weight_residual"  # buffer name on each Adapter whose W is bf16


def check_weight_dtype(weight: torch.Tensor, name: str) -> None:
    """Refuse weight dtypes whose switching could not be kept exact."""
    if weight.dtype == torch.float16:
        raise ConfigError(name, "the weight is float16: switching adds s·B·A into it thousands of times, and "
                          "float16 can neither hold that sum exactly nor carry an exact fp32 master in 16 more bits",
                          "keep fp32 parameters and compute in float16 under torch.autocast (recommended), or "
                          "convert the model to bfloat16 (adapted weights then keep an exact fp32 master)")
    if not weight.dtype.is_floating_point:
        raise ConfigError(name, f"the weight has dtype {weight.dtype}", "adapt floating-point weights only")


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a weight of ``dtype`` absorbs updates."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``master`` -> (its bf16 rounding to nearest, the int16 residual that makes it exact)."""
    bits = master.contiguous().view(torch.int32)
    high = (bits + 0x8000) >> 16  # round half away from zero on the magnitude's bits
    residual = bits - (high << 16)  # in [-2**15, 2**15)
    return high.to(torch.int16).view(torch.bfloat16), residual.to(torch.int16)


def join_master(weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The fp32 master of a bf16 ``weight`` and its int16 ``residual`` (a new tensor)."""
    bits = (weight.contiguous().view(torch.int16).to(torch.int32) << 16) + residual.to(torch.int32)
    return bits.view(torch.float32)


def residual_of(adapter: nn.Module, weight: torch.Tensor, create: bool = True) -> torch.Tensor | None:
    """The adapter's residual buffer for a bf16 ``weight``; None for other dtypes. A missing one
    (the weight became bf16 after the transform: it is exactly its own master) is registered as
    zeros if ``create``, else None is returned."""
    if weight.dtype != torch.bfloat16:
        return None
    residual = adapter._buffers.get(RESIDUAL)
    if residual is None or residual.shape != weight.shape or residual.device != weight.device:
        if not create:
            return None
        residual = torch.zeros(weight.shape, dtype=torch.int16, device=weight.device)
        adapter.register_buffer(RESIDUAL, residual)
    return residual


def master_weight(weight: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``weight``'s exact value in its master dtype (the weight itself when it is its own master)."""
    return weight if residual is None else join_master(weight, residual)


def update_weight(weight: torch.Tensor, residual: torch.Tensor | None,
                  update: Callable[..., Any], *args: Any) -> None:
    """Apply an in-place ``update(master, *args)`` (``addmm_``, ``add_``, …) to ``weight``'s master,
    exactly in fp32 for a bf16 weight, and store the result back (weight and residual). Call it
    under ``torch.no_grad()``."""
    if residual is None:
        update(weight, *args)
        return
    master = join_master(weight, residual)
    update(master, *args)
    high, low = split_master(master)
    weight.copy_(high)
    residual.copy_(low)


@dataclass(frozen=True)
class PrecisionPolicy:
    """How the runtime's switches and ReLoRA merges write an adapted ``W``."""

    # True: a bf16 W absorbs into its exact fp32 master (weight + residual). False: W absorbs in its
    # own dtype, rounding at every update (what the runtime did before; the precision benchmark's ablation)
    exact_master: bool = True

    def master_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype in which a weight of ``dtype`` absorbs updates."""
        return master_dtype(dtype) if self.exact_master else dtype

    def residual(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
        """The residual that ``update_weight`` keeps exact alongside ``weight`` (None: none)."""
        return residual_of(adapter, weight) if self.exact_master else None


EXACT_MASTER = PrecisionPolicy()  # the default
