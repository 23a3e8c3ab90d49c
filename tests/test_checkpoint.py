"""Regions analysis and the activation-checkpointing pass: same values and gradients as without
(dropout included), far fewer saved bytes, on both capture paths, eager and compiled."""

import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

import dynlora_fx as dl
from dynlora_fx.errors import ConfigError, DynLoRAError
from dynlora_fx.passes import find_regions, repeated_blocks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _common import SavedTensors  # noqa: E402


def saved_bytes(forward, gm):
    """Run ``forward()``; its result and the bytes it saved for backward, ``gm``'s own state left out."""
    with SavedTensors(exclude=[*gm.parameters(), *gm.buffers()]) as saved:
        out = forward()
    return out, saved.bytes


class Block(nn.Module):
    def __init__(self, d, p=0.2):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(self.down(torch.relu(self.up(self.norm(x)))))


class Stack(nn.Module):
    """Blocks in a ModuleList; ``exported=True`` adds an int() of a shape, which fx cannot trace."""

    def __init__(self, d=16, n=3, exported=False, own_checkpoint=None):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 4)
        self.exported, self.own_checkpoint = exported, own_checkpoint

    def forward(self, x):
        x = self.inp(x)
        if self.exported:
            x = x.reshape(int(x.shape[0]), -1)
        for layer in self.layers:
            if self.own_checkpoint is None:
                x = layer(x)
            else:
                x = torch_checkpoint.checkpoint(layer, x, use_reentrant=self.own_checkpoint == "reentrant")
        return self.head(x)


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Conv1d(8, 8, 1)

    def forward(self, x):
        return self.b(self.a(x).unsqueeze(-1)).squeeze(-1)


def _step(gm, forward, seed=1):
    """One forward (``forward()``, a tensor) and backward: output, gradients, bytes saved for backward."""
    torch.manual_seed(seed)  # the same dropout masks for both runs
    out, nbytes = saved_bytes(forward, gm)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    return out.detach(), grads, nbytes


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _train(gm, x, steps, compiled=False):
    """``steps`` SwitchLoRA steps on ``gm`` (compiled if asked) from a fixed seed: (losses, switcher)."""
    opt = dl.AdamW(gm.parameters(), lr=1e-2)
    sw = dl.attach(gm, opt, total_steps=steps)
    run = dl.compile(gm) if compiled else gm
    torch.manual_seed(5)
    losses = []
    for _ in range(steps):
        loss = run(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, sw


def test_regions_are_the_repeated_blocks():
    model = Stack()
    assert repeated_blocks(model) == ["layers.0", "layers.1", "layers.2"]
    assert repeated_blocks(Flat()) == []
    gm = dl.transform(model, (torch.randn(4, 16),), dl.SwitchLoRA(rank=4, form="activation"), checkpoint=False)
    graph = gm.graph_module("train")
    plan = find_regions(graph, repeated_blocks(model))
    assert [r.block for r in plan.regions] == ["layers.0", "layers.1", "layers.2"] and not plan.skipped
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    for region in plan.regions:  # contiguous, disjoint, and holding the block's adapter nodes
        idx = [order[n] for n in region.nodes]
        assert idx == sorted(idx) and len(set(idx)) == len(idx)
        assert any((n.meta.get("dynlora") or {}).get("weight", "").startswith(region.block) for n in region.nodes)
    assert not set(plan.regions[0].nodes) & set(plan.regions[1].nodes)


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("form", ["activation", "weight"])
def test_checkpointed_step_equals_plain_step(form, exported, device):
    model = Stack(exported=exported).to(device)
    x = torch.randn(32, 16, device=device)
    runs = {}
    for checkpoint in (False, True):
        gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=4, form=form), checkpoint=checkpoint)
        assert gm.capture_method == ("export" if exported else "symbolic_trace")
        assert gm.checkpointed == (("layers.0", "layers.1", "layers.2") if checkpoint else ())
        gm.train()
        runs[checkpoint] = _step(gm, lambda: gm(x))
    (o0, g0, b0), (o1, g1, b1) = runs[False], runs[True]
    assert _rel(o1, o0) <= 1e-5
    assert g0.keys() == g1.keys() and max(_rel(g1[k], g0[k]) for k in g0) <= 1e-5
    assert b1 < 0.5 * b0


