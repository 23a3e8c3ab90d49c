"""Regions analysis and the activation-checkpointing pass: same values and gradients as without
(dropout included), far fewer saved bytes, on both capture paths, eager and compiled."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

import dynlora_fx as dl
from dynlora_fx.errors import ConfigError, DynLoRAError
from dynlora_fx.passes import find_regions, region_modules, repeated_blocks
from dynlora_fx.testing import SavedTensors


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


def _steps(gm, inputs, steps=3):
    """``steps`` train-mode forward/backward passes on ``inputs(i)``: outputs, gradients, the bytes the
    first saved for backward, and the buffers after the last."""
    gm.train()
    outs, grads, nbytes = [], [], None
    for i in range(steps):
        out, g, b = _step(gm, lambda: gm(*inputs(i)), seed=i)
        outs.append(out)
        grads.append(g)
        nbytes = b if nbytes is None else nbytes
    return outs, grads, nbytes, {n: b.clone() for n, b in gm.named_buffers()}


def _assert_same_steps(plain, recomputed, exact=True):
    """Outputs, every gradient and every buffer of two ``_steps`` runs: equal bit for bit, or ≤ 1e-6."""
    (o0, g0, _, b0), (o1, g1, _, b1) = plain, recomputed
    close = torch.equal if exact else (lambda a, b: _rel(a, b) <= 1e-6)
    assert all(close(a, b) for a, b in zip(o1, o0))
    for a, b in zip(g1, g0):
        assert a.keys() == b.keys() and all(close(a[k], b[k]) for k in b), [k for k in b if not close(a[k], b[k])]
    assert b0.keys() == b1.keys() and all(torch.equal(b1[k], b0[k]) for k in b0)


class NormBlock(nn.Module):
    """conv/linear -> batch norm -> relu -> ... -> batch norm, residual: batch norm mid-block and last."""

    def __init__(self, dims=2, d=4, norm=None):
        super().__init__()
        conv = {1: lambda: nn.Linear(d, d), 2: lambda: nn.Conv2d(d, d, 3, padding=1),
                3: lambda: nn.Conv3d(d, d, 3, padding=1)}[dims]
        norm = norm or {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv, self.bn, self.conv2, self.bn2 = conv(), norm(d), conv(), norm(d)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


class NormStack(nn.Sequential):
    """``exported=True`` adds an int() of a shape, which fx cannot trace."""

    def __init__(self, *blocks, exported=False, own_checkpoint=False):
        super().__init__(*blocks)
        self.exported, self.own_checkpoint = exported, own_checkpoint

    def forward(self, x):
        if self.exported:
            x = x.reshape(int(x.shape[0]), *x.shape[1:])
        for block in self:
            x = torch_checkpoint.checkpoint(block, x, use_reentrant=False) if self.own_checkpoint else block(x)
        return x


_NORM_SHAPES = {1: (6, 4), 2: (2, 4, 6, 6), 3: (2, 4, 3, 4, 4)}


@pytest.mark.parametrize("dims, exported", [(1, False), (2, False), (3, False), (2, True)],
                         ids=["1d-fx", "2d-fx", "3d-fx", "2d-export"])
def test_batch_norm_blocks_recompute_with_one_statistics_update(dims, exported):
    """Training-mode batch norm becomes a pure normalisation (recomputed) and a statistics update that runs
    once, after the region: after 3 steps outputs, gradients and running statistics equal the unchecked
    ones bit for bit, on both capture paths; eval mode still uses the running statistics."""
    model = NormStack(NormBlock(dims), NormBlock(dims), exported=exported)
    shape = _NORM_SHAPES[dims]
    runs, eval_out = {}, {}
    for checkpoint in (False, True):
        gm = dl.transform(model, (torch.randn(shape),), dl.SwitchLoRA(rank=2), checkpoint=checkpoint)
        assert gm.capture_method == ("export" if exported else "symbolic_trace")
        assert gm.checkpointed == (("0", "1") if checkpoint else ())
        runs[checkpoint] = _steps(gm, lambda i: (torch.randn(shape, generator=torch.Generator().manual_seed(i)),))
        eval_out[checkpoint] = gm.eval()(torch.ones(shape))
    _assert_same_steps(runs[False], runs[True])
    assert runs[True][3]["model.0.bn.num_batches_tracked"].item() == 3
    assert torch.equal(eval_out[True], eval_out[False])


def _tv_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [2, 1, 1, 1], num_classes=4)


def _tv_regnet():
    from torchvision.models.regnet import BlockParams, RegNet
    return RegNet(BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8), num_classes=4)


def _tv_mobilenet():
    from torchvision.models import mobilenet_v3_small
    return mobilenet_v3_small(weights=None, width_mult=0.25, num_classes=4)


def _timm_efficientnet():
    import timm
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=4)


@pytest.mark.parametrize("build", [_tv_regnet, _timm_efficientnet], ids=["tv-regnet", "timm-efficientnet"])
def test_batch_norm_cnns_under_fx_recompute_exactly(build):
    model = build()
    x = torch.randn(2, 3, 32, 32)
    runs = {}
    for checkpoint in (False, True):
        gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2), checkpoint=checkpoint)
        assert gm.capture_method == "symbolic_trace"
        assert gm.checkpointed == (tuple(repeated_blocks(model)) if checkpoint else ())
        runs[checkpoint] = _steps(gm, lambda i: (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)),),
                                  steps=2)
    _assert_same_steps(runs[False], runs[True])
    assert runs[True][2] < runs[False][2]


def test_batch_norm_that_cannot_be_split_is_refused_with_the_module():
    """SyncBatchNorm decides at run time whether to synchronise statistics across processes, and
    momentum=None averages with 1/num_batches_tracked read at run time: fx keeps both module calls,
    which recomputation would repeat."""
    x = torch.randn(*_NORM_SHAPES[1])
    for norm, kind in ((nn.SyncBatchNorm, "SyncBatchNorm"), (lambda d: nn.BatchNorm1d(d, momentum=None), "BatchNorm1d")):
        with pytest.raises(DynLoRAError, match=rf"0\.bn2? \({kind}, a module kept opaque\).*in place"):
            dl.transform(NormStack(NormBlock(1, norm=norm), NormBlock(1, norm=norm)), (x,), dl.SwitchLoRA(rank=2),
                         checkpoint=True)


class TempWrites(nn.Module):
    """In-place ops on tensors the block itself creates (the issue's ``y.div_(3)``, a router's
    ``index_put_``/``scatter_`` into a zero buffer, ``+=``, ``copy_``, ``detach_``): all recomputable."""

    def __init__(self, d=8, exported=False):
        super().__init__()
        self.lin, self.gate, self.out = nn.Linear(d, d), nn.Linear(d, 4), nn.Linear(d, d)
        self.norm = nn.Parameter(torch.ones(d))
        self.exported = exported

    def forward(self, x):
        n = len(x) if self.exported else x.shape[0]
        y = self.lin(x).reshape(n, -1) * 2
        y.div_(3)
        weights, experts = torch.topk(torch.softmax(self.gate(x), -1), 2, dim=-1)
        weights /= weights.sum(-1, keepdim=True)  # a router's normalisation, in place
        dense = torch.zeros_like(weights[:, :1]).expand(-1, 4).contiguous()
        dense.scatter_(1, experts, weights)
        mixed = torch.zeros_like(y)
        mixed.index_put_((torch.arange(y.shape[0]),), y * dense[:, :1], accumulate=True)
        h = self.norm * mixed
        h += y
        scratch = torch.empty_like(h)
        scratch.copy_(h)
        stat = scratch.mean().detach_()
        return x + self.out(torch.relu(scratch)) - stat


class TempStack(nn.Module):
    def __init__(self, exported=False, own_checkpoint=False, block=TempWrites):
        super().__init__()
        self.layers = nn.ModuleList([block(exported=exported) for _ in range(2)])
        self.own_checkpoint = own_checkpoint

    def forward(self, x):
        for layer in self.layers:
            x = torch_checkpoint.checkpoint(layer, x, use_reentrant=False) if self.own_checkpoint else layer(x)
        return x


@pytest.mark.parametrize("exported", [False, True], ids=["fx", "export"])
def test_blocks_writing_their_own_temporaries_are_recomputed(exported):
    model = TempStack(exported=exported, own_checkpoint=True)
    x = torch.randn(6, 8)
    runs = {}
    for checkpoint in ("auto", False):
        gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2), checkpoint=checkpoint)
        assert gm.capture_method == ("export" if exported else "symbolic_trace")
        assert gm.checkpointed == (("layers.0", "layers.1") if checkpoint else ())
        runs[checkpoint] = _steps(gm, lambda i: (torch.randn(6, 8, generator=torch.Generator().manual_seed(i)),))
    _assert_same_steps(runs[False], runs["auto"], exact=False)
    assert runs["auto"][2] < 0.5 * runs[False][2]


class Counted(nn.Module):
    """A call counter updated in place: read back by the block (a true state write), or not (it then
    runs once, after the block's region)."""

    def __init__(self, d=8, exported=False, read_back=True):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("calls", torch.zeros(()))
        self.read_back = read_back

    def forward(self, x):
        self.calls.add_(1)
        y = torch.tanh(self.lin(x))
        return y * self.calls if self.read_back else y


class SpectralNormed(nn.Module):
    """The old hook-based spectral norm: its power iteration writes weight_u/weight_v, then the block reads them."""

    def __init__(self, d=8, exported=False):
        super().__init__()
        self.lin, self.out = nn.utils.spectral_norm(nn.Linear(d, d)), nn.Linear(d, d)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("block", [Counted, SpectralNormed])
def test_blocks_writing_state_they_read_are_refused(block):
    """True state writes: "auto" fails loudly on a block the model checkpoints, naming it, the write
    and the remedy; checkpoint=True (the user's own choice) warns and runs such blocks plain."""
    model, x = TempStack(own_checkpoint=True, block=block), torch.randn(4, 8)
    with pytest.raises(DynLoRAError, match=r"layers\.0.*(in place|writes).*checkpoint=False") as err:
        dl.transform(model, (x,), dl.SwitchLoRA(rank=2))
    assert "cannot be recomputed" in str(err.value)
    with pytest.raises(DynLoRAError, match="no block is a region"):
        dl.transform(model, (x,), dl.SwitchLoRA(rank=2), checkpoint=True)
    model.layers.append(Block(8))  # one block that can be recomputed: True proceeds, with a warning
    with pytest.warns(RuntimeWarning, match="without activation checkpointing"):
        gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2), checkpoint=True)
    assert gm.checkpointed == ("layers.2",)
    assert dl.transform(model, (x,), dl.SwitchLoRA(rank=2), checkpoint=False).checkpointed == ()


