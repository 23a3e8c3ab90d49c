"""A small, explicit training loop shared by the CLI, the main job and the benchmarks.

Cosine learning rate with linear warm-up, gradient clipping, and the method's runtime
attached through ``dl.attach`` — the two lines a user adds to their own loop.

Data parallel (``Trainer(..., rank=r, world=n)`` under an initialised process group, the
module wrapped in DDP or sharded with ``dl.fully_shard``): every rank is handed the same
*global* batch and trains on its own equal slice of it (rows ``r·B/n .. (r+1)·B/n`` of every
tensor whose leading dimension is the batch's), so the averaged gradient is the global
batch's. Reported losses are averaged over the ranks and items (tokens/samples) summed:
the numbers a single process training on the whole batch reports.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from .adapter import Adapter
from .config import AdapterConfig
from .errors import ConfigError
from .runtime import attach
from .runtime.handlers import optimizer_class
from .runtime.precision import RESIDUAL

__all__ = ["TrainSettings", "PRECISIONS", "cast_model", "cast_inputs", "autocast", "cosine_multiplier", "make_optimizer", "Trainer",
           "default_model_inputs", "batch_slice", "mean_over_ranks"]


@dataclass(frozen=True)
class TrainSettings:
    steps: int  # optimizer steps
    lr: float = 3e-3  # peak learning rate of the matrices (adapters, or W for full-rank)
    lr_other: float | None = None  # peak LR of everything trained full-rank in every method (embeddings, norms, head); None = lr
    warmup: int = 20  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping; 0 disables
    precision: str = "fp32"  # one of PRECISIONS: "bf16-autocast" runs forward under torch.autocast(bfloat16)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError("TrainSettings.precision", f"got {self.precision!r}", f"use one of {PRECISIONS}")


# fp32: everything fp32. bf16-autocast (recommended for low precision): fp32 parameters and optimizer
# state, bf16 compute under torch.autocast. bf16: the model's parameters are cast to bf16
# (cast_model); adapted weights keep an exact fp32 master (runtime/precision.py).
PRECISIONS = ("fp32", "bf16-autocast", "bf16")


def cast_model(model: nn.Module, precision: str) -> nn.Module:
    """``model`` (in place) in the parameter dtype ``precision`` asks for."""
    return model.to(torch.bfloat16) if precision == "bf16" else model


def cast_inputs(inputs: Any, precision: str) -> Any:
    """``inputs`` (any nesting) with floating-point tensors in bf16 for ``precision="bf16"``: a bf16 model
    takes bf16 activations; token ids, masks and everything under other precisions stay as they are."""
    if precision != "bf16":
        return inputs
    return tree_map(lambda t: t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    inputs)


def autocast(module: nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on the module's device (a no-op for fp32 and bf16)."""
    if precision != "bf16-autocast":
        return contextlib.nullcontext()
    device = next(module.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cosine_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _matrix_ids(module: nn.Module, adapted: bool) -> set[int]:
    """Parameters the method is about: adapter factors, or (full-rank) every parameter of >= 2
    dims that is not an embedding table (tied heads included, as the pass skips those too)."""
    if adapted:
        return {id(p) for m in module.modules() if isinstance(m, Adapter) for p in (m.A, m.B)}
    tables = {id(m.weight) for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    return {id(p) for p in module.parameters() if p.dim() >= 2 and id(p) not in tables}


def make_optimizer(module: nn.Module, config: AdapterConfig | None, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with two groups: the matrices the method is about (adapters, or every non-embedding
    matrix for full-rank) at ``lr``, everything else trained at ``lr_other``."""
    chosen = _matrix_ids(module, config is not None)
    matrices, others = [], []
    for p in module.parameters():
        if p.requires_grad:
            (matrices if id(p) in chosen else others).append(p)
    groups = [{"params": matrices, "lr": settings.lr},
              {"params": others, "lr": settings.lr if settings.lr_other is None else settings.lr_other}]
    groups = [g for g in groups if g["params"]]
    return optimizer_class(config)(groups, weight_decay=settings.weight_decay, betas=(0.9, 0.95))


def _batch_size(batch: Any) -> int | None:
    """The leading dimension of the batch's first tensor of >= 1 dims (None: no such tensor)."""
    first = next((t for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() >= 1), None)
    return None if first is None else first.shape[0]


def batch_slice(batch: Any, rank: int, world: int, what: str = "batches()") -> Any:
    """Rank ``rank``'s equal share of a global ``batch``: rows ``rank·B/world .. (rank+1)·B/world`` of
    every tensor whose leading dimension is the batch size ``B`` (that of its first tensor of >= 1
    dims); other leaves as they are. ``B`` must divide by ``world``: equal slices are what makes the
    ranks' averaged gradient the global batch's."""
    if world == 1:
        return batch
    n = _batch_size(batch)
    if n is None:
        raise ConfigError(what, "a batch holds no tensor with a batch dimension to split over the ranks",
                          "yield batches of tensors whose first dimension is the batch (e.g. (x, y))")
    if n % world:
        raise ConfigError(what, f"a batch has {n} rows, which do not split evenly over {world} ranks",
                          f"yield batches whose size is a multiple of {world} (every rank trains on an equal slice "
                          "of each global batch)")
    per = n // world
    lo, hi = rank * per, (rank + 1) * per
    return tree_map(lambda t: t[lo:hi] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n else t,
                    batch)


def mean_over_ranks(value: float, world: int) -> float:
    """``value`` averaged over the ranks of the default process group (itself when ``world`` is 1)."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def _check_same_batch(batch: Any, world: int, what: str) -> None:
    """Every rank must be handed the same global batch (each trains on its own slice of it)."""
    import torch.distributed as dist

    tensors = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
    # position-weighted sums: a permutation or a different draw changes them
    f = torch.zeros(2, dtype=torch.float64)
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64)
        f[0] += flat.sum()
        f[1] += (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(97)).sum()
    lo, hi = f.clone(), f.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise ConfigError(what, "the ranks were handed different batches",
                          "make it yield the same sequence of global batches on every rank (seed its generator; "
                          "do not split by rank yourself: each rank takes its own slice)")


def default_model_inputs(batch: Any) -> tuple:
    """Model inputs of a batch: its first element for a (inputs, targets) tuple, else the batch.
    A user's ``model_inputs`` may return a tuple (positional) or a dict (keyword inputs)."""
    if isinstance(batch, (tuple, list)):
        return (batch[0],)
    return (batch,)


@dataclass
class Trainer:
    """Owns optimizer, LR schedule and (for adapter methods) the switcher of one run."""

    module: nn.Module  # what is called in the loop (possibly compiled)
    config: AdapterConfig | None  # None: full-rank baseline
    settings: TrainSettings
    loss_fn: Callable[[Any, Any], torch.Tensor]
    model_inputs: Callable[[Any], tuple | dict] = default_model_inputs
    optimizer: torch.optim.Optimizer | None = None  # None: make_optimizer's AdamW over the module
    step: int = 0
    losses: list[float] = field(default_factory=list)  # of the global batch (averaged over ranks)
    rank: int = 0  # data parallel: this process's rank and the number of ranks (see the module doc)
    world: int = 1

    def __post_init__(self) -> None:
        s = self.settings
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.module, self.config, s)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: cosine_multiplier(t, s.steps, s.warmup, s.min_lr_ratio))
        self.switcher = attach(self.module, self.optimizer, s.steps) if self.config is not None else None
        self.tokens = 0  # items seen, in ``unit``: tokens for integer (token id) inputs, else samples
        self.unit = "tok"
        self.seconds = 0.0
        self._checked = False

    def _local(self, batch: Any, what: str) -> Any:
        """This rank's slice of a global batch (the batch itself on one rank)."""
        if self.world == 1:
            return batch
        if not self._checked:  # once per run (and after a resume): every rank has the same batches
            _check_same_batch(batch, self.world, what)
            self._checked = True
        return batch_slice(batch, self.rank, self.world, what)

    def train_step(self, batch: Any) -> float:
        """One optimizer step on ``batch`` (the global batch; each rank trains on its slice); the loss."""
        t0 = time.perf_counter()
        self.module.train()
        batch = self._local(batch, "batches()")
        inputs = cast_inputs(self.model_inputs(batch), self.settings.precision)
        with autocast(self.module, self.settings.precision):
            out = self.module(**inputs) if isinstance(inputs, dict) else self.module(*inputs)
            loss = self.loss_fn(out, batch)
        loss.backward()
        if self.settings.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        value = mean_over_ranks(loss.item(), self.world)
        self.losses.append(value)
        self.seconds += time.perf_counter() - t0
        first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        self.unit, items = _items(first)
        self.tokens += items * self.world  # equal slices: the global batch's items
        return value

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> float:
        self.module.eval()
        total, n = 0.0, 0
        for batch in batches:
            batch = batch_slice(batch, self.rank, self.world, "val_batches()")
            inputs = cast_inputs(self.model_inputs(batch), self.settings.precision)
            with autocast(self.module, self.settings.precision):
                out = self.module(**inputs) if isinstance(inputs, dict) else self.module(*inputs)
                total += self.loss_fn(out, batch).item()
            n += 1
        self.module.train()
        return mean_over_ranks(total / max(1, n), self.world)

    def state_dict(self) -> dict[str, Any]:
        """Loop, optimizer and schedule state. The switcher's is in the module's ``state_dict()``
        (save both: ``module.state_dict()`` and this)."""
        return {"step": self.step, "losses": list(self.losses), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.losses = state["step"], list(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _items(first_input: Any) -> tuple[str, int]:
    """What a batch counts as: its tokens when its first input holds token ids (integers), else
    its samples (the leading dim of an image or feature batch)."""
    if not isinstance(first_input, torch.Tensor):
        return "samples", 1
    if not first_input.is_floating_point():
        return "tok", first_input.numel()
    return "samples", first_input.shape[0] if first_input.dim() else 1


def skip(batches: Iterator[Any], n: int) -> Iterator[Any]:
    """Advance a batch iterator by ``n`` (resume lands on the batch it would have seen)."""
    for _ in range(n):
        next(batches)
    return batches


def stored_candidate_bytes(module: nn.Module) -> int:
    """Bytes of the candidate tables a ``candidates="stored"`` switcher keeps on the adapters."""
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers()
               if name.rsplit(".", 1)[-1] in ("stored_a", "stored_b"))


def training_state_bytes(module: nn.Module, optimizer_slots: int = 2) -> int:
    """Bytes of parameters + gradients + AdamW moments (+ stored candidates) for training ``module``
    as it stands: frozen parameters cost their storage only."""
    total = stored_candidate_bytes(module)
    total += sum(b.numel() * b.element_size() for name, b in module.named_buffers()  # bf16 W's fp32 low halves
                 if name.rsplit(".", 1)[-1] == RESIDUAL)
    for p in module.parameters():  # tied parameters come once
        nbytes = p.numel() * p.element_size()
        total += nbytes * (2 + optimizer_slots) if p.requires_grad else nbytes
    from .module import DynLoRAModule

    if isinstance(module, DynLoRAModule) and module.dynlora_config.switching:  # dl.AdamW's per-vector steps
        total += sum(2 * (ad.A.numel() // ad.target.cols) * 4 for ad in module.iter_adapters())
    return total


def full_rank_state_bytes(model: nn.Module, optimizer_slots: int = 2) -> int:
    """The same for training every parameter of ``model`` full-rank."""
    return sum(p.numel() * p.element_size() * (2 + optimizer_slots) for p in model.parameters())
