"""A graph per guard set (issue 18): sizes torch.export specialised on are captured again.

Models that export pins to the example's sequence length (``nn.LSTM``, ``nn.GRU``, a branch on
the length) train and evaluate over other lengths and a last partial batch, eager and compiled,
with switching keeping the function at learning rate 0; compiled instances are independent of
one another; a size no graph can take is the same ``DynLoRAError`` eager and compiled.
"""

import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import dynlora_fx as dl

VOCAB, D = 13, 8


class LstmLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.rnn = nn.LSTM(D, D, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


class GruTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.rnn = nn.GRU(D, D, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(0.1)
        self.tag = nn.Linear(2 * D, 5)

    def forward(self, ids):
        return self.tag(self.drop(self.rnn(self.emb(ids))[0]))


class LengthBranch(nn.Module):
    """Python control flow on the sequence length: export pins the branch it took."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.short, self.long = nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.long(h).cumsum(1) if ids.shape[1] > 6 else torch.tanh(self.short(h))
        return self.head(h)


class LoopCell(nn.Module):
    """A Python loop over time steps: export unrolls it, so every length is a graph of its own (cheap)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.cell = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        h, outs = torch.zeros_like(x[:, 0]), []
        for t in range(ids.shape[1]):
            h = torch.tanh(self.cell(x[:, t]) + h)
            outs.append(h)
        return self.head(torch.stack(outs, 1))


MODELS = {"lstm-lm": LstmLM, "bigru-tagger": GruTagger, "length-branch": LengthBranch, "loop-cell": LoopCell}
# (batch, length): the example's length, another, and last partial batches
SCHEDULE = [(4, 8), (4, 5), (4, 8), (3, 8), (3, 5)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on RNN flat weights
        yield


def _ids(batch, length, seed):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _transform(name, **kw):
    torch.manual_seed(0)
    model = MODELS[name]()
    gm = dl.transform(model, (_ids(4, 8, 0),), dl.SwitchLoRA(rank=2, interval=2, freeze_steps=1), **kw)
    return model, gm


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", ["lstm-lm", "bigru-tagger", "length-branch"])
def test_varying_lengths_train_and_keep_the_function(name, compiled):
    model, gm = _transform(name)
    assert gm.capture_method == "export"
    opt = dl.AdamW(gm.parameters(), lr=0.0)  # only switching changes anything: the function must not
    sw = dl.attach(gm, opt, total_steps=20)
    run = dl.compile(gm, backend="eager") if compiled else gm
    model.eval()
    for step, (batch, length) in enumerate(SCHEDULE):
        ids = _ids(batch, length, step + 1)
        run.train()
        loss = run(ids).square().mean()  # the train graph of this length, with its backward
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.eval()
        with torch.no_grad():
            torch.testing.assert_close(run(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert sw.num_switched()[0] > 0
    # RNNs: lengths 8 and 5 (batch 3 fits the dynamic batch dim); the branch: length 5 takes the other one
    assert len(gm._graph_sets) == 2


def test_graphs_hold_no_state():
    model, gm = _transform("loop-cell")
    keys = list(gm.state_dict())
    gm(_ids(2, 5, 1))
    assert len(gm._graph_sets) == 2 and list(gm.state_dict()) == keys
    copy = dl.merge(gm)  # a copy keeps every graph set, reading its own state
    assert len(copy._graph_sets) == 2
    ids = _ids(2, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(ids), model.eval()(ids), rtol=1e-4, atol=1e-5)
    fresh = _transform("loop-cell")[1]
    fresh.load_state_dict(gm.state_dict())  # a module with only the example's graph resumes from it
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids), model(ids), rtol=1e-4, atol=1e-5)


def test_the_limit_is_a_clear_error_eager_and_compiled():
    _, gm = _transform("loop-cell", recapture_limit=2)
    gm(_ids(2, 5, 1))  # the second graph set
    for run in (gm, dl.compile(gm, backend="eager"), torch.compile(gm, backend="eager")):
        with pytest.raises(dl.DynLoRAError, match=r"ids dim 1 \(8, 5, 11\).*pad.*dynamic_shapes.*recapture_limit"):
            run(_ids(2, 11, 2))
    assert len(gm._graph_sets) == 2
    gm.recapture_limit = 3
    assert gm(_ids(2, 11, 2)).shape == (2, 11, VOCAB)
    with pytest.raises(dl.errors.ConfigError, match="recapture_limit"):
        _transform("loop-cell", recapture_limit=0)


def test_the_models_own_error_is_its_own():
    model, gm = _transform("loop-cell")
    bad = _ids(2, 5, 1)
    bad[0, 0] = VOCAB + 3  # out of the embedding's range: the model itself fails
    with pytest.raises(IndexError) as want:
        model(bad)
    for run in (gm, dl.compile(gm, backend="eager")):
        with pytest.raises(IndexError) as got:
            run(bad)
        assert str(got.value) == str(want.value)
    assert len(gm._graph_sets) == 1


def test_dynamic_shapes_go_to_torch_export():
    ids = _ids(4, 8, 0)
    # batch declared static: another batch size is another guard set
    _, gm = _transform("lstm-lm", dynamic_shapes={"ids": None})
    gm(_ids(3, 8, 1))
    assert len(gm._graph_sets) == 2
    with pytest.raises(dl.errors.CaptureError, match="torch.export failed"):  # export's own meaning: DYNAMIC must hold
        dl.transform(LoopCell(), (ids,), dl.SwitchLoRA(rank=2),
                     dynamic_shapes={"ids": {1: torch.export.Dim.DYNAMIC}})


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_fifty_compiled_instances_all_run_compiled():
    torch._dynamo.reset()
    x = torch.randn(4, 8)
    mods = [dl.transform(Small(), (x,), dl.SwitchLoRA(rank=2)) for _ in range(50)]
    counters.clear()
    for gm in mods:
        dl.compile(gm, backend="eager")(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 50  # one compiled graph each: none ran eagerly
    counters.clear()
    for gm in mods[:12]:  # the user's own torch.compile: each instance its own forward code object
        torch.compile(gm, backend="eager")(x)
    assert counters["stats"]["unique_graphs"] == 12


class Stack(nn.Module):
    """Two repeated blocks, each a Python loop over time: checkpointed regions in every graph set."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([LoopCell() for _ in range(2)])

    def forward(self, ids):
        return sum(block(ids) for block in self.blocks)


def test_a_new_graph_set_checkpoints_the_same_blocks():
    torch.manual_seed(0)
    model = Stack()
    gm = dl.transform(model, (_ids(2, 4, 0),), dl.SwitchLoRA(rank=2), checkpoint=True)
    assert gm.checkpointed == ("blocks.0", "blocks.1")
    ids = _ids(3, 6, 1)
    out = gm(ids)
    out.square().mean().backward()
    assert len(gm._graph_sets) == 2
    regions = gm._graph_sets[1].graphs["train"].regions
    assert [(r.block, r.recompute) for r in regions.children()] == [("blocks.0", True), ("blocks.1", True)]
    torch.testing.assert_close(out, model(ids), rtol=1e-4, atol=1e-5)
