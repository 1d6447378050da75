"""A loss written for transformers' Trainer (`compute_loss_func(outputs, labels,
num_items_in_batch=None)`), used unchanged as the module's loss_fn: it reads `outputs.logits`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.realmodels import llama, make_batch  # noqa: F401 - the suite finds them here

__all__ = ["llama", "loss_fn", "make_batch"]


def loss_fn(outputs, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
    """Next-token cross entropy, as HF's ForCausalLMLoss computes it (shift, float32, mean)."""
    logits = outputs.logits[..., :-1, :].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1))
