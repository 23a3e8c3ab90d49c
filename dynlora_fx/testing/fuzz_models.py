"""Seeded random models for fuzzing ``dl.transform``, and the invariants every one must satisfy.

A case is drawn in two steps: :func:`draw_spec` turns a seed into a *spec* (plain JSON data:
input kind, a list of blocks, output container, dtype, adapter config), and :func:`build`
turns a spec into a model and example inputs. Shrinking works on specs (drop a block,
simplify an option) and a spec is a complete, printable reproduction of a failure.

:func:`check_spec` runs the invariants of DESIGN.md §3-§4 on one spec and returns the
failures it found (an empty list when all hold):

- ``equal``: the transformed module equals the model in train and eval mode (same RNG seed),
  buffers mutated by the call included;
- ``untouched``: the user's model keeps its state, modes, ``requires_grad`` flags and hooks;
- ``coverage``: every >= 2-D parameter is adapted or skipped, with a reason that holds
  (an "unused" weight changes nothing, a "frozen" one is frozen, a "no_grad" one gets no
  gradient), and no adapter is dead (never read, or without gradient where its weight has one);
- ``grads``: adapter gradients equal ``s·Bᵀ·∂L/∂W`` and ``s·∂L/∂W·Aᵀ`` from the model's own
  ``∂L/∂W``; every other parameter's gradient equals the model's;
- ``switch``: optimizer steps at lr 0 with switching leave the function unchanged;
- ``merge``: ``dl.merge`` equals the transformed module after its adapters moved;
- ``batch``: other batch sizes and sequence lengths give the model's output, in both modes,
  wherever the model accepts them; refusing one (even with a ``DynLoRAError``) is a failure, since
  a size outside the captured graphs' guards is captured again.
"""

from __future__ import annotations

import collections
import copy
import math
import random
import traceback
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import dynlora_fx as dl
from dynlora_fx.passes import repeated_blocks
from dynlora_fx.passes.insert_adapters import META_KEY

__all__ = ["draw_spec", "build", "check_spec", "shrink", "features", "BLOCKS", "CHECKPOINT_BLOCKS",
           "draw_checkpoint_spec", "check_checkpointing"]

Pair = collections.namedtuple("Pair", ["out", "aux"])

# block kind -> inputs it accepts ("vec": (B, D), "seq": (B, T, D))
BLOCKS = {
    "linear": ("vec", "seq"), "hook": ("vec", "seq"), "spectral_norm": ("vec", "seq"),
    "weight_norm": ("vec", "seq"), "spectral_param": ("vec", "seq"), "raw": ("vec", "seq"),
    "reuse": ("vec", "seq"), "tied": ("vec", "seq"), "plist": ("vec", "seq"), "pdict": ("vec", "seq"),
    "mha": ("seq",), "rnn": ("seq",), "cell": ("vec", "seq"), "norm": ("vec", "seq"),
    "dropout": ("vec", "seq"), "mode_flow": ("vec", "seq"), "shape_flow": ("vec", "seq"),
    "no_grad": ("vec", "seq"), "frozen": ("vec", "seq"), "buffer": ("vec", "seq"), "conv1d": ("seq",),
}
RAW_OPS = ("matmul", "matmul_t", "mm", "addmm", "einsum", "bmm", "tensordot", "linear", "slices", "reshaped")


# -- drawing specs -------------------------------------------------------------------------
def _draw_block(rng: random.Random, kind: str, d: int) -> dict[str, Any]:
    b: dict[str, Any] = {"kind": kind}
    if kind in ("linear", "frozen", "reuse", "tied"):
        b["bias"] = rng.random() < 0.6
        b["act"] = rng.choice(["relu", "tanh", "none"])
    if kind == "hook":
        b["hooks"] = rng.choice(["forward", "pre", "both"])
        b["conv"] = rng.random() < 0.3
    if kind == "raw":
        b["ops"] = rng.sample(RAW_OPS, 2)  # two raw parameters, applied one after the other
    if kind in ("plist", "pdict"):
        b["n"] = rng.randint(1, 3)
    if kind == "mha":
        b["heads"] = rng.choice([h for h in (1, 2) if d % h == 0])
        b["bias"] = rng.random() < 0.7
        b["kdim"] = rng.random() < 0.25  # separate k/v projection weights
    if kind == "rnn":
        b["cls"] = rng.choice(["LSTM", "GRU", "RNN"])
        b["layers"] = rng.randint(1, 2)
        b["bidirectional"] = d % 2 == 0 and rng.random() < 0.3
    if kind == "cell":
        b["cls"] = rng.choice(["LSTMCell", "GRUCell", "RNNCell"])
    if kind == "norm":
        b["cls"] = rng.choice(["LayerNorm", "RMSNorm", "BatchNorm1d", "GroupNorm"])
    if kind == "dropout":
        b["p"] = rng.choice([0.1, 0.5])
        b["functional"] = rng.random() < 0.5
    if kind == "mode_flow":
        b["style"] = rng.choice(["weights", "extra"])
    if kind == "shape_flow":
        b["on"] = rng.choice(["batch", "feature"])
    if kind == "no_grad":
        b["raw"] = rng.random() < 0.5
    if kind == "conv1d":
        b["transposed"] = rng.random() < 0.3
        b["groups"] = rng.choice([g for g in (1, 2) if d % g == 0])
        b["padding_mode"] = "zeros" if b["transposed"] else rng.choice(["zeros", "zeros", "reflect", "circular"])
    return b


