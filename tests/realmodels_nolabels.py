"""A batch without `labels`: the Hugging Face model then returns no `.loss` (the user's input
at fault: measure answers one line, exit 2)."""

from __future__ import annotations

import torch

from tests.realmodels import llama  # noqa: F401 - the suite finds it here

__all__ = ["llama", "make_batch"]


def make_batch(model: torch.nn.Module, batch_size: int, generator: torch.Generator | None = None) -> dict:
    return {"input_ids": torch.randint(0, model.config.vocab_size, (batch_size, 8), generator=generator)}
