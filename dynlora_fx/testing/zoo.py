"""A zoo of small real models used as test subjects for the adapter pass.

Plain helper module (no tests here): ``from dynlora_fx.testing.zoo import ZOO``. The
model libraries a case needs (transformers, torchvision, timm) are imported when the case
is built, never at import.

Every case is tiny (hidden sizes 32-64, one or two layers, 32x32 images, vocab
100, sequence length 8) so that build + forward takes milliseconds. All weights
are randomly initialised from a config or a constructor: nothing is downloaded.

``weight_bearing_params`` is an *independent* oracle for the set of parameters
that feed a matrix product (linear / conv / mm / bmm / einsum / RNN / grouped
mm ...). It deliberately uses no ``dynlora_fx`` code: it exports the model
with ``torch.export`` and walks the ATen graph itself.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZooCase", "ZOO", "ZOO_BY_ID", "weight_bearing_params", "main_output"]

VOCAB = 100
SEQ = 8
IMG = 32
NUM_CLASSES = 10


@dataclass(frozen=True)
class ZooCase:
    id: str  # readable pytest id, e.g. "hf-llama"
    build: Callable[[], nn.Module]  # deterministic (seeds itself); model returned in train() mode
    inputs: Callable[[int], tuple]  # batch size -> positional example inputs
    kwargs: Callable[[int], dict]  # batch size -> keyword example inputs ({} when none)
    has_dropout: bool  # active dropout / stochastic depth in train mode
    main_output: Callable[[Any], torch.Tensor]  # main output tensor (e.g. logits) of forward's result

    def __repr__(self) -> str:  # keeps pytest ids / failure messages short
        return f"ZooCase({self.id!r})"


# ---------------------------------------------------------------------------
# inputs / outputs helpers
# ---------------------------------------------------------------------------


def _gen(batch: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1234 + 17 * batch + salt)


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=_gen(batch, 1))


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=_gen(batch, 2))


def _no_args(batch: int) -> tuple:
    return ()


def _no_kwargs(batch: int) -> dict:
    return {}


def _hf_kwargs(batch: int) -> dict:
    return {"input_ids": _tokens(batch)}


def _token_args(batch: int) -> tuple:
    return (_tokens(batch),)


def _image_args(batch: int) -> tuple:
    return (_images(batch),)


def main_output(out: Any) -> torch.Tensor:
    """Main tensor of a forward result: a tensor, ``.logits`` / ``.last_hidden_state``
    of a HF ModelOutput (or the same keys of a dict), else the first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # includes transformers ModelOutput (an OrderedDict)
        for key in ("logits", "last_hidden_state", "prediction_logits"):
            if key in out and out[key] is not None:
                return out[key]
        return main_output(next(v for v in out.values() if v is not None))
    for key in ("logits", "last_hidden_state"):
        val = getattr(out, key, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)):
        return main_output(out[0])
    raise TypeError(f"cannot find the main output tensor in {type(out).__name__}")


def _build(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = fn()
        return model.train()

    build.__name__ = f"build_{fn.__name__}"
    return build


# ---------------------------------------------------------------------------
# HuggingFace transformers
# ---------------------------------------------------------------------------

_HF_COMMON = dict(
    vocab_size=VOCAB, max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, attn_implementation="eager", **_HF_COMMON,
    )
    return LlamaForCausalLM(cfg)


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, resid_pdrop=0.1, embd_pdrop=0.1,
        attn_pdrop=0.1, use_cache=False, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg)  # lm_head tied to wte


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=64, type_vocab_size=2,
        pad_token_id=0, attn_implementation="eager",
    )
    return BertForMaskedLM(cfg)  # decoder tied to word_embeddings


def _hf_mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=None, tie_word_embeddings=False, attn_implementation="sdpa", **_HF_COMMON,
    )
    return MistralForCausalLM(cfg)


def _hf_mixtral() -> nn.Module:
    # transformers 5.x stores the experts as stacked 3-D parameters
    # (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]); the
    # "grouped_mm" experts implementation consumes them through a grouped matmul
    # (torch's grouped_mm, or transformers' custom grouped_mm_fallback op on CPU).
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, sliding_window=None,
        tie_word_embeddings=False, attn_implementation="eager", experts_implementation="grouped_mm", **_HF_COMMON,
    )
    return MixtralForCausalLM(cfg)


# ---------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------


def _tv_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=NUM_CLASSES)


