"""Invariant 1 and friends on real architectures built from configs (no downloads)."""

import pytest
import torch

import dynlora_fx as dl
from dynlora_fx.export import rel_error
from dynlora_fx.testing.zoo import ZOO, weight_bearing_params


def _perturb(gm):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ad in gm.iter_adapters():
            ad.A.add_(torch.randn(ad.A.shape, generator=g) * ad.A.abs().mean())
            ad.B.add_(torch.randn(ad.B.shape, generator=g) * ad.B.abs().mean())


@pytest.mark.parametrize("form", ["activation", "weight"])
@pytest.mark.parametrize("case", ZOO, ids=[c.id for c in ZOO])
def test_zoo_model(case, form):
    model = case.build()
    args, kwargs = case.inputs(2), case.kwargs(2)
    gm = dl.transform(model, args, dl.SwitchLoRA(rank=0.25, form=form), example_kwargs=kwargs)
    if form == "weight":
        assert {a.form for a in dl.adapters(gm)} == {"weight"}
    for mode in ("train", "eval"):
        gm.graph_module(mode).graph.lint()

    # step 0: same function (eval: deterministic), eval output reproducible
    model.eval()
    gm.eval()
    with torch.no_grad():
        ref = case.main_output(model(*args, **kwargs))
        out = case.main_output(gm(*args, **kwargs))
        again = case.main_output(gm(*args, **kwargs))
    assert rel_error(out, ref) < 1e-5
    assert torch.equal(out, again)

    # coverage of the weight-bearing parameters, counted by an independent oracle
    oracle = weight_bearing_params(case.build(), args, kwargs, tied_embeddings=False)
    adapted = {a.weight for a in dl.adapters(gm)}
    assert adapted <= set(oracle), adapted - set(oracle)
    covered = sum(n for name, n in oracle.items() if name in adapted) / sum(oracle.values())
    assert covered >= 0.95, (covered, sorted(set(oracle) - adapted))

    # train mode at another batch size: gradients reach A and B, never W
    gm.train()
    x3, k3 = case.inputs(3), case.kwargs(3)
    out3 = case.main_output(gm(*x3, **k3))
    assert out3.shape[0] == 3
    out3.float().pow(2).mean().backward()
    params = dict(gm.named_parameters())
    for info in dl.adapters(gm):
        assert params[info.a].grad is not None and params[info.b].grad is not None, info.weight
        assert gm.model.get_parameter(info.weight).grad is None, info.weight
    assert any(params[i.b].grad.abs().sum() > 0 for i in dl.adapters(gm))

    # merge folds trained adapters into W with the same function
    _perturb(gm)
    gm.eval()
    merged = dl.merge(gm).eval()
    with torch.no_grad():
        adapted_out = case.main_output(gm(*args, **kwargs))
        merged_out = case.main_output(merged(*args, **kwargs))
    assert rel_error(merged_out, adapted_out) < 1e-4
    assert not any("adapters" in n for n, _ in merged.named_parameters())
