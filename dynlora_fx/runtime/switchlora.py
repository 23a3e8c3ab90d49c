"""SwitchLoRA around the step: after every ``optimizer.step()`` count down freezes, then switch
``r / interval(t)`` rows of each ``A`` and as many columns of each ``B`` to fresh candidates,
folding the difference into ``W`` so the function is unchanged; frozen vectors get no update
(``dl.AdamW`` masks their gradients by the freeze counters).

Counts come from the CPU generator (identical on every rank); positions and candidates are
chosen on the device, by a switching strategy: :class:`BatchedSwitching` (the default: all
adapters of a cohort at once, no host-device synchronisation) or the reference per-vector loop
(``runtime/reference.py``), which makes the same draws.

On an FSDP2-sharded module (``dl.fully_shard``) each rank switches its own shards: ``W`` and
``B`` are split on the same rows, so a rank absorbs into its rows of ``W`` with its rows of
``B`` and generates only its rows of a new column of ``B``; the ``k`` selected rows of ``A``
(which another rank may hold) and the finiteness of ``B``'s selected columns are summed across
ranks in one all-reduce per bank and side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from ..candidates import SIDE_A, SIDE_B
from ..errors import StateError
from .cohorts import Bank, Cohort, make_cohorts
from .handler import MethodHandler
from .optim import AdamW
from .precision import update_weight
from .reference import ReferenceSwitching
from .schedule import expected_switches

if TYPE_CHECKING:
    from .switcher import Switcher

__all__ = ["SwitchLoRAHandler", "SwitchingStrategy", "BatchedSwitching", "STRATEGIES"]

Factors = tuple[torch.Tensor, torch.Tensor]  # (n, rows, k), (n, k, cols): what W absorbs (unscaled)


class SwitchingStrategy(Protocol):
    """How one side of a cohort's vectors is switched."""

    def switch_side(self, cohort: Cohort, side: int, kmax: int, k_per_row: torch.Tensor,
                    bank_ks: list[list[int]]) -> list[Factors | None]:
        """Switch up to ``k`` vectors of ``side`` in every adapter of ``cohort`` (``k_per_row``: per
        stacked matrix; ``bank_ks``: each bank's per-adapter counts). Returns per bank the factors
        whose product W must absorb, or None where there is nothing left to absorb."""

    def held_bytes(self) -> int:
        """Bytes of tensors the strategy keeps of its own (beyond the module's and optimizer's)."""


class SwitchLoRAHandler(MethodHandler):
    optimizer_class = AdamW  # per-vector steps: a switched vector's partner restarts its bias correction

    def __init__(self, switcher: Switcher, strategy: str = "batched"):  # strategy: a key of STRATEGIES
        super().__init__(switcher, strategy)
        config = switcher.config
        self.cohorts = make_cohorts(switcher.adapters, switcher.optimizer, config.candidates == "stored",
                                    switcher.live.seed, switcher.precision)
        self.strategy: SwitchingStrategy = STRATEGIES[strategy](self)

    @classmethod
    def check_strategy(cls, strategy: str, method: str) -> None:
        """Every strategy of STRATEGIES switches SwitchLoRA."""

    @classmethod
    def check_optimizer(cls, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, AdamW):
            raise StateError("dl.attach", f"SwitchLoRA needs per-vector optimizer state, got {type(optimizer).__name__}",
                             "use dl.AdamW (a drop-in torch.optim.AdamW)")

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        seed = self.switcher.live.seed
        for cohort in self.cohorts:  # dl.AdamW reads the freeze counters during the step
            cohort.refresh(seed)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._switch_all()

    def switch_counts(self, step: int) -> list[int]:
        """How many vectors per side each adapter switches at ``step`` (consumes the count generator)."""
        sw = self.switcher
        u = torch.rand(len(sw.adapters), generator=sw.live.counts, dtype=torch.float64).tolist()
        cfg = sw.config
        out = []
        for ad, draw in zip(sw.adapters, u):
            e = expected_switches(step, sw.total_steps, ad.target.rank, cfg.interval, cfg.decay_ratio)
            out.append(min(ad.target.rank, int(e) + (draw < e - int(e))))  # stochastic rounding
        return out

    @torch.no_grad()
    def _switch_all(self) -> None:
        counts = self.switch_counts(self.switcher.step)
        for cohort in self.cohorts:
            cohort.a_frozen.sub_(1).clamp_(min=0)
            cohort.b_frozen.sub_(1).clamp_(min=0)
            ks = [counts[i] for i in cohort.positions]
            kmax = max(ks)
            if kmax == 0:
                continue
            k_per_row = _host_to_device(ks, cohort.device).repeat_interleave(cohort.experts)
            bank_ks = [ks[span] for span in cohort.spans]  # host ints: banks and Ws without a switch are skipped
            by_side = [self.strategy.switch_side(cohort, side, kmax, k_per_row, bank_ks) for side in (SIDE_A, SIDE_B)]
            for bank, counts_of, side_a, side_b in zip(cohort.banks, bank_ks, *by_side):
                if side_a is None:  # nothing to absorb: no switch in this bank, or W took it already
                    continue
                (left_a, right_a), (left_b, right_b) = side_a, side_b
                # W absorbs both sides in one rank-2k update per adapter: a single pass over each W
                weights = bank.weight_views(self.switcher.gm)
                dtype = cohort.precision.master_dtype(weights[0][0].dtype)  # bf16 W absorbs into its fp32 master
                left = torch.cat([left_a, left_b], dim=2).to(dtype).mul_(bank.scale)
                right = torch.cat([right_a, right_b], dim=1).to(dtype)
                if bank.E == 1:  # addmm_ on a matrix is ~2x faster than baddbmm_ on a batch of one
                    update, lefts, rights = torch.Tensor.addmm_, left.unbind(0), right.unbind(0)
                else:
                    update, lefts, rights = torch.Tensor.baddbmm_, left.split(bank.E), right.split(bank.E)
                for (w, residual), lhs, rhs, k in zip(weights, lefts, rights, counts_of):
                    if k:
                        update_weight(w, residual, update, lhs, rhs)


