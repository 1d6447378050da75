"""A tiny Hugging Face GPT-2 for `--model tests.hfmodels:gpt2`, built from its config (no
download). The module defines `make_batch` (a dict: the model is called as
`model(**batch)`) and no `loss_fn`: the suite takes the output's `.loss`, which GPT-2
computes because the batch holds `labels`."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 128
POSITIONS = 32
SEQ = 16


def config(width: int = 32, depth: int = 2) -> GPT2Config:
    # bos/eos default to GPT-2's 50256, outside this vocabulary: transformers warns about them
    return GPT2Config(n_layer=depth, n_embd=width, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS,
                      bos_token_id=None, eos_token_id=None)


def gpt2() -> GPT2LMHeadModel:
    """Takes neither width nor depth: records keep 0 for both."""
    return GPT2LMHeadModel(config())


def gpt2_sized(width: int = 32, depth: int = 2) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(config(width, depth))


def make_batch(model: torch.nn.Module, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids}  # GPT-2 shifts the labels itself
