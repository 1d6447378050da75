"""The measure stage: probes (where memory numbers come from), optimizer-state accounting,
timing, the protocol (one config in, one Record out) and profile (the same around a user's loop).

Named `instrument`, not `measure`: the package face exports the function `measure`, which a
subpackage of that name would shadow."""
