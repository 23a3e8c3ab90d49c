"""Invariant 5: compiled and eager training agree; switching never recompiles."""

import pytest
import torch
import torch.nn as nn

import dynlora_fx as dl


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.qkv = nn.Linear(32, 96, bias=False)
        self.proj = nn.Parameter(torch.randn(32, 32) / 6)  # raw matmul: weight-space adapter
        self.head = nn.Linear(32, 50)
        self.drop = nn.Dropout(0.0)

    def forward(self, ids):
        h = self.emb(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) @ self.proj
        return self.head(self.drop(h))


def train(module, opt, steps, ids):
    losses = []
    for _ in range(steps):
        logits = module(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def make(config):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 17))
    gm = dl.transform(Tiny(), (ids[:, :-1],), config)
    opt = dl.AdamW(gm.parameters(), lr=3e-3) if config.method == "switchlora" else torch.optim.AdamW(
        gm.parameters(), lr=3e-3)
    sw = dl.attach(gm, opt, 200)
    return gm, opt, sw, ids


@pytest.mark.parametrize("config,backend,steps", [
    (dl.SwitchLoRA(rank=8, interval=10, freeze_steps=2), "inductor", 200),
    (dl.ReLoRA(rank=8, reset_every=10, warmup=3), "aot_eager", 30),
], ids=["switchlora-inductor", "relora-aot_eager"])
def test_compiled_training_matches_eager_without_recompiles(config, backend, steps):
    gm, opt, sw, ids = make(config)
    eager = train(gm, opt, steps, ids)
    gm2, opt2, sw2, _ = make(config)
    torch._dynamo.reset()
    compiled = dl.compile(gm2, backend=backend)
    train(compiled, opt2, 1, ids)  # first step compiles forward and backward
    with torch._dynamo.config.patch(error_on_recompile=True):
        rest = train(compiled, opt2, steps - 1, ids)
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(eager[1:]), rtol=2e-3, atol=2e-4)
    if config.method == "switchlora":
        assert sw2.num_switched() == sw.num_switched() and sw2.num_switched()[0] > 20


def test_attaching_after_the_first_compiled_step_does_not_recompile():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 17))
    gm = dl.transform(Tiny(), (ids[:, :-1],), dl.SwitchLoRA(rank=8, interval=10, freeze_steps=2))
    opt = dl.AdamW(gm.parameters(), lr=3e-3)
    torch._dynamo.reset()
    compiled = dl.compile(gm, backend="aot_eager")
    train(compiled, opt, 1, ids)
    sw = dl.attach(compiled, opt, 50)  # stacks the adapter factors into shared storage: tensor data only
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(compiled, opt, 20, ids)
    assert sw.num_switched()[0] > 0


def test_compile_rejects_wrong_modules():
    with pytest.raises(dl.DynLoRAError, match="dl.transform"):
        dl.compile(nn.Linear(2, 2))
    with pytest.raises(dl.DynLoRAError, match="already compiled.*dl.compile\\(dl.transform"):
        dl.transform(torch.compile(nn.Linear(4, 4)), (torch.randn(2, 4),), dl.LoRA(rank=2))
    gm = dl.transform(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), dl.LoRA(rank=2))
    compiled = dl.compile(gm, backend="eager")
    with pytest.raises(dl.DynLoRAError, match="already compiled"):
        dl.compile(compiled)
    infos = dl.adapters(compiled)  # the API sees through the wrapper; names resolve in it
    assert [i.weight for i in infos] == [i.weight for i in dl.adapters(gm)]
    params = dict(compiled.named_parameters())
    assert all(i.a in params and i.b in params for i in infos)
