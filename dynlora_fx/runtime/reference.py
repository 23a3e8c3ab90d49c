"""The reference switching strategy: a deliberately simple re-implementation of the paper's code.

One Python loop iteration per switched vector, candidates stored in memory. It consumes the same
generator draws as the batched strategy (counts from the CPU generator, one ``rand(N, K)`` per
cohort side from the device generator), so from the same seed both produce the same parameters;
the speed benchmark times it against the batched runtime (``dl.attach(..., strategy="reference")``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..adapter import Adapter
from ..candidates import SIDE_A, SIDE_B
from .cohorts import Cohort

if TYPE_CHECKING:
    from .switchlora import SwitchLoRAHandler

__all__ = ["ReferenceSwitching"]


class ReferenceSwitching:
    """Same hooks, schedule and generators as the batched strategy; switching done vector by vector
    (without the runtime's per-vector NaN guard, which is not part of the reference)."""

    def __init__(self, handler: SwitchLoRAHandler):
        self.switcher = sw = handler.switcher
        seed = sw.live.seed
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter -> (A rows (E, K, n), B columns (E, K, m))
        for ad in sw.adapters:
            every = torch.arange(ad.num_candidates, device=ad.A.device).expand(*ad.target.batch, ad.num_candidates)
            E = math.prod(ad.target.batch)
            self.tables[id(ad)] = (ad.generate_candidates(seed, SIDE_A, every).reshape(E, ad.num_candidates, -1),
                                   ad.generate_candidates(seed, SIDE_B, every).reshape(E, ad.num_candidates, -1))

    def held_bytes(self) -> int:
        """Bytes of the stored candidate tables."""
        return sum(t.numel() * t.element_size() for pair in self.tables.values() for t in pair)

    def switch_side(self, cohort: Cohort, side: int, kmax: int, k_per_row: torch.Tensor,
                    bank_ks: list[list[int]]) -> list[Any]:
        """One side of every adapter in ``cohort``, one vector at a time. Draws the same ``rand(N, K)``
        as the batched strategy."""
        draw = torch.rand(cohort.N, cohort.K, generator=self.switcher.live.device, device=cohort.device)
        row = 0
        for ad, experts in zip(cohort.adapters, cohort.experts_list):
            for e in range(experts):
                self._switch_vectors(ad, e, side, int(k_per_row[row]), draw[row])
                row += 1
        return [None] * len(cohort.banks)  # W was updated vector by vector above: nothing left to absorb

    def _switch_vectors(self, ad: Adapter, e: int, side: int, k: int, draw: torch.Tensor) -> None:
        sw = self.switcher
        t = ad.target
        r, rows, cols, E = t.rank, t.rows, t.cols, math.prod(t.batch)
        A, B = ad.A.view(E, r, cols)[e], ad.B.view(E, rows, r)[e]
        W = sw.gm.model.get_parameter(t.weight).view(E, rows, cols)[e]
        s = ad.scale
        a_tab, b_tab = (tab[e] for tab in self.tables[id(ad)])
        if side == SIDE_A:
            frozen, ptr, index, partner_frozen = ad.a_frozen.view(E, r)[e], ad.a_ptr.view(E), ad.a_index.view(E, r)[e], \
                ad.b_frozen.view(E, r)[e]
        else:
            frozen, ptr, index, partner_frozen = ad.b_frozen.view(E, r)[e], ad.b_ptr.view(E), ad.b_index.view(E, r)[e], \
                ad.a_frozen.view(E, r)[e]
        state = sw.optimizer.vector_state(ad.B if side == SIDE_A else ad.A)
        in_use = set(index.tolist())
        free = sorted((draw[c].item(), c) for c in range(ad.num_candidates) if c not in in_use)
        start = int(ptr[e])
        slots = [(start + j) % r for j in range(r) if frozen[(start + j) % r] == 0][:k]
        last = None
        for j, i in enumerate(slots):
            if j >= len(free):
                break
            c = free[j][1]
            if side == SIDE_A:  # W += s · B[:, i] ⊗ (A[i] − c)
                W += s * torch.outer(B[:, i], A[i] - a_tab[c])
                A[i] = a_tab[c]
                partner = [state[key].view(E, -1, r)[e, :, i] for key in ("exp_avg", "exp_avg_sq", "step")]
            else:  # W += s · (B[:, i] − d) ⊗ A[i]
                W += s * torch.outer(B[:, i] - b_tab[c], A[i])
                B[:, i] = b_tab[c]
                partner = [state[key].view(E, r, -1)[e, i] for key in ("exp_avg", "exp_avg_sq", "step")]
            index[i] = c
            partner_frozen[i] = sw.config.freeze_steps
            if sw.config.reset_vector_state:
                for vec in partner:
                    vec.zero_()
            sw.state.switched[side] += 1
            last = i
        if last is not None:
            ptr[e] = (last + 1) % r
