"""User models that fail in the ways a user's code does, for tests/test_malformed.py: a
factory that raises, a forward that raises, a forward that returns no tensor; and a forward that
returns a tuple, which the Trainer hands the loss_fn unchanged (as transformers' Trainer does)."""

from __future__ import annotations

import torch
from torch import nn


class _Net(nn.Module):
    def __init__(self, width: int, mode: str) -> None:
        super().__init__()
        self.layer1 = nn.Linear(width, width)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "raise":
            raise ValueError("forward failed on purpose")
        out = self.layer1(x)
        if self.mode == "text":
            return "not a tensor"  # type: ignore[return-value]
        return (out, out) if self.mode == "tuple" else out  # type: ignore[return-value]


def make_batch(model: nn.Module, batch: int, device: str = "cpu", generator: torch.Generator | None = None):
    width = model.layer1.in_features
    return torch.randn(batch, width, device=device, generator=generator)


def loss_fn(out: torch.Tensor | tuple) -> torch.Tensor:
    # the model's output unchanged: forward_tuple's is a tuple (logits first, as in Hugging Face)
    if isinstance(out, tuple):
        out = out[0]
    return out.float().pow(2).mean()


def factory_raises(width: int = 8, depth: int = 1) -> nn.Module:
    if torch.empty(0).device.type != "meta":  # passes the meta-device check, fails for real
        raise RuntimeError("the factory failed on purpose")
    return _Net(width, "ok")


def forward_raises(width: int = 8, depth: int = 1) -> nn.Module:
    return _Net(width, "raise")


def forward_tuple(width: int = 8, depth: int = 1) -> nn.Module:
    return _Net(width, "tuple")


def forward_text(width: int = 8, depth: int = 1) -> nn.Module:
    return _Net(width, "text")
