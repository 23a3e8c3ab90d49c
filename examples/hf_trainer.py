"""Pre-train a Hugging Face LLaMA with SwitchLoRA through ``transformers.Trainer``; resume; merge; save.

    python examples/hf_trainer.py --steps 60 --out runs/hf_trainer

1. Build ``LlamaForCausalLM`` from a config (nothing is downloaded) and ``dl.transform`` it.
2. Train it with ``transformers.Trainer``, ``dl.AdamW`` (switcher attached) and a cosine
   schedule, saving a checkpoint every ``--save-every`` steps. Trainer saves ``gm.state_dict()``
   (safetensors) and the optimizer's state: that is all the switcher needs to resume.
3. Resume a fresh model, optimizer and Trainer from the middle checkpoint with
   ``trainer.train(resume_from_checkpoint=...)`` and check that it ends bit-identical to the
   uninterrupted run.
4. ``dl.merge_and_unload`` gives back a plain ``LlamaForCausalLM``: ``save_pretrained``,
   ``from_pretrained``, ``generate``.

The data is the built-in byte-level corpus (the Python standard library's own source).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import dynlora_fx as dl
from dynlora_fx.training import cosine_multiplier

SEQ_LEN = 64


def build_model(hidden: int = 64, layers: int = 2, vocab: int = 256) -> LlamaForCausalLM:
    """A freshly initialised byte-level LLaMA (seeded with 0)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ_LEN, use_cache=False, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class TokenChunks(torch.utils.data.Dataset):
    """Consecutive ``seq_len`` chunks of a 1-D token tensor as Trainer features. ``attention_mask``
    is there on purpose: Trainer drops it because the transformed forward does not take it."""

    def __init__(self, tokens: torch.Tensor, seq_len: int = SEQ_LEN):
        self.chunks = tokens[: len(tokens) // seq_len * seq_len].long().view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.chunks[i]
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def transform(model: LlamaForCausalLM, rank: int = 16, interval: float = 40.0,
              freeze_steps: int = 5) -> dl.DynLoRAModule:
    """SwitchLoRA adapters, captured with the inputs Trainer will pass (input_ids and labels)."""
    ids = torch.zeros(2, SEQ_LEN, dtype=torch.long)
    return dl.transform(model, (), dl.SwitchLoRA(rank=rank, interval=interval, freeze_steps=freeze_steps),
                        example_kwargs={"input_ids": ids, "labels": ids})


def make_trainer(gm: dl.DynLoRAModule, dataset: torch.utils.data.Dataset, out_dir: str | os.PathLike, steps: int,
                 save_every: int, lr: float = 3e-3, batch_size: int = 8) -> tuple[Trainer, dl.Switcher]:
    """Trainer over the transformed module with dl.AdamW (switcher attached) and a cosine schedule."""
    optimizer = dl.AdamW(gm.parameters(), lr=lr, betas=(0.9, 0.95))
    switcher = dl.attach(gm, optimizer, total_steps=steps)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: cosine_multiplier(t, steps, warmup, 0.1))
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             save_strategy="steps", save_steps=save_every, logging_steps=max(1, save_every // 2),
                             report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=gm, args=args, train_dataset=dataset, optimizers=(optimizer, scheduler)), switcher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="runs/hf_trainer")
    args = p.parse_args()
    from dynlora_fx.corpus import load_corpus

    data = TokenChunks(load_corpus().train[: 64 * SEQ_LEN * args.steps])
    template = transform(build_model(), rank=args.rank)

    straight = copy.deepcopy(template)  # one transform, two identical runs
    trainer, switcher = make_trainer(straight, data, Path(args.out) / "straight", args.steps, args.save_every)
    result = trainer.train()
    print(f"trained {args.steps} steps: loss {result.training_loss:.4f}, "
          f"switched (A rows, B columns) {switcher.num_switched()}")

    middle = Path(args.out) / "straight" / f"checkpoint-{args.save_every}"
    resumed = copy.deepcopy(template)  # a fresh model, optimizer and Trainer: the checkpoint holds the rest
    trainer, _ = make_trainer(resumed, data, Path(args.out) / "resumed", args.steps, args.save_every)
    trainer.train(resume_from_checkpoint=str(middle))
    same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    print(f"resumed from {middle}: {'bit-identical' if same else 'DIFFERENT'} to the uninterrupted run")

    plain = dl.merge_and_unload(straight)  # a LlamaForCausalLM with the adapters folded in
    plain.save_pretrained(Path(args.out) / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(Path(args.out) / "merged").eval()
    prompt = data[0]["input_ids"][:16].unsqueeze(0)
    with torch.no_grad():
        gap = (reloaded(prompt).logits - straight.eval()(input_ids=prompt, labels=prompt).logits).abs().max()
    text = bytes(reloaded.generate(prompt, max_new_tokens=32, do_sample=False)[0, 16:].tolist())
    print(f"merged -> {type(plain).__name__}, saved and reloaded from {Path(args.out) / 'merged'} "
          f"(max |logit gap| vs the transformed model {gap:.2e}); greedy continuation: {text!r}")


if __name__ == "__main__":
    main()
