"""multiopt: what each optimizer of a multi-optimizer training setup costs in memory and time.

The face of the package (see docs/DESIGN.md for the stages behind it):

- `MultiOptimizer`, `Trainer`: what a user trains with (`multiopt.train`);
- `profile(model, optimizer)`: the instruments around your own training loop;
- `measure(Config(...), Protocol(...))`: one config through the measurement protocol, one Record.

The command line (`multiopt`, `python -m multiopt`) measures, sweeps, reports and gates.

Each name is imported on first use (PEP 562), so `import multiopt` and the command line's
`--help`, `report` and `gate` pay no torch import; `from multiopt import Trainer` works as usual.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# name -> the module (below this package) that defines it
_FACE = {
    "Config": ".record",
    "Record": ".record",
    "MultiOptimizer": ".train.multi",
    "Trainer": ".train.trainer",
    "Profile": ".instrument.profile",
    "profile": ".instrument.profile",
    "Protocol": ".instrument.protocol",
    "measure": ".instrument.protocol",
}

__all__ = ["Config", "MultiOptimizer", "Profile", "Protocol", "Record", "Trainer", "measure", "profile"]  # = _FACE


def __getattr__(name: str) -> Any:
    try:
        where = _FACE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(where, __name__), name)
    globals()[name] = value  # once: later lookups never come back here
    return value


def __dir__() -> list[str]:
    return sorted({*_FACE, *(k for k in globals() if k.startswith("__"))})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .instrument.profile import Profile, profile
    from .instrument.protocol import Protocol, measure
    from .record import Config, Record
    from .train.multi import MultiOptimizer
    from .train.trainer import Trainer
