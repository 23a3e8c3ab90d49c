"""The switcher: what ``dl.attach`` hooks onto an optimizer.

After every ``optimizer.step()`` it (SwitchLoRA) counts down freezes, then switches
``r / interval(t)`` rows of each ``A`` and as many columns of each ``B`` to fresh
candidates, folding the difference into ``W`` so the function is unchanged; before
every step it zeroes the gradients of frozen vectors. Counts come from a CPU
generator (identical on every rank); positions and candidates are chosen on the
device by batched ops, with no host-device synchronisation. ReLoRA merges and
re-initialises instead; LoRA does nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..candidates import SIDE_A, SIDE_B, project_generator
from ..config import LoRA, ReLoRA, SwitchLoRA
from ..errors import StateError
from ..module import Adapter, DynLoRAModule, unwrap
from .optim import AdamW
from .schedule import expected_switches, relora_lr_multiplier

__all__ = ["Switcher", "attach"]

_BOOKKEEPING = ("a_index", "b_index", "a_frozen", "b_frozen", "a_ptr", "b_ptr")
_CHECK_EVERY = 50  # steps between reads of the non-finite-skip counter (the only sync)


def attach(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> Switcher:
    """Hook the method's runtime onto ``optimizer``: each ``optimizer.step()`` then also switches
    (SwitchLoRA) or merges and restarts (ReLoRA). ``module`` is what ``dl.transform`` returned,
    or a DDP / torch.compile wrapper of it."""
    return Switcher(unwrap(module), optimizer, total_steps)


class Switcher:
    def __init__(self, gm: DynLoRAModule, optimizer: torch.optim.Optimizer, total_steps: int):
        if getattr(optimizer, "_dynlora_switcher", None) is not None:
            raise StateError("dl.attach", "this optimizer already has a switcher attached",
                             "attach once per optimizer; keep the Switcher dl.attach returned")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise StateError("dl.attach total_steps", f"expected an int >= 1, got {total_steps!r}",
                             "pass the number of optimizer steps the run will take")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.adapters: list[Adapter] = gm.iter_adapters()
        missing = [a.target.weight for a in self.adapters if id(a.A) not in held or id(a.B) not in held]
        if missing:
            raise StateError("dl.attach", f"the optimizer does not hold the adapters of {missing[:3]}"
                             f"{' …' if len(missing) > 3 else ''}",
                             "build the optimizer over the transformed module's parameters: dl.AdamW(gm.parameters())")
        self.config = gm.config
        if isinstance(self.config, SwitchLoRA) and not isinstance(optimizer, AdamW):
            raise StateError("dl.attach", f"SwitchLoRA needs per-vector optimizer state, got {type(optimizer).__name__}",
                             "use dl.AdamW (a drop-in torch.optim.AdamW)")
        self.gm, self.optimizer, self.total_steps = gm, optimizer, total_steps
        self.step = 0  # optimizer steps taken under this switcher
        self.seed = self.config.seed
        device = self.adapters[0].A.device
        self._counts_gen = project_generator(self.seed, 0xC0117)
        self._device_gen = torch.Generator(device=device)
        self._device_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=project_generator(self.seed, 0xDE1))))
        self._switched = torch.zeros(2, dtype=torch.long, device=device)  # rows of A, columns of B
        self._skipped = torch.zeros((), dtype=torch.long, device=device)  # switches skipped on NaN/Inf
        self._warned = False
        self._relora_round = 0
        self._saved_lr: list[Any] = []
        if isinstance(self.config, SwitchLoRA):
            for ad in self.adapters:
                optimizer.register_vectors(ad.A, -2, lambda ad=ad: ad.a_frozen)
                optimizer.register_vectors(ad.B, -1, lambda ad=ad: ad.b_frozen)
            if self.config.candidates == "stored":
                self._store_candidates()
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        optimizer._dynlora_switcher = self

    # -- hooks -----------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if isinstance(self.config, SwitchLoRA):
            with torch.no_grad():
                for ad in self.adapters:  # frozen vectors get zero gradient
                    if ad.A.grad is not None:
                        ad.A.grad.mul_((ad.a_frozen == 0).unsqueeze(-1))
                    if ad.B.grad is not None:
                        ad.B.grad.mul_((ad.b_frozen == 0).unsqueeze(-2))
        elif isinstance(self.config, ReLoRA):
            mult = relora_lr_multiplier(self.step, self.config.reset_every, self.config.warmup)
            self._saved_lr = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * mult

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if isinstance(self.config, SwitchLoRA):
            self._switch_all()
        elif isinstance(self.config, ReLoRA):
            for g, lr in zip(optimizer.param_groups, self._saved_lr):
                g["lr"] = lr
            if (self.step + 1) % self.config.reset_every == 0:
                self._relora_reset()
        self.step += 1
        if self.step % _CHECK_EVERY == 0:
            self._warn_skips()

    # -- SwitchLoRA --------------------------------------------------------------------
    def switch_counts(self, step: int) -> list[int]:
        """How many vectors per side each adapter switches at ``step`` (consumes the count generator)."""
        u = torch.rand(len(self.adapters), generator=self._counts_gen, dtype=torch.float64).tolist()
        cfg = self.config
        out = []
        for ad, draw in zip(self.adapters, u):
            e = expected_switches(step, self.total_steps, ad.target.rank, cfg.interval, cfg.decay_ratio)
            out.append(min(ad.target.rank, int(e) + (draw < e - int(e))))  # stochastic rounding
        return out

    @torch.no_grad()
    def _switch_all(self) -> None:
        counts = self.switch_counts(self.step)
        for ad, k in zip(self.adapters, counts):
            ad.a_frozen.sub_(1).clamp_(min=0)
            ad.b_frozen.sub_(1).clamp_(min=0)
            if k == 0:
                continue
            ok = torch.isfinite(ad.A).all() & torch.isfinite(ad.B).all()
            for p in (ad.A, ad.B):
                if p.grad is not None:
                    ok &= torch.isfinite(p.grad).all()
            weight = self.gm.model.get_parameter(ad.target.weight)
            self._switch_side(ad, weight, SIDE_A, k, ok)
            self._switch_side(ad, weight, SIDE_B, k, ok)

    def _switch_side(self, ad: Adapter, weight: torch.Tensor, side: int, k: int, ok: torch.Tensor) -> None:
        t = ad.target
        r, rows, cols = t.rank, t.rows, t.cols
        E = math.prod(t.batch)
        A, B = ad.A.view(E, r, cols), ad.B.view(E, rows, r)
        W = weight.view(E, rows, cols)
        if side == SIDE_A:
            frozen, ptr, index = ad.a_frozen.view(E, r), ad.a_ptr.view(E), ad.a_index.view(E, r)
            partner_frozen, partner = ad.b_frozen.view(E, r), ad.B
        else:
            frozen, ptr, index = ad.b_frozen.view(E, r), ad.b_ptr.view(E), ad.b_index.view(E, r)
            partner_frozen, partner = ad.a_frozen.view(E, r), ad.A
        dev = A.device
        # slots: the next k non-frozen ones in round-robin order from the pointer
        order = (torch.arange(r, device=dev) - ptr.unsqueeze(1)) % r
        key = order + r * (frozen > 0)
        pos = key.topk(k, dim=1, largest=False).indices  # (E, k)
        valid = key.gather(1, pos) < r
        # candidates: k distinct ones not in use, uniformly at random
        draw = torch.rand(E, ad.num_candidates, generator=self._device_gen, device=dev)
        draw.scatter_(1, index, 2.0)
        cand = draw.topk(k, dim=1, largest=False).indices
        valid &= (draw.gather(1, cand) < 2.0) & ok
        new = ad.candidates(side, cand.view(*t.batch, k)).view(E, k, -1)  # (E, k, len)
        s = ad.scale
        # invalid slots (frozen-out, no candidate left, or a non-finite adapter) contribute exact
        # zeros to W: masked with where(), since NaN * 0 would still be NaN
        row_ok, col_ok = valid.unsqueeze(-1), valid.unsqueeze(1)
        if side == SIDE_A:  # W += s · B[:, i] ⊗ (A[i] − c);  A[i] = c
            a_idx = pos.unsqueeze(-1).expand(E, k, cols)
            old = A.gather(1, a_idx)
            b_cols = torch.where(col_ok, B.gather(2, pos.unsqueeze(1).expand(E, rows, k)), 0)
            W.add_(s * torch.bmm(b_cols, torch.where(row_ok, old - new, 0)).to(W.dtype))
            A.scatter_(1, a_idx, torch.where(row_ok, new, old))
        else:  # W += s · (B[:, j] − d) ⊗ A[j];  B[:, j] = d
            b_idx = pos.unsqueeze(1).expand(E, rows, k)
            old = B.gather(2, b_idx)
            a_rows = torch.where(row_ok, A.gather(1, pos.unsqueeze(-1).expand(E, k, cols)), 0)
            W.add_(s * torch.bmm(torch.where(col_ok, old - new.transpose(1, 2), 0), a_rows).to(W.dtype))
            B.scatter_(2, b_idx, torch.where(col_ok, new.transpose(1, 2), old))
        index.scatter_(1, pos, torch.where(valid, cand, index.gather(1, pos)))
        fs = torch.full_like(pos, self.config.freeze_steps, dtype=partner_frozen.dtype)
        partner_frozen.scatter_(1, pos, torch.where(valid, fs, partner_frozen.gather(1, pos)))
        if self.config.reset_vector_state:
            self.optimizer.reset_vectors(partner, pos, valid)
        last = torch.where(valid, order.gather(1, pos), -1).amax(dim=1)
        ptr.copy_(torch.where(last >= 0, (ptr + last + 1) % r, ptr))
        self._switched[side] += valid.sum()
        self._skipped += (~ok).to(torch.long) * k

    def _store_candidates(self) -> None:
        for ad in self.adapters:
            K, batch = ad.num_candidates, ad.target.batch
            every = torch.arange(K, device=ad.A.device).expand(*batch, K)
            ad.register_buffer("stored_a", ad.generate_candidates(SIDE_A, every), persistent=False)
            ad.register_buffer("stored_b", ad.generate_candidates(SIDE_B, every), persistent=False)

    # -- ReLoRA ------------------------------------------------------------------------
    @torch.no_grad()
    def _relora_reset(self) -> None:
        self._relora_round += 1
        for ad in self.adapters:
            weight = self.gm.model.get_parameter(ad.target.weight)
            weight.add_(ad.delta().to(weight.dtype))
            ad.reset_parameters(self.seed, self.config.init, round_=self._relora_round)
            for p in (ad.A, ad.B):
                for key in ("exp_avg", "exp_avg_sq"):
                    buf = self.optimizer.state.get(p, {}).get(key)
                    if buf is not None and self.config.prune_ratio > 0:
                        mag = buf.abs().flatten()
                        keep = max(0, int(round(mag.numel() * (1 - self.config.prune_ratio))))
                        thresh = mag.kthvalue(mag.numel() - keep).values if keep else mag.max() + 1
                        buf.mul_(buf.abs() >= thresh) if keep else buf.zero_()

    # -- reporting, state ------------------------------------------------------------------
    def num_switched(self) -> tuple[int, int]:
        """(rows of A, columns of B) switched so far (reads the device: not for the hot path)."""
        a, b = self._switched.tolist()
        return a, b

    def _warn_skips(self) -> None:
        if not self._warned and int(self._skipped) > 0:
            self._warned = True
            warnings.warn(f"dynlora: {int(self._skipped)} switches were skipped because an adapter or its gradient "
                          "held NaN/Inf; W absorbed none of them. Lower the learning rate or clip gradients.",
                          RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        self._warn_skips()
        return {
            "version": 1, "method": self.config.method, "step": self.step, "seed": self.seed,
            "total_steps": self.total_steps, "relora_round": self._relora_round,
            "counts_generator": self._counts_gen.get_state(), "device_generator": self._device_gen.get_state(),
            "switched": self._switched.clone(), "skipped": self._skipped.clone(),
            "adapters": {ad.target.weight: {k: getattr(ad, k).clone() for k in _BOOKKEEPING} for ad in self.adapters},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"version", "method", "step", "seed", "total_steps", "relora_round", "counts_generator",
                    "device_generator", "switched", "skipped", "adapters"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise StateError("Switcher.load_state_dict", f"not a switcher state (keys {got})",
                             "pass what Switcher.state_dict() returned")
        if state["method"] != self.config.method:
            raise StateError("Switcher.load_state_dict", f"state is for {state['method']}, this run uses "
                             f"{self.config.method}", "resume with the same method")
        mine = {ad.target.weight: ad for ad in self.adapters}
        if set(state["adapters"]) != set(mine):
            diff = sorted(set(state["adapters"]) ^ set(mine))[:3]
            raise StateError("Switcher.load_state_dict", f"adapters differ from this model's (e.g. {diff})",
                             "load the state into the same model, transformed with the same targets and rank")
        for name, entry in state["adapters"].items():
            for key in _BOOKKEEPING:
                if key not in entry or entry[key].shape != getattr(mine[name], key).shape:
                    raise StateError(f"Switcher.load_state_dict adapters[{name!r}]", f"{key} is missing or misshapen",
                                     "pass an unmodified Switcher.state_dict() for this model")
        self.step, self.seed, self.total_steps = state["step"], state["seed"], state["total_steps"]
        self._relora_round = state["relora_round"]
        self._counts_gen.set_state(state["counts_generator"])
        self._device_gen.set_state(state["device_generator"])
        self._switched.copy_(state["switched"])
        self._skipped.copy_(state["skipped"])
        for name, entry in state["adapters"].items():
            ad = mine[name]
            ad.seed = self.seed  # candidates are a function of the run's seed
            for key in _BOOKKEEPING:
                getattr(ad, key).copy_(entry[key])
        if isinstance(self.config, SwitchLoRA) and self.config.candidates == "stored":
            self._store_candidates()

    def detach(self) -> None:
        """Remove the hooks: the optimizer steps like a plain one again."""
        for h in self._hooks:
            h.remove()
        self.optimizer._dynlora_switcher = None
