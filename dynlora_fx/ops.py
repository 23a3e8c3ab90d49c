"""Ops the rewritten graphs call: the weight-space adapter ``W' = W + s·B·A``, never held for backward.

Fed to the weight's own op (matmul, einsum, grouped conv, RNN, packed attention, stacked
experts), ``W'`` would be saved by that op for its input gradient: a second copy of every
adapted weight, kept from forward to backward. Instead the backward recomputes it from
``W``, ``A``, ``B`` and ``s`` (``r·m·n`` multiply-adds, about ``r/T`` of the op's own work):

- **eager**: a graph runs inside :func:`enter_recompute_scope` / :func:`exit_recompute_scope`,
  a ``saved_tensors_hooks`` pair. Its pack hook replaces any saved tensor that is ``W'`` or a
  view of it by a :class:`_Recipe` (the four small-or-shared inputs and the view's geometry);
  the unpack hook recomputes ``W'`` once per weight and backward pass, checking that none of
  its inputs changed in place meanwhile. Every other saved tensor is kept as it is, with the
  in-place check autograd itself skips for tensors that go through hooks.
- **torch.compile**: :func:`merged_weight` runs the merge under ``torch.utils.checkpoint``, so
  AOTAutograd's partitioner recomputes it in the backward graph instead of saving ``W'``
  (the scope is a no-op there: Dynamo does not trace saved-tensor hooks).

Saved-tensor hooks already active when the scope opens (``save_on_cpu``, a memory probe)
still receive every other saved tensor; inside ``torch.utils.checkpoint`` the scope stays
closed, since nothing is kept there anyway.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.fx.node import has_side_effect
from torch.utils.checkpoint import checkpoint

__all__ = ["merge_weight", "merged_weight", "enter_recompute_scope", "exit_recompute_scope", "keep_merged_weights"]

_recompute = True  # False inside keep_merged_weights()


def merge_weight(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W + s·B@A`` in ``W``'s shape: one addmm (a baddbmm for stacked experts) that reads ``W``
    once and writes the sum once, ``s`` scaling the small ``(m, r)`` factor.
    Shapes: ``A (*batch, r, n)``, ``B (*batch, m, r)``, ``W`` any shape of ``prod(batch)·m·n`` elements."""
    b_scaled = b * scale
    rows, cols = b.shape[-2], a.shape[-1]
    if a.dim() == 2:
        return torch.addmm(w.reshape(rows, cols), b_scaled, a).view(w.shape)
    r = a.shape[-2]
    return torch.baddbmm(w.reshape(-1, rows, cols), b_scaled.reshape(-1, rows, r),
                         a.reshape(-1, r, cols)).view(w.shape)


class _MergeWeight(torch.autograd.Function):
    """:func:`merge_weight` that keeps only its inputs for backward (autograd's own addmm would
    also keep the scaled ``s·B``)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b, a, scale)
        return merge_weight(w, b, a, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # in the gradient's dtype: under autocast W' (and its gradient) is bf16 while the factors are
        # fp32; autograd casts each returned gradient to its input's dtype, as autocast's casts would
        b, a, scale = (t.to(grad.dtype) for t in ctx.saved_tensors)
        g = grad.reshape(*b.shape[:-2], b.shape[-2], a.shape[-1])  # (*batch, m, n)
        grad_b = (g @ a.mT) * scale if ctx.needs_input_grad[1] else None
        grad_a = (b * scale).mT @ g if ctx.needs_input_grad[2] else None
        grad_w = grad if ctx.needs_input_grad[0] else None
        return grad_w, grad_b, grad_a, None


class _Merged:
    """One ``W'`` of a forward pass: its inputs, their versions, and the recomputed value while
    some saved reference still waits for it."""

    __slots__ = ("inputs", "versions", "pending", "value", "autocast")

    def __init__(self, inputs: tuple[torch.Tensor, ...]):
        self.inputs = inputs
        self.versions = tuple(t._version for t in inputs)
        device = inputs[0].device.type  # the recomputation replays forward's autocast (bf16 W' under bf16)
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        self.pending = 0  # saved references not yet unpacked
        self.value: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        if tuple(t._version for t in self.inputs) != self.versions:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: W, A, B or the scale of a weight-space adapter (weight shape "
                f"{tuple(self.inputs[0].shape)}) changed between forward and backward; run backward before "
                "the optimizer step or switching changes them")
        value = self.value
        if value is None:
            device, dtype, enabled = self.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                value = merge_weight(*self.inputs)
        self.pending -= 1
        self.value = value if self.pending > 0 else None  # keep it only for this weight's other uses
        return value


class _Recipe:
    """What autograd holds instead of a saved ``W'`` (or a view of it)."""

    __slots__ = ("merged", "size", "stride", "offset")

    def __init__(self, merged: _Merged, t: torch.Tensor):
        self.merged = merged
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()
        merged.pending += 1


