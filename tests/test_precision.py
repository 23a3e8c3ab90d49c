"""Low precision: a bf16 W keeps an exact fp32 master (switching error does not grow), fp16 is
refused with a remedy, and fp32 parameters under torch.autocast train eager and compiled."""

import copy

import pytest
import torch

import dynlora_fx as dl
from dynlora_fx.errors import ConfigError
from dynlora_fx.runtime.precision import join_master, master_weight, residual_of, split_master
from dynlora_fx.testing import load_script

_tiny_llama = load_script("examples/tiny_llama.py")
LlamaConfig, TinyLlama = _tiny_llama.LlamaConfig, _tiny_llama.TinyLlama


def _llama(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return TinyLlama(LlamaConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=32)).to(device=device, dtype=dtype)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _effective_error(gm, originals):
    """max over adapters of |master(W) + s·B·A − W_original| / |W_original|, all in fp32."""
    worst = 0.0
    for ad in gm.iter_adapters():
        w = gm.model.get_parameter(ad.target.weight)
        eff = master_weight(w, residual_of(ad, w, create=False)) + ad.delta(torch.float32)
        worst = max(worst, _rel(eff, originals[ad.target.weight]))
    return worst


def test_split_master_is_exact_and_rounds_to_nearest():
    x = torch.randn(100_000) * torch.logspace(-30, 30, 100_000)
    x[:5] = torch.tensor([0.0, -0.0, 1e-42, -3e38, float("inf")])
    high, low = split_master(x)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(join_master(high, low).view(torch.int32), x.view(torch.int32))
    # the bf16 half is the nearest bf16 (ties may go either way): within half a bf16 ulp
    finite = x.isfinite() & (x.abs() > 1e-37)
    assert ((high.float() - x)[finite].abs() <= x[finite].abs() * 2.0 ** -8 * 1.0001).all()


def test_bf16_switching_error_does_not_grow(device):
    model = _llama(torch.bfloat16, device)
    ids = torch.randint(0, 256, (2, 32), device=device)
    originals = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    gm = dl.transform(model, (ids,), dl.SwitchLoRA(rank=8, interval=8, freeze_steps=2))
    gm.eval()
    with torch.no_grad():
        reference, start = model.eval()(ids), gm(ids)
    assert _rel(start, reference) <= 0.03  # bf16 rounding of W and of the compute
    assert _effective_error(gm, originals) <= 1e-6  # the master is exact to fp32
    opt = dl.AdamW(gm.parameters(), lr=0.0)
    sw = dl.attach(gm, opt, total_steps=300)
    drift = {}
    for step in range(1, 301):
        opt.step()
        if step in (30, 300):
            with torch.no_grad():
                drift[step] = _rel(gm(ids), start)
    assert sum(sw.num_switched()) > 500  # every vector switched several times
    assert _effective_error(gm, originals) <= 1e-6  # after every switch, still exact to fp32
    assert drift[300] <= 1.25 * drift[30] + 1e-3  # bf16 rounding, flat: not a sum over switches


def test_bf16_relora_merges_exactly():
    model = _llama(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 32))
    originals = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    gm = dl.transform(model, (ids,), dl.ReLoRA(rank=8, reset_every=5, warmup=1))
    opt = dl.AdamW(gm.parameters(), lr=0.0)
    dl.attach(gm, opt, total_steps=20)
    for _ in range(20):  # four merge-and-reinitialise rounds
        opt.step()
    assert _effective_error(gm, originals) <= 1e-6


def test_bf16_resume_is_bit_identical_and_merge_matches():
    ids = torch.randint(0, 256, (2, 32))

    def fresh():
        gm = dl.transform(_llama(torch.bfloat16), (ids,), dl.SwitchLoRA(rank=8, interval=4, freeze_steps=1))
        opt = dl.AdamW(gm.parameters(), lr=1e-3)
        return gm, opt, dl.attach(gm, opt, total_steps=12)

    def train(gm, opt, steps):
        for _ in range(steps):
            logits = gm(ids)
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()

    straight = fresh()
    train(straight[0], straight[1], 12)
    first = fresh()
    train(first[0], first[1], 6)
    saved = copy.deepcopy({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sw": first[2].state_dict()})
    assert any(k.endswith("weight_residual") for k in saved["model"])
    resumed = fresh()
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sw"])
    train(resumed[0], resumed[1], 6)
    a, b = straight[0].state_dict(), resumed[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    gm = straight[0].eval()
    with torch.no_grad():
        assert _rel(dl.merge(gm)(ids), gm(ids)) <= 0.03  # the merged W is rounded to bf16 once


def test_fp16_weights_are_refused_with_a_remedy():
    ids = torch.randint(0, 256, (2, 32))
    with pytest.raises(ConfigError, match="autocast"):
        dl.transform(_llama(torch.float16), (ids,), dl.SwitchLoRA(rank=8))
    gm = dl.transform(_llama(), (ids,), dl.SwitchLoRA(rank=8)).half()  # cast after the transform
    with pytest.raises(ConfigError, match="float16"):
        dl.attach(gm, dl.AdamW(gm.parameters()), total_steps=10)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fp32_parameters_under_bf16_autocast(compiled, device):
    torch._dynamo.reset()
    ids = torch.randint(0, 256, (4, 32), device=device)
    gm = dl.transform(_llama(device=device), (ids,), dl.SwitchLoRA(rank=8, interval=2, freeze_steps=1))
    opt = dl.AdamW(gm.parameters(), lr=1e-3)
    sw = dl.attach(gm, opt, total_steps=6)
    run = dl.compile(gm) if compiled else gm
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = run(ids)
            assert logits.dtype == torch.bfloat16
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert sum(sw.num_switched()) > 0 and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in gm.parameters())
