"""The gate's step-time check: a slower median is a regression only when the host could not
have made it so. Pure: two record rows in, one `TimeVerdict` out.

A step time is the code and the host together; on a shared CI runner the host alone moves a
median by tens of percent (another job on the cores, a descheduled thread). Records carry
what tells them apart (`instrument/timing.py`): the timed samples, and a fixed calibration
kernel timed around and between them. Its work never changes, so

* its spread while a config ran (`host_noise`, IQR / median) is that run's noise there, and
* its median now against its median in the baseline, at the same config, is how much faster
  or slower the host itself was (the shift).

The host's noise for a config is the largest of the two spreads and the shift. With the
band = max(tolerance, k x baseline IQR / baseline median):

* noise > band: **inconclusive** whatever the change, never a regression: the host moved
  more than the change the gate could call;
* else a change beyond band + noise is a **regression** (or an improvement, faster); a
  change beyond the band but within band + noise is **inconclusive** (the host could explain
  it); anything within the band is **unchanged**.

Records without the calibration (written before it existed, pytest-benchmark JSON) keep the
band alone, and the verdict says the noise was not recorded.

To confirm an inconclusive verdict: re-run on a quiet host, with `--threads 1` (one thread
is not held up by a sibling thread the scheduler parked), and gate again (`CONFIRM`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["CONFIRM", "INCONCLUSIVE", "TimeCheck", "TimeVerdict", "host_noise", "host_shift", "inconclusive_note"]

REGRESSION, IMPROVEMENT, UNCHANGED, INCONCLUSIVE = "regression", "improvement", "unchanged", "inconclusive"

CONFIRM = ("re-run on a quiet host (no other job on its cores), with `--threads 1`, and gate again; "
           "inconclusive verdicts do not fail the gate")

MEDIAN, IQR = "step_ms_median", "step_ms_iqr"


@dataclass(frozen=True)
class TimeVerdict:
    """One config's step-time verdict. `change` = (new - old) / old; `band` the relative band
    from tolerance and baseline IQR; `noise` the host's noise (None: not recorded on both
    sides); `detail` says why, in words."""

    old: float
    new: float
    change: float
    band: float
    noise: float | None
    verdict: str
    detail: str = ""

    @property
    def allowed(self) -> float:
        """The relative change a verdict needed: the band plus the host's noise."""
        return self.band + (self.noise or 0.0)


@dataclass(frozen=True)
class TimeCheck:
    """Step time of one config, baseline row vs current row (both `ok` and timed on the same
    machine: the gate checks that first)."""

    tol: float = 0.10
    k: float = 3.0

    def __call__(self, b: Mapping[str, Any], c: Mapping[str, Any]) -> TimeVerdict:
        old, new = float(b[MEDIAN]), float(c[MEDIAN])
        change = _rel(old, new)
        iqr = float(b.get(IQR) or 0.0)
        spread = self.k * iqr / old if old > 0 else 0.0
        band = max(self.tol, spread)
        why = f"{self.k:g} x IQR/median" if spread > self.tol else ""
        noise = host_noise(b, c)
        if noise is None:
            return TimeVerdict(old, new, change, band, None, _classify(change, band),
                               _join(why, "host noise not recorded"))
        words = f"host noise {_pct(noise)}"
        if noise > band:
            return TimeVerdict(old, new, change, band, noise, INCONCLUSIVE, _join(why, f"{words} > band"))
        verdict = _classify(change, band + noise)
        if verdict == UNCHANGED and abs(change) > band:
            return TimeVerdict(old, new, change, band, noise, INCONCLUSIVE, _join(why, f"{words}: within it"))
        return TimeVerdict(old, new, change, band, noise, verdict, _join(why, f"+ {words}" if noise else ""))


def inconclusive_note(noises: Sequence[float]) -> str:
    """The sentence under a verdict table with inconclusive step times: how many, how noisy
    the host was, and how to confirm."""
    lo, hi = min(noises), max(noises)
    n = len(noises)
    return (f"Step time inconclusive on {n} config{'s' * (n != 1)}: the host's own noise during the runs "
            f"({_pct(lo)}{'' if lo == hi else f' to {_pct(hi)}'}; a fixed calibration kernel's spread and its shift "
            f"between the runs) was as large as the change the gate could call. To confirm: {CONFIRM}.")


def host_noise(b: Mapping[str, Any], c: Mapping[str, Any]) -> float | None:
    """The host's noise across a baseline row and a current row of one config: the larger
    calibration spread of the two, or the calibration's shift between them if larger. None
    when either row lacks its calibration, or the rows timed different kernels."""
    spreads = [_spread(r) for r in (b, c)]
    shift = host_shift(b, c)
    if shift is None or any(s is None for s in spreads):
        return None
    return max(abs(shift), *spreads)  # type: ignore[arg-type]


def host_shift(b: Mapping[str, Any], c: Mapping[str, Any]) -> float | None:
    """How much slower (> 0) or faster (< 0) the host ran the same calibration kernel now than
    in the baseline, at this config: median now / median then - 1."""
    if not b.get("host_calib") or b.get("host_calib") != c.get("host_calib"):
        return None
    mb, mc = _median(b.get("host_calib_ms")), _median(c.get("host_calib_ms"))
    if mb is None or mc is None or mb <= 0:
        return None
    return mc / mb - 1


def _spread(r: Mapping[str, Any]) -> float | None:
    v = r.get("host_noise")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return float(v)
    return None


def _median(xs: Sequence[float] | None) -> float | None:
    if xs is None or isinstance(xs, (str, bytes)):
        return None
    vals = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(vals) if vals else None


def _classify(change: float, band: float) -> str:
    if change > band:
        return REGRESSION
    if change < -band:
        return IMPROVEMENT
    return UNCHANGED


def _rel(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.copysign(math.inf, new)
    return (new - old) / abs(old)


def _pct(x: float) -> str:
    p = x * 100
    return f"{p:.0f}%" if abs(p) >= 10 else f"{p:.1f}%"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