def _tv_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=IMG, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, dropout=0.1,
        attention_dropout=0.1, num_classes=NUM_CLASSES,
    )
    # torchvision zero-initialises the classifier, which makes the output a
    # constant (= bias) at init; give it a random init so outputs depend on input
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    # layer_scale 0.5 (not the 1e-6 default) so the blocks visibly contribute at init
    return ConvNeXt(setting, stochastic_depth_prob=0.2, layer_scale=0.5, num_classes=NUM_CLASSES)


def _tv_mobilenet_v3() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(weights=None, width_mult=0.25, num_classes=NUM_CLASSES)


# ---------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------


def _timm_vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2.0, num_classes=NUM_CLASSES, drop_rate=0.1, drop_path_rate=0.1,
    )


def _timm_efficientnet() -> nn.Module:
    import timm

    # timm's own tiny test architecture: depthwise convs, squeeze-excite, BN+act
    return timm.create_model(
        "test_efficientnet", pretrained=False, num_classes=NUM_CLASSES, drop_rate=0.1, drop_path_rate=0.1,
    )


# ---------------------------------------------------------------------------
# plain torch models
# ---------------------------------------------------------------------------


class TransformerEncoderClassifier(nn.Module):
    """Embedding -> nn.TransformerEncoder (batch_first) -> Linear head."""

    def __init__(self, d_model: int = 32, nhead: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(1, SEQ, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=64, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.encoder(x))


class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer nn.LSTM (dropout between layers) -> Linear."""

    def __init__(self, d: int = 32, hidden: int = 48):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True, dropout=0.1)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


class RawParamTransformer(nn.Module):
    """No nn.Linear anywhere: raw nn.Parameters used through F.linear,
    torch.matmul / ``@`` and torch.einsum. Also holds parameters that must NOT
    count as weight-bearing (an embedding table, a 2-D elementwise scale)."""

    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64):
        super().__init__()
        self.heads = heads
        self.tok = nn.Parameter(torch.randn(VOCAB, d) * 0.02)  # F.embedding only
        self.pos_scale = nn.Parameter(torch.ones(SEQ, d))  # elementwise only (2-D, not weight-bearing)
        self.w_qkv = nn.Parameter(torch.randn(3 * d, d) * d**-0.5)  # F.linear
        self.b_qkv = nn.Parameter(torch.zeros(3 * d))
        self.w_o = nn.Parameter(torch.randn(d, d) * d**-0.5)  # torch.matmul (x @ W)
        self.w_up = nn.Parameter(torch.randn(d, ff) * d**-0.5)  # torch.einsum
        self.w_down = nn.Parameter(torch.randn(ff, d) * ff**-0.5)  # torch.matmul after transpose/view
        self.norm_w = nn.Parameter(torch.ones(d))
        self.w_out = nn.Parameter(torch.randn(VOCAB, d) * d**-0.5)  # einsum with explicit .t()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        x = F.embedding(tokens, self.tok) * self.pos_scale[:s]
        qkv = F.linear(x, self.w_qkv, self.b_qkv)
        q, k, v = qkv.view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        ctx = torch.matmul(att, v).transpose(1, 2).reshape(b, s, -1)
        x = x + torch.matmul(ctx, self.w_o)
        h = F.gelu(torch.einsum("bsd,df->bsf", F.layer_norm(x, x.shape[-1:], self.norm_w), self.w_up))
        x = x + torch.matmul(h, self.w_down.t().contiguous().t())
        return torch.einsum("bsd,dv->bsv", x, self.w_out.t())


class MHAClassifier(nn.Module):
    """nn.MultiheadAttention used directly: self-attention (query is key is
    value: packed in-projection) and attention to a shifted copy of the
    sequence (key is value, query differs: split in-projection)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, NUM_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        a, _ = self.self_attn(x, x, x, need_weights=False)
        x = self.norm(x + a)
        mem = torch.roll(x, shifts=1, dims=1)
        c, _ = self.cross_attn(x, mem, mem, need_weights=False)
        return self.head((x + c).mean(dim=1))


class ConvGRUTagger(nn.Module):
    """Embedding -> Conv1d -> GRU -> Linear (a sequence tagger)."""

    def __init__(self, d: int = 32, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.conv = nn.Conv1d(d, d, kernel_size=3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.gru = nn.GRU(d, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)
        x = F.relu(self.conv(x)).transpose(1, 2)
        out, _ = self.gru(self.drop(x))
        return self.head(out)


class TinyCNN(nn.Module):
    """Conv2d (+grouped conv) + BatchNorm + ConvTranspose2d + Linear: a plain CNN
    without dropout, using conv kinds the other cases lack."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4, bias=False)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.up(x))
        return self.head(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------


def _case(id, fn, inputs, kwargs, has_dropout) -> ZooCase:
    return ZooCase(
        id=id, build=_build(fn), inputs=inputs, kwargs=kwargs, has_dropout=has_dropout, main_output=main_output,
    )


ZOO: list[ZooCase] = [
    # HuggingFace transformers (driven by keyword input_ids)
    _case("hf-llama", _hf_llama, _no_args, _hf_kwargs, has_dropout=False),
    _case("hf-gpt2", _hf_gpt2, _no_args, _hf_kwargs, has_dropout=True),
    _case("hf-bert", _hf_bert, _no_args, _hf_kwargs, has_dropout=True),
    _case("hf-mistral", _hf_mistral, _no_args, _hf_kwargs, has_dropout=False),
    _case("hf-mixtral-moe", _hf_mixtral, _no_args, _hf_kwargs, has_dropout=False),
    # torchvision
    _case("tv-resnet18", _tv_resnet18, _image_args, _no_kwargs, has_dropout=False),
    _case("tv-vit", _tv_vit, _image_args, _no_kwargs, has_dropout=True),
    _case("tv-convnext", _tv_convnext, _image_args, _no_kwargs, has_dropout=True),
    _case("tv-mobilenet-v3", _tv_mobilenet_v3, _image_args, _no_kwargs, has_dropout=True),
    # timm
    _case("timm-vit", _timm_vit, _image_args, _no_kwargs, has_dropout=True),
    _case("timm-efficientnet", _timm_efficientnet, _image_args, _no_kwargs, has_dropout=True),
    # plain torch
    _case("torch-transformer-encoder", TransformerEncoderClassifier, _token_args, _no_kwargs, has_dropout=True),
    _case("torch-lstm-lm", LSTMLanguageModel, _token_args, _no_kwargs, has_dropout=True),
    _case("torch-raw-params", RawParamTransformer, _token_args, _no_kwargs, has_dropout=False),
    _case("torch-mha", MHAClassifier, _token_args, _no_kwargs, has_dropout=True),
    _case("torch-conv1d-gru", ConvGRUTagger, _token_args, _no_kwargs, has_dropout=True),
    _case("torch-cnn", TinyCNN, _image_args, _no_kwargs, has_dropout=False),
]

ZOO_BY_ID: dict[str, ZooCase] = {c.id: c for c in ZOO}
assert len(ZOO_BY_ID) == len(ZOO), "duplicate zoo ids"


# ---------------------------------------------------------------------------
# independent oracle: which parameters feed a matrix product
# ---------------------------------------------------------------------------

# ops through which a parameter is followed (views, copies, splits)
_PASS_THROUGH = frozenset(
    {
        "transpose", "t", "permute", "view", "_unsafe_view", "reshape", "unsqueeze",
        "squeeze", "expand", "expand_as", "contiguous", "slice", "select", "split",
        "split_with_sizes", "chunk", "unbind", "to", "_to_copy", "clone", "alias",
        "detach", "unflatten", "flatten", "view_as", "type_as", "lift_fresh_copy",
        "_unsafe_split", "unsafe_split", "unsafe_chunk", "narrow", "movedim", "swapaxes",
        "swapdims", "mT", "adjoint", "numpy_T", "_conj", "resolve_conj", "resolve_neg",
    }
)

# ops that are matrix products of a weight. For the first group the weight must
# be the ``weight`` operand (a parameter fed in as the *input* of a linear /
# conv, e.g. a learned query or memory, is an activation, not a weight).
_WEIGHT_ARG1 = frozenset(
    {
        "linear", "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
        "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_tbc",
        "cudnn_convolution", "cudnn_convolution_transpose", "mkldnn_convolution",
        "_convolution_mode", "_cudnn_rnn",
    }
)
# RNN ops: the weights are inside the ``params`` list (not the input / hx)
_RNN = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
# any operand position counts
_ANY_OPERAND = frozenset({"mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "einsum"})


def _op_name(target: Any) -> str:
    """Bare op name: ``aten.linear.default`` -> ``linear``; custom ops keep only
    their op name too (``transformers.grouped_mm_fallback`` -> ``grouped_mm_fallback``)."""
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return getattr(packet, "__name__", str(packet)).split("::")[-1]
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1]


def _contains(arg: Any, node: torch.fx.Node) -> bool:
    if arg is node:
        return True
    if isinstance(arg, (list, tuple)):
        return any(_contains(a, node) for a in arg)
    if isinstance(arg, dict):
        return any(_contains(a, node) for a in arg.values())
    return False


def _is_matmul(name: str) -> bool:
    return (
        name in _WEIGHT_ARG1
        or name in _RNN
        or name in _ANY_OPERAND
        or name.endswith("_cell")
        or "grouped_mm" in name
        or "_mm" in name
    )


def _uses_as_weight(user: torch.fx.Node, name: str, node: torch.fx.Node) -> bool:
    """Is ``node`` (a parameter or a view of it) a weight operand of the matrix
    product ``user`` (whose bare op name is ``name``)?"""
    args, kwargs = user.args, user.kwargs
    if name in _WEIGHT_ARG1:
        return (len(args) > 1 and _contains(args[1], node)) or _contains(kwargs.get("weight"), node)
    if name in _RNN:
        overload = getattr(user.target, "_overloadname", "input")
        idx = 3 if overload == "data" else 2  # lstm.data(data, batch_sizes, hx, params, ...)
        return (len(args) > idx and _contains(args[idx], node)) or _contains(kwargs.get("params"), node)
    if name.endswith("_cell") and not name.startswith("_thnn"):
        # lstm_cell / gru_cell / rnn_*_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
        return _contains(tuple(args[2:4]), node) or _contains(
            [kwargs.get("w_ih"), kwargs.get("w_hh")], node
        )
    if name.startswith("_thnn"):  # fused cells take gate activations, not weights
        return False
    return True  # mm / bmm / matmul / addmm / baddbmm / einsum / *grouped_mm* / *_mm*: any operand


def _feeds_matmul(start: torch.fx.Node) -> bool:
    seen: set[torch.fx.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in list(node.users):
            if user.op != "call_function":
                continue
            name = _op_name(user.target)
            if _is_matmul(name):
                if _uses_as_weight(user, name, node):
                    return True
            elif name == "getitem" or name in _PASS_THROUGH:
                stack.append(user)
    return False


def _feeds_embedding(start: torch.fx.Node) -> bool:
    """Is the parameter (also) looked up as an embedding table (a tied input/output embedding)?"""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op != "call_function":
                continue
            name = _op_name(user.target)
            if name.startswith("embedding"):
                return True
            if name == "getitem" or name in _PASS_THROUGH:
                stack.append(user)
    return False


def weight_bearing_params(model: nn.Module, args: tuple = (), kwargs: dict | None = None,
                          tied_embeddings: bool = True) -> dict[str, int]:
    """``{fqn: numel}`` of every parameter with >= 2 dims that reaches a matrix
    product (linear, conv*, mm, bmm, matmul, addmm, baddbmm, einsum, RNN ops,
    any ``*grouped_mm*`` / ``*_mm*`` op) through view-like ops only, found by
    exporting a deep copy of ``model`` in train mode. For linear / conv and RNN
    ops the parameter must be the *weight* operand (a parameter used as the input
    of a linear is an activation); for mm / bmm / matmul / einsum / grouped mm
    any operand counts. Parameters only consumed by embeddings or elementwise ops
    are excluded. Tied parameters count once, under their first name in
    ``model.named_parameters()`` (e.g. ``transformer.wte.weight`` for GPT-2's
    tied ``lm_head.weight``); ``tied_embeddings=False`` leaves out such weights
    that are also embedding tables (they train full-rank by design), so every key is a name in
    ``dict(model.named_parameters())``."""
    kwargs = dict(kwargs or {})
    m = copy.deepcopy(model).train()
    ep = torch.export.export(m, tuple(args), kwargs, strict=False)
    # canonical name of every parameter object: its first name in named_parameters()
    canonical: dict[int, str] = {}
    for name, p in m.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    placeholder_to_fqn = ep.graph_signature.inputs_to_parameters
    result: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in placeholder_to_fqn:
            continue
        fqn = placeholder_to_fqn[node.name]
        try:
            p = m.get_parameter(fqn)
        except AttributeError:
            p = ep.state_dict[fqn]
        if p.dim() < 2:
            continue
        if _feeds_matmul(node) and (tied_embeddings or not _feeds_embedding(node)):
            result[canonical.get(id(p), fqn)] = p.numel()
    return result
