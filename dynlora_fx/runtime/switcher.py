"""The switcher: what ``dl.attach`` hooks onto an optimizer.

After every ``optimizer.step()`` it (SwitchLoRA) counts down freezes, then switches
``r / interval(t)`` rows of each ``A`` and as many columns of each ``B`` to fresh
candidates, folding the difference into ``W`` so the function is unchanged; frozen
vectors get no update (``dl.AdamW`` masks their gradients by the freeze counters).
Counts come from a CPU generator (identical on every rank); positions and candidates
are chosen on the device by batched ops, with no host-device synchronisation. ReLoRA
merges and re-initialises instead; LoRA does nothing.

The switcher's state lives in the module (``gm.switch_state`` buffers, next to each
adapter's bookkeeping buffers) and in ``dl.AdamW``'s state: whatever checkpoints the
module's and the optimizer's ``state_dict()`` resumes switching bit-identically.
A new switcher continues from the state the module holds.

On an FSDP2-sharded module (``dl.fully_shard``) each rank switches its own shards: ``W`` and
``B`` are split on the same rows, so a rank absorbs into its rows of ``W`` with its rows of
``B`` and generates only its rows of a new column of ``B``; the ``k`` selected rows of ``A``
(which another rank may hold) and the finiteness of ``B``'s selected columns are summed across
ranks in one all-reduce per bank and side. Every decision (counts, slots, candidates) comes
from generators that are identical on every rank, so ranks stay in step.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..candidates import SIDE_A, SIDE_B, candidate_keys, candidate_vectors
from ..config import ReLoRA, SwitchLoRA
from ..errors import StateError
from ..distributed import is_fully_sharded
from ..adapters import Adapter
from ..module import DynLoRAModule, SwitchState, device_seed, unwrap
from ..shards import gathered, is_sharded, local, local_range, sum_across
from .optim import AdamW, VectorGroup
from .precision import RESIDUAL, check_weight_dtype, master_dtype, residual_of, update_weight
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
        if not self.adapters:
            raise StateError("dl.attach", "the module has no adapters (was it merged?)",
                             "attach to the module dl.transform returned, before dl.merge")
        for ad in self.adapters:  # the module may have been cast since the transform
            check_weight_dtype(gm.model.get_parameter(ad.target.weight), ad.target.weight)
        missing = [a.target.weight for a in self.adapters if id(a.A) not in held or id(a.B) not in held]
        if missing:
            raise StateError("dl.attach", f"the optimizer does not hold the adapters of {missing[:3]}"
                             f"{' …' if len(missing) > 3 else ''}",
                             "build the optimizer over the transformed module's parameters: dl.AdamW(gm.parameters())"
                             + (", after dl.fully_shard (sharding replaces the parameters)" if is_fully_sharded(gm) else ""))
        self.config = gm.dynlora_config
        if isinstance(self.config, SwitchLoRA) and not isinstance(optimizer, AdamW):
            raise StateError("dl.attach", f"SwitchLoRA needs per-vector optimizer state, got {type(optimizer).__name__}",
                             "use dl.AdamW (a drop-in torch.optim.AdamW)")
        self.gm, self.optimizer, self.total_steps = gm, optimizer, total_steps
        self._counts_gen = torch.Generator()
        self._device_gen = torch.Generator(device=self.adapters[0].A.device)
        self._warned = False
        self._saved_lr: list[Any] = []
        gm.switch_state.pull()  # a switcher attached before hands over its live state
        # the module's state (fresh: step 0 and the config seed's generators; or what was loaded)
        self.step = self.seed = self._relora_round = 0  # set by _adopt
        self._adopt(gm.switch_state)
        self._cohorts: list[_Cohort] = []
        if isinstance(self.config, SwitchLoRA):
            self._cohorts = _make_cohorts(self.adapters, optimizer, self.config.candidates == "stored")
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        optimizer._dynlora_switcher = self
        gm.switch_state.bind(self)

    # -- hooks -----------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for cohort in self._cohorts:  # dl.AdamW reads the freeze counters during the step
            cohort.refresh()
        if isinstance(self.config, ReLoRA):
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
        for cohort in self._cohorts:
            cohort.a_frozen.sub_(1).clamp_(min=0)
            cohort.b_frozen.sub_(1).clamp_(min=0)
            ks = [counts[i] for i in cohort.positions]
            kmax = max(ks)
            if kmax == 0:
                continue
            k_per_row = _host_to_device(ks, cohort.device).repeat_interleave(cohort.experts)
            bank_ks = [ks[span] for span in cohort.spans]  # host ints: banks and Ws without a switch are skipped
            by_side = [self._switch_side(cohort, side, kmax, k_per_row, bank_ks) for side in (SIDE_A, SIDE_B)]
            for bank, counts_of, side_a, side_b in zip(cohort.banks, bank_ks, *by_side):
                if side_a is None:  # nothing to absorb: no switch in this bank, or W took it already
                    continue
                (left_a, right_a), (left_b, right_b) = side_a, side_b
                # W absorbs both sides in one rank-2k update per adapter: a single pass over each W
                weights = bank.weight_views(self.gm)
                dtype = master_dtype(weights[0][0].dtype)  # bf16 W absorbs into its exact fp32 master
                left = torch.cat([left_a, left_b], dim=2).to(dtype).mul_(bank.scale)
                right = torch.cat([right_a, right_b], dim=1).to(dtype)
                if bank.E == 1:  # addmm_ on a matrix is ~2x faster than baddbmm_ on a batch of one
                    update, lefts, rights = torch.Tensor.addmm_, left.unbind(0), right.unbind(0)
                else:
                    update, lefts, rights = torch.Tensor.baddbmm_, left.split(bank.E), right.split(bank.E)
                for (w, residual), lhs, rhs, k in zip(weights, lefts, rights, counts_of):
                    if k:
                        update_weight(w, residual, update, lhs, rhs)

    def _switch_side(self, cohort: _Cohort, side: int, kmax: int, k_per_row: torch.Tensor,
                     bank_ks: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Switch up to ``k`` vectors of ``side`` in every adapter of ``cohort``: slots and candidates
        are chosen for all its N matrices at once, vectors moved bank by bank (``bank_ks``: each bank's
        per-adapter counts; a bank with none is skipped). Returns per bank the factors (n, rows, k),
        (n, k, cols) whose product W must absorb (unscaled), or None where there is nothing to absorb."""
        r, N = cohort.r, cohort.N
        if side == SIDE_A:
            frozen, ptr, index, partner_frozen = cohort.a_frozen, cohort.a_ptr, cohort.a_index, cohort.b_frozen
        else:
            frozen, ptr, index, partner_frozen = cohort.b_frozen, cohort.b_ptr, cohort.b_index, cohort.a_frozen
        # slots: the next k non-frozen ones in round-robin order from each pointer
        order = (cohort.slots - ptr.unsqueeze(1)) % r
        key = order + r * (frozen > 0)
        pos = key.topk(kmax, dim=1, largest=False).indices  # (N, kmax)
        chosen = (key.gather(1, pos) < r) & (cohort.slots[:kmax] < k_per_row.unsqueeze(1))
        # candidates: k distinct ones not in use, uniformly at random
        draw = torch.rand(N, cohort.K, generator=self._device_gen, device=cohort.device)
        draw.scatter_(1, index, 2.0)
        cand = draw.topk(kmax, dim=1, largest=False).indices
        chosen &= draw.gather(1, cand) < 2.0
        generated = cohort.generate(side, cand)  # (N, kmax, longest vector), or None when stored
        factors, valid = [], []
        for bank, rows, counts_of in zip(cohort.banks, cohort.rows, bank_ks):
            if max(counts_of) == 0:  # chosen[rows] is all False: nothing of this bank moves
                factors.append(None)
                valid.append(chosen[rows])
                continue
            f, ok = self._move_vectors(bank, side, pos[rows], cand[rows], chosen[rows],
                                       None if generated is None else generated[rows])
            factors.append(f)
            valid.append(ok)
        valid = torch.cat(valid)
        state = self.gm.switch_state
        state.skipped += (chosen ^ valid).sum()
        index.scatter_(1, pos, torch.where(valid, cand, index.gather(1, pos)))
        partner_frozen.scatter_(1, pos, torch.where(valid, self.config.freeze_steps, partner_frozen.gather(1, pos)))
        last = torch.where(valid, order.gather(1, pos), -1).amax(dim=1)  # -1: nothing switched, ptr stays
        ptr.add_(last + 1).remainder_(r)
        state.switched[side] += valid.sum()
        return factors

    def _move_vectors(self, bank: _Bank, side: int, pos: torch.Tensor, cand: torch.Tensor, chosen: torch.Tensor,
                      generated: torch.Tensor | None) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Put the candidates into ``bank``'s factors at ``pos`` (n, k) where ``chosen`` and the vectors
        involved are finite; reset the partners' optimizer state. Returns W's factors and the mask of
        switches done. Sharded: this rank's rows of W's factors; A's rows are written by their owner."""
        n, kmax = pos.shape
        cols = bank.cols
        A, B = bank.a_group.flat(), bank.b_group.flat()  # (n, r, cols), (n, rows, r): this rank's shards
        rows = B.shape[1]
        b_idx = pos.unsqueeze(1).expand(n, rows, kmax)
        b_sel = B.gather(2, b_idx)
        a_sel, b_sums, owned, a_pos = bank.selected_rows(A, pos, b_sel)
        a_idx = a_pos.unsqueeze(-1).expand(n, kmax, cols)
        # both vectors of a slot enter W's update: a NaN/Inf in either skips that switch alone
        valid = chosen & a_sel.sum(2).add_(b_sums).isfinite()
        new = (bank.candidates(side, cand) if generated is None
               else generated[..., :cols if side == SIDE_A else rows].to(A.dtype))
        rows_ok, cols_ok = valid.unsqueeze(-1), valid.unsqueeze(1)
        # skipped slots contribute exact zeros: masked with where(), since NaN * 0 is still NaN
        m = master_dtype(A.dtype)  # factors in W's master dtype: a bf16 difference would round
        if side == SIDE_A:  # W += s · B[:, i] ⊗ (A[i] − c);  A[i] = c;  B[:, i]'s state resets
            factors = torch.where(cols_ok, b_sel.to(m), 0), torch.where(rows_ok, a_sel.to(m) - new.to(m), 0)
            bank.write_rows(A, a_pos, valid & owned, new, a_idx, a_sel)
            partner, vec_dim, moment_idx, keep = bank.b_group, 2, b_idx, ~valid
            step_idx = pos.unsqueeze(1)
        else:  # W += s · (B[:, j] − d) ⊗ A[j];  B[:, j] = d;  A[j]'s state resets (where this rank holds it)
            new_t = new.transpose(1, 2)
            factors = torch.where(cols_ok, b_sel.to(m) - new_t.to(m), 0), torch.where(rows_ok, a_sel.to(m), 0)
            B.scatter_(2, b_idx, torch.where(cols_ok, new_t, b_sel))
            partner, vec_dim, moment_idx, keep = bank.a_group, 1, a_idx, ~(valid & owned)
            step_idx = a_pos.unsqueeze(2)
        bank.a_group.commit()
        bank.b_group.commit()
        holds = partner is bank.b_group or bank.slot_hi > bank.slot_lo  # a rank may hold none of A's rows
        if self.config.reset_vector_state and isinstance(self.optimizer, AdamW) and holds:
            # zero the switched vectors' partners' moments and steps: a product with 0 (reset) or 1
            # (skipped slot, or a row another rank holds) touches only the k vectors, not the whole state
            state = self.optimizer.vector_state(partner)
            keep = keep.unsqueeze(3 - vec_dim)  # (n, 1, k) for B's columns, (n, k, 1) for A's rows
            for name, idx in (("exp_avg", moment_idx), ("exp_avg_sq", moment_idx), ("step", step_idx)):
                state[name].scatter_reduce_(vec_dim, idx, keep.to(state[name].dtype).expand(idx.shape), "prod")
        return factors, valid

    # -- ReLoRA ------------------------------------------------------------------------
    @torch.no_grad()
    def _relora_reset(self) -> None:
        self._relora_round += 1
        for ad in self.adapters:
            weight = self.gm.model.get_parameter(ad.target.weight)
            dtype = master_dtype(weight.dtype)
            merged = ad.delta(dtype)  # this rank's rows, when sharded
            ad.reset_parameters(self.seed, self.config.init, round_=self._relora_round)
            # W takes the trained product and gives up the new one (zero for init="lora", whose B is 0),
            # so the function is unchanged across the reset, as after dl.transform
            update_weight(local(weight), residual_of(ad, weight), torch.Tensor.add_, merged - ad.delta(dtype))
            for p in (ad.A, ad.B):  # prune the adapters' optimizer state by magnitude
                for key in ("exp_avg", "exp_avg_sq"):
                    buf = self.optimizer.state.get(p, {}).get(key)
                    if buf is not None:
                        _prune_smallest(buf, self.config.prune_ratio)

    # -- reporting, state ------------------------------------------------------------------
    def num_switched(self) -> tuple[int, int]:
        """(rows of A, columns of B) switched so far (reads the device: not for the hot path)."""
        a, b = self.gm.switch_state.switched.tolist()
        return a, b

    def _warn_skips(self) -> None:
        skipped = int(self.gm.switch_state.skipped)
        if not self._warned and skipped > 0:
            self._warned = True
            warnings.warn(f"dynlora: {skipped} switches were skipped because the adapter vectors to "
                          "switch held NaN/Inf; W absorbed none of them. Lower the learning rate or clip gradients.",
                          RuntimeWarning, stacklevel=3)

    # The module's switch_state buffers hold the state between saves; the host copies below are
    # the live ones while this switcher is attached (the buffers' owner).
    def _export_state(self, state: SwitchState) -> None:
        """Write this switcher's host state into ``state``'s buffers (before the module is saved)."""
        state.step.fill_(self.step)
        state.seed.fill_(self.seed)
        state.relora_round.fill_(self._relora_round)
        state.set_generator("counts_generator", self._counts_gen.get_state())
        state.set_generator("device_generator", self._device_gen.get_state())

    def _import_state(self, state: SwitchState) -> None:
        """Continue from ``state``'s buffers (after the module was loaded)."""
        self._adopt(state)
        for cohort in self._cohorts:  # the seed may have changed: candidate keys and tables follow it
            cohort.refresh(force=True)

    def _adopt(self, state: SwitchState) -> None:
        step, seed = int(state.step), int(state.seed)
        self._counts_gen.set_state(state.counts_generator.cpu())
        device_state = state.device_generator.cpu()
        if device_state.numel() == self._device_gen.get_state().numel():
            self._device_gen.set_state(device_state)
        elif step == 0:  # transformed on one device type, attached on another: a fresh generator there
            self._device_gen.manual_seed(device_seed(seed))
        else:
            raise StateError("switch_state.device_generator", f"the state was saved by a switcher on another "
                             f"device type than {self._device_gen.device.type} (its generator state has "
                             f"{device_state.numel()} bytes)",
                             "resume on the device type the checkpoint was written on")
        self.step, self.seed, self._relora_round = step, seed, int(state.relora_round)
        for ad in self.adapters:
            ad.seed = seed  # candidates are a function of the run's seed

    def state_dict(self) -> dict[str, Any]:
        """The switcher's state as one dict (a convenience: ``gm.state_dict()`` carries the same)."""
        self._warn_skips()
        state = self.gm.switch_state
        return {
            "version": 1, "method": self.config.method, "step": self.step, "seed": self.seed,
            "total_steps": self.total_steps, "relora_round": self._relora_round,
            "counts_generator": self._counts_gen.get_state(), "device_generator": self._device_gen.get_state(),
            "switched": state.switched.clone(), "skipped": state.skipped.clone(),
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
        self.gm.switch_state.switched.copy_(state["switched"])
        self.gm.switch_state.skipped.copy_(state["skipped"])
        for name, entry in state["adapters"].items():
            ad = mine[name]
            ad.seed = self.seed  # candidates are a function of the run's seed
            for key in _BOOKKEEPING:
                getattr(ad, key).copy_(entry[key])
        for cohort in self._cohorts:  # the seed may have changed: candidate keys and tables follow it
            cohort.refresh(force=True)

    def detach(self) -> None:
        """Remove the hooks: the optimizer steps like a plain one again. The module keeps the state."""
        for h in self._hooks:
            h.remove()
        self.optimizer._dynlora_switcher = None
        self.gm.switch_state.pull()
        self.gm.switch_state.unbind(self)


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


def _host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device's queue to drain."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _make_cohorts(adapters: list[Adapter], optimizer: AdamW, stored: bool) -> list[_Cohort]:
    """Adapters of one shape, dtype, device and param group share a bank; banks of one rank,
    candidate count and device share a cohort."""
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    banks: dict[tuple, list[tuple[int, Adapter]]] = {}
    for i, ad in enumerate(adapters):
        t = ad.target
        key = (t.rows, t.cols, t.rank, t.batch, ad.A.dtype, ad.A.device, group_of[id(ad.A)], group_of[id(ad.B)])
        banks.setdefault(key, []).append((i, ad))
    cohorts: dict[tuple, list[list[tuple[int, Adapter]]]] = {}
    for members in banks.values():
        first = members[0][1]
        cohorts.setdefault((first.target.rank, first.num_candidates, first.A.device), []).append(members)
    return [_Cohort(groups, optimizer, stored) for groups in cohorts.values()]


class _Bank:
    """Adapters of identical shape, rank, dtype and device: their ``A`` s are views of one
    ``(n, r, cols)`` tensor and their ``B`` s of one ``(n, rows, r)`` (``VectorGroup``, n = G
    adapters x E experts), as are their AdamW moments, so moving vectors is one gather and one
    scatter per side for the whole bank. The weights stay the model's own tensors."""

    def __init__(self, cohort: _Cohort, rows: slice, members: list[tuple[int, Adapter]], optimizer: AdamW):
        self.cohort, self.row_range = cohort, rows
        self.adapters = [ad for _, ad in members]
        t = self.adapters[0].target
        self.rows, self.cols, self.batch = t.rows, t.cols, t.batch
        self.E = math.prod(t.batch)
        self.GE, self.K = self.E * len(self.adapters), self.adapters[0].num_candidates
        # this rank's share (everything, unless sharded): A's slots [slot_lo, slot_hi), W's and B's rows
        first = self.adapters[0]
        self.sharded = is_sharded(first.A)
        _, self.slot_lo, self.slot_hi = local_range(first.A) if self.sharded else (0, 0, t.rank)
        _, self.row_lo, self.row_hi = local_range(first.B) if self.sharded else (0, 0, t.rows)
        self._weights: list[torch.Tensor] | None = None
        self._weight_ptrs: list[int] = []
        self._residuals: list[torch.Tensor | None] = []
        self._weight_views: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.tables: dict[int, torch.Tensor] = {}
        self.a_group = VectorGroup([ad.A for ad in self.adapters], -2,
                                   lambda: self.cohort.a_frozen[self.row_range][:, self.slot_lo:self.slot_hi])
        self.b_group = VectorGroup([ad.B for ad in self.adapters], -1, lambda: self.cohort.b_frozen[self.row_range])
        optimizer.register_vectors(self.a_group)
        optimizer.register_vectors(self.b_group)

    def restack(self, stored: bool) -> None:
        """Device-bound constants (scale, stored candidate tables), rebuilt with the cohort's keys."""
        first = self.adapters[0]
        self.p_dtype = first.A.dtype
        self.scale = torch.stack([ad.scale for ad in self.adapters]).repeat_interleave(self.E).view(self.GE, 1, 1)
        self.tables = {}
        if stored:  # every candidate, computed once: (n, K, length) per side
            every = torch.arange(self.K, device=first.A.device).expand(self.GE, self.K)
            for side in (SIDE_A, SIDE_B):
                self.tables[side] = self._generate(side, every)
            for g, ad in enumerate(self.adapters):
                sl = slice(g * self.E, (g + 1) * self.E)
                ad.register_buffer("stored_a", self.tables[SIDE_A][sl].view(*self.batch, self.K, self.cols),
                                   persistent=False)
                ad.register_buffer("stored_b", self.tables[SIDE_B][sl].view(*self.batch, self.K, -1),
                                   persistent=False)

    def _generate(self, side: int, index: torch.Tensor) -> torch.Tensor:
        """Candidates ``index`` in full (A's rows), or this rank's rows of them (B's columns)."""
        if side == SIDE_A:
            return self.cohort.vectors(side, index, self.row_range, self.cols, self.p_dtype)
        return self.cohort.vectors(side, index, self.row_range, self.row_hi - self.row_lo, self.p_dtype,
                                   start=self.row_lo)

    def candidates(self, side: int, index: torch.Tensor) -> torch.Tensor:
        table = self.tables.get(side)
        if table is None:
            return self._generate(side, index)
        return table.gather(1, index.unsqueeze(-1).expand(-1, -1, table.shape[-1]))

    def selected_rows(self, A: torch.Tensor, pos: torch.Tensor, b_sel: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For slots ``pos`` (n, k): A's rows in full (n, k, cols), the sums of B's selected columns
        ``b_sel`` (n, rows, k) over all rows (n, k), which of the rows this rank holds (n, k), and
        their positions in its shard ``A`` (clamped where it holds none). Sharded, the rows and
        sums come from one all-reduce: each row from its owner, zeros from the others, exactly."""
        n, k = pos.shape
        if not self.sharded:
            return A.gather(1, pos.unsqueeze(-1).expand(n, k, self.cols)), b_sel.sum(1), \
                torch.ones_like(pos, dtype=torch.bool), pos
        held = self.slot_hi - self.slot_lo
        owned = (pos >= self.slot_lo) & (pos < self.slot_hi)
        a_pos = (pos - self.slot_lo).clamp(0, max(held - 1, 0))
        if held:
            rows = torch.where(owned.unsqueeze(-1), A.gather(1, a_pos.unsqueeze(-1).expand(n, k, self.cols)), 0)
        else:
            rows = A.new_zeros(n, k, self.cols)
        both = sum_across(torch.cat([rows.flatten(), b_sel.sum(1).flatten()]), self.adapters[0].A)
        return both[:rows.numel()].view(rows.shape), both[rows.numel():].view(n, k), owned, a_pos

    def write_rows(self, A: torch.Tensor, a_pos: torch.Tensor, write: torch.Tensor, new: torch.Tensor,
                   a_idx: torch.Tensor, current: torch.Tensor) -> None:
        """``A[a_pos] = new`` where ``write`` (n, k), in this rank's shard ``A`` (n, r, cols);
        ``current`` holds the rows' values now."""
        if not self.sharded:  # positions are distinct: one scatter
            A.scatter_(1, a_idx, torch.where(write.unsqueeze(-1), new, current))
            return
        held = A.shape[1]
        if not held:
            return
        # rows this rank does not hold were clamped onto rows it does: pick each held row's writer instead
        hit = (a_pos.unsqueeze(-1) == torch.arange(held, device=A.device)) & write.unsqueeze(-1)  # (n, k, r)
        source = hit.to(torch.uint8).argmax(1, keepdim=True).transpose(1, 2)  # (n, r, 1)
        A.copy_(torch.where(hit.any(1).unsqueeze(-1), new.gather(1, source.expand(-1, -1, self.cols)), A))

    def weight_views(self, gm: DynLoRAModule) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each adapter's W as a (rows, cols) matrix, or (E, rows, cols) for stacked experts (this
        rank's rows, when sharded), with its residual viewed alike (None where W is its own master:
        see runtime/precision.py); cached while the weights and residuals keep their storage."""
        if self._weights is None or any(local(w).data_ptr() != ptr for w, ptr in zip(self._weights, self._weight_ptrs)) \
                or any(ad._buffers.get(RESIDUAL) is not r for ad, r in zip(self.adapters, self._residuals)):
            self._weights = [gm.model.get_parameter(ad.target.weight) for ad in self.adapters]
            self._weight_ptrs = [local(w).data_ptr() for w in self._weights]
            self._residuals = [residual_of(ad, w) for ad, w in zip(self.adapters, self._weights)]
            rows = self.row_hi - self.row_lo
            shape = (rows, self.cols) if self.E == 1 else (self.E, rows, self.cols)
            self._weight_views = [(local(w).detach().view(shape), None if r is None else r.view(shape))
                                  for w, r in zip(self._weights, self._residuals)]
        return self._weight_views


class _Cohort:
    """Banks whose adapters share rank ``r``, candidate count ``K`` and device. Their bookkeeping
    (in-use indices, freeze counters, pointers) is stacked to ``(N, r)`` / ``(N,)`` over all N
    matrices, each adapter's buffers views of it, so choosing slots and candidates is one set
    of ops for all of them per side."""

    def __init__(self, groups: list[list[tuple[int, Adapter]]], optimizer: AdamW, stored: bool):
        self.stored = stored
        self.adapters = [ad for members in groups for _, ad in members]
        self.positions = [i for members in groups for i, _ in members]
        first = self.adapters[0]
        self.r, self.K = first.target.rank, first.num_candidates
        self.experts_list = [math.prod(ad.target.batch) for ad in self.adapters]
        self.N = sum(self.experts_list)
        self.views: dict[int, dict[str, torch.Tensor]] = {}
        self.banks, self.rows, self.spans, start, first_adapter = [], [], [], 0, 0
        for members in groups:  # rows: the bank's matrices in the stacks; spans: its adapters in the cohort
            n = math.prod(members[0][1].target.batch) * len(members)
            self.rows.append(slice(start, start + n))
            self.spans.append(slice(first_adapter, first_adapter + len(members)))
            self.banks.append(_Bank(self, self.rows[-1], members, optimizer))
            start += n
            first_adapter += len(members)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """(Re)stack the bookkeeping and candidate keys if something replaced the adapters'
        buffers (``.to()``, ``load_state_dict(assign=True)``) or ``force`` (a new seed)."""
        if not force and all(ad._buffers[k] is v for ad in self.adapters for k, v in self.views[id(ad)].items()):
            return
        self.device = self.adapters[0].A.device
        stacked: dict[str, torch.Tensor] = {}
        for key in _BOOKKEEPING:
            parts = [getattr(ad, key).reshape(e, -1) for ad, e in zip(self.adapters, self.experts_list)]
            stacked[key] = torch.cat(parts) if key.endswith(("index", "frozen")) else torch.cat(parts).view(-1)
            start = 0
            for ad, e in zip(self.adapters, self.experts_list):
                ad._buffers[key] = stacked[key][start:start + e].view(getattr(ad, key).shape)
                start += e
        self.a_index, self.b_index = stacked["a_index"], stacked["b_index"]
        self.a_frozen, self.b_frozen = stacked["a_frozen"], stacked["b_frozen"]
        self.a_ptr, self.b_ptr = stacked["a_ptr"], stacked["b_ptr"]
        self.views = {id(ad): {k: ad._buffers[k] for k in _BOOKKEEPING} for ad in self.adapters}
        self.slots = torch.arange(self.r, device=self.device)
        self.experts = torch.tensor(self.experts_list, device=self.device)
        self.base = torch.cat([ad.base_keys() for ad in self.adapters]).unsqueeze(1)  # (N, 1)
        self.bounds = {side: torch.tensor([ad.bound_a if side == SIDE_A else ad.bound_b for ad in self.adapters],
                                          device=self.device).repeat_interleave(self.experts).view(self.N, 1)
                       for side in (SIDE_A, SIDE_B)}
        # seeded candidates are generated for the whole cohort at the longest vector length; a
        # candidate's first L entries are the same whatever length is generated
        self.longest = {SIDE_A: max(b.cols for b in self.banks), SIDE_B: max(b.rows for b in self.banks)}
        for bank in self.banks:
            bank.restack(self.stored)

    def vectors(self, side: int, index: torch.Tensor, rows: slice, length: int,
                dtype: torch.dtype = torch.float32, start: int = 0) -> torch.Tensor:
        """Entries ``start .. start+length`` of candidates ``index`` (n, k) of the stacked matrices
        ``rows``, regenerated from their keys."""
        return candidate_vectors(candidate_keys(self.base[rows], side, index), length, self.bounds[side][rows],
                                 dtype=dtype, start=start)

    def generate(self, side: int, cand: torch.Tensor) -> torch.Tensor | None:
        """Seeded candidates ``cand`` (N, k) of every row at the longest length; None when stored
        or sharded (each bank then generates its own rows)."""
        if self.stored or any(bank.sharded for bank in self.banks):
            return None
        return self.vectors(side, cand, slice(None), self.longest[side])
