"""Regression tests for issue 13 (silent mismatches found by fuzzing) and for the shrunk cases the
project's own fuzzer (dynlora_fx/testing/fuzz_models.py, benchmarks/fuzz.py) found since. Each model is the
smallest that showed the bug; each test checks what went wrong: outputs, gradients, buffers,
the reason a weight was skipped, or what a call with another batch size does."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import dynlora_fx as dl
from dynlora_fx import capture as capture_mod
from dynlora_fx.errors import CaptureError, DynLoRAError


def run(module, x, mode, seed=0):
    module.train(mode == "train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module(x)


def assert_same_function(model, gm, x, modes=("train", "eval")):
    """Outputs, buffers and every gradient of the transformed module equal the model's: adapter
    gradients are s·Bᵀ·∂L/∂W and s·∂L/∂W·Aᵀ of the model's own ∂L/∂W."""
    for mode in modes:
        ref = copy.deepcopy(model)
        out_r, out_g = run(ref, x, mode), run(gm, x, mode)
        torch.testing.assert_close(out_g, out_r, rtol=1e-5, atol=1e-6)
        for (k, b_r), (_, b_g) in zip(ref.named_buffers(), gm.model.named_buffers()):
            torch.testing.assert_close(b_g, b_r, msg=f"{mode}: buffer {k}")
        w = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(3))
        (out_r * w).sum().backward()
        gm.zero_grad()
        (out_g * w).sum().backward()
        for name, p in ref.named_parameters():
            if name in {a.weight for a in dl.adapters(gm)}:
                ad = gm.adapter(name)
                G = torch.zeros_like(p) if p.grad is None else p.grad
                G = G.reshape(*ad.target.batch, ad.target.rows, ad.target.cols)
                s = ad.scale
                got_a = torch.zeros_like(ad.A) if ad.A.grad is None else ad.A.grad  # unread in this mode
                got_b = torch.zeros_like(ad.B) if ad.B.grad is None else ad.B.grad
                torch.testing.assert_close(got_a, s * ad.B.detach().mT @ G, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(got_b, s * G @ ad.A.detach().mT, rtol=1e-4, atol=1e-6)
            else:
                mine = gm.model.get_parameter(name).grad
                if p.grad is None:
                    assert mine is None or not mine.any(), f"{mode}: {name} gets a gradient the model does not give"
                else:
                    torch.testing.assert_close(mine, p.grad, rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
        _restore_buffers(gm, ref, model)


def _restore_buffers(gm, ref, model):
    with torch.no_grad():
        for (_, b_g), (_, b_m) in zip(gm.model.named_buffers(), model.named_buffers()):
            b_g.copy_(b_m)


def _double_plus_one(module, inputs, output):
    return output * 2 + 1


def _halve_input(module, inputs):
    return (inputs[0] * 0.5,)


# -- class 1: forward hooks and pre-hooks on Linear/Conv --------------------------------------
class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 6, 1)
        self.fc.register_forward_hook(_double_plus_one)
        self.fc.register_forward_pre_hook(_halve_input)
        self.conv.register_forward_hook(_double_plus_one)

    def forward(self, x):
        return self.conv(self.fc(x).unsqueeze(-1)).squeeze(-1)


def test_forward_hooks_on_linear_and_conv_are_kept():
    model, x = Hooked(), torch.randn(4, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert gm.capture_method == "export"  # fx would functionalize the layers and drop the hooks
    assert {a.weight for a in dl.adapters(gm)} == {"fc.weight", "conv.weight"}
    assert_same_function(model, gm, x)


def test_root_module_hook_is_kept():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    model.register_forward_hook(_double_plus_one)
    x = torch.randn(3, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert_same_function(model, gm, x)


def test_backward_hooks_are_refused_by_name():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    model[1].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(CaptureError, match=r"^1: it has a backward hook.*Remedy: remove the hook"):
        dl.transform(model, (torch.randn(3, 6),), dl.SwitchLoRA(rank=2))


# -- class 2: hook-based spectral_norm (the old API) -------------------------------------------
class SpectralOld(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.utils.spectral_norm(nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def test_old_spectral_norm_keeps_power_iteration_and_trains_weight_orig():
    model, x = SpectralOld(), torch.randn(4, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    reasons = {s.weight: s.reason for s in gm.plan.skipped}
    # weight_orig is read by the power iteration and divided by sigma before the product: the
    # true reason, not "not used by forward"
    assert "fc.weight_orig" in reasons and "not used by forward" not in reasons["fc.weight_orig"]
    assert "div" in reasons["fc.weight_orig"]
    assert_same_function(model, gm, x)  # train mode updates weight_u like the model does
    u_before = gm.model.fc.weight_u.clone()
    run(gm, x, "train")
    assert not torch.equal(gm.model.fc.weight_u, u_before), "the power iteration must run in train mode"
    gm.zero_grad()
    run(gm, x, "train").sum().backward()
    assert gm.model.fc.weight_orig.grad is not None and gm.model.fc.weight_orig.grad.abs().sum() > 0


def test_capture_leaves_tensor_attributes_and_buffers_as_they_were():
    """spectral_norm's hook rebinds fc.weight to a tensor that needs a gradient whenever the model
    runs; capture runs it, and a deepcopy (merge) of the result used to fail on that tensor."""
    model, x = SpectralOld(), torch.randn(4, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert gm.model.fc.weight.grad_fn is None
    dl.merge(gm)  # deep-copies the model


# -- class 3: torch.no_grad() inside forward ------------------------------------------------------
class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(6, 6) / 3)
        self.v = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):
        with torch.no_grad():
            frozen = x @ self.w + x @ self.v  # v is also used with gradients below
        return self.fc(x) + frozen @ self.v


def test_no_grad_region_keeps_its_gradients():
    model, x = NoGrad(), torch.randn(4, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert gm.capture_method == "export"
    reasons = {s.weight: s.reason for s in gm.plan.skipped}
    assert reasons["w"].startswith("read only under torch.no_grad")
    assert {a.weight for a in dl.adapters(gm)} == {"fc.weight", "v"}
    assert_same_function(model, gm, x)


def test_fx_graph_that_drops_no_grad_fails_verification_on_gradients():
    """Outputs alone cannot tell: the same values, different gradients."""
    model, x = NoGrad(), torch.randn(4, 6)
    gm = fx.symbolic_trace(model)  # plain fx: the no_grad context is gone; parameters are shared
    assert gm.fc.weight is model.fc.weight
    torch.testing.assert_close(gm(x), model(x))
    why = capture_mod._verify(model, {"train": gm, "eval": gm}, (x,), {})
    assert "gradient" in why and "output" not in why


# -- class 4: a weight used only in eval mode ---------------------------------------------------
class EvalOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.wt = nn.Parameter(torch.randn(6, 6) / 3)
        self.we = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):
        return x @ self.wt if self.training else x @ self.we


def test_weight_used_only_in_eval_mode_is_adapted():
    model, x = EvalOnly(), torch.randn(4, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert {a.weight for a in dl.adapters(gm)} == {"wt", "we"}
    assert not gm.plan.skipped
    assert_same_function(model, gm, x)
    dl.merge(gm)


# -- smaller findings -------------------------------------------------------------------------------
class FxOnlyBranch(nn.Module):
    """Code that runs differently under fx tracing (as Hugging Face's is_torch_fx_proxy checks do):
    the fx graph fails on real inputs, export's graph is right."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            h = h.view(-1, 99)
        return h


def test_fallback_to_export_prints_nothing(capfd):
    gm = dl.transform(FxOnlyBranch(), (torch.randn(4, 6),), dl.SwitchLoRA(rank=2))
    assert gm.capture_method == "export"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "FX-traced" not in err, err


class WeightNormed(nn.Module):
    def __init__(self, hook=False):
        super().__init__()
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)
        if hook:  # a forward hook sends the model to torch.export
            self.head.register_forward_hook(_double_plus_one)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def test_weight_norm_is_planned_alike_under_fx_and_export():
    x = torch.randn(4, 6)
    plans = {}
    for hook in (False, True):
        model = WeightNormed(hook)
        gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
        plans[gm.capture_method] = ({a.weight for a in dl.adapters(gm)},
                                    {s.weight: s.reason.split(" (node")[0] for s in gm.plan.skipped})
        assert_same_function(model, gm, x)
    assert set(plans) == {"symbolic_trace", "export"}
    assert plans["symbolic_trace"] == plans["export"]
    adapted, skipped = plans["export"]
    assert "fc.parametrizations.weight.original1" in adapted  # the direction v: weight space
    assert skipped == {"fc.parametrizations.weight.original0": "used by _weight_norm"}  # the magnitude g


class Counter(nn.Module):
    """Buffers updated in place in train mode: fx used to run the update once while tracing."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("avg", torch.zeros(6))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            self.avg.mul_(0.9).add_(y.detach().mean(0) * 0.1)
            self.calls.add_(1)
        return y - self.avg


def test_buffer_updates_are_traced_not_run_once():
    model, x = Counter(), torch.randn(4, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert gm.capture_method == "symbolic_trace"
    assert gm.model.calls.item() == 0, "capturing must not move the model's buffers"
    assert_same_function(model, gm, x)
    run(gm, x, "train")
    run(gm, x, "train")
    assert gm.model.calls.item() == 2


class DeadProduct(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.unused_head = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        self.unused_head(h)  # computed and thrown away: fx keeps the node
        return h


def test_dead_code_product_is_not_a_use():
    gm = dl.transform(DeadProduct(), (torch.randn(3, 6),), dl.SwitchLoRA(rank=2))
    assert [a.weight for a in dl.adapters(gm)] == ["fc.weight"]
    assert {s.weight: s.reason for s in gm.plan.skipped}["unused_head.weight"] == "not used by forward"


# -- shrunk fuzzer findings -----------------------------------------------------------------------
class BatchBranchCell(nn.Module):
    """fuzz seed 10182, shrunk: a branch on the batch size pins it (export's 0/1 rule leaves the
    range [2, 2]), and an LSTMCell's zero state is baked with that size; export's graph module
    did not check the static size, so batch 1 ran into the LSTM op with a batch-2 state."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.cell = nn.LSTMCell(6, 6)

    def forward(self, x):
        h = self.a(x) if x.shape[0] > 2 else self.b(x)
        return self.cell(h)[0]


class StaticBmm(nn.Module):
    """fuzz seed 10358, shrunk: a view that bakes the batch size (``x.shape[0]``) where export
    specialised it; another batch size failed deep inside the graph, or broadcast silently."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        x3 = x.reshape(x.shape[0], -1, 4)
        y = torch.bmm(x3, self.w.expand(x.shape[0], 4, 4)).reshape(x.shape)
        return self.gate(y) if x.shape[0] > 2 else y


@pytest.mark.parametrize("cls", [BatchBranchCell, StaticBmm], ids=["lstm-cell-state", "bmm-view"])
def test_other_batch_sizes_are_captured_again(cls):
    """Where export pinned the batch size, another one is captured again (issue 18): same outputs, one
    graph set per guard set (batch 2 as captured, batch 1 — export's 0/1 rule — and batch > 2)."""
    model, x = cls(), torch.randn(2, 6 if cls is BatchBranchCell else 4)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert_same_function(model, gm, x)
    for batch in (1, 2, 5, 3, 1):
        other = torch.randn(batch, x.shape[1])
        for mode in ("eval", "train"):
            torch.testing.assert_close(run(gm, other, mode), run(copy.deepcopy(model), other, mode),
                                       rtol=1e-5, atol=1e-6)
    assert len(gm._graph_sets) == 3


def test_functionalize_keeps_hooked_layers_opaque():
    from dynlora_fx.passes import functionalize_leaves

    model = Hooked()
    gm = fx.symbolic_trace(model)  # plain fx keeps Linear/Conv as call_module, hooks run at call time
    x = torch.randn(3, 6)
    want = model(x)
    functionalize_leaves(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "conv"]
    torch.testing.assert_close(gm(x), want)


def test_a_model_that_cannot_be_copied_is_a_clear_error():
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 8)), nn.Linear(8, 2))
    model.train()(torch.randn(4, 8))  # the old spectral_norm leaves a non-leaf weight: deepcopy fails
    with pytest.raises(DynLoRAError, match="cannot be copied"):
        dl.transform(model, (torch.randn(4, 8),), dl.SwitchLoRA(rank=2))
