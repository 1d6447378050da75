"""The host's own noise, read from a pair of records: what lets the gate's `TimeCheck` tell a
slower host from a slower step. Pure: records in, fractions and text out.

A step time is the code and the host together; on a shared CI runner the host alone moves a
median by tens of percent (another job on the cores, a descheduled thread). Records carry
what tells them apart (`instrument/timing.py`): the timed samples, and a fixed calibration
kernel timed around and between them. Its work never changes, so

* its spread while a config ran (`host_noise`, IQR / median) is that run's noise there, and
* its median now against its median in the baseline, at the same config, is how much faster
  or slower the host itself was (the shift).

The host's noise for a config is the largest of the two spreads and the shift (`host_noise`);
None when either record lacks its calibration or they timed different kernels.

The kernel cannot see contention for the step's threads (timing.py: one busy loop slowed
2-thread steps 2-3x and the kernel 16-29%). The scheduler can: `host_wait` is the fraction of
the timed window the process's threads spent waiting for a CPU. Above `WAIT_LIMIT` in either
record, the step time measured the other jobs as much as the code (`host_contention`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

__all__ = ["CONFIRM", "WAIT_LIMIT", "host_contention", "host_noise", "host_shift", "inconclusive_note"]

#: the share of a timed window the threads may wait for a CPU before its step time is not the
#: code's: quiet hosts here read 0.000-0.00x; one competing busy loop, 0.65 and up
WAIT_LIMIT = 0.02

CONFIRM = ("re-run on a quiet host (no other job on its cores), with `--threads 1`, and gate again; "
           "inconclusive verdicts do not fail the gate")


def host_noise(b: Any, c: Any) -> float | None:
    """The host's noise across a baseline record and a current record of one config: the
    larger calibration spread of the two, or the calibration's shift between them if larger.
    None when either lacks its calibration, or they timed different kernels."""
    spreads = [_fraction(r, "host_noise") for r in (b, c)]
    shift = host_shift(b, c)
    if shift is None or any(s is None for s in spreads):
        return None
    return max(abs(shift), *spreads)  # type: ignore[arg-type]


def host_contention(b: Any, c: Any) -> float | None:
    """The larger `host_wait` of the two records (the share of its timed window the process's
    threads waited for a CPU); None when neither recorded it."""
    waits = [w for w in (_fraction(r, "host_wait") for r in (b, c)) if w is not None]
    return max(waits) if waits else None


def host_shift(b: Any, c: Any) -> float | None:
    """How much slower (> 0) or faster (< 0) the host ran the same calibration kernel now than
    in the baseline, at this config: median now / median then - 1."""
    kb, kc = getattr(b, "host_calib", None), getattr(c, "host_calib", None)
    if not kb or kb != kc:
        return None
    mb, mc = _median(getattr(b, "host_calib_ms", None)), _median(getattr(c, "host_calib_ms", None))
    if mb is None or mc is None or mb <= 0:
        return None
    return mc / mb - 1


def inconclusive_note(noises: Sequence[float]) -> str:
    """The sentence under a verdict table with inconclusive step times: how many, how noisy
    the host was, and how to confirm."""
    lo, hi = min(noises), max(noises)
    n = len(noises)
    return (f"Step time inconclusive on {n} config{'s' * (n != 1)}: the host's own noise during the runs "
            f"({pct(lo)}{'' if lo == hi else f' to {pct(hi)}'}; a fixed calibration kernel's spread and its shift "
            f"between the runs) was as large as the change the gate could call. To confirm: {CONFIRM}.")


def pct(x: float) -> str:
    """A noise as a short percentage: 0.02 -> '2.0%', 0.53 -> '53%'."""
    p = x * 100
    return f"{p:.0f}%" if abs(p) >= 10 else f"{p:.1f}%"


def _fraction(r: Any, name: str) -> float | None:
    """`r.name` when it is a finite fraction >= 0 (a spread, a share of a window); else None."""
    v = getattr(r, name, None)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return float(v)
    return None


def _median(xs: Sequence[float] | None) -> float | None:
    if xs is None or isinstance(xs, (str, bytes)):
        return None
    vals = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(vals) if vals else None
