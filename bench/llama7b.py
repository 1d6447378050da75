"""A Llama-2-7B shape (32 layers, width 4096, mlp 11008, 32 heads, vocab 32000), built from its
config by transformers (nothing downloaded), for `bench/fsdp_7b.py` and
`--model bench.llama7b:llama` (sequence 512 by default, `SEQ` here)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEQ = 512


def llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                                        pad_token_id=None))


def make_batch(model: torch.nn.Module, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 32000, (batch_size, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids}
