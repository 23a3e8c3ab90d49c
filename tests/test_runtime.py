"""SwitchLoRA runtime: switches preserve the function, schedule, optimizer semantics, resume."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import dynlora_fx as dl
from dynlora_fx.errors import ConfigError, StateError
from dynlora_fx.runtime import expected_switches
from dynlora_fx.runtime.optim import VectorGroup


class Block(nn.Module):
    """A small LLaMA-ish block: attention-free, but linear, raw-matmul and stacked-expert weights."""

    def __init__(self, d=32, experts=2):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.mix = nn.Parameter(torch.randn(d, d) / math.sqrt(d))  # used as x @ mix
        self.experts = nn.Parameter(torch.randn(experts, d, d) / math.sqrt(d))  # stacked 3-D weight
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x))) + x
        h = self.norm(h) @ self.mix
        per_expert = torch.einsum("bd,edf->ebf", h, self.experts)
        return per_expert.mean(0)


def build(seed=0, **cfg):
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(16, 32)
    config = dl.SwitchLoRA(rank=cfg.pop("rank", 8), seed=seed,
                           **{"interval": 10, "freeze_steps": 2, "form": "activation", **cfg})
    return dl.transform(model, (x,), config), x


def run(gm, opt, x, steps, target=None):
    g = torch.Generator().manual_seed(123)
    target = torch.randn(x.shape[0], 32, generator=g) if target is None else target
    for _ in range(steps):
        loss = (gm(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return target


def test_switches_preserve_function_and_follow_schedule():
    gm, x = build(rank=8)
    assert {a.form for a in dl.adapters(gm)} == {"activation", "weight"}
    T = 150
    opt = dl.AdamW(gm.parameters(), lr=0.0, weight_decay=0.0)
    sw = dl.attach(gm, opt, T)
    with torch.no_grad():
        ref = gm(x)
    run(gm, opt, x, T)
    with torch.no_grad():
        out = gm(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    expected = 0.0
    for t in range(T):
        for a in dl.adapters(gm):
            experts = math.prod(a.shape[:-2]) if a.op == "einsum" else 1
            expected += experts * expected_switches(t, T, a.rank, 10, 0.1)
    a_sw, b_sw = sw.num_switched()
    assert a_sw == b_sw
    assert abs(a_sw - expected) / expected < 0.10, (a_sw, expected)
    # in-use candidate indices stay distinct
    for ad in gm.iter_adapters():
        for idx in (ad.a_index, ad.b_index):
            flat = idx.reshape(-1, idx.shape[-1])
            assert all(len(set(row.tolist())) == row.numel() for row in flat)


@pytest.mark.parametrize("candidates,interval,freeze", [("seeded", 10, 2), ("stored", 10, 2), ("seeded", 3, 1)])
def test_fast_runtime_matches_reference_loop(candidates, interval, freeze):
    # interval 10 at rank 8 switches 0-1 vectors per side and step, interval 3 switches 2-3
    runs = []
    for strategy in ("batched", "reference"):
        gm, x = build(rank=8, candidates=candidates, interval=interval, freeze_steps=freeze)
        # eps 1e-6: a first Adam step on a gradient near eps would magnify rounding differences
        # (W absorbs a rank-2k update at once here, vector by vector in the reference)
        opt = dl.AdamW(gm.parameters(), lr=1e-2, eps=1e-6)
        sw = dl.attach(gm, opt, 50, strategy=strategy)
        run(gm, opt, x, 50)
        runs.append((gm, opt, sw))
    (fast, opt_fast, sw_fast), (ref, opt_ref, sw_ref) = runs
    assert sw_fast.num_switched() == sw_ref.num_switched() and sw_fast.num_switched()[0] > 10
    for (name, p), (_, q) in zip(fast.state_dict().items(), ref.state_dict().items()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(p, q), name
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):  # moments and per-vector steps
        for key, value in opt_fast.state[p].items():
            torch.testing.assert_close(value, opt_ref.state[q][key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_resume_is_bit_identical():
    N = 12
    gm, x = build(rank=8)
    opt = dl.AdamW(gm.parameters(), lr=1e-2)
    sw = dl.attach(gm, opt, 2 * N)
    target = run(gm, opt, x, 2 * N)
    straight = copy.deepcopy(gm.state_dict())

    gm1, _ = build(rank=8)
    opt1 = dl.AdamW(gm1.parameters(), lr=1e-2)
    sw1 = dl.attach(gm1, opt1, 2 * N)
    run(gm1, opt1, x, N, target)
    saved = copy.deepcopy((gm1.state_dict(), opt1.state_dict(), sw1.state_dict()))

    gm2, _ = build(seed=7, rank=8)  # a fresh model with another seed: everything must come from the state
    opt2 = dl.AdamW(gm2.parameters(), lr=1e-2)
    sw2 = dl.attach(gm2, opt2, 2 * N)
    gm2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sw2.load_state_dict(saved[2])
    run(gm2, opt2, x, N, target)
    for k, v in gm2.state_dict().items():
        assert torch.equal(v, straight[k]), k
    assert sw2.step == sw.step == 2 * N


def test_reset_vector_restarts_like_fresh_adamw_and_frozen_vectors_hold():
    gm, x = build(rank=8, interval=40, freeze_steps=3)
    opt = dl.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)
    sw = dl.attach(gm, opt, 400)
    ad = gm.adapter("up.weight")
    target = None
    while not (ad.b_frozen == 3).any():  # step until an A-row switch freezes columns of B
        target = run(gm, opt, x, 1, target)
    cols = (ad.b_frozen == 3).nonzero().flatten()
    st = opt.vector_state(ad.B)
    assert torch.all(st["step"][0, cols] == 0) and torch.all(st["exp_avg"][:, cols] == 0)
    held = ad.B.detach()[:, cols].clone()
    for _ in range(3):  # frozen for freeze_steps optimizer steps: no update, not even weight decay
        run(gm, opt, x, 1, target)
        assert torch.equal(ad.B.detach()[:, cols], held)
    assert torch.all(ad.b_frozen[cols] == 0) and torch.all(st["step"][0, cols] == 0)
    before = ad.B.detach()[:, cols].clone()
    (gm(x) - target).pow(2).mean().backward()
    fresh_param = nn.Parameter(before.clone())
    fresh_param.grad = ad.B.grad[:, cols].clone()
    fresh = torch.optim.AdamW([fresh_param], lr=1e-2, weight_decay=0.1)
    fresh.step()
    opt.step()
    opt.zero_grad()
    assert torch.all(opt.vector_state(ad.B)["step"][0, cols] == 1)
    torch.testing.assert_close(ad.B.detach()[:, cols], fresh_param.detach(), rtol=1e-6, atol=1e-7)
    assert sw.step > 4


def test_adamw_matches_torch_for_plain_and_unreset_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    ours = dl.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(ours, 2, 0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, 2, 0.5)
    x = torch.randn(5, 8)
    for _ in range(5):
        for m, o, s in ((model, ours, sched), (twin, ref, sched_ref)):
            m(x).pow(2).sum().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            o.step()
            o.zero_grad()
            s.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    # a registered factor with nothing frozen or reset follows torch's AdamW to rounding
    w = nn.Parameter(torch.randn(4, 6))
    w_ref = nn.Parameter(w.detach().clone())
    o1 = dl.AdamW([w], lr=1e-2, weight_decay=0.1)
    o1.register_vectors(VectorGroup([w], -2, lambda: torch.zeros(1, 4, dtype=torch.int32)))
    o2 = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.1)
    for i in range(6):
        g = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        w.grad, w_ref.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)


def test_candidate_storage_modes():
    gm_seeded, x = build(rank=8, candidates="seeded")
    gm_stored, _ = build(rank=8, candidates="stored")
    sw_seeded = dl.attach(gm_seeded, dl.AdamW(gm_seeded.parameters()), 10)
    sw_stored = dl.attach(gm_stored, dl.AdamW(gm_stored.parameters()), 10)
    assert sw_seeded and sw_stored
    size = lambda m: sum(t.numel() for t in m.state_dict().values())  # noqa: E731
    assert size(gm_seeded) == size(gm_stored)
    for ad in gm_seeded.iter_adapters():
        assert "stored_a" not in ad._buffers and "stored_b" not in ad._buffers
    for ad in gm_stored.iter_adapters():
        t = ad.target
        K = min(t.rows, t.cols)
        assert ad.stored_a.shape == (*t.batch, K, t.cols) and ad.stored_b.shape == (*t.batch, K, t.rows)
        # stored and seeded hold the very same vectors, and A's rows are candidates
        idx = torch.arange(K).expand(*t.batch, K)
        torch.testing.assert_close(ad.stored_a, ad.generate_candidates(0, 0, idx), rtol=0, atol=0)
        flat_a, flat_i = ad.A.detach().reshape(-1, t.rank, t.cols), ad.a_index.reshape(-1, t.rank)
        table = ad.stored_a.reshape(-1, K, t.cols)
        for e in range(flat_a.shape[0]):
            torch.testing.assert_close(flat_a[e], table[e][flat_i[e]], rtol=0, atol=0)
    # the candidate distribution: uniform in ±sqrt(3)·std_A
    ad = gm_stored.adapter("up.weight")
    assert ad.stored_a.abs().max() <= ad.bound_a
    assert abs(ad.stored_a.std().item() - ad.bound_a / math.sqrt(3)) / (ad.bound_a / math.sqrt(3)) < 0.05


def test_non_finite_adapter_skips_switches_and_w_stays_finite():
    gm, x = build(rank=8)
    opt = dl.AdamW(gm.parameters(), lr=0.0)
    sw = dl.attach(gm, opt, 20)
    ad = gm.adapter("up.weight")
    with torch.no_grad():
        ad.A[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        run(gm, opt, x, 3)
        sw.state_dict()
    assert torch.isfinite(gm.model.up.weight).all()


def test_attach_errors():
    gm, x = build()
    opt = dl.AdamW(gm.parameters())
    dl.attach(gm, opt, 10)
    with pytest.raises(StateError, match="already has a switcher"):
        dl.attach(gm, opt, 10)
    with pytest.raises(StateError, match="does not hold the adapters"):
        dl.attach(gm, dl.AdamW(gm.model.parameters()), 10)
    with pytest.raises(StateError, match="use dl.AdamW"):
        dl.attach(gm, torch.optim.AdamW(gm.parameters()), 10)
    with pytest.raises(StateError, match="total_steps"):
        dl.attach(gm, dl.AdamW(gm.parameters()), 0)
    sw = dl.attach(gm, dl.AdamW(gm.parameters()), 10)
    with pytest.raises(StateError, match="not a switcher state"):
        sw.load_state_dict({"step": 3})
    bad = sw.state_dict()
    bad["adapters"]["up.weight"]["a_index"] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(StateError, match="misshapen"):
        sw.load_state_dict(bad)
    with pytest.raises(ConfigError, match="interval"):
        dl.SwitchLoRA(interval=5, freeze_steps=5)


def test_lora_and_relora_on_the_same_machinery():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(16, 32)
    gm = dl.transform(model, (x,), dl.LoRA(rank=4))
    w0 = gm.model.up.weight.detach().clone()
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    dl.attach(gm, opt, 10)
    run(gm, opt, x, 5)
    assert torch.equal(gm.model.up.weight, w0)  # LoRA never touches W

    gm = dl.transform(model, (x,), dl.ReLoRA(rank=4, reset_every=4, warmup=2))
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    sw = dl.attach(gm, opt, 12)
    target = run(gm, opt, x, 3)
    with torch.no_grad():
        before = gm(x)
    run(gm, opt, x, 1, target)  # 4th step: the update, then merge + re-init + prune
    ad = gm.adapter("up.weight")
    assert torch.count_nonzero(ad.B) == 0 and torch.count_nonzero(opt.state[ad.A]["exp_avg"]) <= 1
    assert not torch.equal(gm.model.up.weight, w0)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))  # runs after the switcher's
    run(gm, opt, x, 3, target)
    assert seen == pytest.approx([0.5e-2, 1e-2, 1e-2])  # jagged restart: warm-up 2 steps after the reset
    assert opt.param_groups[0]["lr"] == 1e-2 and sw.step == 7  # the multiplier is applied around the step only
    with torch.no_grad():
        assert before.shape == gm(x).shape

def test_hooks_run_once_per_step_even_after_a_stock_adamw_exists():
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # makes torch wrap AdamW.step with its hook runner
    gm, x = build()
    opt = dl.AdamW(gm.parameters(), lr=1e-3)
    sw = dl.attach(gm, opt, 10)
    run(gm, opt, x, 3)
    assert sw.step == 3


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 24), n=st.integers(2, 24), rank_frac=st.floats(0.05, 1.0),
       form=st.sampled_from(["activation", "weight"]), candidates=st.sampled_from(["seeded", "stored"]),
       seed=st.integers(0, 2**31 - 1))
def test_property_switching_never_changes_the_function(m, n, rank_frac, form, candidates, seed):
    torch.manual_seed(seed % 1000)
    model = nn.Linear(n, m)
    x = torch.randn(5, n)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=rank_frac, form=form, candidates=candidates, seed=seed,
                                                 interval=2, freeze_steps=1))
    opt = dl.AdamW(gm.parameters(), lr=0.0)
    sw = dl.attach(gm, opt, 8)
    with torch.no_grad():
        ref = gm(x)
    for _ in range(8):
        gm(x).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)
    ad = gm.iter_adapters()[0]
    for idx in (ad.a_index, ad.b_index):  # in-use candidates stay distinct and in range
        assert len(set(idx.tolist())) == idx.numel() and 0 <= int(idx.min()) and int(idx.max()) < min(m, n)
    assert sw.step == 8


def test_bundle_weights_round_trip_while_factors_share_stacked_storage(tmp_path):
    from safetensors.torch import load_model

    from dynlora_fx.checkpoint import write_bundle

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        return dl.transform(model, (torch.randn(2, 16),), dl.SwitchLoRA(rank=4, interval=4, freeze_steps=1))

    gm = make()
    opt = dl.AdamW(gm.parameters(), lr=1e-2)
    dl.attach(gm, opt, 20)
    a0, a1 = (ad.A for ad in gm.iter_adapters())
    assert a0.untyped_storage().data_ptr() == a1.untyped_storage().data_ptr()  # one bank: one stacked tensor
    run(gm, opt, torch.randn(4, 16), 5, torch.randn(4, 16))
    write_bundle(tmp_path, gm, {})
    fresh = make()
    load_model(fresh, str(tmp_path / "weights.safetensors"))
    for (name, v), w in zip(gm.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), name


def test_attaching_after_some_steps_keeps_the_optimizer_state():
    gm, x = build(rank=8)
    opt = dl.AdamW(gm.parameters(), lr=1e-2)
    target = run(gm, opt, x, 3)  # no switcher yet: stock AdamW for every parameter
    ad = gm.adapter("up.weight")
    before = {k: v.clone() for k, v in opt.state[ad.A].items()}
    dl.attach(gm, opt, 100)
    st = opt.vector_state(ad.A)
    assert torch.equal(st["exp_avg"], before["exp_avg"]) and torch.equal(st["exp_avg_sq"], before["exp_avg_sq"])
    assert st["step"].shape == (8, 1) and torch.all(st["step"] == 3)  # the tensor-wide step, per vector
    run(gm, opt, x, 2, target)
    steps = opt.vector_state(ad.A)["step"].flatten()
    assert (steps == 5).sum() >= 6 and torch.all((steps == 5) | (steps <= 2))  # a few reset by switches


def test_moving_the_module_after_attaching_restacks_and_keeps_training():
    gm, x = build(rank=8, interval=3, freeze_steps=1)
    # adapters only: torch's own AdamW state does not follow a module moved after the first step
    opt = dl.AdamW([p for n, p in gm.named_parameters() if n.startswith("adapters.")], lr=1e-2)
    sw = dl.attach(gm, opt, 100)
    target = run(gm, opt, x, 3)
    gm.double()  # new storage for every parameter and floating buffer: stacks are rebuilt lazily
    x, target = x.double(), target.double()
    run(gm, opt, x, 3, target)
    ad = gm.adapter("up.weight")
    assert ad.A.dtype == torch.float64 and opt.vector_state(ad.A)["exp_avg"].dtype == torch.float64
    with torch.no_grad():
        before = gm(x)
    opt.zero_grad()
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 0.0
    switched = sw.num_switched()
    opt.step()  # switches only
    opt.param_groups[0]["lr"] = lr
    assert sw.num_switched()[0] > switched[0]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=1e-9, atol=1e-9)


def test_relora_reset_preserves_the_function_with_either_init():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(16, 32)
    for init in ("lora", "switchlora"):
        gm = dl.transform(model, (x,), dl.ReLoRA(rank=8, reset_every=3, warmup=1, init=init))
        with torch.no_grad():
            before = gm(x)
        opt = dl.AdamW(gm.parameters(), lr=0.0)
        dl.attach(gm, opt, total_steps=9)
        for _ in range(9):  # three resets: merge, re-initialise (non-zero B for init="switchlora")
            opt.step()
        with torch.no_grad():
            assert ((gm(x) - before).abs().max() / before.abs().max()).item() < 1e-5, init
