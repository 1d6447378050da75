"""multiopt: what each optimizer of a multi-optimizer training setup costs in memory and time.

`multiopt.profile(model, optimizer)` instruments your own training loop (see
`multiopt/profile.py`); the command line (`python -m multiopt`) measures and sweeps configs.
"""

from .profile import Profile, profile

__all__ = ["Profile", "profile"]
