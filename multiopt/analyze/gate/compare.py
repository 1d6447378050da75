"""Compare: current records against baseline records, config by config -> a `GateResult`.

Pure: Records in, a frozen result out; no I/O, no formatting (render.py writes the markdown,
baseline.py reads and writes the files). A config is known by `record.KEY_COLUMNS`: every
config column but `rules` (a combo is known by its name, and a change of its rules is noted
next to the verdicts it causes).

What is compared is a list of *checks*, one object per kind of metric. The status of a
config always comes first: a config `ok` in the baseline but `oom`/`error`/`diverged` now is
a regression, the reverse an improvement, and the metric checks run only where both sides
are `ok`. Each metric check takes the pair of records and yields its verdicts (or why a
metric was not compared); a new kind of metric is a new check object passed in `checks`,
touching no other check:

* `ToleranceCheck` -- integer metrics (memory: `MEMORY`) under a relative tolerance: a
  regression when `new > old * (1 + tol)`, an improvement when `new < old * (1 - tol)`; a
  value missing now where the baseline has one is a regression (a missing value can hide
  one). Without a tolerance, memory takes it per probe: 0 on `tracked`/`fake` (deterministic
  to the byte), 1% on `cuda` and anything else. Its `per_rank` metrics are compared on every
  rank of `ranks_state` (FSDP, ZeRO) the same way, named `rank <r>: <metric>` (an optimizer's
  state `rank <r>: state[<name>]`), so a verdict names the rank that grew; a rank missing now
  is a regression like a missing value.
* `TimeCheck` -- step time, against the host's own noise (`noise.host_noise`: a fixed
  calibration kernel's spread in both runs and its shift between them). The band is
  `max(time_tol, time_k * old_iqr / old)`, so a noisy baseline widens its own band. Noise
  above the band: `inconclusive` whatever the change, never a regression (the host moved as
  much as the change the gate could call); else a change beyond band + noise is a regression
  (faster: an improvement), one beyond the band but within band + noise is inconclusive, the
  rest unchanged. First of all, a record whose threads waited for a CPU more than
  `noise.WAIT_LIMIT` of its timed window (`host_wait`: another job on the cores) makes the
  verdict inconclusive whatever the change. Records without the calibration (older files, pytest-benchmark JSON) keep
  the band alone, and say so. Compared only on the same `device_name` and `torch`, else not
  compared, with the reason. On the same machine a config timed in the baseline with no
  finite time now is a regression, as for memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from ...errors import UsageError
from ...kinds import Probe, Status
from ...record import GATED_COLUMNS, KEY_COLUMNS, NAME_COLUMNS, RANK_FSDP_COLUMNS, Record
from ...units import fmt_bytes, fmt_ms, missing, parse_fraction
from .noise import WAIT_LIMIT, host_contention, host_noise, pct as noise_pct


class Outcome(str, Enum):
    """A verdict on one (config, metric), worst first: the order results are listed in. A
    new outcome is one member; only REGRESSION fails the gate. INCONCLUSIVE: a step time the
    host's own noise could explain (see TimeCheck)."""

    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    INCONCLUSIVE = "inconclusive"
    UNCHANGED = "unchanged"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        return list(type(self)).index(self)


REGRESSION, IMPROVEMENT, UNCHANGED = Outcome.REGRESSION, Outcome.IMPROVEMENT, Outcome.UNCHANGED
INCONCLUSIVE = Outcome.INCONCLUSIVE


@dataclass(frozen=True)
class Unit:
    """What a metric's values are: its name and how one reads (pure formatting)."""

    name: str
    show: Callable[[Any], str] = str
    numeric: bool = True  # values with a difference and a relative change

    def __str__(self) -> str:
        return self.name


BYTES = Unit("bytes", fmt_bytes)
MS = Unit("ms", fmt_ms)
COUNT = Unit("count", lambda v: f"{v:,}")
STATUS = Unit("status", str, numeric=False)