def test_counter_nothing_reads_back_runs_once_after_the_region():
    model, x = TempStack(own_checkpoint=True, block=lambda exported: Counted(read_back=False)), torch.randn(4, 8)
    runs = {}
    for checkpoint in ("auto", False):
        gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=2), checkpoint=checkpoint)
        runs[checkpoint] = _steps(gm, lambda i: (torch.randn(4, 8, generator=torch.Generator().manual_seed(i)),))
    assert gm.checkpointed == () and dl.transform(model, (x,), dl.SwitchLoRA(rank=2)).checkpointed == \
        ("layers.0", "layers.1")
    _assert_same_steps(runs[False], runs["auto"])
    assert runs["auto"][3]["model.layers.0.calls"].item() == 3


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
    from dynlora_fx.testing import fuzz_models as fm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fm.check_checkpointing(fm.draw_spec(seed))
    assert result["outcome"] == "ok", result


# The checkpoint fuzzer's own block kinds (fuzz_models.CHECKPOINT_BLOCKS): MoE routing with index_add_
# over routed tokens (export), dense and sparse routing (fx); every repeated block is recomputed, with
# the same outputs, gradients and buffers.
@pytest.mark.parametrize("seed", [17, 19])
def test_fuzzed_temporary_writes_and_routing_recompute(seed):
    from dynlora_fx.testing import fuzz_models as fm

    spec = fm.draw_checkpoint_spec(seed)
    assert {b["kind"] for b in spec["blocks"]} & set(fm.CHECKPOINT_BLOCKS)
    result = fm.check_checkpointing(spec)
    assert result["outcome"] == "ok" and result["notes"] == [f"recomputed {len(spec['blocks'])} blocks"], result


