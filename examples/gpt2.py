"""A Hugging Face GPT-2 built from a small config (no download) as a MODEL.py for the CLI.

    dynlora-transform examples/gpt2.py --dry-run
    dynlora-transform examples/gpt2.py --train 100 --onnx runs/gpt2.onnx

Hugging Face models do not symbolic-trace, so the pass captures it with torch.export;
the model is fed keyword inputs (``input_ids``) and trained on the built-in byte corpus.
GPT-2 ties its output head to the token embedding: that weight stays full-rank.
"""

import functools
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from dynlora_fx import corpus as _corpus

BATCH_SIZE, SEQ_LEN = 8, 64


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4, use_cache=False)
    return GPT2LMHeadModel(config)


@functools.lru_cache(maxsize=1)
def _data() -> _corpus.Corpus:
    return _corpus.load_corpus()


def example_inputs() -> tuple:
    return ()


def example_kwargs() -> dict[str, Any]:
    return {"input_ids": _data().val[: 2 * SEQ_LEN].long().view(2, SEQ_LEN)}


def model_inputs(batch: tuple) -> dict[str, torch.Tensor]:
    """Keyword inputs for a training batch (a dict is passed as **kwargs)."""
    return {"input_ids": batch[0]}


def batches() -> Iterator[tuple]:
    return _corpus.batches(_data().train, batch_size=BATCH_SIZE, seq_len=SEQ_LEN, seed=0)


def val_batches() -> list:
    return _corpus.val_batches(_data().val, batch_size=BATCH_SIZE, seq_len=SEQ_LEN, max_batches=8)


def loss_fn(output: Any, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(output.logits.reshape(-1, output.logits.shape[-1]), batch[1].reshape(-1))
