"""Fitting the tools people train with: transformers.Trainer trains, checkpoints and resumes a
transformed model bit-identically; merge_and_unload gives back the user's own class; the module
forwards the wrapped model's attributes and shows the captured signature; a model's whole switching
state travels in its and its optimizer's state dicts (torch.save, safetensors); calls that do not
fit what was captured fail with a DynLoRAError. Tiny models from configs: nothing is downloaded."""

import copy
import importlib.util
import inspect
import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import dynlora_fx as dl
from dynlora_fx.testing import load_script

VOCAB = 64


@pytest.fixture(scope="module")
def example():
    return load_script("examples/hf_trainer.py")


@pytest.fixture(scope="module")
def template(example):
    """A transformed tiny LLaMA (hidden 32, 2 layers) that switches often (interval 2): copied per test."""
    return example.transform(example.build_model(hidden=32, vocab=VOCAB), rank=4, interval=2.0, freeze_steps=1)


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _same_state(a: nn.Module, b: nn.Module) -> list[str]:
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


def test_trainer_trains_checkpoints_and_resumes_bit_identically(example, template, tmp_path):
    data = example.TokenChunks(_tokens(32 * example.SEQ_LEN))  # has an attention_mask column Trainer must drop
    straight = copy.deepcopy(template)
    trainer, switcher = example.make_trainer(straight, data, tmp_path / "straight", steps=6, save_every=3,
                                             batch_size=2)
    trainer.train()
    assert switcher.step == 6 and min(switcher.num_switched()) > 0
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    saved = load_file(checkpoint / "model.safetensors")  # Trainer wrote gm.state_dict() with safetensors
    assert int(saved["switch_state.step"]) == 3 and int(saved["switch_state.switched"].sum()) > 0

    resumed = copy.deepcopy(template)  # fresh model, optimizer, scheduler and Trainer: only the checkpoint
    trainer, switcher2 = example.make_trainer(resumed, data, tmp_path / "resumed", steps=6, save_every=3,
                                              batch_size=2)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert switcher2.step == 6 and switcher2.num_switched() == switcher.num_switched()
    assert _same_state(straight, resumed) == []

    # what made it exact: the same resume without the switcher's buffers diverges
    (tmp_path / "partial").mkdir()
    for f in checkpoint.iterdir():
        (tmp_path / "partial" / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in saved.items() if not k.startswith("switch_state.")},
              str(tmp_path / "partial" / "model.safetensors"), metadata={"format": "pt"})
    without = copy.deepcopy(template)
    trainer, _ = example.make_trainer(without, data, tmp_path / "without", steps=6, save_every=3, batch_size=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "partial"))
    assert _same_state(straight, without) != []


