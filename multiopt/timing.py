"""Step timing: every step synchronised, statistics computed once and right.

On CUDA each step is bracketed by CUDA events (device time, no host jitter from the launch
queue); elsewhere by `time.perf_counter`. Timing runs never carry instrumentation: the
caller times with tracking paused.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Per-step times in milliseconds, and their summary statistics."""

    times_ms: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def iqr(self) -> float:
        """Interquartile range (numpy's default linear interpolation); 0 for one sample."""
        if self.n < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q3 - q1

    def __str__(self) -> str:
        return f"median {self.median:.3f} ms, IQR {self.iqr:.3f} ms, min {self.min:.3f} ms over {self.n} steps"


def time_steps(
    fn: Callable[[], object],
    *,
    steps: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> Timing:
    """Run `fn` `warmup` times untimed, then `steps` times, each synchronised and timed."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return Timing(tuple(_cuda_times(fn, steps, device)))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(tuple(times))


def _cuda_times(fn: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    torch.cuda.synchronize(device)
    out = []
    for _ in range(steps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out
