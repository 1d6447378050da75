"""Fails on import, on purpose (tests/test_models.py checks the one-line error)."""

raise RuntimeError("this module is broken on purpose\nsecond line that must not be shown")