def test_switching_merge_and_copy_through_checkpointed_regions():
    model, x = Stack(), torch.randn(16, 16)
    losses, merged_err = {}, {}
    for checkpoint in (False, True):
        gm = copy.deepcopy(dl.transform(model, (x,), dl.SwitchLoRA(rank=4, interval=2, freeze_steps=1),
                                        checkpoint=checkpoint))  # a copy keeps its regions on its own state
        losses[checkpoint], sw = _train(gm, x, steps=12)
        assert sum(sw.num_switched()) > 0
        gm.eval()
        merged = dl.merge(gm)
        merged_err[checkpoint] = _rel(merged(x), gm(x))
    assert losses[True] == losses[False]  # bit-identical: recomputation replays the same ops and masks
    assert merged_err[True] <= 1e-6 and merged_err[False] <= 1e-6


@pytest.mark.parametrize("variant", ["non-reentrant", "reentrant"])
def test_auto_follows_the_models_own_checkpoint_calls(variant):
    model, x = Stack(own_checkpoint=variant), torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = dl.transform(model, (x,), dl.SwitchLoRA(rank=4))
        off = dl.transform(model, (x,), dl.SwitchLoRA(rank=4), checkpoint=False)
    assert auto.checkpointed == ("layers.0", "layers.1", "layers.2") and off.checkpointed == ()
    assert dl.transform(Stack(), (x,), dl.SwitchLoRA(rank=4)).checkpointed == ()  # auto: the model's own choice
    assert _rel(auto.eval()(x), model.eval()(x)) <= 1e-5


def test_auto_follows_hugging_face_gradient_checkpointing():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.1)
    model = transformers.LlamaForCausalLM(cfg).train()
    model.activation_checkpointing_enable({"use_reentrant": False})  # HF v5's name for gradient checkpointing
    ids = torch.randint(0, 64, (2, 64))
    kwargs = {"input_ids": ids, "use_cache": False}
    runs = {}
    for checkpoint in ("auto", False):
        gm = dl.transform(model, (), dl.SwitchLoRA(rank=4), example_kwargs=kwargs, checkpoint=checkpoint)
        gm.train()
        runs[checkpoint] = (gm.checkpointed, *_step(gm, lambda: gm(**kwargs).logits))
    assert runs["auto"][0] == ("model.layers.0", "model.layers.1") and runs[False][0] == ()
    (_, o1, g1, b1), (_, o0, g0, b0) = runs["auto"], runs[False]
    assert _rel(o1, o0) <= 1e-5 and max(_rel(g1[k], g0[k]) for k in g0) <= 1e-5
    assert b1 <= 0.2 * b0


def test_compiled_checkpointing_matches_and_never_recompiles():
    model, x = Stack(), torch.randn(16, 16)
    losses = {}
    for checkpoint in (False, True):
        torch._dynamo.reset()
        gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=4, interval=2, freeze_steps=1), checkpoint=checkpoint)
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses[checkpoint], _ = _train(gm, x, steps=5, compiled=True)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False])) <= 1e-5


class NormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def test_blocks_updating_state_in_place_are_not_recomputed():
    """Under fx, batch norm is a module call that updates its running statistics: recomputing its block
    would update them twice, so such blocks are refused (True) or left plain with a warning (auto)."""
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(DynLoRAError, match="batch-norm running statistics"):
        dl.transform(nn.Sequential(NormBlock(), NormBlock()), (x,), dl.SwitchLoRA(rank=2), checkpoint=True)

    class OwnCheckpoint(nn.Sequential):
        def forward(self, x):
            for block in self:
                x = torch_checkpoint.checkpoint(block, x, use_reentrant=False)
            return x

    with pytest.warns(RuntimeWarning, match="without activation checkpointing"):
        gm = dl.transform(OwnCheckpoint(NormBlock(), NormBlock()), (x,), dl.SwitchLoRA(rank=2))
    assert gm.checkpointed == ()


def test_checkpoint_errors():
    x = torch.randn(2, 8)
    with pytest.raises(DynLoRAError, match="no repeated blocks"):
        dl.transform(Flat(), (x,), dl.SwitchLoRA(rank=2), checkpoint=True)
    with pytest.raises(ConfigError, match="checkpoint"):
        dl.transform(Flat(), (x,), dl.SwitchLoRA(rank=2), checkpoint="yes")
    assert dl.transform(Flat(), (x,), dl.SwitchLoRA(rank=2), checkpoint=False).checkpointed == ()


# Fuzzer models on which checkpoint=True once changed outputs, gradients or buffers (old spectral norm's
# power iteration read back updated by the recomputation; a buffer counter's add_ dropped or repeated),
# now regression cases; each recomputes at least one block of a different random model.
@pytest.mark.parametrize("seed", [38, 39, 63, 73, 92, 100, 103, 119])
def test_fuzzed_models_recompute_exactly(seed):
    import fuzz_models as fm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fm.check_checkpointing(fm.draw_spec(seed))
    assert result["outcome"] == "ok", result