# --------------------------------------------------------------------------------------
# result types


@dataclass(frozen=True)
class Verdict:
    """One compared (config, metric) pair."""

    config: str  # short readable name
    key: tuple  # the config key (KEY_COLUMNS order)
    metric: str  # a memory metric, "step_ms_median" or "status"
    old: Any
    new: Any
    change: float | None  # (new - old) / old; inf if old == 0 < new; None for status or a missing value
    allowed: float | None  # the relative band applied (time: before the host's noise); None for status or a missing value
    verdict: Outcome
    unit: Unit
    detail: str = ""  # why the band is what it is, a failed config's error, or why a value is missing
    missing: bool = False  # no finite current value where the baseline has one
    noise: float | None = None  # time: the host's noise (noise.host_noise); None where not recorded

    @property
    def delta(self) -> float | None:
        if not self.unit.numeric or self.missing:
            return None
        return self.new - self.old


@dataclass(frozen=True)
class ConfigRef:
    """A config present on one side only."""

    config: str
    key: tuple
    status: str


@dataclass(frozen=True)
class NotCompared:
    config: str
    key: tuple
    metric: str  # "*": every metric of the config
    reason: str


@dataclass(frozen=True)
class GateResult:
    verdicts: tuple[Verdict, ...]  # regressions, then improvements, then unchanged; worst first
    missing: tuple[ConfigRef, ...]  # in baseline, not in current: fails
    new: tuple[ConfigRef, ...]  # in current, not in baseline: reported, passes
    not_compared: tuple[NotCompared, ...]
    notes: tuple[str, ...] = ()
    n_baseline: int = 0  # distinct configs per side
    n_current: int = 0
    settings: str = ""  # the tolerances, in words
    baseline_label: str = "baseline"
    current_label: str = "current"

    def having(self, outcome: Outcome) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.verdict == outcome)

    @property
    def regressions(self) -> tuple[Verdict, ...]:
        return self.having(REGRESSION)

    @property
    def improvements(self) -> tuple[Verdict, ...]:
        return self.having(IMPROVEMENT)

    @property
    def unchanged(self) -> tuple[Verdict, ...]:
        return self.having(UNCHANGED)

    @property
    def inconclusive(self) -> tuple[Verdict, ...]:
        return self.having(INCONCLUSIVE)

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.missing

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


# --------------------------------------------------------------------------------------
# checks


@dataclass(frozen=True)
class Pair:
    """One config present on both sides, both `ok`: what a metric check compares."""

    config: str
    key: tuple
    old: Record
    new: Record


Found = Verdict | NotCompared


class Check(Protocol):
    """One kind of metric: `kind` names it for `--only`, `describe()` says its tolerance in
    words, calling it on a pair yields its verdicts and what it could not compare."""

    kind: str

    def describe(self) -> str: ...

    def __call__(self, pair: Pair) -> Iterable[Found]: ...


def _classify(old: float, new: float, band: float) -> Outcome:
    if new > old * (1 + band):
        return REGRESSION
    if new < old * (1 - band):
        return IMPROVEMENT
    return UNCHANGED


