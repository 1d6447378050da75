"""Step timing: every step synchronised, statistics computed once and right, and the
host's own noise measured while the steps ran.

On CUDA each step is bracketed by CUDA events (device time, no host jitter from the launch
queue); elsewhere by `time.perf_counter`. Timing runs never carry instrumentation: the
caller times with tracking paused.

Host noise: a step time alone cannot say whether a slower median is the code or the host
(another job on the same cores, a descheduled thread). `Calibration` is a fixed amount of
work (the same kernel, the same sizes, the same repeats on every run of every version), timed
before, between and after the step samples with the same threads and timer. Its work never
changes, so its spread during a config is the host's noise there, and its median against
another run's median is how much faster or slower the host itself was; the gate
(`analyze/gate/noise.py`, `TimeCheck`) turns both into `inconclusive` instead of a false regression.

Contention: a kernel's shift cannot see everything. A step that runs on the intra-op thread
pool waits at every op for its slowest thread, so one competing process on one core slowed
quick-preset steps 2-3x while the (single-threaded) calibration kernel moved 16-29%, and the
slowdown of a multi-threaded kernel under the same load swung between 1.0x and 4.9x from one
run to the next. What does not swing is the scheduler's own account: Linux counts, per thread,
the time it was runnable but waiting for a CPU (`/proc/self/task/*/schedstat`). `host_wait` is
that time, summed over the process's threads, as a fraction of the timed window: 0.00 on a
quiet host, 0.65-1.03 with one or two busy loops beside a 2-thread step.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Timing:
    """Per-sample step times in milliseconds and their summary statistics. Each sample is
    the mean step time over a block of `block` consecutive steps."""

    times_ms: tuple[float, ...]
    block: int = 1
    # the calibration kernel's samples taken around and between these samples (`Calibration`)
    host_ms: tuple[float, ...] = ()
    # the process's threads' time waiting for a CPU over the timed window, as a fraction of
    # it (`runqueue_ms`); None where the system does not say
    host_wait: float | None = None

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
        return iqr(self.times_ms)

    @property
    def host_noise(self) -> float | None:
        """The calibration kernel's relative spread (`relative_iqr`) while these steps ran; None
        when it was not timed."""
        return relative_iqr(self.host_ms)

    def __str__(self) -> str:
        per = f" (blocks of {self.block})" if self.block > 1 else ""
        host = f"; host noise {self.host_noise:.1%}" if self.host_ms else ""
        host += f"; waited for a CPU {self.host_wait:.1%} of the window" if self.host_wait else ""
        return (f"median {self.median:.3f} ms, IQR {self.iqr:.3f} ms, min {self.min:.3f} ms over {self.n} "
                f"samples{per}{host}")


def runqueue_ms() -> float | None:
    """Milliseconds this process's threads have spent runnable but waiting for a CPU, summed
    over the live threads (Linux schedstat's second field, in ns). None where unreadable
    (not Linux, schedstats off). Threads that ended meanwhile drop out: compare two reads
    around a window in which the thread pool lives throughout."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended between the listing and the read
    return total / 1e6


def iqr(xs: Sequence[float]) -> float:
    """Interquartile range (numpy's default linear interpolation); 0 for fewer than 2 values."""
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q3 - q1


def relative_iqr(xs: Sequence[float]) -> float | None:
    """IQR / median: the spread of samples of one fixed amount of work, as a fraction of it.
    Robust to a lone outlier (a thread descheduled once) and to none of a drift: samples taken
    half before and half after a slowdown put their quartiles on both sides of it."""
    if len(xs) < 2:
        return None
    med = statistics.median(xs)
    return iqr(xs) / med if med > 0 else None


class Calibration:
    """A fixed amount of work whose timing measures the host, not the code: `REPEATS` products
    of one 192x192 float32 matrix with itself, each followed by an in-place add, on the
    config's device with the thread count the steps run with (so a competing job that slows
    a step's threads slows it too). About 0.3 ms on one core of a 2020s x86 CPU; tens of
    microseconds on a GPU, where it measures launch latency as much as the device.

    `KERNEL` names the work; change it (and the name) only together, so records of another
    kernel are never compared to these (the gate compares medians only between equal names).
    """

    KERNEL = "mm192x192+add_x4/1"
    SIZE = 192
    REPEATS = 4

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        # values in [0, 1/SIZE): products stay bounded however often the add repeats
        self._a = (torch.rand(self.SIZE, self.SIZE, generator=gen) / self.SIZE).to(self.device)
        self._timer = _cuda_block if self.device.type == "cuda" else _cpu_block
        self._run()  # first call: thread pool, kernel selection, caches

    def _run(self) -> None:
        y = self._a @ self._a
        y.add_(1.0)

    def sample(self) -> float:
        """One timed sample of the fixed work, in ms."""
        return self._timer(self._run, self.REPEATS, self.device)

    def samples(self, n: int) -> list[float]:
        return [self.sample() for _ in range(n)]


def time_steps(
    fn: Callable[[], object],
    *,
    steps: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    min_block_ms: float = 0.0,
    host: Calibration | None = None,
) -> Timing:
    """Run `fn` `warmup` times untimed, then take `steps` synchronised samples.

    With `host`, the calibration kernel is timed `HOST_EDGE` times before the first sample
    and after the last, and once after every `HOST_EVERY` samples between (a burst of noise
    inside the timed window shows too): about 16 samples of ~0.3 ms for 30 step samples.

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
    if host is None:
        return Timing(tuple(timer(fn, block, device) / block for _ in range(steps)), block)
    host_ms = host.samples(HOST_EDGE)
    times = []
    waited, start = runqueue_ms(), time.perf_counter()
    for i in range(steps):
        if i and i % HOST_EVERY == 0:
            host_ms.append(host.sample())
        times.append(timer(fn, block, device) / block)
    window, after = (time.perf_counter() - start) * 1e3, runqueue_ms()
    host_ms += host.samples(HOST_EDGE)
    wait = None if waited is None or after is None or window <= 0 else max(after - waited, 0.0) / window
    return Timing(tuple(times), block, tuple(host_ms), wait)


# Calibration samples at each edge of the timed window, and one after every HOST_EVERY step
# samples inside it.
HOST_EDGE = 3
HOST_EVERY = 3


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
