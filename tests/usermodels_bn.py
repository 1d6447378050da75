"""A test-only model with buffers (BatchNorm running stats) whose factory takes a width but
no depth, for `--model tests.usermodels_bn:factory`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def factory(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))


def make_batch(model: nn.Module, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = model[0].in_features
    return torch.randn(batch_size, width, generator=generator), torch.randn(batch_size, 1, generator=generator)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target, reduction="none").mean()