def _rel(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.copysign(math.inf, new)
    return (new - old) / abs(old)


def pct(x: float, signed: bool = False) -> str:
    """A fraction as a short percentage: 0.1 -> '10%', signed -> '+10%'."""
    if math.isinf(x):
        return "+inf%" if x > 0 else "-inf%"
    p = x * 100
    if p == 0:
        return "0%"
    s = "+" if signed and p > 0 else ""
    if abs(p) >= 10:
        body = f"{p:.1f}".rstrip("0").rstrip(".")
    elif abs(p) >= 0.01:
        body = f"{p:.2f}".rstrip("0").rstrip(".")
    else:
        body = f"{p:.2g}"
    return f"{s}{body}%"


def _check_number(name: str, v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
        raise UsageError(f"{name} must be a finite number >= 0, got {v!r}")


# Memory metrics the gate compares (bytes): declared on the Record's fields (`GATED`).
MEMORY_METRICS: tuple[str, ...] = GATED_COLUMNS
# ... and on each rank of `ranks_state`: its optimizer state (also per optimizer), its peak,
# and FSDP's per-rank fields (RankRecord's Role.MEMORY); exact on tracked/fake like the record's.
RANK_METRICS: tuple[str, ...] = ("state_bytes", "peak_total", *RANK_FSDP_COLUMNS)
# Default memory tolerance per probe, used when a check has no tolerance of its own.
DEFAULT_MEM_TOL: Mapping[str, float] = {Probe.TRACKED: 0.0, Probe.FAKE: 0.0, Probe.CUDA: 0.01}
FALLBACK_MEM_TOL = 0.01  # an unknown probe is assumed to be noisy like CUDA


@dataclass(frozen=True)
class ToleranceCheck:
    """Metrics compared under a relative tolerance; `tol` None takes `DEFAULT_MEM_TOL` per
    probe. A metric measured on neither side is skipped; one missing now is a regression.
    `per_rank`: metrics of each rank's row in `ranks_state`, compared rank by rank."""

    kind: str
    metrics: tuple[str, ...]
    unit: Unit
    tol: float | None = None
    per_rank: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_number(f"{self.kind} tolerance", self.tol)

    def describe(self) -> str:
        ranks = " (per rank too)" if self.per_rank else ""
        if self.tol is None:
            return f"{self.kind}{ranks}: 0 on tracked/fake probes, 1% on cuda"
        return f"{self.kind}{ranks}: {pct(self.tol)}"

    def band(self, probe: str) -> float:
        return self.tol if self.tol is not None else DEFAULT_MEM_TOL.get(str(probe), FALLBACK_MEM_TOL)

    def __call__(self, p: Pair) -> Iterator[Found]:
        tol = self.band(p.old.probe)
        pairs = [(m, getattr(p.old, m), getattr(p.new, m)) for m in self.metrics]
        if self.per_rank:
            pairs += _rank_pairs(p.old, p.new, self.per_rank)
        for m, old, new in pairs:
            if missing(old) and missing(new):
                continue  # not measured on this probe/config
            if missing(new):  # a missing (or NaN) value can hide a regression: never a pass
                yield Verdict(p.config, p.key, m, old, new, None, None, REGRESSION, self.unit,
                              "no finite value in current", missing=True)
            elif missing(old):
                yield NotCompared(p.config, p.key, m, "no value in baseline")
            else:
                yield Verdict(p.config, p.key, m, old, new, _rel(old, new), tol, _classify(old, new, tol), self.unit)


def _rank_values(r: Record, metrics: Sequence[str]) -> dict[str, Any]:
    """`rank <r>: <metric>` -> value for every rank of `r`, and each rank's optimizers' state."""
    out: dict[str, Any] = {}
    for row in r.ranks_state:
        out.update({f"rank {row.rank}: {m}": getattr(row, m) for m in metrics})
        out.update({f"rank {row.rank}: state[{o.name}]": o.state_bytes for o in row.by_optimizer})
    return out


def _rank_pairs(old: Record, new: Record, metrics: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """(metric, old, new) per rank metric of the baseline (a rank absent now: new None)."""
    a, b = _rank_values(old, metrics), _rank_values(new, metrics)
    return [(m, v, b.get(m)) for m, v in a.items()]


_WORK = (("flops", COUNT), ("bytes", BYTES), ("kernels", COUNT))


@dataclass(frozen=True)
class WorkCheck:
    """Work counters (instrument/work.py), per phase and per optimizer's step, under a relative
    tolerance (None: `DEFAULT_MEM_TOL` per probe, 0 on tracked/fake where they are exact).
    Metrics are named `work:<phase>:<what>` and `work:step[<optimizer>]:<what>`, so a verdict
    says which phase and which optimizer changed. Records without counters on both sides (the
    cuda probe, records older than the counters) are skipped; counters missing now are a
    regression."""

    tol: float | None = None
    kind: str = "work"

    def __post_init__(self) -> None:
        _check_number("work tolerance", self.tol)

    def describe(self) -> str:
        return "work: 0 on tracked/fake probes" if self.tol is None else f"work: {pct(self.tol)}"

    def __call__(self, p: Pair) -> Iterator[Found]:
        tol = self.tol if self.tol is not None else DEFAULT_MEM_TOL.get(str(p.old.probe), FALLBACK_MEM_TOL)
        old, new = _work_of(p.old), _work_of(p.new)
        if not old:
            if new:
                yield NotCompared(p.config, p.key, "work", "no work counters in baseline")
            return
        for metric, (a, unit, detail) in old.items():
            b = new.get(metric, (None, unit, detail))[0]
            if missing(b):
                yield Verdict(p.config, p.key, metric, a, b, None, None, REGRESSION, unit,
                              "no work counters in current", missing=True)
            else:
                yield Verdict(p.config, p.key, metric, a, b, _rel(a, b), tol, _classify(a, b, tol), unit, detail)


def _work_of(r: Record) -> dict[str, tuple[Any, Unit, str]]:
    """metric -> (value, unit, detail) for every work counter of `r`: per phase, per optimizer."""
    out: dict[str, tuple[Any, Unit, str]] = {}
    for w in r.work:
        for what, unit in _WORK:
            out[f"work:{w.phase}:{what}"] = (getattr(w, what), unit, f"phase {w.phase}")
    if r.work:
        for o in r.optimizers:
            for what, unit in _WORK:
                out[f"work:step[{o.name}]:{what}"] = (getattr(o, f"work_{what}"), unit,
                                                      f"phase step, optimizer {o.name} ({o.optimizer})")
    return out


TIME_METRIC = "step_ms_median"
TIME_IQR = "step_ms_iqr"
_UNTIMED_NOW = "not timed in current"


@dataclass(frozen=True)
class TimeCheck:
    """Median step time under max(tol, k x the baseline's IQR / median) plus the host's own
    noise, which must be inside that band; same machine only (see the module's docstring)."""

    tol: float = 0.10
    k: float = 3.0
    kind: str = "time"

    def __post_init__(self) -> None:
        _check_number("time_tol", self.tol)
        _check_number("time_k", self.k)

    def describe(self) -> str:
        return (f"time: max({pct(self.tol)}, {self.k:g} x IQR/median) plus the host's noise, which must be inside "
                "that band (else inconclusive), same device_name and torch only")

    def __call__(self, p: Pair) -> Iterator[Found]:
        reason = _time_incomparable(p.old, p.new)
        if reason == "":
            return  # untimed on both sides (e.g. the fake probe)
        if reason == _UNTIMED_NOW:  # as for memory: a missing value can hide a regression
            yield Verdict(p.config, p.key, TIME_METRIC, p.old.step_ms_median, p.new.step_ms_median, None,
                          None, REGRESSION, MS, "no finite step time in current (gate memory alone with "
                          "--only memory)", missing=True)
        elif reason is not None:
            yield NotCompared(p.config, p.key, TIME_METRIC, reason)
        else:
            yield self.verdict(p)

    def verdict(self, p: Pair) -> Verdict:
        """The step time of a pair timed on the same machine (see the module's docstring)."""
        old, new = float(p.old.step_ms_median), float(p.new.step_ms_median)
        change = _rel(old, new)
        spread = self.k * float(p.old.step_ms_iqr or 0.0) / old if old > 0 else 0.0
        band = max(self.tol, spread)
        why = f"{self.k:g} x IQR/median" if spread > self.tol else ""
        noise = host_noise(p.old, p.new)

        def verdict(outcome: Outcome, detail: str) -> Verdict:
            return Verdict(p.config, p.key, TIME_METRIC, old, new, change, band, outcome, MS,
                           "; ".join(d for d in (why, detail) if d), noise=noise)

        wait = host_contention(p.old, p.new)
        if wait is not None and wait > WAIT_LIMIT:
            return verdict(INCONCLUSIVE, f"threads waited for a CPU {noise_pct(wait)} of the timed window "
                                         "(another job on the cores)")
        if noise is None:
            return verdict(_classify(old, new, band), "host noise not recorded")
        words = f"host noise {noise_pct(noise)}"
        if noise > band:
            return verdict(INCONCLUSIVE, f"{words} > band")
        outcome = _classify(old, new, band + noise)
        if outcome == UNCHANGED and abs(change) > band:
            return verdict(INCONCLUSIVE, f"{words}: within it")
        return verdict(outcome, f"+ {words}" if noise else "")


def _timed(r: Record) -> bool:
    return not missing(r.step_ms_median) and (r.steps_timed or 0) > 0


def _time_incomparable(b: Record, c: Record) -> str | None:
    """None when step time is comparable; "" when neither side is timed; else the reason
    (`_UNTIMED_NOW` when only the current record lacks a finite time on the same machine)."""
    if not _timed(b) and not _timed(c):
        return ""
    if not _timed(b):
        return "not timed in baseline"
    for col, what in (("device_name", "device"), ("torch", "torch version")):
        if getattr(b, col) != getattr(c, col):
            return f"{what} differs: {getattr(b, col)!r} vs {getattr(c, col)!r}"
    return None if _timed(c) else _UNTIMED_NOW


def checks(mem_tol: float | None = None, time_tol: float = 0.10, time_k: float = 3.0) -> tuple[Check, ...]:
    """The gate's checks at these settings: memory, work (at memory's tolerance), then step time."""
    return (ToleranceCheck("memory", MEMORY_METRICS, BYTES, mem_tol, RANK_METRICS), WorkCheck(mem_tol),
            TimeCheck(time_tol, time_k))


# --------------------------------------------------------------------------------------
# compare


def compare(baseline: Iterable[Record], current: Iterable[Record], *, mem_tol: float | None = None,
            time_tol: float = 0.10, time_k: float = 3.0, only: str | None = None,
            using: Sequence[Check] | None = None) -> GateResult:
    """Compare current records to baseline records, config by config. Pure: no I/O.

    `using`: the checks (default `checks(mem_tol, time_tol, time_k)`); `only` keeps the checks
    of that kind (`"memory"`: a CPU CI runner's timings say little about a change)."""
    every = tuple(using) if using is not None else checks(mem_tol, time_tol, time_k)
    kinds = [c.kind for c in every]
    wanted = None if only is None else {k.strip() for k in only.split(",")}  # "memory,work": both
    if wanted is not None and not wanted <= set(kinds):
        raise UsageError(f"--only takes {', '.join(repr(k) for k in kinds)} or a comma list of them, got {only!r}")
    active = [c for c in every if wanted is None or c.kind in wanted]
    notes: list[str] = []
    base = _by_key(baseline, "baseline", notes)
    cur = _by_key(current, "current", notes)
    names = short_names(list(base) + list(cur))
    found: list[Found] = []
    for key, b in base.items():
        if key in cur:
            found += _compare_config(Pair(names[key], key, b, cur[key]), active, notes)
    skipped = [f"{c.kind} not compared (--only {only})" for c in every if c not in active]
    return GateResult(
        verdicts=tuple(sorted((f for f in found if isinstance(f, Verdict)), key=_severity)),
        missing=tuple(ConfigRef(names[k], k, str(base[k].status)) for k in base if k not in cur),
        new=tuple(ConfigRef(names[k], k, str(cur[k].status)) for k in cur if k not in base),
        not_compared=tuple(f for f in found if isinstance(f, NotCompared)),
        notes=tuple(notes),
        n_baseline=len(base),
        n_current=len(cur),
        settings="; ".join([c.describe() for c in active] + skipped),
    )


def _key(r: Record) -> tuple:
    return tuple(getattr(r, c) for c in KEY_COLUMNS)


def _by_key(records: Iterable[Record], side: str, notes: list[str]) -> dict[tuple, Record]:
    out: dict[tuple, Record] = {}
    dups = 0
    for r in records:
        key = _key(r)
        if key in out and out[key].rules != r.rules:
            raise UsageError(f"{side}: combo {r.combo!r} names two rule sets, {out[key].rules!r} and "
                             f"{r.rules!r}, in the same config; give each its own name")
        if key in out:
            dups += 1
            del out[key]  # keep insertion order of the last occurrence
        out[key] = r
    if dups:
        notes.append(f"{side}: {dups} duplicate record(s) of the same config; the last of each was used")
    return out


def _compare_config(p: Pair, active: Sequence[Check], notes: list[str]) -> list[Found]:
    """One config present on both sides: its status, then each check."""
    bs, cs = str(p.old.status), str(p.new.status)
    if bs != Status.OK or cs != Status.OK:
        if bs == cs:
            return [NotCompared(p.config, p.key, "*", f"{bs} on both sides")]
        if Status.OK not in (bs, cs):
            return [NotCompared(p.config, p.key, "*", f"{bs} in baseline, {cs} now")]
        failed = p.new if bs == Status.OK else p.old
        outcome = REGRESSION if bs == Status.OK else IMPROVEMENT
        return [Verdict(p.config, p.key, "status", bs, cs, None, None, outcome, STATUS, str(failed.error or ""))]
    if p.old.rules != p.new.rules:
        notes.append(f"{p.config}: rules changed from `{p.old.rules}` to `{p.new.rules}`")
    return [f for check in active for f in check(p)]


def short_names(keys: Iterable[tuple]) -> dict[tuple, str]:
    """Short, unique, readable names: only the columns that tell these configs apart, tried
    in `record.NAME_COLUMNS` order."""
    keys = list(dict.fromkeys(keys))
    idx = {c: KEY_COLUMNS.index(c) for c in NAME_COLUMNS if c in KEY_COLUMNS}
    chosen: list[str] = []
    groups = 1
    for col in idx:
        trial = chosen + [col]
        n = len({tuple(k[idx[c]] for c in trial) for k in keys})
        if n > groups:  # this column splits configs the chosen ones could not
            chosen, groups = trial, n
    first = NAME_COLUMNS[0]  # the combo: a name's bare first part
    if not chosen:
        chosen = [first] if first in idx else []

    def name(k: tuple) -> str:
        return ", ".join(str(k[idx[c]]) if c == first else f"{c}={k[idx[c]]}" for c in chosen) or "(config)"

    names = {k: name(k) for k in keys}
    if len(set(names.values())) < len(names):  # columns outside the names differ
        names = {k: f"{n} #{i}" for i, (k, n) in enumerate(names.items(), start=1)}
    return names


def _severity(v: Verdict) -> tuple:
    """Worst outcome first; within one, status before metrics and the biggest move first."""
    status_first = 0 if not v.unit.numeric else 1
    ch = v.change if v.change is not None else 0.0
    severity = -ch if v.verdict == REGRESSION else -abs(ch) if v.verdict == INCONCLUSIVE else ch  # biggest move first
    return (v.verdict.rank, status_first, severity, v.config, v.metric)


def parse_tolerance(text: str | float, what: str = "tolerance") -> float:
    """`10%` or `0.1` -> 0.1. A bare number >= 1 is refused as ambiguous (write `10%`)."""
    try:
        value = parse_fraction(text)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None
    s = str(text).strip()
    if not isinstance(text, (int, float)) and not s.endswith("%") and value >= 1:
        raise UsageError(f"{what}: {text!r} is ambiguous; write a percentage ({s}%) or a fraction (0.1)")
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{what}: {text!r} must be >= 0")
    return value
