"""Models that exist only in the tests, for `--model tests.usermodels:factory`.

The module defines `make_batch` and `loss_fn`, so the suite uses them for every factory here.
Layers are named `layer1`, `layer2` and `head` so the built-in combos (`sgd+adam`:
`layer1=sgd; rest=adam`) route them too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IN_FEATURES = 12
CLASSES = 5


class TinyClassifier(nn.Module):
    """A 1-D conv front end and a classifier: conv (3-D weight), linear matrices, biases, norm."""

    def __init__(self, width: int = 16, depth: int = 2, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer1 = nn.Conv1d(1, width, kernel_size=3, padding=1)
        self.layer2 = nn.Sequential(*[nn.Linear(width * IN_FEATURES if i == 0 else width, width) for i in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.layer1(x.unsqueeze(1))).flatten(1)
        for lin in self.layer2:
            h = torch.relu(lin(h))
        return self.head(self.norm(h))


def factory(width: int = 16, depth: int = 2, colour: str = "blue") -> nn.Module:
    """Takes width and depth (and a keyword the suite never passes)."""
    return TinyClassifier(width, depth)


def make_batch(model: nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 inputs on purpose: the suite casts floating tensors to the config's dtype."""
    x = torch.randn(batch_size, IN_FEATURES, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (batch_size,))
    return x, y


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def width_only(width: int = 16) -> nn.Module:
    """A factory that takes no depth: the suite must not pass it."""
    return TinyClassifier(width, 1)


def not_a_module(width: int = 16, depth: int = 2) -> dict:
    return {"width": width}


def needs_classes(classes: int, width: int = 16) -> nn.Module:
    return TinyClassifier(width)


NOT_CALLABLE = 3
