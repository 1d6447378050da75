"""Benchmark models and their synthetic batches.

Layers are named `layer1`, `layer2`, ... in every model, so one rule string
(`layer1=sgd; rest=adam`) means the same thing on each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

Batch = tuple[torch.Tensor, torch.Tensor]


class SimpleNet(nn.Module):
    """The classic two-layer net: Linear(10, 20), ReLU, Linear(20, 1)."""

    in_features = 10
    out_features = 1

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.layer2 = nn.Linear(20, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.relu(self.layer1(x)))


class MLP(nn.Module):
    """`depth` Linear(width, width) layers with ReLU between: depth * (width^2 + width) parameters."""

    def __init__(self, width: int, depth: int = 3, *, bias: bool = True) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise UsageError(f"MLP needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.in_features = self.out_features = width
        self.depth = depth
        for i in range(1, depth + 1):
            self.add_module(f"layer{i}", nn.Linear(width, width, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"layer{i}")(x)
            if i < self.depth:
                x = torch.relu(x)
        return x


@dataclass(frozen=True)
class ModelSpec:
    """How the suite builds a model, makes its batches and computes its loss.

    `loss_fn(output, target)` when batches are (inputs, targets); None when the model's
    output already is the loss."""

    name: str
    factory: Callable[..., nn.Module]
    batch_fn: Callable[..., Any]
    loss_fn: Callable[..., torch.Tensor] | None = None

    def build(self, width: int, depth: int) -> nn.Module:
        return self.factory(width=width, depth=depth)

    def make_batch(self, model: nn.Module, batch: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Any:
        return self.batch_fn(model, batch, dtype=dtype, device=device, generator=generator)


MODELS: dict[str, ModelSpec] = {}


def resolve(name: str) -> ModelSpec:
    """A built-in model by name."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def build(name: str, width: int = 64, depth: int = 3) -> nn.Module:
    return resolve(name).build(width, depth)


def make_batch(
    model: nn.Module,
    batch: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Batch:
    """A synthetic regression batch (inputs, targets) shaped for `model`."""
    x = torch.randn(batch, model.in_features, dtype=dtype, device=device, generator=generator)
    y = torch.randn(batch, model.out_features, dtype=dtype, device=device, generator=generator)
    return x, y


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error whose memory is the same on every backend.

    On CPU, `F.mse_loss(reduction="mean")` returns a 0-dim view of its batch-sized
    unreduced buffer, so the loss keeps that buffer alive until it dies; the meta kernels
    the fake probe runs allocate 4 bytes instead. Reducing explicitly gives a fresh 0-dim
    loss on every backend, so tracked and fake probes agree to the byte."""
    return F.mse_loss(output, target, reduction="none").mean()


MODELS["simple"] = ModelSpec("simple", lambda width=0, depth=0: SimpleNet(), make_batch, mse)
MODELS["mlp"] = ModelSpec("mlp", lambda width=64, depth=3: MLP(width, depth), make_batch, mse)
