"""A test-only model whose output is its loss and whose batches come from `example_batch`
(the module defines neither make_batch nor loss_fn)."""

from __future__ import annotations

import torch
from torch import nn


class AutoEncoder(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = 2 * width
        self.layer1 = nn.Linear(self.features, width)
        self.layer2 = nn.Linear(width, self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.layer2(torch.tanh(self.layer1(x))) - x) ** 2).mean()

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch_size, self.features, generator=generator)


def factory(width: int = 32) -> nn.Module:
    return AutoEncoder(width)


class NoBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x).sum()
