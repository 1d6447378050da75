"""The regression gate: current records vs a committed baseline -> verdicts and an exit code.

`multiopt gate --baseline BASE --current CUR` compares config by config, on the config key
(`record.CONFIG_COLUMNS` less `rules`: a combo is known by its name, and a change of its
rules is noted next to the verdicts it causes):

* **status** -- a config `ok` in the baseline but `oom`/`error`/`diverged` now is a
  regression; the reverse is an improvement. Metrics are compared only where both sides
  are `ok`.
* **memory** (`MEMORY_METRICS`, bytes) -- relative tolerance: a regression when
  `new > old * (1 + tol)`, an improvement when `new < old * (1 - tol)`. Without
  `--mem-tol` the tolerance is picked per probe: 0 on `tracked` and `fake` (deterministic to
  the byte), 1% on `cuda` and anything else.
* **step time** (`step_ms_median`, `timecheck.TimeCheck`) -- the band is
  `max(time_tol, time_k * old_iqr / old)`, so a noisy baseline widens its own band; a
  regression only when the host's own noise during both runs (a fixed calibration kernel's
  spread, and its shift between the runs) is inside that band and the median is worse by
  more than band + noise; otherwise `inconclusive (host noise N%)`, which passes and says
  how to confirm. Records without the calibration keep the band alone. Compared only when
  both records have the same `device_name` and `torch` version; otherwise listed as "not
  compared" with the reason. On the same machine, a config timed in the baseline with no finite time now
  is a regression, as a missing memory value is (`--only memory` gates memory alone).
* **configs on one side only** are always listed: missing in current FAILS the gate (a
  config that silently stopped being measured is how regressions hide); new in current is
  reported and passes (add it to the baseline with `--update-baseline`).
* **duplicate configs** on one side (a re-run appended to the same file): the last record
  wins, and the gate says so.

Exit code: 0 pass, 1 regression or missing config, 2 bad input (a `UsageError`: missing,
empty, corrupt or wrong-schema file; the CLI prints one line naming it).

`--update-baseline` compares as usual, prints the verdict against the *old* baseline, then
writes the current records (JSONL, atomically) as the new baseline and exits 0: accepting
the new numbers is an explicit act. If the baseline file does not exist yet, it is created.

Pure parts: `compare()` (DataFrames in, `GateResult` out) and `render()` (markdown).
`run_gate()` adds loading, printing, `$GITHUB_STEP_SUMMARY` and the baseline update.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import pandas as pd

from .. import record as rec
from ..errors import UsageError
from ..store import write_jsonl_atomic
from ..units import fmt_bytes, fmt_ms
from .frame import load
from .timecheck import INCONCLUSIVE, TimeCheck, inconclusive_note
from ..units import parse_fraction

# Memory metrics the gate compares (bytes). `opt_state_expected` is a formula, not a
# measurement; `mem_*` levels are implied by the peaks; n_params is not memory.
# `peak_reserved` is what decides an out-of-memory error on CUDA (the cuda probe, and target
# cuda on the CPU probes); records without it (target cpu) skip it on both sides.
MEMORY_METRICS: tuple[str, ...] = (
    "peak_total", "peak_forward", "peak_backward", "peak_step", "peak_zero_grad",
    "step_temp_bytes", "opt_state_bytes", "param_bytes", "grad_bytes", "peak_reserved",
)
TIME_METRIC = "step_ms_median"
TIME_IQR = "step_ms_iqr"

# Default memory tolerance per probe, used when mem_tol is None.
DEFAULT_MEM_TOL: Mapping[str, float] = {"tracked": 0.0, "fake": 0.0, "cuda": 0.01}
FALLBACK_MEM_TOL = 0.01  # an unknown probe is assumed to be noisy like CUDA

REGRESSION, IMPROVEMENT, UNCHANGED = "regression", "improvement", "unchanged"

# Columns tried, in this order, for a config's short name (only those that vary are shown).
_NAME_COLUMNS: tuple[str, ...] = (
    "combo", "width", "batch", "depth", "model", "dtype", "amp", "impl", "zero_grad_at",
    "zero", "ranks", "seed", "probe", "device", "rules",
)


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
    change: float | None  # (new - old) / old; inf if old == 0 < new; None for status
    allowed: float | None  # the relative band applied (time: before the host's noise); None for status
    verdict: str  # REGRESSION | IMPROVEMENT | UNCHANGED | INCONCLUSIVE (time: the host's noise decides)
    unit: str  # "bytes" | "ms" | "status" | "missing" (a memory metric without a finite current value)
    detail: str = ""  # why the band is what it is, or a failed config's error
    noise: float | None = None  # time: the host's noise (timecheck.host_noise); None if not recorded

    @property
    def delta(self) -> float | None:
        if self.unit not in ("bytes", "ms"):
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
    metric: str
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

    @property
    def regressions(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.verdict == REGRESSION)

    @property
    def improvements(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.verdict == IMPROVEMENT)

    @property
    def unchanged(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.verdict == UNCHANGED)

    @property
    def inconclusive(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.verdict == INCONCLUSIVE)

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.missing

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


# --------------------------------------------------------------------------------------
# compare


def _plain(value: Any) -> Any:
    """A DataFrame cell as a plain Python value: NaN/NA -> None, numpy scalars -> Python."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # lists, arrays: not missing
        pass
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # ints that went through a float column (because of a None)
    return value