def _hf_model(transformers, arch):
    """A tiny Hugging Face model built from its config: (model, inputs, its decoder/encoder layers)."""
    t, common = transformers, {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    if arch == "deberta-v2":
        cfg = t.DebertaV2Config(**common, intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                                position_buckets=8, pos_att_type=["p2c", "c2p"])
        return t.DebertaV2ForMaskedLM(cfg), {}, ("deberta.encoder.layer.0", "deberta.encoder.layer.1")
    moe = {"num_key_value_heads": 2, "num_experts_per_tok": 2}
    if arch == "qwen3-moe":
        cfg = t.Qwen3MoeConfig(**common, **moe, intermediate_size=64, moe_intermediate_size=16, head_dim=16,
                               num_experts=4, decoder_sparse_step=1)
        model = t.Qwen3MoeForCausalLM(cfg)
    elif arch == "deepseek-v3":  # multi-head latent attention + shared and routed experts in both layers
        cfg = t.DeepseekV3Config(**common, **moe, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                                 n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)
        model = t.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = t.GptOssConfig(**common, **moe, intermediate_size=32, head_dim=16, num_local_experts=4,
                             layer_types=["full_attention"] * 2)
        model = t.GptOssForCausalLM(cfg)
    return model, {"use_cache": False}, ("model.layers.0", "model.layers.1")


@pytest.mark.parametrize("arch", ["qwen3-moe", "deepseek-v3", "gpt-oss", "deberta-v2"])
def test_hugging_face_moe_mla_and_deberta_layers_are_recomputed(arch):
    """Routers normalise their top-k weights in place and experts scatter into buffers they allocate:
    temporaries, so "auto" keeps every layer the model checkpoints. The checkpointed step equals the
    same graph run without recomputation (loss and every gradient), and keeps a fraction of its bytes."""
    transformers = pytest.importorskip("transformers")
    model, kwargs, layers = _hf_model(transformers, arch)
    model.train().gradient_checkpointing_enable({"use_reentrant": False})
    kwargs = {"input_ids": torch.randint(0, 64, (2, 64)), **kwargs}
    gm = dl.transform(model, (), dl.SwitchLoRA(rank=4), example_kwargs=kwargs)
    assert gm.checkpointed == layers
    plain = copy.deepcopy(gm)
    for region in region_modules(plain.graph_module("train")):
        region.recompute = False  # the same ops, activations kept
    (o0, g0, b0), (o1, g1, b1) = [_step(g, lambda g=g: g.train()(**kwargs).logits) for g in (plain, gm)]
    assert _rel(o1.square().mean(), o0.square().mean()) <= 1e-6
    assert g0.keys() == g1.keys() and max(_rel(g1[k], g0[k]) for k in g0) <= 1e-6
    assert b1 <= 0.2 * b0, (b1, b0)
    with torch.no_grad():
        assert _rel(gm.eval()(**kwargs).logits, model.eval()(**kwargs).logits) <= 1e-5
