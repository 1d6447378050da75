"""Models with frozen parameters, for `--model tests.usermodels_frozen:...` (issue 20:
frozen parameters need no rule, and the word frozen names the cause when a rule or a
model has nothing to train)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Tagger(nn.Module):
    """An embedding table (frozen by the factories below) and a trainable linear head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, width)
        self.head = nn.Linear(width, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


def embed_frozen(width: int = 8) -> nn.Module:
    """The embedding frozen, the head trainable (as LoRA or a frozen backbone leaves it)."""
    model = Tagger(width)
    model.embed.requires_grad_(False)
    return model


def all_frozen(width: int = 8) -> nn.Module:
    """Nothing to train."""
    return Tagger(width).requires_grad_(False)


def make_batch(model: nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 32, (batch_size, 5)), torch.randint(0, 4, (batch_size,))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)
