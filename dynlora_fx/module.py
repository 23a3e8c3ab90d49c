"""The transformed module: shared state plus one graph per mode, and its adapters.

``DynLoRAModule`` owns three state trees — ``model`` (the copy of the user's model,
base weights frozen where adapted), ``adapters`` (``A``, ``B``, ``scale`` and the
in-use candidate indices for every adapted weight, nested under the weight's own
qualified name) and ``constants`` — and runs the train or eval graph by
``self.training``. The graphs are not registered submodules: state lives once, so
``.to()``, ``state_dict()`` and ``load_state_dict()`` see every tensor exactly once.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .candidates import SIDE_A, SIDE_B, base_keys, candidate_keys, candidate_vectors, lora_a_bound, \
    project_generator, switchlora_stds
from .capture import graph_module
from .config import AdapterConfig
from .errors import StateError
from .passes.find_targets import Target, TargetPlan

__all__ = ["Adapter", "AdapterInfo", "DynLoRAModule", "adapters", "unwrap"]

_SHARED = ("model", "adapters", "constants")


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
        self.target, self.uid, self.seed = target, uid, config.seed
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
        if init == "switchlora":  # A's rows and B's columns are candidates
            self.A.copy_(self.generate_candidates(SIDE_A, self.a_index))
            self.B.copy_(self.generate_candidates(SIDE_B, self.b_index).transpose(-1, -2))
        else:  # LoRA: Kaiming-uniform A (as nn.Linear would), zero B
            bound = lora_a_bound(t.cols)
            self.A.copy_((torch.rand(self.A.shape, generator=gen) * 2 - 1) * bound)
            self.B.zero_()

    def base_keys(self) -> torch.Tensor:
        """Per-expert key prefix ``(E,)`` of this adapter's candidates under its current seed."""
        experts = torch.arange(math.prod(self.target.batch), device=self.A.device)
        return base_keys(self.seed, self.uid, experts, device=self.A.device)

    def generate_candidates(self, side: int, index: torch.Tensor) -> torch.Tensor:
        """Candidate vectors ``(*index.shape, length)`` for ``index`` (shape ``(*batch, k)``),
        regenerated from the seed (a stored table, when the switcher keeps one, holds the same)."""
        base = self.base_keys().view(*self.target.batch, *([1] * (index.dim() - len(self.target.batch))))
        keys = candidate_keys(base, side, index)
        length = self.target.cols if side == SIDE_A else self.target.rows
        bound = self.bound_a if side == SIDE_A else self.bound_b
        return candidate_vectors(keys, length, bound, dtype=self.A.dtype)

    def delta(self) -> torch.Tensor:
        """``s · B @ A`` in the weight's own shape."""
        return (self.scale * (self.B @ self.A)).reshape(self.target.shape)

    def extra_repr(self) -> str:
        t = self.target
        return f"weight={t.weight}, shape={t.shape}, rank={t.rank}, form={t.form}, op={t.op}"


class DynLoRAModule(nn.Module):
    """What ``dl.transform`` returns: the user's model with low-rank adapters, as FX graphs."""

    def __init__(self, model: nn.Module, constants: nn.Module, graphs: dict[str, fx.GraphModule],
                 capture_method: str, config: AdapterConfig, plan: TargetPlan):
        super().__init__()
        self.model = model
        self.adapters = nn.Module()
        self.constants = constants
        self._graphs = graphs  # plain dict on purpose: graphs hold no state of their own
        self.capture_method = capture_method
        self.config = config
        self.plan = plan
        for gm in self._unique_graphs():
            gm.add_module("adapters", self.adapters)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._graphs["train" if self.training else "eval"](*args, **kwargs)

    def graph_module(self, mode: str = "train") -> fx.GraphModule:
        """The FX graph module run in ``mode`` ("train" or "eval")."""
        return self._graphs[mode]

    def _unique_graphs(self) -> list[fx.GraphModule]:
        return list({id(g): g for g in self._graphs.values()}.values())

    def adapter(self, weight: str) -> Adapter:
        return self.adapters.get_submodule(weight)

    def iter_adapters(self) -> list[Adapter]:
        return [m for m in self.adapters.modules() if isinstance(m, Adapter)]

    def __deepcopy__(self, memo: dict[int, Any]) -> DynLoRAModule:
        # fx's own GraphModule deepcopy re-creates attribute paths, which would split the
        # shared state; copy the state once and rebuild the graph modules around it.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "_graphs"}, memo))
        rebuilt: dict[int, fx.GraphModule] = {}
        new._graphs = {}
        for mode, gm in self._graphs.items():
            if id(gm) not in rebuilt:
                extra = {k: copy.deepcopy(m, memo) for k, m in gm._modules.items() if k not in _SHARED}
                shared = {k: getattr(new, k) for k in _SHARED}
                rebuilt[id(gm)] = graph_module(copy.deepcopy(gm.graph, memo), {**shared, **extra})
            new._graphs[mode] = rebuilt[id(gm)]
        return new

    def __repr__(self) -> str:
        n = len(self.iter_adapters())
        return (f"DynLoRAModule({type(self.model).__name__}, method={self.config.method}, adapters={n}, "
                f"capture={self.capture_method})")


def unwrap(module: nn.Module) -> DynLoRAModule:
    """The DynLoRAModule inside ``module`` (itself, a torch.compile wrapper, or DDP)."""
    seen = module
    for _ in range(4):
        if isinstance(seen, DynLoRAModule):
            return seen
        seen = getattr(seen, "_orig_mod", None) or getattr(seen, "module", None)
        if seen is None:
            break
    raise StateError(f"{type(module).__name__}", "this module was not produced by dl.transform",
                     "pass the module dl.transform returned (or a torch.compile / DDP wrapper of it)")


def adapters(module: nn.Module) -> list[AdapterInfo]:
    """One ``AdapterInfo`` per adapted weight of a transformed module, in graph order."""
    gm = unwrap(module)
    prefix = _prefix_of(module, gm)
    out = []
    for ad in gm.iter_adapters():
        t = ad.target
        out.append(AdapterInfo(t.weight, f"{prefix}adapters.{t.weight}.A", f"{prefix}adapters.{t.weight}.B",
                               t.shape, t.rank, t.op, t.form))
    return out


def _prefix_of(outer: nn.Module, inner: nn.Module) -> str:
    if outer is inner:
        return ""
    for name, m in outer.named_modules():
        if m is inner:
            return f"{name}." if name else ""
    return ""
