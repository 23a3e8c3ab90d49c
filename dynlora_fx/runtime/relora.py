"""ReLoRA around the step: a jagged cosine restart of the learning rate, and every
``reset_every`` steps a merge of ``s·B·A`` into ``W``, re-initialised adapters and pruned
adapter optimizer state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..shards import gathered, local
from .handler import MethodHandler
from .precision import update_weight
from .schedule import relora_lr_multiplier

if TYPE_CHECKING:
    from .switcher import Switcher

__all__ = ["ReLoRAHandler"]


class ReLoRAHandler(MethodHandler):
    def __init__(self, switcher: Switcher, strategy: str = "batched"):
        super().__init__(switcher, strategy)
        self._saved_lr: list[Any] = []  # the groups' learning rates while the step runs scaled

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale every group's learning rate by the restart multiplier for this step only."""
        config = self.switcher.config
        mult = relora_lr_multiplier(self.switcher.step, config.reset_every, config.warmup)
        self._saved_lr = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * mult

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved_lr):
            g["lr"] = lr
        if (self.switcher.step + 1) % self.switcher.config.reset_every == 0:
            self._reset()

    @torch.no_grad()
    def _reset(self) -> None:
        sw = self.switcher
        live = sw.live
        live.relora_round += 1
        for ad in sw.adapters:
            weight = sw.gm.model.get_parameter(ad.target.weight)
            dtype = sw.precision.master_dtype(weight.dtype)
            merged = ad.delta(dtype)  # this rank's rows, when sharded
            ad.reset_parameters(live.seed, sw.config.init, round_=live.relora_round)
            # W takes the trained product and gives up the new one (zero for init="lora", whose B is 0),
            # so the function is unchanged across the reset, as after dl.transform
            update_weight(local(weight), sw.precision.residual(ad, weight), torch.Tensor.add_, merged - ad.delta(dtype))
            for p in (ad.A, ad.B):  # prune the adapters' optimizer state by magnitude
                for key in ("exp_avg", "exp_avg_sq"):
                    buf = sw.optimizer.state.get(p, {}).get(key)
                    if buf is not None:
                        _prune_smallest(buf, sw.config.prune_ratio)


def _prune_smallest(buf: torch.Tensor, ratio: float) -> None:
    """Zero the ``ratio`` fraction of entries of smallest magnitude (ReLoRA's state pruning); of a
    sharded state, by the threshold of the whole tensor."""
    n = buf.numel()
    drop = int(round(n * ratio))
    if drop >= n:
        local(buf).zero_()
    elif drop > 0:
        threshold = gathered(buf).abs().flatten().kthvalue(drop).values
        local(buf).mul_(local(buf).abs() > threshold)
