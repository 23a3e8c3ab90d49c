"""``dl.AdamW``: torch.optim.AdamW with a step counter per vector for adapter factors.

Registered adapter parameters (rows of ``A``, columns of ``B``) keep ``exp_avg``,
``exp_avg_sq`` and ``step`` per vector, so a vector whose state is reset restarts its
bias correction alone, and a frozen vector (``frozen > 0``) is not updated at all —
not by its moments, not by weight decay. Every other parameter goes through the stock
``torch.optim.AdamW.step`` unchanged, so its numbers are exactly torch's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import ConfigError

__all__ = ["AdamW"]


def _stock_step(opt: torch.optim.AdamW) -> None:
    """torch's AdamW.step without its hook wrapper: torch wraps a class's ``step`` to run the
    step hooks once a first instance exists, and ours must not run twice per step."""
    step = torch.optim.AdamW.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    step(opt)


class AdamW(torch.optim.AdamW):
    """Drop-in ``torch.optim.AdamW``; the switcher registers adapter factors with
    :meth:`register_vectors` when it is attached."""

    def __init__(self, params: Any, *args: Any, **kwargs: Any):
        super().__init__(params, *args, **kwargs)
        # id(param) -> (vector dim, getter of the frozen-steps-left tensor, one entry per vector)
        self._vectors: dict[int, tuple[int, Callable[[], torch.Tensor]]] = {}

    def register_vectors(self, param: torch.Tensor, dim: int, frozen: Callable[[], torch.Tensor]) -> None:
        """Give ``param`` per-vector state along ``dim`` (-2: rows, -1: columns); ``frozen()`` returns
        each vector's remaining frozen steps (read at every step, so ``.to()`` after attaching is fine)."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                if group["amsgrad"] or group["maximize"] or group.get("fused") or group.get("capturable"):
                    raise ConfigError("dl.AdamW", "amsgrad, maximize, fused and capturable are not supported for "
                                      "adapter factors", "construct dl.AdamW without those options")
                break
        else:
            raise ConfigError("dl.AdamW", "the parameter to register is not in any param group",
                              "build the optimizer over gm.parameters()")
        self._vectors[id(param)] = (dim, frozen)
        state = self.state[param]
        if state:  # attached after some steps: broadcast the tensor-wide step to every vector
            state["step"] = torch.full(self._vector_shape(param, dim), float(state["step"]),
                                       dtype=torch.float32, device=param.device)

    @staticmethod
    def _vector_shape(param: torch.Tensor, dim: int) -> tuple[int, ...]:
        shape = list(param.shape)
        shape[-1 if dim == -2 else -2] = 1
        return tuple(shape)

    def vector_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-vector state of a registered parameter (created on first use)."""
        state = self.state[param]
        if not state:
            dim, _ = self._vectors[id(param)]
            state["step"] = torch.zeros(self._vector_shape(param, dim), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._vectors:
            _stock_step(self)
            return loss
        saved = [g["params"] for g in self.param_groups]
        try:  # stock AdamW for everything that is not an adapter factor
            for g in self.param_groups:
                g["params"] = [p for p in g["params"] if id(p) not in self._vectors]
            _stock_step(self)
        finally:
            for g, params in zip(self.param_groups, saved):
                g["params"] = params
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._vectors and p.grad is not None:
                    self._vector_update(p, group)
        return loss

    def _vector_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """AdamW with per-vector step counts, in place. Frozen vectors have zero gradient (the
        switcher zeroes it) and a zero ``active`` weight: moments, step and value stay put."""
        dim, frozen_of = self._vectors[id(p)]
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        state = self.vector_state(p)
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        active = (frozen_of() == 0).unsqueeze(-1 if dim == -2 else -2).to(p.dtype)  # one entry per vector
        grad = p.grad * active  # frozen vectors see exactly zero, whatever the caller left there
        step.add_(active)
        if wd:
            p.mul_(1 - lr * wd * active)
        m.lerp_(grad, (1 - beta1) * active)
        v.mul_(1 - (1 - beta2) * active).addcmul_(grad, grad, value=1 - beta2)
        t = step.clamp_min(1.0).double()  # per-vector bias corrections, on (.., r, 1)-sized tensors
        step_size = (lr / (1 - beta1 ** t)).to(p.dtype) * active
        bc2_sqrt = (1 - beta2 ** t).sqrt().to(p.dtype)
        denom = v.sqrt().div_(bc2_sqrt).add_(eps)
        p.sub_(m.div(denom).mul_(step_size))
