"""A deliberately simple re-implementation of the reference SwitchLoRA switching.

One Python loop iteration per switched vector, candidates stored in memory, as the
paper's code does it. It consumes the same generator draws as ``dl.Switcher`` (counts
from the CPU generator, one ``rand(E, K)`` per adapter side from the device generator),
so from the same seed both must produce the same parameters; the speed benchmark
times it against the batched runtime.
"""

from __future__ import annotations

import math

import torch

from dynlora_fx.candidates import SIDE_A, SIDE_B
from dynlora_fx.runtime.switcher import Switcher


class ReferenceSwitcher(Switcher):
    """Same hooks, schedule and generators as ``Switcher``; switching done vector by vector."""

    def __init__(self, gm, optimizer, total_steps):
        super().__init__(gm, optimizer, total_steps)
        self.tables = {}  # stored candidates: adapter -> (A rows (E, K, n), B columns (E, K, m))
        for ad in self.adapters:
            every = torch.arange(ad.num_candidates).expand(*ad.target.batch, ad.num_candidates)
            E = math.prod(ad.target.batch)
            self.tables[id(ad)] = (ad.generate_candidates(SIDE_A, every).reshape(E, ad.num_candidates, -1),
                                   ad.generate_candidates(SIDE_B, every).reshape(E, ad.num_candidates, -1))

    @torch.no_grad()
    def _switch_all(self):
        counts = self.switch_counts(self.step)
        for ad, k in zip(self.adapters, counts):
            ad.a_frozen.sub_(1).clamp_(min=0)
            ad.b_frozen.sub_(1).clamp_(min=0)
            if k == 0:
                continue
            for side in (SIDE_A, SIDE_B):
                self._switch_side_loop(ad, side, k)

    def _switch_side_loop(self, ad, side, k):
        t = ad.target
        r, rows, cols, E = t.rank, t.rows, t.cols, math.prod(t.batch)
        A, B = ad.A.view(E, r, cols), ad.B.view(E, rows, r)
        W = self.gm.model.get_parameter(t.weight).view(E, rows, cols)
        s = ad.scale
        a_tab, b_tab = self.tables[id(ad)]
        draw = torch.rand(E, ad.num_candidates, generator=self._device_gen, device=A.device)
        if side == SIDE_A:
            frozen, ptr, index, partner_frozen = ad.a_frozen.view(E, r), ad.a_ptr.view(E), ad.a_index.view(E, r), \
                ad.b_frozen.view(E, r)
        else:
            frozen, ptr, index, partner_frozen = ad.b_frozen.view(E, r), ad.b_ptr.view(E), ad.b_index.view(E, r), \
                ad.a_frozen.view(E, r)
        state = self.optimizer.vector_state(ad.B if side == SIDE_A else ad.A)
        for e in range(E):
            in_use = set(index[e].tolist())
            free = sorted((draw[e, c].item(), c) for c in range(ad.num_candidates) if c not in in_use)
            start = int(ptr[e])
            slots = [(start + j) % r for j in range(r) if frozen[e, (start + j) % r] == 0][:k]
            last = None
            for j, i in enumerate(slots):
                if j >= len(free):
                    break
                c = free[j][1]
                if side == SIDE_A:  # W += s · B[:, i] ⊗ (A[i] − c)
                    W[e] += s * torch.outer(B[e, :, i], A[e, i] - a_tab[e, c])
                    A[e, i] = a_tab[e, c]
                    partner_rows = [state[key].view(E, rows, -1)[e, :, i] if key != "step" else
                                    state[key].view(E, 1, r)[e, :, i] for key in ("exp_avg", "exp_avg_sq", "step")]
                else:  # W += s · (B[:, i] − d) ⊗ A[i]
                    W[e] += s * torch.outer(B[e, :, i] - b_tab[e, c], A[e, i])
                    B[e, :, i] = b_tab[e, c]
                    partner_rows = [state[key].view(E, r, -1)[e, i] for key in ("exp_avg", "exp_avg_sq", "step")]
                index[e, i] = c
                partner_frozen[e, i] = self.config.freeze_steps
                if self.config.reset_vector_state:
                    for vec in partner_rows:
                        vec.zero_()
                self._switched[side] += 1
                last = i
            if last is not None:
                ptr[e] = (last + 1) % r
