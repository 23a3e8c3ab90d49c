"""A tiny LLaMA-style byte-level decoder in plain PyTorch, trained on the built-in corpus.

Token embedding (256 bytes) -> N x [RMSNorm -> causal self-attention with rotary position
embeddings -> residual; RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> untied lm_head.
Every projection is an ``nn.Linear`` without bias, so the SwitchLoRA pass finds q/k/v/o,
gate/up/down and lm_head. The model captures with ``torch.export`` (dynamic batch and
sequence length) and with ``torch.fx.symbolic_trace``.

This file is also a ``MODEL.py`` for the CLI: it defines ``build_model``, ``example_inputs``,
``batches``, ``loss_fn`` and ``val_batches``. Run it with::

    dynlora-transform examples/tiny_llama.py --train 300

Data is the stdlib byte corpus from :mod:`dynlora_fx.corpus`, loaded (and built and cached
on first use, a few seconds) when a data function is first called, never at import.
"""

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dynlora_fx import corpus as _corpus

__all__ = ["LlamaConfig", "TinyLlama", "build_model", "example_inputs", "batches", "loss_fn",
           "val_batches"]

BATCH_SIZE = 8  # training / validation batch size used by the MODEL.py functions
SEQ_LEN = 128  # training / validation sequence length used by the MODEL.py functions
VAL_BATCHES = 16  # number of validation batches


@dataclass
class LlamaConfig:
    vocab: int = 256  # vocabulary size; 256 = raw bytes
    dim: int = 128  # model (residual stream) width
    n_layers: int = 2  # number of transformer blocks
    n_heads: int = 4  # attention heads; head_dim = dim // n_heads must be even (rotary)
    ffn_hidden: int | None = None  # SwiGLU hidden width; None -> 8/3 * dim rounded up to multiple_of
    multiple_of: int = 32  # rounding for the computed ffn_hidden, as in LLaMA
    max_seq_len: int = 256  # longest sequence; rotary tables are precomputed to this length
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self) -> None:
        assert self.dim % self.n_heads == 0, \
            f"dim={self.dim} must be divisible by n_heads={self.n_heads}"
        assert (self.dim // self.n_heads) % 2 == 0, \
            f"head_dim = dim // n_heads = {self.dim // self.n_heads} must be even for rotary embeddings"
        if self.ffn_hidden is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos, sin: (T, hd)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, H, T, hd)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        cos, sin = self._rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, head_dim)
        self.reset_parameters()

    @staticmethod
    def _rotary_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hd), matching _rotate_half's halves
        return angles.cos(), angles.sin()

    def reset_parameters(self) -> None:
        """nanoGPT/LLaMA init: N(0, 0.02), residual output projections N(0, 0.02/sqrt(2*n_layers))."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: (B, T) int64 byte ids -> logits (B, T, vocab)
        T = idx.shape[1]
        # torch._assert (not _check) so fx.symbolic_trace records it instead of failing
        torch._assert(T <= self.config.max_seq_len,
                      f"sequence length exceeds max_seq_len={self.config.max_seq_len}; "
                      "build the model with a larger LlamaConfig.max_seq_len")
        # narrow, not [:T]: fx.symbolic_trace cannot slice a real tensor with a traced length
        cos, sin = self.rope_cos.narrow(0, 0, T), self.rope_sin.narrow(0, 0, T)  # (T, hd)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


def build_model(config: LlamaConfig | None = None) -> nn.Module:
    """A freshly initialised TinyLlama (default config unless given), seeded with 0."""
    torch.manual_seed(0)
    return TinyLlama(config if config is not None else LlamaConfig())


@functools.lru_cache(maxsize=1)
def _load() -> _corpus.Corpus:
    return _corpus.load_corpus()


def example_inputs() -> tuple:
    """One (2, 64) int64 batch of bytes from the validation split."""
    return (_load().val[:128].long().view(2, 64),)


def batches() -> Iterator[tuple]:
    """Endless (x, y) training batches, int64 (8, 128), the same sequence on every run."""
    return _corpus.batches(_load().train, batch_size=BATCH_SIZE, seq_len=SEQ_LEN, seed=0)


def loss_fn(output: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Mean next-byte cross-entropy of logits (B, T, vocab) against batch[1] (B, T)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), batch[1].reshape(-1))


def val_batches() -> list:
    """16 fixed validation batches of (x, y), int64 (8, 128)."""
    return _corpus.val_batches(_load().val, batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                               max_batches=VAL_BATCHES)