def draw_spec(seed: int, *, export_rate: float = 1.0) -> dict[str, Any]:
    """A random model spec. ``export_rate`` < 1 thins out the block kinds that send a model to
    ``torch.export`` (several seconds each), for the CI-sized set."""
    rng = random.Random(seed)
    d = rng.choice([4, 6, 8])
    inp = rng.choice(["vec", "seq", "seq", "img", "ids"])
    stream = "vec" if inp in ("vec", "img") else "seq"
    kinds = [k for k, ok in BLOCKS.items() if stream in ok]
    slow = {"hook", "spectral_norm", "mha", "rnn", "cell", "shape_flow", "no_grad", "spectral_param"}
    blocks = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        if kind in slow and rng.random() > export_rate:
            kind = rng.choice(["linear", "raw", "norm", "dropout", "reuse", "plist", "mode_flow"])
        blocks.append(_draw_block(rng, kind, d))
    spec: dict[str, Any] = {
        "seed": seed, "d": d, "input": inp, "blocks": blocks,
        "batch": rng.choice([2, 3, 4]), "time": rng.choice([3, 5]),
        "stem": None, "head": rng.random() < 0.6, "pool": stream == "seq" and rng.random() < 0.3,
        "output": rng.choice(["tensor", "tensor", "tuple", "dict", "namedtuple"]),
        "dtype": "float64" if rng.random() < 0.15 else "float32",
    }
    if inp == "img":
        spec["stem"] = {"cls": rng.choice(["Conv2d", "Conv2d", "ConvTranspose2d", "Conv3d"]),
                        "groups": rng.choice([1, 1, 2]), "stride": rng.choice([1, 2]),
                        "padding_mode": rng.choice(["zeros", "zeros", "reflect"])}
    if inp == "ids":
        spec["tie_head"] = rng.random() < 0.4
    method = rng.choice(["switchlora", "switchlora", "lora", "relora"])
    spec["config"] = {
        "method": method,
        "rank": rng.choice([1, 2, 3, 0.25, 0.5, 1.0]),
        "form": rng.choice(["auto", "activation", "weight"]),
        "init": rng.choice(["switchlora", "lora"]) if method == "lora" else None,
        "tokens_per_step": rng.choice([16, 4096]),
    }
    return spec


def features(spec: dict[str, Any]) -> list[str]:
    """Feature tags of a spec, for the campaign's per-feature table."""
    out = {f"input:{spec['input']}", f"output:{spec['output']}", spec["dtype"], f"method:{spec['config']['method']}",
           f"form:{spec['config']['form']}", f"rank:{spec['config']['rank']}"}
    for b in spec["blocks"]:
        out.add(b["kind"])
        if "cls" in b:
            out.add(f"{b['kind']}:{b['cls']}")
        out.update(f"raw:{op}" for op in b.get("ops", ()))
        if b.get("transposed"):
            out.add("conv_transpose")
    if spec["stem"]:
        out.add(f"stem:{spec['stem']['cls']}")
        if spec["stem"]["groups"] > 1:
            out.add("grouped_conv")
    if spec.get("tie_head"):
        out.add("tied_embedding_head")
    return sorted(out)


# -- building models -----------------------------------------------------------------------
_ACT = {"relu": torch.relu, "tanh": torch.tanh, "none": lambda x: x}


def _scale_hook(module, inputs, output):
    return output * 1.5 + 0.1


def _pre_hook(module, inputs):
    return (inputs[0] * 0.5,) + tuple(inputs[1:])


