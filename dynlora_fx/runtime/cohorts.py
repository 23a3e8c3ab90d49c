"""Banks and cohorts: the adapters' tensors stacked so that switching is batched.

A *bank* is the adapters of one shape, rank, dtype, device and param group: their ``A`` s are
views of one ``(n, r, cols)`` tensor and their ``B`` s of one ``(n, rows, r)``, as are their AdamW
moments. A *cohort* is the banks of one rank, candidate count and device: their bookkeeping
(in-use indices, freeze counters, pointers) is stacked to ``(N, r)`` / ``(N,)``. A switching
strategy (``runtime/switchlora.py``, ``runtime/reference.py``) works on these.
"""

from __future__ import annotations

import math

import torch

from ..adapter import Adapter
from ..candidates import SIDE_A, SIDE_B, candidate_keys, candidate_vectors
from ..module import DynLoRAModule
from ..shards import is_sharded, local, local_range, sum_across
from .optim import AdamW, VectorGroup
from .precision import RESIDUAL, PrecisionPolicy

__all__ = ["Bank", "Cohort", "BOOKKEEPING", "make_cohorts"]

BOOKKEEPING = ("a_index", "b_index", "a_frozen", "b_frozen", "a_ptr", "b_ptr")  # each adapter's switching buffers


def make_cohorts(adapters: list[Adapter], optimizer: AdamW, stored: bool, seed: int,
                 precision: PrecisionPolicy) -> list[Cohort]:
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
    return [Cohort(groups, optimizer, stored, seed, precision) for groups in cohorts.values()]


class Bank:
    """Adapters of identical shape, rank, dtype and device: their ``A`` s are views of one
    ``(n, r, cols)`` tensor and their ``B`` s of one ``(n, rows, r)`` (``VectorGroup``, n = G
    adapters x E experts), as are their AdamW moments, so moving vectors is one gather and one
    scatter per side for the whole bank. The weights stay the model's own tensors."""

    def __init__(self, cohort: Cohort, rows: slice, members: list[tuple[int, Adapter]], optimizer: AdamW):
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
            self._residuals = [self.cohort.precision.residual(ad, w) for ad, w in zip(self.adapters, self._weights)]
            rows = self.row_hi - self.row_lo
            shape = (rows, self.cols) if self.E == 1 else (self.E, rows, self.cols)
            self._weight_views = [(local(w).detach().view(shape), None if r is None else r.view(shape))
                                  for w, r in zip(self._weights, self._residuals)]
        return self._weight_views


class Cohort:
    """Banks whose adapters share rank ``r``, candidate count ``K`` and device. Their bookkeeping
    (in-use indices, freeze counters, pointers) is stacked to ``(N, r)`` / ``(N,)`` over all N
    matrices, each adapter's buffers views of it, so choosing slots and candidates is one set
    of ops for all of them per side."""

    def __init__(self, groups: list[list[tuple[int, Adapter]]], optimizer: AdamW, stored: bool, seed: int,
                 precision: PrecisionPolicy):
        self.stored, self.precision = stored, precision
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
            self.banks.append(Bank(self, self.rows[-1], members, optimizer))
            start += n
            first_adapter += len(members)
        self.refresh(seed, force=True)

    def refresh(self, seed: int, force: bool = False) -> None:
        """(Re)stack the bookkeeping and candidate keys for the run's ``seed`` if it changed (a state
        was loaded), something replaced the adapters' buffers (``.to()``, ``load_state_dict(assign=True)``)
        or ``force``."""
        if not force and seed == self.seed \
                and all(ad._buffers[k] is v for ad in self.adapters for k, v in self.views[id(ad)].items()):
            return
        self.seed = seed
        self.device = self.adapters[0].A.device
        stacked: dict[str, torch.Tensor] = {}
        for key in BOOKKEEPING:
            parts = [getattr(ad, key).reshape(e, -1) for ad, e in zip(self.adapters, self.experts_list)]
            stacked[key] = torch.cat(parts) if key.endswith(("index", "frozen")) else torch.cat(parts).view(-1)
            start = 0
            for ad, e in zip(self.adapters, self.experts_list):
                ad._buffers[key] = stacked[key][start:start + e].view(getattr(ad, key).shape)
                start += e
        self.a_index, self.b_index = stacked["a_index"], stacked["b_index"]
        self.a_frozen, self.b_frozen = stacked["a_frozen"], stacked["b_frozen"]
        self.a_ptr, self.b_ptr = stacked["a_ptr"], stacked["b_ptr"]
        self.views = {id(ad): {k: ad._buffers[k] for k in BOOKKEEPING} for ad in self.adapters}
        self.slots = torch.arange(self.r, device=self.device)
        self.experts = torch.tensor(self.experts_list, device=self.device)
        self.base = torch.cat([ad.base_keys(seed) for ad in self.adapters]).unsqueeze(1)  # (N, 1)
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