_live: dict[int, tuple[weakref.ref, _Merged]] = {}  # id(W') -> (weak W', its recipe inputs), while W' lives


class _Kept:
    """A saved tensor kept as it is, with its version: hooks switch off autograd's own check that
    nothing changed it in place before backward, so the scope does that check itself."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{self.tensor.type()} {list(self.tensor.shape)}] is at version "
                f"{self.tensor._version}; expected version {self.version} instead")
        return self.tensor


class _Passed:
    """A saved tensor handed to the hooks that were active before the scope opened."""

    __slots__ = ("packed",)

    def __init__(self, packed: Any):
        self.packed = packed


class _Scope:
    """The pack/unpack pair of one graph run; ``outer`` is the pair it sits on (``save_on_cpu``,
    a memory probe), which still gets every saved tensor that is not a ``W'``."""

    def __init__(self, outer: tuple[Any, Any] | None):
        self.outer = outer
        self.hooks = saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> Any:
        root = t if t._base is None else t._base
        entry = _live.get(id(root))
        if entry is not None and entry[0]() is root:
            return _Recipe(entry[1], t)
        return _Kept(t) if self.outer is None else _Passed(self.outer[0](t))

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, _Kept):
            return saved.unpack()
        if isinstance(saved, _Recipe):
            return saved.merged.materialize().as_strided(saved.size, saved.stride, saved.offset)
        return self.outer[1](saved.packed)


def merged_weight(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`merge_weight`, arranged so that backward recomputes it instead of keeping it."""
    if not _recompute:
        return merge_weight(w, b, a, scale)
    if torch.compiler.is_compiling():
        return checkpoint(merge_weight, w, b, a, scale, use_reentrant=False)
    out = _MergeWeight.apply(w, b, a, scale)
    if out.requires_grad:  # saved views of `out` reach autograd with `root` as their base
        root = out if out._base is None else out._base
        key = id(root)

        def forget(ref: weakref.ref, key: int = key) -> None:
            if _live.get(key, (None,))[0] is ref:
                del _live[key]

        _live[key] = (weakref.ref(root, forget), _Merged((w, b, a, scale)))
    return out


@contextlib.contextmanager
def keep_merged_weights() -> Iterator[None]:
    """Graphs run (eager) or compiled inside keep every ``W'`` for backward, as plain autograd would:
    the form before recomputation, for comparison, or a way out should the scope's hooks clash with
    a framework's own. Process-wide; compiled graphs take the setting they were compiled under
    (Dynamo guards on it). Cover the backward too where it recomputes checkpointed blocks."""
    global _recompute
    before, _recompute = _recompute, False
    try:
        yield
    finally:
        _recompute = before


@has_side_effect
def enter_recompute_scope() -> _Scope | None:
    """Start holding ``W'`` as recipes for the graph about to run; returns what
    :func:`exit_recompute_scope` needs (``None``: nothing to undo)."""
    if not _recompute or torch.compiler.is_compiling() or not torch.is_grad_enabled() \
            or not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return None
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is not None and isinstance(getattr(top[0], "__self__", None), _Scope):
        top[0].__self__.hooks.__exit__()  # left open by a graph run that raised: close it
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is not None and getattr(top[0], "_checkpoint_internal", False):
        return None  # inside torch.utils.checkpoint: nothing is kept, W' is recomputed anyway
    scope = _Scope(top)
    scope.hooks.__enter__()
    return scope


@has_side_effect
def exit_recompute_scope(scope: _Scope | None) -> None:
    if scope is not None:
        scope.hooks.__exit__()
