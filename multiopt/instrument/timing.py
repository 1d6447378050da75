"""Step timing: every step synchronised, statistics computed once and right.

On CUDA each step is bracketed by CUDA events (device time, no host jitter from the launch
queue); elsewhere by `time.perf_counter`. Timing runs never carry instrumentation: the
caller times with tracking paused.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Per-sample step times in milliseconds and their summary statistics. Each sample is
    the mean step time over a block of `block` consecutive steps."""

    times_ms: tuple[float, ...]
    block: int = 1

    @property
    def n(self) -> int:
        return len(self.times_ms)

    @property
    def steps(self) -> int:
        """Steps timed in all."""
        return self.n * self.block

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
        per = f" (blocks of {self.block})" if self.block > 1 else ""
        return f"median {self.median:.3f} ms, IQR {self.iqr:.3f} ms, min {self.min:.3f} ms over {self.n} samples{per}"


def time_steps(
    fn: Callable[[], object],
    *,
    steps: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    min_block_ms: float = 0.0,
) -> Timing:
    """Run `fn` `warmup` times untimed, then take `steps` synchronised samples.

    With `min_block_ms`, a sample is the mean of a block of consecutive steps that lasts at
    least that long (the block size is set once, from one calibration step): a
    sub-millisecond step is at the mercy of the timer and the scheduler, and averaging a
    block, as torch.utils.benchmark's blocked_autorange does, keeps the median and IQR
    meaningful. Steps that already take that long are timed one by one.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    timer = _cuda_block if device.type == "cuda" else _cpu_block
    block = 1
    if min_block_ms > 0:
        once = timer(fn, 1, device)
        block = max(1, min(10_000, math.ceil(min_block_ms / max(once, 1e-6))))
    return Timing(tuple(timer(fn, block, device) / block for _ in range(steps)), block)


def _cpu_block(fn: Callable[[], object], k: int, device: torch.device) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) * 1e3


def _cuda_block(fn: Callable[[], object], k: int, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(k):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