def test_wrapped_model_attributes_signature_and_merge_and_unload(template, tmp_path):
    gm = copy.deepcopy(template)
    assert isinstance(gm.config, LlamaConfig) and gm.config is gm.model.config  # the model's, not ours
    assert isinstance(gm.dynlora_config, dl.SwitchLoRA) and gm.dynlora_config.rank == 4
    assert gm.device == torch.device("cpu") and gm.get_input_embeddings() is gm.model.get_input_embeddings()
    assert list(inspect.signature(gm.forward).parameters) == ["input_ids", "labels"]
    with torch.no_grad():  # adapters far from their initial product: the merge has something to fold
        for info in dl.adapters(gm):
            gm.get_parameter(info.b).add_(0.05 * torch.randn_like(gm.get_parameter(info.b)))
    ids = _tokens(2 * 16, seed=1).view(2, 16)
    gm.eval()
    with torch.no_grad():
        want = gm(input_ids=ids, labels=ids)

    count = len(dl.adapters(gm))
    plain = dl.merge_and_unload(gm)
    assert type(plain) is LlamaForCausalLM and plain is not gm.model
    assert not any(isinstance(m, dl.DynLoRAModule) for m in plain.modules())
    assert count > 0 and len(dl.adapters(gm)) == count  # the transformed module keeps its adapters
    plain.eval()
    with torch.no_grad():
        got = plain(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)

    plain.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, got.logits)
    assert reloaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)

    for call in (lambda: gm.save_pretrained(tmp_path / "x"), lambda: gm.generate(ids)):
        with pytest.raises(dl.DynLoRAError, match=r"merge_and_unload\(gm\)"):
            call()
    with pytest.raises(dl.DynLoRAError, match=r"before dl\.transform .* checkpoint=True"):
        gm.gradient_checkpointing_enable()  # forwarded, it would set a flag the captured graph never reads
    with pytest.raises(dl.DynLoRAError, match=r"attention_mask was not among the inputs captured by dl.transform "
                                              r"\(input_ids, labels\).*example_kwargs"):
        gm(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    with pytest.raises(dl.DynLoRAError, match=r"do not fit the captured ones \(input_ids, labels\).*labels"):
        gm(input_ids=ids)


class SizeBranch(nn.Module):
    """Python control flow on the batch size: fx cannot trace it, torch.export guards on it."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(16, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.emb(x))
        return h * 2 if x.shape[0] > 2 else h


def test_sliced_example_inputs_and_sizes_outside_export_guards():
    model = SizeBranch()
    big = torch.randint(0, 16, (8, 10), generator=torch.Generator().manual_seed(0))
    example = big[:4, :6]  # a non-contiguous view
    gm = dl.transform(model, (example,), dl.LoRA(rank=2))
    assert gm.capture_method == "export"
    x = torch.randint(0, 16, (5, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gm(x), model(x))  # a fresh tensor of another shape: guards hold

    # the model itself takes a batch of 2 (its other branch), outside the guard x.size()[0] >= 3 of the
    # graph captured from the example: it is captured again for it (a view, like the example)
    torch.testing.assert_close(gm(x[:2]), model(x[:2]))
    assert len(gm._graph_sets) == 2


class TiedLM(nn.Module):
    """Embedding tied to the output head (one tensor under two names), two adapted layers."""

    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.emb, self.l1, self.l2 = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.l2(torch.relu(self.l1(self.emb(x))))))


def test_switching_state_travels_in_module_and_optimizer_state_dicts(tmp_path):
    """N steps, save gm.state_dict() (safetensors) and opt.state_dict() (torch.save), load into fresh
    ones, N more == 2N straight — attached before or after loading, without Switcher.state_dict()."""
    torch.manual_seed(0)
    model, x = TiedLM(), torch.randint(0, 32, (4, 8))
    config, N = dl.SwitchLoRA(rank=4, interval=2.0, freeze_steps=1), 6

    template = dl.transform(model, (x,), config)

    def fresh():
        gm = copy.deepcopy(template)
        return gm, dl.AdamW(gm.parameters(), lr=1e-2)

    def train(gm, opt, steps):
        for _ in range(steps):
            gm(x).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()

    gm, opt = fresh()
    switcher = dl.attach(gm, opt, 2 * N)
    train(gm, opt, 2 * N)
    assert min(switcher.num_switched()) > 0

    gm1, opt1 = fresh()
    dl.attach(gm1, opt1, 2 * N)
    train(gm1, opt1, N)
    save_file(gm1.state_dict(), str(tmp_path / "model.safetensors"))  # tied weight + stacked adapter storage
    torch.save(opt1.state_dict(), tmp_path / "optimizer.pt")

    for attach_first in (True, False):
        gm2, opt2 = fresh()
        if attach_first:  # Trainer's order: optimizer and switcher exist, then the checkpoint is loaded
            switcher2 = dl.attach(gm2, opt2, 2 * N)
        gm2.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
        if not attach_first:  # a new switcher continues from the state the module holds
            switcher2 = dl.attach(gm2, opt2, 2 * N)
        opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
        assert switcher2.step == N
        train(gm2, opt2, N)
        assert _same_state(gm, gm2) == [], f"attach_first={attach_first}"
        assert gm2.model.head.weight is gm2.model.emb.weight  # the tie survived loading

    gm3, opt3 = fresh()  # the control: the same files without the switcher's buffers do not resume
    dl.attach(gm3, opt3, 2 * N)
    gm3.load_state_dict({k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items()
                         if not k.startswith("switch_state.")}, strict=False)
    opt3.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    train(gm3, opt3, N)
    assert _same_state(gm, gm3) != []


def test_onnx_export_checks_with_onnxruntime_without_torchvision_noise(tmp_path, monkeypatch, caplog):
    """On a machine without torchvision the exporter warned once per torchvision op; silenced."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchvision" else real(name, *args))
    torch.manual_seed(0)
    model, x = TiedLM(), torch.randint(0, 32, (4, 8))
    gm = dl.transform(model, (x,), dl.SwitchLoRA(rank=4))
    with caplog.at_level(logging.WARNING):
        report = dl.export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert report.max_rel_error is not None and report.max_rel_error < 1e-5
    assert [r.getMessage() for r in caplog.records if "torchvision" in r.getMessage()] == []