# A config is identified by its combo's name, not its rule text: a change that alters what a
# combo does (say amsgrad turned on for "adam") is then a verdict on that config's numbers,
# with the rule change noted, instead of one config missing and another new.
KEY_COLUMNS: tuple[str, ...] = tuple(c for c in rec.CONFIG_COLUMNS if c != "rules")


def _rows_by_key(df: pd.DataFrame, side: str, notes: list[str]) -> dict[tuple, dict[str, Any]]:
    missing = [c for c in rec.CONFIG_COLUMNS + ("status",) if c not in df.columns]
    if missing:
        raise UsageError(f"{side}: records lack {', '.join(missing)}; not multiopt records")
    out: dict[tuple, dict[str, Any]] = {}
    dups = 0
    for row in df.to_dict(orient="records"):
        clean = {k: _plain(v) for k, v in row.items()}
        key = tuple(clean.get(c) for c in KEY_COLUMNS)
        if key in out and out[key].get("rules") != clean.get("rules"):
            raise UsageError(f"{side}: combo {clean.get('combo')!r} names two rule sets, {out[key].get('rules')!r} and "
                             f"{clean.get('rules')!r}, in the same config; give each its own name")
        if key in out:
            dups += 1
            del out[key]  # keep insertion order of the last occurrence
        out[key] = clean
    if dups:
        notes.append(f"{side}: {dups} duplicate record(s) of the same config; the last of each was used")
    return out


def _short_names(keys: Iterable[tuple]) -> dict[tuple, str]:
    """Short, unique, readable names: only the columns that tell these configs apart."""
    keys = list(dict.fromkeys(keys))
    idx = {c: KEY_COLUMNS.index(c) for c in _NAME_COLUMNS if c in KEY_COLUMNS}
    chosen: list[str] = []
    groups = 1
    for col in _NAME_COLUMNS:
        if col not in idx:
            continue
        trial = chosen + [col]
        n = len({tuple(k[idx[c]] for c in trial) for k in keys})
        if n > groups:  # this column splits configs the chosen ones could not
            chosen, groups = trial, n
    if not chosen:
        chosen = ["combo"] if "combo" in idx else []

    def name(k: tuple) -> str:
        parts = []
        for c in chosen:
            v = k[idx[c]]
            parts.append(str(v) if c == "combo" else f"{c}={v}")
        return ", ".join(parts) or "(config)"

    names = {k: name(k) for k in keys}
    if len(set(names.values())) < len(names):  # columns outside _NAME_COLUMNS differ
        names = {k: f"{n} #{i}" for i, (k, n) in enumerate(names.items(), start=1)}
    return names


