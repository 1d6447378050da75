"""A tiny Hugging Face Llama for `--model tests.hfllama:llama`, built from its config (no
download): 2 decoder layers, width 32, grouped-query attention (4 heads, 2 key/value heads),
a SwiGLU mlp of 64 and an untied head over a vocabulary of 131 rows, which no number of ranks
divides evenly (FSDP2 pads the shards). Batches are dicts; the output's `.loss` is the loss."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 131
SEQ = 16


def config(width: int = 32, depth: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def llama(width: int = 32, depth: int = 2) -> LlamaForCausalLM:
    return LlamaForCausalLM(config(width, depth))


def make_batch(model: torch.nn.Module, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids}
