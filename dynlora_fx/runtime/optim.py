"""``dl.AdamW``: torch.optim.AdamW with a step counter per vector for adapter factors.

Adapter factors are registered in :class:`VectorGroup` s — same-shape parameters kept as
views of one stacked tensor — and their ``exp_avg``, ``exp_avg_sq`` and per-vector
``step`` are stacked the same way, so one group's update is a dozen tensor ops however
many adapters it holds. A vector whose state is reset restarts its bias correction alone;
a frozen vector is not updated at all (not by its moments, not by weight decay). Every
other parameter goes through the stock ``torch.optim.AdamW.step`` unchanged, so its
numbers are exactly torch's.

FSDP2-sharded factors (``dl.fully_shard``) are updated on each rank's local shards: FSDP owns
their storage, so a group stacks a working copy and writes it back; their state is exposed as
DTensors sharded like the parameters, so ``torch.distributed.checkpoint`` saves and loads it per
rank. Every parameter's state exists from construction (zeros, as torch would create it at the
first step), so a fresh optimizer's ``state_dict()`` is something a checkpoint can be loaded into.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from ..shards import is_sharded, local, shard_like

__all__ = ["AdamW", "VectorGroup"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def _stock_step(opt: torch.optim.AdamW) -> None:
    """torch's AdamW.step without its hook wrapper: torch wraps a class's ``step`` to run the
    step hooks once a first instance exists, and ours must not run twice per step."""
    step = torch.optim.AdamW.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    step(opt)


class VectorGroup:
    """Same-shape parameters whose vectors — rows (``dim=-2``) or columns (``dim=-1``) of the
    last two dims — are trained and switched one by one, stored as views of one stacked tensor
    (for sharded parameters: of this rank's shards, stacked as a working copy that
    :meth:`commit` writes back).

    ``frozen()`` returns every vector's frozen steps left, shape ``(N, r)`` for the ``N``
    matrices of :meth:`flat` (leading batch dims folded) and ``r`` (local) vectors each."""

    def __init__(self, params: Sequence[torch.Tensor], dim: int, frozen: Callable[[], torch.Tensor]):
        params = list(params)
        if not params or dim not in (-2, -1) or params[0].dim() < 2:
            raise ConfigError("VectorGroup", "needs one or more matrices (or batches of matrices) and dim -2 or -1",
                              "pass the adapter factors A (dim=-2) or B (dim=-1)")
        first = params[0]
        if any(p.shape != first.shape or p.dtype != first.dtype or p.device != first.device for p in params):
            raise ConfigError("VectorGroup", "parameters differ in shape, dtype or device",
                              "group only same-shape factors")
        self.params, self.dim, self.frozen = params, dim, frozen
        self.sharded = is_sharded(first)
        self._flat: torch.Tensor | None = None
        self._ptrs: list[int] = []
        self.flat()

    def flat(self) -> torch.Tensor:
        """All parameters as one ``(N, rows, cols)`` tensor whose slices they are views of.
        Re-stacked (values kept) if something gave a parameter new storage (``.to()``,
        ``load_state_dict(assign=True)``). Sharded parameters: a fresh stack of the local shards,
        whose changes :meth:`commit` writes back."""
        if self.sharded:
            shards = torch.stack([local(p).detach() for p in self.params])
            self._flat = shards.view(math.prod(shards.shape[:-2]), *shards.shape[-2:])  # a shard may be empty
            return self._flat
        if self._flat is None or any(p.data_ptr() != ptr for p, ptr in zip(self.params, self._ptrs)):
            stacked = torch.stack([p.detach() for p in self.params])
            for p, view in zip(self.params, stacked):
                p.data = view
            self._flat = stacked.view(-1, *stacked.shape[-2:])
            self._ptrs = [p.data_ptr() for p in self.params]
        return self._flat

    def commit(self) -> None:
        """Write changes made to :meth:`flat` back to sharded parameters (unsharded ones are views)."""
        if self.sharded:
            for p, part in zip(self.params, self._flat.view(len(self.params), *local(self.params[0]).shape)):
                local(p).copy_(part)

    def vector_shape(self) -> tuple[int, ...]:
        """Shape of a per-vector quantity broadcast against :meth:`flat`."""
        n, rows, cols = self.flat().shape
        return (n, rows, 1) if self.dim == -2 else (n, 1, cols)


class AdamW(torch.optim.AdamW):
    """Drop-in ``torch.optim.AdamW``; the switcher registers adapter factors with
    :meth:`register_vectors` when it is attached."""

    def __init__(self, params: Any, *args: Any, **kwargs: Any):
        super().__init__(params, *args, **kwargs)
        self._groups: list[VectorGroup] = []
        self._flat_state: dict[int, dict[str, torch.Tensor]] = {}  # id(group) -> stacked moments and steps
        self._grouped: set[int] = set()  # ids of registered parameters
        self._init_state()

    @torch.no_grad()
    def _init_state(self) -> None:
        """The state torch's AdamW creates at a parameter's first step, created now: zeros (and the
        same numbers after the first step), but present for a checkpoint to be loaded into."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or self.state.get(p):
                    continue
                on_device = group["capturable"] or group["fused"]
                state = {"step": torch.zeros((), dtype=torch.float32 if group["fused"] else scalar, device=p.device)
                         if on_device else torch.tensor(0.0, dtype=scalar),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p] = state

    def register_vectors(self, group: VectorGroup) -> None:
        """Give ``group``'s parameters per-vector state. They must share one param group;
        state they already have (attached after some steps) is carried over."""
        index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        where = {index.get(id(p)) for p in group.params}
        if None in where:
            raise ConfigError("dl.AdamW", "a parameter to register is not in any param group",
                              "build the optimizer over gm.parameters()")
        if len(where) > 1:
            raise ConfigError("dl.AdamW", "one vector group spans several param groups",
                              "register each param group's factors separately")
        pg = self.param_groups[where.pop()]
        if pg["amsgrad"] or pg["maximize"] or pg.get("fused") or pg.get("capturable"):
            raise ConfigError("dl.AdamW", "amsgrad, maximize, fused and capturable are not supported for "
                              "adapter factors", "construct dl.AdamW without those options")
        self._groups.append(group)
        self._grouped.update(id(p) for p in group.params)
        self._flat_state[id(group)] = self._stack_state(group)

    def _stack_state(self, group: VectorGroup) -> dict[str, torch.Tensor]:
        """Stacked zero state, filled from any per-parameter state the parameters already have;
        each parameter's ``self.state`` entries become views of it."""
        flat = group.flat()
        stacked = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat),
                   "step": torch.zeros(group.vector_shape(), dtype=torch.float32, device=flat.device)}
        per = len(flat) // len(group.params)
        for i, p in enumerate(group.params):
            old, rows = self.state.get(p, {}), slice(i * per, (i + 1) * per)
            for key in _MOMENTS:
                if key in old:  # a tensor-wide step broadcasts to every vector
                    dest, value = stacked[key][rows], local(old[key])
                    dest.copy_(value.reshape(dest.shape) if value.numel() > 1 else value)
            # sharded: DTensors over the stacked shards; a column's step (dim=-1) is the same on every rank
            self.state[p] = {key: shard_like(stacked[key][rows].view(self._state_shape(local(p), key, group.dim)), p,
                                             replicate=key == "step" and group.dim == -1) for key in _MOMENTS}
        return stacked

    @staticmethod
    def _state_shape(p: torch.Tensor, key: str, dim: int) -> tuple[int, ...]:
        if key != "step":
            return tuple(p.shape)
        shape = list(p.shape)
        shape[-1 if dim == -2 else -2] = 1
        return tuple(shape)

    def vector_state(self, target: torch.Tensor | VectorGroup) -> dict[str, torch.Tensor]:
        """``exp_avg``, ``exp_avg_sq``, ``step`` of a registered parameter (views), or of a whole
        group (stacked like :meth:`VectorGroup.flat`; ``step`` one entry per vector)."""
        if isinstance(target, VectorGroup):
            return self._flat_state[id(target)]
        return self.state[target]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self._groups:  # loaded tensors replace the views: stack them again
            self._flat_state[id(group)] = self._stack_state(group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._groups:
            _stock_step(self)
            return loss
        saved = [g["params"] for g in self.param_groups]
        try:  # stock AdamW for everything that is not an adapter factor
            for g in self.param_groups:
                g["params"] = [p for p in g["params"] if id(p) not in self._grouped]
            _stock_step(self)
        finally:
            for g, params in zip(self.param_groups, saved):
                g["params"] = params
        owner = {id(p): g for g in self.param_groups for p in g["params"]}
        for group in self._groups:
            self._group_update(group, owner[id(group.params[0])])
        return loss

    def _group_update(self, group: VectorGroup, hp: dict[str, Any]) -> None:
        """AdamW with per-vector step counts over a whole group, in place. A frozen vector (or a
        parameter without gradient) gets a zero ``active`` weight: moments, step and value stay put."""
        grads = [None if p.grad is None else local(p.grad) for p in group.params]
        if all(g is None for g in grads):
            return
        flat = group.flat()
        state = self._flat_state[id(group)]
        if state["exp_avg"].device != flat.device or state["exp_avg"].dtype != flat.dtype:  # moved after attaching
            state = self._flat_state[id(group)] = self._stack_state(group)
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = hp["betas"]
        lr, eps, wd = hp["lr"], hp["eps"], hp["weight_decay"]
        active = (group.frozen() == 0).view(step.shape).to(flat.dtype)
        if any(g is None for g in grads):
            present = torch.tensor([g is not None for g in grads], device=flat.device)
            active *= present.repeat_interleave(len(flat) // len(grads)).view(-1, 1, 1)
            grads = [torch.zeros_like(local(p)) if g is None else g for p, g in zip(group.params, grads)]
        grad = torch.stack(grads).view_as(flat).mul_(active)  # frozen vectors see zero
        step.add_(active)
        if wd:
            flat.mul_(1 - lr * wd * active)
        m.lerp_(grad, (1 - beta1) * active)
        v.mul_(1 - (1 - beta2) * active).addcmul_(grad, grad, value=1 - beta2)
        t = step.clamp_min(1.0).double()  # per-vector bias corrections, on (N, r, 1)-sized tensors
        step_size = (lr / (1 - beta1 ** t)).to(flat.dtype).mul_(active)
        bc2_sqrt = (1 - beta2 ** t).sqrt().to(flat.dtype)
        denom = torch.sqrt(v, out=grad).div_(bc2_sqrt).add_(eps)  # the gradient's buffer is free again
        flat.addcmul_(torch.div(m, denom, out=denom), step_size, value=-1)
        group.commit()