def _mem_tol_for(probe: Any, mem_tol: float | None) -> float:
    if mem_tol is not None:
        return mem_tol
    return DEFAULT_MEM_TOL.get(str(probe), FALLBACK_MEM_TOL)


def _classify(old: float, new: float, band: float) -> str:
    if new > old * (1 + band):
        return REGRESSION
    if new < old * (1 - band):
        return IMPROVEMENT
    return UNCHANGED


def _rel(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.copysign(math.inf, new)
    return (new - old) / abs(old)


def compare(
    baseline_df: pd.DataFrame,
    current_df: pd.DataFrame,
    *,
    mem_tol: float | None = None,
    time_tol: float = 0.10,
    time_k: float = 3.0,
    only: str | None = None,
) -> GateResult:
    """Compare current records to baseline records, config by config. Pure: no I/O.

    `only="memory"` skips step time (a CPU CI runner's timings say little about a change);
    `only="time"` skips memory."""
    _check_settings(mem_tol, time_tol, time_k)
    if only not in (None, "memory", "time"):
        raise UsageError(f"--only takes 'memory' or 'time', got {only!r}")
    notes: list[str] = []
    base = _rows_by_key(baseline_df, "baseline", notes)
    cur = _rows_by_key(current_df, "current", notes)
    names = _short_names(list(base) + list(cur))
    verdicts: list[Verdict] = []
    not_compared: list[NotCompared] = []
    for key, b in base.items():
        if key in cur:
            _compare_config(names[key], key, b, cur[key], verdicts, not_compared, notes,
                            mem_tol=mem_tol, time_tol=time_tol, time_k=time_k, only=only)
    return GateResult(
        verdicts=tuple(sorted(verdicts, key=_severity)),
        missing=tuple(ConfigRef(names[k], k, str(base[k].get("status"))) for k in base if k not in cur),
        new=tuple(ConfigRef(names[k], k, str(cur[k].get("status"))) for k in cur if k not in base),
        not_compared=tuple(not_compared),
        notes=tuple(notes),
        n_baseline=len(base),
        n_current=len(cur),
        settings=_settings_text(mem_tol, time_tol, time_k, only),
    )


def _compare_config(cfg: str, key: tuple, b: dict[str, Any], c: dict[str, Any], verdicts: list[Verdict],
                    not_compared: list[NotCompared], notes: list[str], *, mem_tol: float | None,
                    time_tol: float, time_k: float, only: str | None) -> None:
    """One config present on both sides: its status, then memory, then time."""
    bs, cs = str(b.get("status")), str(c.get("status"))
    if bs != "ok" or cs != "ok":
        if bs == cs:
            not_compared.append(NotCompared(cfg, key, "*", f"{bs} on both sides"))
        elif bs == "ok" or cs == "ok":
            failed = c if bs == "ok" else b
            verdicts.append(Verdict(cfg, key, "status", bs, cs, None, None,
                                    REGRESSION if bs == "ok" else IMPROVEMENT, "status", str(failed.get("error") or "")))
        else:
            not_compared.append(NotCompared(cfg, key, "*", f"{bs} in baseline, {cs} now"))
        return
    if b.get("rules") != c.get("rules"):
        notes.append(f"{cfg}: rules changed from `{b.get('rules')}` to `{c.get('rules')}`")
    tol = _mem_tol_for(key[KEY_COLUMNS.index("probe")], mem_tol)
    for m in MEMORY_METRICS if only != "time" else ():
        old, newv = _finite(b.get(m)), _finite(c.get(m))
        if old is None and newv is None:
            continue  # not measured on this probe/config
        if newv is None:  # a missing (or NaN) value can hide a regression: never a pass
            verdicts.append(Verdict(cfg, key, m, old, c.get(m), None, None, REGRESSION, "missing",
                                    "no finite value in current"))
            continue
        if old is None:
            not_compared.append(NotCompared(cfg, key, m, "no value in baseline"))
            continue
        verdicts.append(Verdict(cfg, key, m, old, newv, _rel(old, newv), tol, _classify(old, newv, tol), "bytes"))
    if only != "memory":
        _compare_time(cfg, key, b, c, verdicts, not_compared, time_tol=time_tol, time_k=time_k)


def _compare_time(cfg: str, key: tuple, b: dict[str, Any], c: dict[str, Any], verdicts: list[Verdict],
                  not_compared: list[NotCompared], *, time_tol: float, time_k: float) -> None:
    reason = _time_incomparable(b, c)
    if reason == "":
        return  # untimed on both sides (e.g. the fake probe)
    if reason == _UNTIMED_NOW:  # as for memory: a missing value can hide a regression
        verdicts.append(Verdict(cfg, key, TIME_METRIC, _finite(b.get(TIME_METRIC)), c.get(TIME_METRIC), None, None,
                                REGRESSION, "missing", "no finite step time in current (gate memory alone with "
                                "--only memory)"))
        return
    if reason is not None:
        not_compared.append(NotCompared(cfg, key, TIME_METRIC, reason))
        return
    t = TimeCheck(time_tol, time_k)(b, c)
    verdicts.append(Verdict(cfg, key, TIME_METRIC, t.old, t.new, t.change, t.band, t.verdict, "ms", t.detail,
                            t.noise))


def _severity(v: Verdict) -> tuple:
    """Regressions first (status before metrics, biggest move first), then improvements."""
    rank = {REGRESSION: 0, IMPROVEMENT: 1, INCONCLUSIVE: 2, UNCHANGED: 3}[v.verdict]
    status_first = 0 if v.unit == "status" else 1
    ch = v.change if v.change is not None else 0.0
    severity = -ch if v.verdict == REGRESSION else -abs(ch) if v.verdict == INCONCLUSIVE else ch  # biggest move first
    return (rank, status_first, severity, v.config, v.metric)


def _settings_text(mem_tol: float | None, time_tol: float, time_k: float, only: str | None) -> str:
    if mem_tol is None:
        mem_words = "memory: 0 on tracked/fake probes, 1% on cuda"
    else:
        mem_words = f"memory: {_pct(mem_tol)}"
    time_words = (f"time: max({_pct(time_tol)}, {time_k:g} x IQR/median) plus the host's noise, which must be "
                  "inside that band (else inconclusive), same device_name and torch only")
    return {"memory": f"{mem_words}; time not compared (--only memory)",
            "time": f"{time_words}; memory not compared (--only time)"}.get(only or "", f"{mem_words}; {time_words}")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_settings(mem_tol: float | None, time_tol: float, time_k: float) -> None:
    for name, v in (("mem_tol", mem_tol), ("time_tol", time_tol), ("time_k", time_k)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise UsageError(f"{name} must be a finite number >= 0, got {v!r}")


_UNTIMED_NOW = "not timed in current"


def _time_incomparable(b: Mapping[str, Any], c: Mapping[str, Any]) -> str | None:
    """None when step time is comparable; "" when neither side is timed; else the reason
    (`_UNTIMED_NOW` when only the current record lacks a finite time on the same machine)."""
    bt = _finite(b.get(TIME_METRIC)) is not None and (b.get("steps_timed") or 0) > 0
    ct = _finite(c.get(TIME_METRIC)) is not None and (c.get("steps_timed") or 0) > 0
    if not bt and not ct:
        return ""
    if not bt:
        return "not timed in baseline"
    for col, what in (("device_name", "device"), ("torch", "torch version")):
        if b.get(col) != c.get(col):
            return f"{what} differs: {b.get(col)!r} vs {c.get(col)!r}"
    return None if ct else _UNTIMED_NOW


# --------------------------------------------------------------------------------------
# render


def _pct(x: float, signed: bool = False) -> str:
    if math.isinf(x):
        return "+inf%" if x > 0 else "-inf%"
    p = x * 100
    s = "+" if signed and p > 0 else ""
    if p == 0:
        return "0%" if not signed else "0%"
    if abs(p) >= 10:
        body = f"{p:.1f}".rstrip("0").rstrip(".")
    elif abs(p) >= 0.01:
        body = f"{p:.2f}".rstrip("0").rstrip(".")
    else:
        body = f"{p:.2g}"
    return f"{s}{body}%"


def _value(v: Verdict, x: Any) -> str:
    if v.unit == "bytes" or (v.unit == "missing" and isinstance(x, int)):
        return fmt_bytes(x)
    if v.unit == "ms":
        return fmt_ms(x)
    return str(x)


def _change(v: Verdict) -> str:
    if v.unit not in ("bytes", "ms"):
        return v.detail[:80] if v.detail else ""
    d = v.delta or 0
    mag = fmt_bytes(abs(d)) if v.unit == "bytes" else fmt_ms(abs(d))
    dtxt = ("+" if d > 0 else "-" if d < 0 else "") + mag
    return f"{_pct(v.change or 0.0, signed=True)} ({dtxt})"


def _allowed(v: Verdict) -> str:
    if v.allowed is None:
        return ""
    s = f"+/-{_pct(v.allowed)}" if v.allowed else "exact"
    return f"{s} ({v.detail})" if v.detail else s


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _list_configs(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def render(result: GateResult) -> str:
    """The verdict as markdown: headline, table of changes (worst first), then the lists."""
    r = result
    n_reg, n_imp, n_same = len(r.regressions), len(r.improvements), len(r.unchanged)
    if r.passed:
        head = "PASS"
    else:
        parts = []
        if n_reg:
            parts.append(f"{n_reg} regression{'s' * (n_reg != 1)}")
        if r.missing:
            parts.append(f"{len(r.missing)} config{'s' * (len(r.missing) != 1)} missing in current")
        head = "FAIL: " + ", ".join(parts)
    lines = [
        f"## multiopt gate: {head}",
        "",
        f"Baseline `{r.baseline_label}` ({r.n_baseline} configs) vs current `{r.current_label}` "
        f"({r.n_current} configs). Tolerances: {r.settings}.",
        "",
    ]
    # an inconclusive time verdict is shown where the change would have been one
    changed = [v for v in r.verdicts if v.verdict != UNCHANGED
               and not (v.verdict == INCONCLUSIVE and abs(v.change or 0.0) <= (v.allowed or 0.0))]
    if changed:
        lines += [
            "| config | metric | old | new | change | allowed | verdict |",
            "|---|---|--:|--:|--:|--:|---|",
        ]
        for v in changed:
            verdict = {REGRESSION: "**REGRESSION**", INCONCLUSIVE: f"inconclusive (host noise {_pct(v.noise or 0.0)})"
                       }.get(v.verdict, v.verdict)
            cells = (v.config, v.metric, _value(v, v.old), _value(v, v.new), _change(v), _allowed(v), verdict)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    n_cfg = len({v.key for v in r.verdicts})
    n_inc = len(r.inconclusive)
    lines.append(
        f"{n_reg} regression{'s' * (n_reg != 1)}, {n_imp} improvement{'s' * (n_imp != 1)}, "
        + (f"{n_inc} step time{'s' * (n_inc != 1)} inconclusive, " if n_inc else "")
        + f"{n_same} metric{'s' * (n_same != 1)} unchanged, over {n_cfg} config{'s' * (n_cfg != 1)} present on both sides."
    )
    if n_inc:
        lines += ["", inconclusive_note([v.noise or 0.0 for v in r.inconclusive])]
    if r.missing:
        lines += ["", f"### Missing in current ({len(r.missing)}; fails the gate)", ""]
        lines += [f"- `{m.config}` (baseline status {m.status})" for m in r.missing]
    if r.new:
        lines += ["", f"### New in current ({len(r.new)}; not in the baseline, passes)", ""]
        lines += [f"- `{m.config}` (status {m.status})" for m in r.new]
    if r.not_compared:
        lines += ["", f"### Not compared ({len(r.not_compared)})", ""]
        grouped: dict[tuple[str, str], list[str]] = {}
        for nc in r.not_compared:
            grouped.setdefault((nc.metric, nc.reason), []).append(nc.config)
        for (metric, reason), cfgs in grouped.items():
            what = "all metrics" if metric == "*" else metric
            lines.append(f"- {what}: {reason}: {_list_configs(cfgs)}")
    if r.notes:
        lines += [""] + [f"Note: {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# CLI side: loading, printing, summary, baseline update


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


def load_records(*paths: str | os.PathLike) -> pd.DataFrame:
    """Records from run dirs, JSONL files or pytest-benchmark JSON, via `frame.load`."""
    return load(*paths)


def _records_for_baseline(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows back to plain Record dicts (schema columns only, JSON-clean values)."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(rec.Record)}
    out = []
    for row in df.to_dict(orient="records"):
        d: dict[str, Any] = {}
        for name in rec.FIELDS:
            v = _plain(row.get(name)) if name in row else dataclasses.fields(rec.Record)[rec.FIELDS.index(name)].default
            if isinstance(v, float) and hints[name].startswith("int") and v.is_integer():
                v = int(v)
            elif isinstance(v, int) and not isinstance(v, bool) and hints[name].startswith("float"):
                v = float(v)  # _py turned an integral float into an int; keep the schema's type
            d[name] = v
        d["schema"] = d.get("schema") or rec.SCHEMA
        out.append(d)
    return out


def write_baseline(path: str | os.PathLike, df: pd.DataFrame) -> int:
    """Replace `path` with the records of `df` as JSONL, atomically. Returns the record count."""
    path = Path(path)
    rows = _records_for_baseline(df)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(path, rows)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the baseline ({e.strerror})") from None
    return len(rows)


def _append_summary(path: str | os.PathLike, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise UsageError(f"{path}: cannot write the summary ({e.strerror})") from None


def run_gate(
    baseline: str | os.PathLike,
    current: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    mem_tol: float | None = None,
    time_tol: float = 0.10,
    time_k: float = 3.0,
    update_baseline: bool = False,
    only: str | None = None,
    summary: str | os.PathLike | None = None,
    stdout: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The `multiopt gate` command. Returns the exit code; bad input raises UsageError.

    The markdown goes to `stdout` and is appended to `summary`, or, when that is None, to
    `$GITHUB_STEP_SUMMARY` when that is set.
    """
    out = stdout if stdout is not None else sys.stdout
    env = os.environ if environ is None else environ
    currents = [current] if isinstance(current, (str, os.PathLike)) else list(current)
    if not currents:
        raise UsageError("--current: give at least one results file or run directory")
    _check_settings(mem_tol, time_tol, time_k)
    cur_label = ", ".join(str(p) for p in currents)

    if update_baseline and not Path(baseline).exists():
        n = write_baseline(baseline, load_records(*currents))
        print(f"multiopt gate: no baseline at {baseline}; wrote {n} records from {cur_label} as the new baseline", file=out)
        return 0

    baseline_df = load_records(baseline)
    current_df = load_records(*currents)
    result = compare(baseline_df, current_df, mem_tol=mem_tol, time_tol=time_tol, time_k=time_k, only=only)
    result = dataclasses.replace(result, baseline_label=str(baseline), current_label=cur_label)
    text = render(result)
    print(text, file=out, end="")
    target = summary if summary is not None else env.get("GITHUB_STEP_SUMMARY") or None
    if target:
        _append_summary(target, text)

    if update_baseline:
        n = write_baseline(baseline, current_df)
        msg = (f"multiopt gate: baseline updated: wrote {n} records from {cur_label} to {baseline} "
               f"(the verdict above is against the old baseline; commit the new file)")
        print(msg, file=out)
        if target:
            _append_summary(target, msg)
        return 0
    return result.exit_code
