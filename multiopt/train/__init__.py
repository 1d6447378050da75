"""What a user trains with: rules, the optimizer registry, MultiOptimizer, Trainer, models.

Knows nothing of measuring: imports only the bottom layer (record, errors, units, env)."""