class BatchedSwitching:
    """Slots and candidates chosen for all N matrices of a cohort at once, vectors moved bank by bank."""

    def __init__(self, handler: SwitchLoRAHandler):
        self.switcher = handler.switcher

    def held_bytes(self) -> int:
        return 0  # stored candidate tables, if any, are the adapters' buffers

    def switch_side(self, cohort: Cohort, side: int, kmax: int, k_per_row: torch.Tensor,
                     bank_ks: list[list[int]]) -> list[Factors | None]:
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
        draw = torch.rand(N, cohort.K, generator=self.switcher.live.device, device=cohort.device)
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
        state = self.switcher.state
        state.skipped += (chosen ^ valid).sum()
        index.scatter_(1, pos, torch.where(valid, cand, index.gather(1, pos)))
        partner_frozen.scatter_(1, pos, torch.where(valid, self.switcher.config.freeze_steps, partner_frozen.gather(1, pos)))
        last = torch.where(valid, order.gather(1, pos), -1).amax(dim=1)  # -1: nothing switched, ptr stays
        ptr.add_(last + 1).remainder_(r)
        state.switched[side] += valid.sum()
        return factors

    def _move_vectors(self, bank: Bank, side: int, pos: torch.Tensor, cand: torch.Tensor, chosen: torch.Tensor,
                      generated: torch.Tensor | None) -> tuple[Factors, torch.Tensor]:
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
        m = bank.cohort.precision.master_dtype(A.dtype)  # factors in W's master dtype: a bf16 difference would round
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
        if self.switcher.config.reset_vector_state and isinstance(self.switcher.optimizer, AdamW) and holds:
            # zero the switched vectors' partners' moments and steps: a product with 0 (reset) or 1
            # (skipped slot, or a row another rank holds) touches only the k vectors, not the whole state
            state = self.switcher.optimizer.vector_state(partner)
            keep = keep.unsqueeze(3 - vec_dim)  # (n, 1, k) for B's columns, (n, k, 1) for A's rows
            for name, idx in (("exp_avg", moment_idx), ("exp_avg_sq", moment_idx), ("step", step_idx)):
                state[name].scatter_reduce_(vec_dim, idx, keep.to(state[name].dtype).expand(idx.shape), "prod")
        return factors, valid


def _host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device's queue to drain."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# switching strategies by the name dl.attach(strategy=...) takes
STRATEGIES: dict[str, type] = {"batched": BatchedSwitching, "reference": ReferenceSwitching}
