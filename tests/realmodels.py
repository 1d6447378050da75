"""Factories over the committed tiny configs (tests/fixtures/hf), for what `--model hf:PATH`
does not do itself: HF's *reentrant* checkpointing, which the fake probe must size as the
tracked probe measures it. The module has no loss_fn: the loss is the output's `.loss`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

LLAMA = Path(__file__).parent / "fixtures" / "hf" / "llama"
SEQ = 64


def llama() -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(LLAMA), dtype=torch.get_default_dtype())


def llama_reentrant() -> torch.nn.Module:
    """HF's legacy mode, as a user writes it: use_reentrant=True."""
    model = llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.config.use_cache = False
    return model


def make_batch(model: torch.nn.Module, batch_size: int, generator: torch.Generator | None = None) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch_size, SEQ), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
