"""Registry of optimizers by lowercase name, and building one from a name and keywords.

Every torch.optim optimizer that steps on dense gradients without a closure is here by
name; any other class can be named by import path (`package.module:ClassName`), so
third-party optimizers (Lion, 8-bit Adam) work the same way.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..errors import UsageError

# name -> torch.optim attribute. Muon and Adafactor exist only in newer torch releases.
_TORCH_NAMES: dict[str, str] = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "adamax": "Adamax",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adagrad": "Adagrad",
    "adadelta": "Adadelta",
    "rmsprop": "RMSprop",
    "rprop": "Rprop",
    "asgd": "ASGD",
    "adafactor": "Adafactor",
    "muon": "Muon",
}

REFUSED: dict[str, str] = {
    "lbfgs": "lbfgs needs a closure that re-evaluates the loss several times per step, "
    "so it cannot share one step with other optimizers; train it on its own",
    "sparseadam": "sparseadam only accepts sparse gradients (nn.Embedding(sparse=True)), "
    "which this suite's dense benchmarks never produce; use adam or adamw",
}

_REFUSED_ATTRS = {"lbfgs": "LBFGS", "sparseadam": "SparseAdam"}

# Muon only takes 2-D parameters; the hint tells a user where the rest should go.
_MATRIX_ONLY = {"muon"}

# Optimizers whose step reads tensor values on the host (`.item()` on step/eta/mu): they
# cannot run under FakeTensorMode, where tensors have sizes but no values.
HOST_READS = {
    "asgd": "ASGD reads eta and mu with .item() every step",
    "adafactor": "Adafactor reads its step count with .item() every step",
}


@dataclass(frozen=True)
class OptimizerSpec:
    """A resolved optimizer: its registry (or import-path) name and class."""

    name: str
    cls: type

    @property
    def matrix_only(self) -> bool:
        return self.name in _MATRIX_ONLY

    def accepted_keywords(self) -> set[str] | None:
        """Keyword names the constructor takes, or None when it takes **kwargs."""
        sig = inspect.signature(self.cls.__init__)
        names = set()
        for p in list(sig.parameters.values())[1:]:
            if p.kind is p.VAR_KEYWORD:
                return None
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
        names.discard("params")
        return names

    def check_keywords(self, kwargs: dict[str, Any], where: str = "") -> None:
        accepted = self.accepted_keywords()
        if accepted is None:
            return
        bad = sorted(set(kwargs) - accepted)
        if bad:
            at = f" in {where}" if where else ""
            raise UsageError(
                f"{self.name} does not take keyword {', '.join(map(repr, bad))}{at}; "
                f"it takes: {', '.join(sorted(accepted))}"
            )

    def build(self, params: Iterable[Any], kwargs: dict[str, Any], where: str = "") -> torch.optim.Optimizer:
        self.check_keywords(kwargs, where)
        return self.cls(params, **kwargs)


def available() -> list[str]:
    """Registered names this torch provides."""
    return [n for n, attr in _TORCH_NAMES.items() if hasattr(torch.optim, attr)]


def resolve(name: str) -> OptimizerSpec:
    """Name (`adam`) or import path (`pkg.mod:Class`) -> OptimizerSpec; UsageError otherwise."""
    if ":" in name:
        return _from_import_path(name)
    key = name.strip().lower()
    if key in REFUSED:
        raise UsageError(f"optimizer {name!r} is refused: {REFUSED[key]}")
    if key not in _TORCH_NAMES:
        raise UsageError(
            f"unknown optimizer {name!r}; known: {', '.join(available())}, "
            "or an import path such as 'mypkg.optim:Lion'"
        )
    attr = _TORCH_NAMES[key]
    cls = getattr(torch.optim, attr, None)
    if cls is None:
        raise UsageError(f"optimizer {name!r} needs a newer torch than {torch.__version__} (torch.optim.{attr})")
    return OptimizerSpec(key, cls)


def name_of(optimizer: torch.optim.Optimizer) -> str:
    """Registry name of an optimizer instance's class, else its import path."""
    cls = type(optimizer)
    for key, attr in _TORCH_NAMES.items():
        if getattr(torch.optim, attr, None) is cls:
            return key
    return f"{cls.__module__}:{cls.__qualname__}"


def _from_import_path(path: str) -> OptimizerSpec:
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise UsageError(f"optimizer path {path!r} must look like 'package.module:ClassName'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import module {module_name!r} for optimizer {path!r}: {e}") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"module {module_name!r} has no {qualname!r} (optimizer {path!r})")
    if not (inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)):
        raise UsageError(f"{path!r} is not a torch.optim.Optimizer subclass")
    for key in REFUSED:  # the same class by its import path is refused for the same reason
        if obj is getattr(torch.optim, _REFUSED_ATTRS[key], None):
            raise UsageError(f"optimizer {path!r} is refused: {REFUSED[key]}")
    return OptimizerSpec(path, obj)
