"""multiopt: what each optimizer of a multi-optimizer training setup costs in memory and time.

The face of the package (see DESIGN.md for the stages behind it):

- `MultiOptimizer`, `Trainer`: what a user trains with (`multiopt.train`);
- `profile(model, optimizer)`: the instruments around your own training loop;
- `measure(Config(...), Protocol(...))`: one config through the measurement protocol, one Record.

The command line (`multiopt`, `python -m multiopt`) measures, sweeps, reports and gates.
"""

from .instrument.profile import Profile, profile
from .instrument.protocol import Protocol, measure
from .record import Config, Record
from .train.multi import MultiOptimizer
from .train.trainer import Trainer

__all__ = ["Config", "MultiOptimizer", "Profile", "Protocol", "Record", "Trainer", "measure", "profile"]
