"""Memory of the weight-space form: backward recomputes ``W' = W + s·B·A`` instead of keeping it.

Per op kind the form serves (matmul, einsum, linear, conv, grouped conv, LSTM weights, packed
attention projection, stacked experts): outputs and gradients equal those of the form as it was
(``W'`` built by plain autograd ops and fed to the model's own op), and what autograd saves for
backward is no more than the plain model saves — while with recomputation switched off
(``keep_merged_weights``) the same probe sees every ``W'``. Saved bytes are counted with ``saved_tensors_hooks``, distinct storages,
parameters and buffers left out.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import dynlora_fx as dl
from dynlora_fx.ops import keep_merged_weights
from dynlora_fx.testing import SavedTensors


def saved_bytes(module, args, params):
    """Bytes autograd keeps for backward in one forward of ``module(*args)``, distinct storages,
    ``params`` excluded; then runs the backward (so recipes are unpacked) and returns the output."""
    with SavedTensors(exclude=params) as saved:
        out = module(*args)
    out.square().sum().backward()
    return saved.bytes, out


class Products(nn.Module):
    """F.linear, matmul (x @ W as (in, out)) and einsum on raw parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, 16) / 4)
        self.w2 = nn.Parameter(torch.randn(24, 24) / 5)
        self.w3 = nn.Parameter(torch.randn(8, 24) / 5)

    def forward(self, x):
        return torch.einsum("bi,oi->bo", torch.matmul(torch.tanh(F.linear(x, self.w1)), self.w2), self.w3)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return self.grouped(torch.relu(self.conv(x))).mean((2, 3))


class Experts(nn.Module):
    """Stacked expert weights (E, out, in), each expert adapted on its own (baddbmm)."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(3, 24, 16) / 4)
        self.w_out = nn.Parameter(torch.randn(3, 16, 24) / 5)

    def forward(self, x):  # x: (E, tokens, 16)
        h = torch.relu(torch.bmm(x, self.w_in.transpose(1, 2)))
        return torch.einsum("ebi,eoi->ebo", h, self.w_out)


class Sequence(nn.Module):
    """nn.MultiheadAttention (packed in-projection) and nn.LSTM weights; captured by torch.export."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 12, batch_first=True)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.lstm(h)[0]


CASES = {
    "matmul-einsum-linear": (Products, lambda: torch.randn(6, 16)),
    "conv-grouped": (Convs, lambda: torch.randn(2, 4, 6, 6)),
    "stacked-experts": (Experts, lambda: torch.randn(3, 5, 16)),
    "mha-lstm": (Sequence, lambda: torch.randn(2, 5, 16)),
}


# the op consuming each adapted weight: MHA's packed in-projection reaches F.linear through chunking
OPS = {"matmul-einsum-linear": ["linear", "matmul", "einsum"], "conv-grouped": ["conv2d", "conv2d"],
       "stacked-experts": ["bmm", "einsum"], "mha-lstm": ["linear", "linear", "lstm", "lstm"]}


