"""A test-only optimizer whose step is really slower: the time gate's acceptance
(`tests/test_timing_e2e.py`) makes one config 1.5x slower with it, instead of editing
numbers in a record."""

from __future__ import annotations

import time

import torch


class SlowAdam(torch.optim.Adam):
    """Adam that, after its update, sleeps `slowdown` times as long as the iteration took since
    its previous step returned (forward, backward, this update, zero_grad), so each training
    step takes about (1 + slowdown) times its time: a step that really waits, as a change
    that added work would make it. The first step, with nothing to measure from, does not wait."""

    def __init__(self, params, slowdown: float = 0.0, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.slowdown = float(slowdown)
        self._last: float | None = None

    def step(self, closure=None):  # type: ignore[override]
        loss = super().step(closure)
        now = time.perf_counter()
        if self.slowdown and self._last is not None:
            time.sleep(self.slowdown * (now - self._last))
        self._last = time.perf_counter()
        return loss
