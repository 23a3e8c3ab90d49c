"""Pass-level tests on tiny modules: structure, numerics, report, errors."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynlora_fx as dl
from dynlora_fx.errors import CaptureError, ConfigError, TargetError
from dynlora_fx.ops import merged_weight
from dynlora_fx.passes.insert_adapters import META_KEY


def perturb_adapters(gm, scale=0.5):
    """Move A and B away from their initial values, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in gm.iter_adapters():
            ad.A.add_(torch.randn(ad.A.shape, generator=g) * scale)
            ad.B.add_(torch.randn(ad.B.shape, generator=g) * scale)


def roles(gm, mode="train"):
    return [n.meta[META_KEY]["role"] for n in gm.graph_module(mode).graph.nodes if META_KEY in n.meta]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self, groups=1, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups, padding_mode=padding_mode)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


class RawParams(nn.Module):
    """F.linear / matmul / einsum on raw parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8) / 3)
        self.w2 = nn.Parameter(torch.randn(16, 16) / 4)  # used as x @ w2 (in, out)
        self.w3 = nn.Parameter(torch.randn(4, 16) / 4)

    def forward(self, x):
        h = F.linear(x, self.w1)
        h = torch.matmul(h, self.w2)
        return torch.einsum("bi,oi->bo", h, self.w3)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight
        self.unused = nn.Linear(8, 8)

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def check_equivalent_and_mergeable(model, args, config, kwargs=None):
    kwargs = kwargs or {}
    gm = dl.transform(model, args, config, example_kwargs=kwargs)
    for mode in ("train", "eval"):
        gm.graph_module(mode).graph.lint()
    model.eval()
    gm.eval()
    with torch.no_grad():
        ref = model(*args, **kwargs)
        torch.testing.assert_close(gm(*args, **kwargs), ref, rtol=1e-5, atol=1e-6)
        perturb_adapters(gm)
        adapted = gm(*args, **kwargs)
        assert not torch.allclose(adapted, ref, atol=1e-3), "adapters must change the output once trained"
        merged = dl.merge(gm).eval()
        torch.testing.assert_close(merged(*args, **kwargs), adapted, rtol=1e-4, atol=1e-5)
    return gm, merged


def test_linear_activation_branch_structure_and_numerics():
    gm, merged = check_equivalent_and_mergeable(MLP(), (torch.randn(5, 8),),
                                                dl.SwitchLoRA(rank=2, form="activation"))
    assert gm.capture_method == "symbolic_trace"
    infos = {a.weight: a for a in dl.adapters(gm)}
    assert set(infos) == {"fc1.weight", "fc2.weight"}
    assert infos["fc1.weight"].form == "activation" and infos["fc1.weight"].op == "linear"
    params = dict(gm.named_parameters())
    assert params[infos["fc1.weight"].a].shape == (2, 8) and params[infos["fc1.weight"].b].shape == (16, 2)
    # two branches: A, B, scale, down, up, scaled, output each
    assert sorted(roles(gm)) == sorted(["A", "B", "scale", "down", "up", "scaled", "output"] * 2)
    assert not roles(merged) and dl.adapters(merged) == []
    assert not any("adapters" in n for n, _ in merged.named_parameters())


def test_frozen_base_and_trainable_adapters():
    model = MLP()
    gm = dl.transform(model, (torch.randn(3, 8),), dl.SwitchLoRA(rank=2))
    gm(torch.randn(6, 8)).sum().backward()
    for name, p in gm.named_parameters():
        if name.endswith(".weight") and name.startswith("model."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.requires_grad for p in model.parameters()), "the user's model must be untouched"


@pytest.mark.parametrize("groups,padding_mode,form", [(1, "zeros", "activation"), (1, "reflect", "activation"),
                                                      (2, "zeros", "weight"), (4, "zeros", "weight")],
                         ids=["conv", "conv-reflect", "grouped", "depthwise-like"])
def test_conv_forms(groups, padding_mode, form):
    gm, _ = check_equivalent_and_mergeable(ConvNet(groups, padding_mode), (torch.randn(2, 4, 6, 6),),
                                           dl.SwitchLoRA(rank=2, form="activation"))
    info = next(a for a in dl.adapters(gm) if a.weight == "conv.weight")
    assert info.form == form and info.shape == (8, 4 // groups, 3, 3)


def test_raw_parameters_use_weight_space_form():
    gm, _ = check_equivalent_and_mergeable(RawParams(), (torch.randn(3, 8),),
                                           dl.LoRA(rank=2, init="switchlora", form="activation"))
    forms = {a.weight: (a.op, a.form) for a in dl.adapters(gm)}
    assert forms == {"w1": ("linear", "activation"), "w2": ("matmul", "weight"), "w3": ("einsum", "weight")}
    weight_outputs = [n for n in gm.graph_module().graph.nodes
                      if n.meta.get(META_KEY, {}).get("role") == "output" and n.meta[META_KEY]["form"] == "weight"]
    assert len(weight_outputs) == 2 and all(n.target is merged_weight for n in weight_outputs)


def test_auto_form_follows_the_cost_model():
    from dynlora_fx.passes.find_targets import adapter_costs, choose_form

    # what the per-op sweep of benchmarks/speed.py measured on CPU: a square 256x256 weight at rank 64
    # takes the branch only for very few tokens per step (crossover ~240); at rank 16 the skinny
    # branch products are slow, yet the branch wins up to ~2,000 tokens
    assert choose_form("auto", True, 256, 256, 64, 128) == "activation"
    assert choose_form("auto", True, 256, 256, 64, 512) == "weight"
    assert choose_form("auto", True, 256, 256, 16, 512) == "activation"
    assert choose_form("auto", True, 256, 256, 16, 4096) == "weight"
    # a 704x256 SwiGLU projection at rank 64: the branch at 512 tokens, weight space from 1,024
    assert choose_form("auto", True, 704, 256, 64, 512) == "activation"
    assert choose_form("auto", True, 704, 256, 64, 1024) == "weight"
    act, wt = adapter_costs(256, 256, 64, 1024)
    assert act > wt > 0
    assert choose_form("auto", False, 256, 256, 64, 16) == "weight"  # no branch possible
    square = nn.Sequential(nn.Linear(256, 256))
    few = dl.transform(square, (torch.randn(2, 256),), dl.SwitchLoRA(rank=64, tokens_per_step=16))
    many = dl.transform(square, (torch.randn(2, 256),), dl.SwitchLoRA(rank=64, tokens_per_step=4096))
    assert {a.form for a in dl.adapters(few)} == {"activation"}
    assert {a.form for a in dl.adapters(many)} == {"weight"}


def test_forced_weight_form_matches():
    gm, _ = check_equivalent_and_mergeable(MLP(), (torch.randn(5, 8),), dl.SwitchLoRA(rank=2, form="weight"))
    assert {a.form for a in dl.adapters(gm)} == {"weight"}


def test_tied_and_unused_weights_are_skipped_with_reasons():
    gm = dl.transform(TiedLM(), (torch.randint(0, 20, (2, 5)),), dl.SwitchLoRA(rank=2))
    assert [a.weight for a in dl.adapters(gm)] == ["mid.weight"]
    reasons = {s.weight: s.reason for s in gm.plan.skipped}
    assert "tied to an embedding" in reasons["emb.weight"]
    assert reasons["unused.weight"] == "not used by forward"


def test_rank_exceeding_matrix_is_skipped_and_fraction_resolves():
    gm = dl.transform(MLP(), (torch.randn(2, 8),), dl.SwitchLoRA(rank=6))
    assert [a.weight for a in dl.adapters(gm)] == ["fc1.weight"]  # fc2 is 4x16
    assert "exceeds min(m, n) = 4" in {s.weight: s.reason for s in gm.plan.skipped}["fc2.weight"]
    gm = dl.transform(MLP(), (torch.randn(2, 8),), dl.SwitchLoRA(rank=0.5))
    assert {a.weight: a.rank for a in dl.adapters(gm)} == {"fc1.weight": 4, "fc2.weight": 2}


def test_target_and_exclude_patterns():
    x = (torch.randn(2, 8),)
    gm = dl.transform(MLP(), x, dl.SwitchLoRA(rank=2, targets=(".fc1.weight", "fc2.weight")))
    assert len(dl.adapters(gm)) == 2
    gm = dl.transform(MLP(), x, dl.SwitchLoRA(rank=2, exclude=("re:fc2\\..*",)))
    assert [a.weight for a in dl.adapters(gm)] == ["fc1.weight"]
    assert {s.weight: s.reason for s in gm.plan.skipped}["fc2.weight"] == "excluded by pattern 're:fc2\\\\..*'"
    with pytest.raises(TargetError, match="matches no weight.*fc1.weight"):
        dl.transform(MLP(), x, dl.SwitchLoRA(rank=2, targets=("fc3.weight",)))


def test_transform_leaves_model_untouched():
    model = ConvNet().train()
    model.conv.bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    gm = dl.transform(model, (torch.randn(2, 4, 6, 6),), dl.SwitchLoRA(rank=2))
    perturb_adapters(gm)
    gm(torch.randn(2, 4, 6, 6)).sum().backward()
    assert model.training and not model.conv.bias.requires_grad and model.conv.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_train_eval_modes_and_batchnorm_statistics():
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    x = torch.randn(8, 6)
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    gm.train()
    assert not torch.equal(gm(x), gm(x)), "dropout must be active in train mode"
    assert gm.model[1].num_batches_tracked.item() == 2, "batch norm updates statistics in train mode"
    gm.eval()
    model.eval()
    model[1].load_state_dict(gm.model[1].state_dict())
    torch.testing.assert_close(gm(x), gm(x))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_deepcopy_and_state_dict_keep_state_shared():
    gm = dl.transform(MLP(), (torch.randn(2, 8),), dl.SwitchLoRA(rank=2))
    keys = list(gm.state_dict())
    assert len(keys) == len(set(keys)) and any(k.startswith("adapters.fc1.weight.") for k in keys)
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        twin.adapter("fc1.weight").A.add_(1.0)
    x = torch.randn(3, 8)
    assert not torch.allclose(twin(x), gm(x))
    twin.load_state_dict(gm.state_dict())
    torch.testing.assert_close(twin(x), gm(x))


def test_config_validation_and_json_round_trip():
    for bad in (0, -3, 0.0, 1.5, float("nan"), True, "8"):
        with pytest.raises(ConfigError, match="rank"):
            dl.SwitchLoRA(rank=bad)
    with pytest.raises(ConfigError, match=r"interval 8 < 2\*freeze_steps = 10"):
        dl.SwitchLoRA(interval=8, freeze_steps=5)
    for cfg in (dl.SwitchLoRA(rank=0.25, targets=(".q.weight",)), dl.LoRA(rank=3), dl.ReLoRA(rank=4, reset_every=50)):
        assert dl.config_from_json(cfg.to_json()) == cfg


class NoMatrix(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither tracer can follow it
            return self.fc(x)
        return x


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TargetError, match="no weight can carry an adapter"):
        dl.transform(NoMatrix(), (torch.randn(2, 4),))
    with pytest.raises(CaptureError, match="rejects the example inputs.*Remedy"):
        dl.transform(MLP(), (torch.randn(2, 7),))
    with pytest.raises(CaptureError, match="pass example_inputs"):
        dl.transform(DataDependent())
    with pytest.raises(CaptureError, match="torch.export failed.*Remedy"):
        dl.transform(DataDependent(), (torch.randn(2, 4),))
    gm = dl.transform(MLP(), (torch.randn(2, 8),))
    with pytest.raises(dl.DynLoRAError, match="already transformed"):
        dl.transform(gm, (torch.randn(2, 8),))
    with pytest.raises(dl.DynLoRAError, match="not produced by dl.transform"):
        dl.adapters(MLP())


def test_merge_refuses_non_finite():
    gm = dl.transform(MLP(), (torch.randn(2, 8),), dl.SwitchLoRA(rank=2))
    with torch.no_grad():
        gm.adapter("fc2.weight").B[0, 0] = float("nan")
    with pytest.raises(dl.DynLoRAError, match="fc2.weight.*NaN"):
        dl.merge(gm)