@pytest.fixture(scope="module")
def transformed():
    """Each case transformed once (export captures take seconds), adapters moved off their init."""
    out = {}
    for name, (cls, make_x) in CASES.items():
        torch.manual_seed(0)
        model, x = cls(), make_x()
        gm = dl.transform(model, (x,), dl.LoRA(rank=4, init="switchlora", form="weight"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for ad in gm.iter_adapters():
                ad.A.add_(torch.randn(ad.A.shape, generator=g) * 0.3)
                ad.B.add_(torch.randn(ad.B.shape, generator=g) * 0.3)
        out[name] = (model, gm, x)
    return out


def reference(gm, x):
    """The form as it was: each W' = addmm(W, s·B, A) by plain autograd, fed to the model's own ops."""
    weights = {}
    for ad in gm.iter_adapters():
        t = ad.target
        w = gm.model.get_parameter(t.weight)
        if t.batch:
            merged = torch.baddbmm(w.reshape(-1, t.rows, t.cols), (ad.B * ad.scale).reshape(-1, t.rows, t.rank),
                                   ad.A.reshape(-1, t.rank, t.cols))
        else:
            merged = torch.addmm(w.reshape(t.rows, t.cols), ad.B * ad.scale, ad.A)
        weights[t.weight] = merged.reshape(t.shape)
    return functional_call(gm.model, weights, (x,))


def main_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("case", list(CASES))
def test_weight_form_matches_the_merged_weight_form(transformed, case):
    _, gm, x = transformed[case]
    assert {a.form for a in dl.adapters(gm)} == {"weight"}
    assert [a.op for a in dl.adapters(gm)] == OPS[case]
    assert gm.capture_method == ("export" if case == "mha-lstm" else "symbolic_trace")
    x = x.clone().requires_grad_()
    grads = []
    for fn in (lambda: gm(x), lambda: reference(gm, x)):
        gm.zero_grad(set_to_none=True)
        x.grad = None
        out = main_output(fn())
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append([out.detach(), x.grad] + [p.grad for p in gm.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[0])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_weight_form_saves_no_merged_weight(transformed, case):
    model, gm, x = transformed[case]
    x = x.clone().requires_grad_()  # as inside a network: every op needs its input gradient, hence W'
    plain = model.train()
    state = lambda m: list(m.parameters()) + list(m.buffers())  # noqa: E731
    call = lambda m: (lambda x: main_output(m(x)))  # noqa: E731
    plain_bytes, _ = saved_bytes(call(plain), (x,), state(plain))
    ours, _ = saved_bytes(call(gm), (x,), state(gm))
    with keep_merged_weights():
        kept, _ = saved_bytes(call(gm), (x,), state(gm))
    merged = sum(ad.target.rows * ad.target.cols * 4 * max(1, len(ad.target.batch) and ad.target.batch[0])
                 for ad in gm.iter_adapters())
    # the plain model saves what the adapted one needs (x for the weight gradient, ...), nothing more
    assert ours <= plain_bytes, (ours, plain_bytes)
    # the probe does see W': without recomputation every merged weight is kept (some through copies)
    assert kept - ours >= merged, (kept, ours, merged)


def test_compiled_weight_form_saves_no_merged_weight():
    """Under torch.compile the merge runs under checkpoint: AOTAutograd's partitioner recomputes it,
    fullgraph, without recompiling across steps. Without the checkpoint it keeps every W'."""
    model = Products()
    gm = dl.transform(model, (torch.randn(6, 16),), dl.LoRA(rank=4, init="switchlora", form="weight"))
    x = torch.randn(6, 16, requires_grad=True)  # an input needing its gradient: W' is needed in backward
    merged = sum(p.numel() * 4 for p in model.parameters())

    def compiled_bytes(module, params):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
            return [saved_bytes(compiled, (x,), params) for _ in range(2)][-1]

    plain_bytes, _ = compiled_bytes(model, list(model.parameters()))
    ours, out = compiled_bytes(gm, list(gm.parameters()))
    torch.testing.assert_close(out, gm(x))
    with keep_merged_weights():
        kept, _ = compiled_bytes(gm, list(gm.parameters()))
    assert ours <= plain_bytes + 64, (ours, plain_bytes)  # a few scalars at most
    assert kept >= plain_bytes + merged, (kept, plain_bytes, merged)


@pytest.mark.parametrize("changed", ["A", "W", "activation"])
def test_changes_between_forward_and_backward_raise(transformed, changed):
    """As autograd's own check would: recomputing W' from changed inputs would give wrong gradients,
    and the scope's hooks must not hide an in-place change of any other saved tensor either."""
    _, gm, x = transformed["matmul-einsum-linear"]
    x = x.clone().requires_grad_()
    out = gm(x)
    with torch.no_grad():  # in-place updates, as an optimizer step or switching would make
        ad = gm.iter_adapters()[-1]
        {"A": ad.A, "W": gm.model.get_parameter(ad.target.weight), "activation": x}[changed].mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_scope_closes_after_a_failed_forward_and_steps_aside_inside_checkpoint(transformed):
    _, gm, x = transformed["matmul-einsum-linear"]
    top = torch._C._autograd._top_saved_tensors_default_hooks
    with pytest.raises(RuntimeError):
        gm(torch.randn(6, 5))  # wrong width: the graph raises after opening its scope
    assert top(False) is not None, "a run that raised leaves its scope open"
    gm(x).sum().backward()  # the next run closes it, then opens and closes its own
    assert top(False) is None
    # under torch.utils.checkpoint nothing is saved: the scope stays closed, outputs and grads agree
    x = x.clone().requires_grad_()
    torch.utils.checkpoint.checkpoint(gm, x, use_reentrant=False).sum().backward()
    got = x.grad
    x.grad = None
    gm(x).sum().backward()
    torch.testing.assert_close(got, x.grad)
    assert top(False) is None
