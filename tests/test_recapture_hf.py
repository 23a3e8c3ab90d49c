"""A Hugging Face hybrid attention/state-space decoder over sequence lengths export specialised on.

``torch.export`` pins a Mamba mixer's scan to the example's length. Jamba, built from a config
(Mamba and attention layers, a mixture-of-experts MLP), transformed at one length, must give the
model's outputs at other lengths and train there, switching at learning rate 0 keeping the
function (issue 18: a graph per guard set).
"""

import warnings

import pytest
import torch

import dynlora_fx as dl

transformers = pytest.importorskip("transformers")
VOCAB = 64


def _jamba() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        use_cache=False)
    return transformers.JambaForCausalLM(config).eval()


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))


def test_jamba_hybrid_decoder_runs_every_length_it_runs():
    model = _jamba()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = dl.transform(model, (), dl.SwitchLoRA(rank=4, interval=2, freeze_steps=0),
                          example_kwargs={"input_ids": _ids(2, 16)}).eval()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"JambaMambaMixer", "JambaAttention", "JambaSparseMoeBlock"} <= kinds  # a hybrid with experts
    for length, batch in ((9, 3), (16, 1)):  # a new length, then the example's with a partial batch
        ids = _ids(batch, length)
        with torch.no_grad():
            want = model(input_ids=ids).logits
            got = gm(input_ids=ids).logits
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), length
    assert len(gm._graph_sets) == 2  # the example's guard set, and one for length 9

    # training at the new length: switching at learning rate 0 keeps the function
    ids = _ids(3, 9)
    with torch.no_grad():
        before = gm.eval()(input_ids=ids).logits
    opt = dl.AdamW(gm.parameters(), lr=0.0)
    sw = dl.attach(gm, opt, total_steps=4)
    gm.train()
    for _ in range(3):
        logits = gm(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert sum(sw.num_switched()) > 0
    with torch.no_grad():
        after = gm.eval()(input_ids=ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