class Linear(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        self.fc = nn.Linear(d, d, bias=b["bias"])
        self.act = b["act"]
        if b["kind"] == "frozen":
            self.fc.weight.requires_grad_(False)

    def forward(self, x):
        return _ACT[self.act](self.fc(x))


class Hooked(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        self.conv = b["conv"]
        self.fc = nn.Conv1d(d, d, 1) if self.conv else nn.Linear(d, d)
        if b["hooks"] in ("forward", "both"):
            self.fc.register_forward_hook(_scale_hook)
        if b["hooks"] in ("pre", "both"):
            self.fc.register_forward_pre_hook(_pre_hook)

    def forward(self, x):
        if self.conv:  # (..., D) -> (N, D, 1) and back
            return self.fc(x.reshape(-1, x.shape[-1], 1)).reshape(x.shape)
        return self.fc(x)


class Normed(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        lin = nn.Linear(d, d)
        if b["kind"] == "spectral_norm":
            self.fc = nn.utils.spectral_norm(lin)
        elif b["kind"] == "spectral_param":
            self.fc = nn.utils.parametrizations.spectral_norm(lin)
        else:
            self.fc = nn.utils.parametrizations.weight_norm(lin)

    def forward(self, x):
        return self.fc(x)


class Raw(nn.Module):
    """Raw parameters used through @, mm, addmm, einsum, bmm, tensordot and F.linear, with views,
    slices and transposes."""

    def __init__(self, b, d):
        super().__init__()
        self.ops = nn.ModuleList([RawOp(op, d) for op in b["ops"]])

    def forward(self, x):
        for op in self.ops:
            x = op(x)
        return x


class RawOp(nn.Module):
    def __init__(self, op, d):
        super().__init__()
        self.op = op
        shape = {"slices": (2 * d, d), "reshaped": (d, d // 2, 2)}.get(self.op, (d, d))
        self.w = nn.Parameter(torch.randn(shape) / math.sqrt(d))
        self.bias = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        w, d = self.w, self.w.shape[-1]
        if self.op == "matmul":
            return x @ w
        if self.op == "matmul_t":
            return torch.matmul(x, w.t())
        if self.op == "mm":
            return torch.mm(x.reshape(-1, d), w).reshape(x.shape)
        if self.op == "addmm":
            return torch.addmm(self.bias, x.reshape(-1, d), w.transpose(0, 1)).reshape(x.shape)
        if self.op == "einsum":
            return torch.einsum("...i,oi->...o", x, w)
        if self.op == "bmm":
            x3 = x.reshape(x.shape[0], -1, d)
            return torch.bmm(x3, w.expand(x.shape[0], d, d)).reshape(x.shape)
        if self.op == "tensordot":
            return torch.tensordot(x, w, dims=([-1], [1]))
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        if self.op == "slices":
            half = w.shape[0] // 2
            return x @ w[:half] + F.linear(x, w[half:])
        return x @ w.reshape(w.shape[0], -1)  # "reshaped": a 3-D parameter viewed as a matrix


class Reuse(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        self.fc = nn.Linear(d, d, bias=b["bias"])
        self.act = b["act"]
        if b["kind"] == "tied":  # a second module sharing the weight (its own bias)
            self.fc2 = nn.Linear(d, d)
            self.fc2.weight = self.fc.weight

    def forward(self, x):
        second = self.fc2 if hasattr(self, "fc2") else self.fc
        return second(_ACT[self.act](self.fc(x)))


class PList(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        mats = [nn.Parameter(torch.randn(d, d) / math.sqrt(d)) for _ in range(b["n"])]
        self.dict = b["kind"] == "pdict"
        self.ps = nn.ParameterDict({f"p{i}": m for i, m in enumerate(mats)}) if self.dict else nn.ParameterList(mats)

    def forward(self, x):
        for p in (self.ps.values() if self.dict else self.ps):
            x = torch.tanh(x @ p)
        return x


class MHA(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        k = d + 2 if b["kdim"] else None
        self.kv = nn.Linear(d, k) if k else None
        self.attn = nn.MultiheadAttention(d, b["heads"], bias=b["bias"], batch_first=True, kdim=k, vdim=k)

    def forward(self, x):
        kv = self.kv(x) if self.kv is not None else x
        return self.attn(x, kv, kv, need_weights=False)[0]


class RNN(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        hidden = d // 2 if b["bidirectional"] else d
        self.rnn = getattr(nn, b["cls"])(d, hidden, num_layers=b["layers"], batch_first=True,
                                         bidirectional=b["bidirectional"])

    def forward(self, x):
        return self.rnn(x)[0]


class Cell(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        self.cell = getattr(nn, b["cls"])(d, d)
        self.lstm = b["cls"] == "LSTMCell"

    def forward(self, x):
        if x.dim() == 2:
            h = self.cell(x)
            return h[0] if self.lstm else h
        outs, state = [], None
        for t in range(x.shape[1]):  # a Python loop over the sequence length
            state = self.cell(x[:, t], state)
            outs.append(state[0] if self.lstm else state)
        return torch.stack(outs, 1)


class Norm(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        self.cls = b["cls"]
        self.norm = {"LayerNorm": lambda: nn.LayerNorm(d), "RMSNorm": lambda: nn.RMSNorm(d),
                     "BatchNorm1d": lambda: nn.BatchNorm1d(d), "GroupNorm": lambda: nn.GroupNorm(2, d)}[self.cls]()

    def forward(self, x):
        if self.cls in ("BatchNorm1d", "GroupNorm") and x.dim() == 3:
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class Dropout(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        self.p, self.functional = b["p"], b["functional"]
        self.drop = nn.Dropout(self.p)

    def forward(self, x):
        return F.dropout(x, self.p, self.training) if self.functional else self.drop(x)


class ModeFlow(nn.Module):
    """Control flow on ``self.training``: different weights, or an extra product, per mode."""

    def __init__(self, b, d):
        super().__init__()
        self.style = b["style"]
        self.wt = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.we = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        if self.style == "weights":
            return x @ self.wt if self.training else x @ self.we
        y = x @ self.wt
        if not self.training:
            y = y + torch.tanh(x @ self.we)
        return y


class ShapeFlow(nn.Module):
    """Python control flow on a dimension: the batch size, or (static) the feature size."""

    def __init__(self, b, d):
        super().__init__()
        self.on = b["on"]
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        if self.on == "batch":
            return self.a(x) if x.shape[0] > 2 else self.b(x)
        return self.a(x) if x.shape[-1] % 2 == 0 else self.b(x)


class NoGrad(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        self.raw = b["raw"]
        self.fc = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        with torch.no_grad():
            h = x @ self.w if self.raw else self.fc(x)
        return self.fc(x) + h if self.raw else x @ self.w + h


class Buffer(nn.Module):
    """A running mean updated in place in train mode, and a call counter."""

    def __init__(self, b, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.register_buffer("avg", torch.zeros(d))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            self.avg.mul_(0.9).add_(y.detach().reshape(-1, y.shape[-1]).mean(0) * 0.1)
            self.calls.add_(1)
        return y - self.avg


class Conv1dBlock(nn.Module):
    def __init__(self, b, d):
        super().__init__()
        if b["transposed"]:
            self.conv = nn.ConvTranspose1d(d, d, 3, padding=1, groups=b["groups"])
        else:
            self.conv = nn.Conv1d(d, d, 3, padding=1, groups=b["groups"], padding_mode=b["padding_mode"])

    def forward(self, x):  # (B, T, D) -> (B, D, T) -> conv -> back
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


_BUILDERS = {"linear": Linear, "frozen": Linear, "hook": Hooked, "spectral_norm": Normed, "weight_norm": Normed,
             "spectral_param": Normed, "raw": Raw, "reuse": Reuse, "tied": Reuse, "plist": PList, "pdict": PList,
             "mha": MHA, "rnn": RNN, "cell": Cell, "norm": Norm, "dropout": Dropout, "mode_flow": ModeFlow,
             "shape_flow": ShapeFlow, "no_grad": NoGrad, "buffer": Buffer, "conv1d": Conv1dBlock}


class FuzzModel(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        d = spec["d"]
        self.input, self.output, self.pool = spec["input"], spec["output"], spec["pool"]
        stem = spec["stem"]
        if stem is not None:
            cls = getattr(nn, stem["cls"])
            kw = {"stride": stem["stride"], "groups": stem["groups"]}
            conv3d = stem["cls"] == "Conv3d"  # on (B, C, 1, H, W): no padding along the depth of 1
            if stem["cls"] != "ConvTranspose2d":
                kw["padding_mode"] = stem["padding_mode"]
                kw["padding"] = (0, 1, 1) if conv3d else 1
            kernel = (1, 3, 3) if conv3d else 3
            self.stem = cls(2, 2 * d, kernel, **kw)
            self.stem3d = conv3d
            self.stem_proj = nn.Linear(2 * d, d)
        if self.input == "ids":
            self.emb = nn.Embedding(11, d)
        self.blocks = nn.ModuleList([_BUILDERS[b["kind"]](b, d) for b in spec["blocks"]])
        self.head = nn.Linear(d, 3) if spec["head"] else None
        self.tie_head = spec.get("tie_head", False)

    def forward(self, x):
        if self.input == "img":
            h = self.stem(x.unsqueeze(2) if self.stem3d else x)
            h = self.stem_proj(h.flatten(2).mean(-1))
        elif self.input == "ids":
            h = self.emb(x)
        else:
            h = x
        for block in self.blocks:
            h = block(h)
        if self.pool:
            h = h.mean(1)
        out = self.head(h) if self.head is not None else h
        if self.tie_head:
            out = h @ self.emb.weight.t()
        aux = h.pow(2).mean()
        if self.output == "tuple":
            return out, aux
        if self.output == "dict":
            return {"logits": out, "aux": aux}
        if self.output == "namedtuple":
            return Pair(out, aux)
        return out


def make_inputs(spec: dict[str, Any], batch: int, seed: int = 0, time: int | None = None) -> tuple:
    g = torch.Generator().manual_seed(seed)
    d, t = spec["d"], time or spec["time"]
    dtype = getattr(torch, spec["dtype"])
    if spec["input"] == "ids":
        return (torch.randint(0, 11, (batch, t), generator=g),)
    shape = {"vec": (batch, d), "seq": (batch, t, d), "img": (batch, 2, 6, 6)}[spec["input"]]
    return (torch.randn(shape, generator=g, dtype=dtype),)


def make_config(spec: dict[str, Any]) -> dl.config.AdapterConfig:
    c = spec["config"]
    common = {"rank": c["rank"], "form": c["form"], "tokens_per_step": c["tokens_per_step"], "seed": spec["seed"]}
    if c["method"] == "switchlora":  # switch every step, so a few steps exercise it
        return dl.SwitchLoRA(interval=2.0, freeze_steps=1, **common)
    if c["method"] == "lora":
        return dl.LoRA(init=c["init"], **common)
    return dl.ReLoRA(reset_every=1, warmup=0, **common)


def build(spec: dict[str, Any]) -> tuple[nn.Module, tuple]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = FuzzModel(spec)
    if spec["dtype"] == "float64":
        model = model.double()
    model.train(spec["seed"] % 2 == 0)  # the user's mode, which transform must keep
    return model, make_inputs(spec, spec["batch"])


# -- checking the invariants -------------------------------------------------------------------
def _float_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _loss(out: Any) -> torch.Tensor:
    """A fixed random projection of every float output: no output can cancel another's gradient."""
    g = torch.Generator().manual_seed(7)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in _float_leaves(out))


def _run(module: nn.Module, args: tuple, mode: str, seed: int = 0) -> Any:
    module.train(mode == "train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module(*args)


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-9, 1e-10) if dtype == torch.float64 else (2e-4, 2e-5)


def _diff(ref: Any, got: Any) -> str:
    """'' when the two output trees agree up to rounding, else where they differ."""
    lr, sr = pytree.tree_flatten(ref)
    lg, sg = pytree.tree_flatten(got)
    if sr != sg:
        return f"output structure {sg} instead of {sr}"
    for i, (r, g) in enumerate(zip(lr, lg)):
        if not isinstance(r, torch.Tensor):
            if r != g:
                return f"leaf {i}: {g!r} instead of {r!r}"
            continue
        if not _tensor_close(r, g):
            err = (g.detach().double() - r.detach().double()).abs().max().item() if r.shape == g.shape else "shape"
            return f"leaf {i}: max abs error {err} (shape {tuple(g.shape)} vs {tuple(r.shape)})"
    return ""


def _tensor_close(r: torch.Tensor | None, g: torch.Tensor | None, peers: float = 0.0) -> bool:
    """Equal up to rounding relative to ``r`` and to ``peers``, the magnitude of its sibling
    gradients (a gradient that is zero in theory, as a bias's before batch norm, is noise of that size)."""
    if r is None or g is None:  # a missing gradient stands for zeros (both missing: equal)
        if r is g:
            return True
        r, g = (torch.zeros_like(g), g) if r is None else (r, torch.zeros_like(r))
    if r.shape != g.shape or r.dtype != g.dtype:
        return False
    if not r.is_floating_point():
        return torch.equal(r, g)
    rtol, atol = _tol(r.dtype)
    scale = max(peers, r.detach().abs().max().item() if r.numel() else 0.0)
    return torch.allclose(g.detach(), r.detach(), rtol=rtol, atol=atol * (1.0 + scale))


def _grads(module: nn.Module, params: list[torch.Tensor], args: tuple, mode: str) -> tuple[Any, list]:
    out = _run(module, args, mode)
    loss = _loss(out)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad or not params:
        return out, [None] * len(params)
    return out, list(torch.autograd.grad(loss, params, allow_unused=True))


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "modes": [m.training for m in model.modules()],
            "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            "grads": [p.grad is None for p in model.parameters()]}


def _matrix(t: torch.Tensor, target: Any) -> torch.Tensor:
    return t.reshape(*target.batch, target.rows, target.cols)


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def _restore(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in module.named_buffers():
            v.copy_(saved[k])


_NUMERIC = ("equal", "grads", "merge", "switch", "batch")


def check_spec(spec: dict[str, Any], *, batches: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    """Run every invariant on one spec. Returns ``{"outcome", "capture", "failures", "notes"}``:
    outcome "ok", "refused" (a DynLoRAError that is acceptable) or "fail".

    A float32 model whose only failures are numeric mismatches is checked again in float64:
    a real mismatch stays (hooks dropped: 40% errors), ill-conditioning does not (a batch norm
    over 2 samples turns rounding of 1e-7 into gradient differences of 1e-4); the note says so."""
    res = _check_once(spec, batches)
    numeric = all(f["check"] in _NUMERIC and "Error" not in f["detail"] and "raised" not in f["detail"]
                  and "structure" not in f["detail"] for f in res["failures"])
    if res["outcome"] == "fail" and numeric and spec["dtype"] == "float32":
        again = _check_once({**spec, "dtype": "float64"}, batches)
        if again["outcome"] != "fail":
            first = res["failures"][0]
            res["notes"].append(f"float32 rounding only (holds in float64): [{first['check']}] {first['detail'][:200]}")
            res = {**res, "outcome": "ok", "failures": []}
    return res


def _check_once(spec: dict[str, Any], batches: tuple[int, ...]) -> dict[str, Any]:
    model, args = build(spec)
    config = make_config(spec)
    before = _snapshot(model)
    pristine = copy.deepcopy(model)  # the reference; ``model`` itself must never be called
    failures: list[dict[str, str]] = []
    notes: list[str] = []

    def fail(check: str, detail: str) -> None:
        failures.append({"check": check, "detail": detail[:600]})

    def result(outcome: str, capture: str | None) -> dict[str, Any]:
        return {"outcome": "fail" if failures else outcome, "capture": capture, "failures": failures, "notes": notes}

    try:
        gm = dl.transform(model, args, config)
    except dl.errors.TargetError as exc:  # e.g. every weight frozen or an embedding: a true refusal
        notes.append(f"transform refused: {exc}"[:300])
        _check_untouched(model, before, fail)
        return result("refused", None)
    except Exception as exc:  # noqa: BLE001
        fail("transform", "".join(traceback.format_exception_only(type(exc), exc)).strip())
        return result("fail", None)

    infos = {a.weight: a for a in dl.adapters(gm)}
    params = dict(gm.named_parameters())
    skipped = {s.weight: s.reason for s in gm.plan.skipped}
    ref_names = [n for n, p in pristine.named_parameters() if p.requires_grad]
    gm_names = [n for n, p in gm.named_parameters() if p.requires_grad]
    gm_params = [params[n] for n in gm_names]
    ref_grad_of: dict[str, dict[str, torch.Tensor | None]] = {}
    start_buffers = _buffers(gm)

    # equal outputs, buffers and gradients in both modes, at step 0
    for mode in ("train", "eval"):
        ref = copy.deepcopy(pristine)
        ref_p = [ref.get_parameter(n) for n in ref_names]
        out_r, g_r = _grads(ref, ref_p, args, mode)
        try:
            out_g, g_g = _grads(gm, gm_params, args, mode)
        except Exception as exc:  # noqa: BLE001
            fail("equal", f"{mode}: transformed module raised {type(exc).__name__}: {exc}")
            return result("fail", gm.capture_method)
        what = _diff(out_r, out_g)
        if what:
            fail("equal", f"{mode}-mode output: {what}")
        bufs_g = dict(gm.model.named_buffers())
        for k, v in ref.named_buffers():
            if not _tensor_close(v, bufs_g.get(k)):
                fail("equal", f"{mode}-mode buffer {k} differs after the call")
        _restore(gm, start_buffers)
        ref_grad = dict(zip(ref_names, g_r))
        peers = max((g.abs().max().item() for g in g_r if g is not None and g.numel()), default=0.0)
        ref_grad_of[mode] = ref_grad
        got = dict(zip(gm_names, g_g))
        for weight, info in infos.items():
            ad = gm.adapter(weight)
            t, s = ad.target, ad.scale.item()
            G = ref_grad.get(weight)
            G = torch.zeros(t.shape, dtype=ad.A.dtype) if G is None else G
            G = _matrix(G, t)
            want_a = s * ad.B.detach().transpose(-1, -2) @ G
            want_b = s * G @ ad.A.detach().transpose(-1, -2)
            if not _tensor_close(want_a, got.get(info.a), peers):
                fail("grads", f"{mode}: gradient of A for {weight} is not s*B^T*dL/dW")
            if not _tensor_close(want_b, got.get(info.b), peers):
                fail("grads", f"{mode}: gradient of B for {weight} is not s*dL/dW*A^T")
        for n in ref_names:
            if n in infos:
                continue
            if f"model.{n}" not in got:
                fail("grads", f"{n} is trained in the model but not in the transformed module")
            elif not _tensor_close(ref_grad[n], got[f"model.{n}"], peers):
                fail("grads", f"{mode}: gradient of {n} differs from the model's")

    # every >= 2-D parameter adapted or skipped with a true reason; no dead adapters
    canonical = [n for n, p in pristine.named_parameters() if p.dim() >= 2]
    missing = [n for n in canonical if n not in infos and n not in skipped]
    if missing:
        fail("coverage", f"neither adapted nor skipped: {missing}")
    for weight in infos:
        if gm.model.get_parameter(weight).requires_grad:
            fail("coverage", f"{weight} is adapted but its base weight still trains")
        read = any(n.meta.get(META_KEY, {}).get("weight") == weight
                   for g in gm._unique_graphs() for n in g.graph.nodes)
        alive = any(ref_grad_of[m].get(weight) is not None for m in ref_grad_of)
        if not read:
            fail("coverage", f"dead adapter: no graph reads the adapter of {weight}")
        elif not alive and pristine.get_parameter(weight).requires_grad:
            fail("coverage", f"dead adapter: {weight} gets no gradient in the model in either mode")
    for weight, reason in skipped.items():
        p = pristine.get_parameter(weight)
        no_grad = all(ref_grad_of[m].get(weight) is None for m in ref_grad_of)
        if reason.startswith("frozen in the model") and p.requires_grad:
            fail("coverage", f"{weight} skipped as frozen but it trains")
        if reason == "not used by forward" and (not no_grad or _affects_output(pristine, weight, args)):
            fail("coverage", f"{weight} skipped as 'not used by forward' but the model uses it")
        if reason.startswith("read only under torch.no_grad") and not no_grad:
            fail("coverage", f"{weight} skipped as no-grad-only but it gets a gradient")
        if reason.startswith("rank") and "exceeds" not in reason:
            fail("coverage", f"{weight}: unexpected reason {reason!r}")

    _check_sizes(spec, pristine, gm, batches, start_buffers, fail, notes)

    # merge equals the transformed module once the adapters have moved
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for ad in gm.iter_adapters():
            ad.A.add_(torch.randn(ad.A.shape, generator=g, dtype=ad.A.dtype) * 0.3)
            ad.B.add_(torch.randn(ad.B.shape, generator=g, dtype=ad.B.dtype) * 0.3)
    try:
        merged = dl.merge(gm)
        for mode in ("eval", "train"):
            with torch.no_grad():
                want = _run(gm, args, mode)
                _restore(gm, start_buffers)
                what = _diff(want, _run(merged, args, mode))
            if what:
                fail("merge", f"{mode}-mode: {what}")
        if dl.adapters(merged):
            fail("merge", "adapters left after merge")
    except Exception as exc:  # noqa: BLE001
        fail("merge", f"{type(exc).__name__}: {exc}")

    # switching (or ReLoRA resets) at lr 0 keeps the function
    if infos:
        try:
            with torch.no_grad():
                before_out = _run(gm, args, "eval")
            opt = dl.AdamW(gm.parameters(), lr=0.0)
            sw = dl.attach(gm, opt, total_steps=1000)  # rate ~1: r/2 switches per step and side
            for _ in range(4):
                _loss(_run(gm, args, "train")).backward()
                opt.step()
                opt.zero_grad()
            _restore(gm, start_buffers)  # training steps move batch-norm statistics; switches never do
            with torch.no_grad():
                what = _diff(before_out, _run(gm, args, "eval"))
            if what:
                fail("switch", f"output changed across switches at lr 0: {what}")
            if spec["config"]["method"] == "switchlora":
                notes.append(f"switched {sw.num_switched()}")
        except Exception as exc:  # noqa: BLE001
            fail("switch", f"{type(exc).__name__}: {exc}")

    _check_untouched(model, before, fail)
    return result("ok", gm.capture_method)


def _check_sizes(spec: dict[str, Any], pristine: nn.Module, gm: nn.Module, batches: tuple[int, ...],
                 start_buffers: dict[str, torch.Tensor], fail: Any, notes: list[str]) -> None:
    """Other batch sizes (and a shorter and a longer sequence): wherever the model accepts them, in either
    mode, the transformed module gives the model's output (same RNG seed). Refusing one is a failure:
    a size outside the captured graphs' guards is captured again. Notes how many graph sets it took."""
    sizes = [(bs, None) for bs in batches if bs != spec["batch"]]
    if spec["input"] in ("seq", "ids"):
        sizes += [(spec["batch"], spec["time"] + 2), (spec["batch"], spec["time"] - 1)]
    for bs, length in sizes:
        other = make_inputs(spec, bs, seed=1, time=length)
        for mode in ("eval", "train"):
            try:
                want = _run(copy.deepcopy(pristine), other, mode)
            except Exception:  # noqa: BLE001 - the model itself does not take this size in this mode
                continue
            try:
                got = _run(gm, other, mode)
            except Exception as exc:  # noqa: BLE001 - a DynLoRAError included: the model runs these inputs
                fail("batch", f"batch {bs} length {length}, {mode} mode: refused: {type(exc).__name__}: "
                              f"{str(exc)[:300]}")
                continue
            finally:
                _restore(gm, start_buffers)
            what = _diff(want, got)
            if what:
                fail("batch", f"batch {bs} length {length}, {mode} mode: {what}")
    notes.append(f"graph sets: {len(gm._graph_sets)}")


def _affects_output(model: nn.Module, weight: str, args: tuple) -> bool:
    """Whether changing ``weight`` changes the model's output in either mode."""
    for mode in ("train", "eval"):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():
            p = b.get_parameter(weight)
            p.add_(torch.randn(p.shape, dtype=p.dtype) + 1.0)
            if _diff(_run(a, args, mode), _run(b, args, mode)):
                return True
    return False


def _check_untouched(model: nn.Module, before: dict[str, Any], fail: Any) -> None:
    after = _snapshot(model)
    for key in ("flags", "modes", "hooks", "grads"):
        if after[key] != before[key]:
            fail("untouched", f"the user's model changed: {key}")
    if after["state"].keys() != before["state"].keys():
        fail("untouched", "the user's model's state_dict keys changed")
    for k, v in before["state"].items():
        if k in after["state"] and not torch.equal(after["state"][k], v):
            fail("untouched", f"the user's model's {k} changed")


# -- shrinking --------------------------------------------------------------------------------
def _candidates(spec: dict[str, Any]):
    """Simpler variants of a spec, simplest first."""
    blocks = spec["blocks"]
    for i in range(len(blocks)):
        if len(blocks) > 1:
            yield {**spec, "blocks": blocks[:i] + blocks[i + 1:]}
    simpler = {"output": "tensor", "dtype": "float32", "head": False, "pool": False, "tie_head": False}
    for key, value in simpler.items():
        if spec.get(key, value) != value:
            yield {**spec, key: value}
    if spec["input"] == "img":
        yield {**spec, "input": "vec", "stem": None}
    if spec["input"] == "ids":
        yield {**spec, "input": "seq", "tie_head": False}
    for key, value in {"form": "auto", "rank": 1, "method": "lora", "init": None, "tokens_per_step": 16}.items():
        if spec["config"].get(key) != value and not (key == "init" and spec["config"]["method"] == "lora"):
            yield {**spec, "config": {**spec["config"], key: value}}


def shrink(spec: dict[str, Any], checks: set[str], budget: int = 40) -> dict[str, Any]:
    """The simplest variant of ``spec`` that still fails one of ``checks`` (greedy, ``budget`` tries)."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for cand in _candidates(spec):
            tries += 1
            try:
                res = check_spec(cand)
            except Exception:  # noqa: BLE001 - building the variant itself failed: not a reduction
                continue
            if {f["check"] for f in res["failures"]} & checks:
                spec, improved = cand, True
                break
            if tries >= budget:
                break
    return spec


# -- the checkpointing pass ------------------------------------------------------------------------
class TempWrites(nn.Module):
    """In-place ops on tensors the block itself creates: recomputation recreates them, so the block
    must be recomputed like any other."""

    def __init__(self, b, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        # relu_ keeps its result for backward: a later in-place op on it would break the model's own backward
        self.ops = sorted(b["ops"], key=lambda op: op == "relu_")

    def forward(self, x):
        y = self.fc(x) * 2
        for op in self.ops:
            if op == "div_":
                y.div_(3)
            elif op == "iadd":
                y += x
            elif op == "setitem":
                y[..., 0] = 0.5
            elif op == "relu_":
                F.relu(y, inplace=True)
            elif op == "copy_":  # into a buffer the block allocates
                buf = torch.empty_like(y)
                buf.copy_(y)
                y = buf
            elif op == "scatter_":
                hot = torch.zeros_like(y)
                hot.scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
                y = y + hot * y
            elif op == "index_put_":
                acc = torch.zeros_like(y)
                acc.index_put_((torch.zeros(1, dtype=torch.long),), y[:1], accumulate=True)
                y = y + acc
            elif op == "detach_":
                y = y - y.mean().detach_()
        return x + torch.tanh(y)


class MoE(nn.Module):
    """Mixture-of-experts routing as Hugging Face writes it: softmax router, top-k, the top-k weights
    renormalised in place, experts' outputs accumulated in place into a zero buffer (dense masks, or
    ``index_add_`` over the routed tokens)."""

    def __init__(self, b, d):
        super().__init__()
        self.k, self.sparse = b["k"], b["sparse"]
        self.gate = nn.Linear(d, b["experts"], bias=False)
        self.experts = nn.ModuleList([nn.Linear(d, d) for _ in range(b["experts"])])

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(torch.softmax(self.gate(flat), -1), self.k, dim=-1)
        weights /= weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            share = (weights * (chosen == e)).sum(-1, keepdim=True)
            if self.sparse:
                rows = torch.nonzero(share.squeeze(-1) > 0).squeeze(-1)
                out.index_add_(0, rows, expert(flat[rows]) * share[rows])
            else:
                out += share * expert(flat)
        return x + out.reshape(x.shape)


# block kinds only the checkpoint fuzzer draws (the main campaign's draws stay as they were)
CHECKPOINT_BLOCKS = {"temp_writes": ("vec", "seq"), "moe": ("vec", "seq")}
_BUILDERS.update({"temp_writes": TempWrites, "moe": MoE})
_TEMP_OPS = ("div_", "iadd", "setitem", "relu_", "copy_", "scatter_", "index_put_", "detach_")
# kinds whose blocks truly write state they read (spectral norm's power iteration, old and parametrized;
# a running mean read back): the only blocks checkpoint=True may refuse to recompute
STATE_WRITERS = ("spectral_norm", "spectral_param", "buffer")


def draw_checkpoint_spec(seed: int) -> dict[str, Any]:
    """:func:`draw_spec`, and for half the seeds two blocks of a kind in :data:`CHECKPOINT_BLOCKS`
    inserted at random places (two, so they are repeated blocks)."""
    spec = draw_spec(seed)
    rng = random.Random(f"checkpoint-{seed}")
    if rng.random() < 0.5:
        kind = rng.choice(sorted(CHECKPOINT_BLOCKS))
        for _ in range(2):
            if kind == "moe":
                b = {"kind": kind, "experts": rng.choice([2, 3, 4]), "sparse": rng.random() < 0.5}
                b["k"] = rng.randint(1, b["experts"] - 1)
            else:
                b = {"kind": kind, "ops": rng.sample(_TEMP_OPS, 2)}
            spec["blocks"].insert(rng.randint(0, len(spec["blocks"])), b)
    return spec


def check_checkpointing(spec: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint=True`` against ``checkpoint=False`` on one spec's model: one train-mode step (same
    RNG seed) gives equal outputs, gradients and buffers, recomputation included, and every repeated
    block is recomputed unless its kind truly writes state it reads (:data:`STATE_WRITERS`). Same result
    shape as :func:`check_spec`; outcome "refused" when the model cannot be transformed, or has no
    block to recompute (a DynLoRAError), with the reason in the notes."""
    model, args = build(spec)
    config = make_config(spec)
    try:
        plain = dl.transform(model, args, config, checkpoint=False)
    except dl.DynLoRAError as exc:
        return {"outcome": "refused", "capture": None, "failures": [], "notes": [f"transform: {exc.cause[:120]}"]}
    blocks = repeated_blocks(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            recomputed = dl.transform(model, args, config, checkpoint=True)
        except dl.DynLoRAError as exc:
            recomputed, refusal = None, exc.cause
    skipped = [b for b in blocks if recomputed is None or b not in recomputed.checkpointed]
    false = [b for b in skipped if spec["blocks"][int(b.rsplit(".", 1)[1])]["kind"] not in STATE_WRITERS]
    if recomputed is None:
        failures = [{"check": "checkpoint-false-refusal", "detail": f"{false}: {refusal[:300]}"}] if false else []
        return {"outcome": "fail" if failures else "refused", "capture": plain.capture_method,
                "failures": failures, "notes": [f"checkpoint=True: {refusal[:160]}"]}
    runs = []
    for gm in (plain, recomputed):
        params = [p for p in gm.parameters() if p.requires_grad]
        out = _run(gm, args, "train", seed=3)
        grads = torch.autograd.grad(_loss(out), params, allow_unused=True)
        runs.append((_float_leaves(out), grads, _buffers(gm)))
    (o0, g0, b0), (o1, g1, b1) = runs
    failures = []
    if false:
        why = "; ".join(str(w.message)[:300] for w in caught if "checkpointing" in str(w.message))
        failures.append({"check": "checkpoint-false-refusal", "detail": f"{false}: {why}"})
    if not all(_tensor_close(a, b) for a, b in zip(o0, o1)) or len(o0) != len(o1):
        failures.append({"check": "checkpoint-output", "detail": _diff(o0, o1)})
    peers = max((float(g.abs().max()) for g in g0 if g is not None and g.numel()), default=0.0)
    if not all(_tensor_close(a, b, peers) for a, b in zip(g0, g1)):
        failures.append({"check": "checkpoint-grads", "detail": "gradients differ with checkpoint=True"})
    if not all(_tensor_close(b0[k], b1[k]) for k in b0):
        failures.append({"check": "checkpoint-buffers", "detail": "buffers differ with checkpoint=True"})
    notes = [f"recomputed {len(recomputed.checkpointed)} blocks"]
    notes += [f"not recomputed: {b} ({spec['blocks'][int(b.rsplit('.', 1)[1])]['kind']})" for b in skipped]
    return {"outcome": "fail" if failures else "ok", "capture": recomputed.capture_method, "failures": failures,
            "notes": notes}
