"""Render: a `GateResult` as markdown. Pure: the result in, the text out.

A headline (PASS, or FAIL and why), a table of every verdict that is not `unchanged` (worst
first, values in each metric's unit), a count, then the configs on one side only, what was
not compared and why, and the notes.
"""

from __future__ import annotations

from typing import Any, Sequence

from ...units import missing
from .compare import INCONCLUSIVE, REGRESSION, UNCHANGED, GateResult, Verdict, pct
from .noise import inconclusive_note, pct as noise_pct


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _value(v: Verdict, x: Any) -> str:
    return "-" if missing(x) else v.unit.show(x)


def _change(v: Verdict) -> str:
    if v.delta is None:
        return v.detail[:80] if v.detail else ""
    d = v.delta
    dtxt = ("+" if d > 0 else "-" if d < 0 else "") + v.unit.show(abs(d))
    return f"{pct(v.change or 0.0, signed=True)} ({dtxt})"


def _allowed(v: Verdict) -> str:
    if v.allowed is None:
        return ""
    s = f"+/-{pct(v.allowed)}" if v.allowed else "exact"
    return f"{s} ({v.detail})" if v.detail else s


def _outcome(v: Verdict) -> str:
    if v.verdict == INCONCLUSIVE:
        return f"inconclusive (host noise {noise_pct(v.noise or 0.0)})"
    return f"**{v.verdict.value.upper()}**" if v.verdict == REGRESSION else v.verdict.value


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _list_configs(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def headline(r: GateResult) -> str:
    """PASS, or FAIL and what fails it."""
    if r.passed:
        return "PASS"
    parts = [_plural(len(r.regressions), "regression")] if r.regressions else []
    if r.missing:
        parts.append(f"{_plural(len(r.missing), 'config')} missing in current")
    return "FAIL: " + ", ".join(parts)


def _table(r: GateResult) -> list[str]:
    # an inconclusive step time is listed where the change would have been a verdict
    changed = [v for v in r.verdicts if v.verdict != UNCHANGED
               and not (v.verdict == INCONCLUSIVE and abs(v.change or 0.0) <= (v.allowed or 0.0))]
    if not changed:
        return []
    lines = ["| config | metric | old | new | change | allowed | verdict |", "|---|---|--:|--:|--:|--:|---|"]
    for v in changed:
        cells = (v.config, v.metric, _value(v, v.old), _value(v, v.new), _change(v), _allowed(v), _outcome(v))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines + [""]


def _lists(r: GateResult) -> list[str]:
    lines = []
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
    return lines


def render(result: GateResult) -> str:
    """The verdict as markdown: headline, table of changes (worst first), then the lists."""
    r = result
    n_cfg = len({v.key for v in r.verdicts})
    lines = [
        f"## multiopt gate: {headline(r)}",
        "",
        f"Baseline `{r.baseline_label}` ({r.n_baseline} configs) vs current `{r.current_label}` "
        f"({r.n_current} configs). Tolerances: {r.settings}.",
        "",
        *_table(r),
        f"{_plural(len(r.regressions), 'regression')}, {_plural(len(r.improvements), 'improvement')}, "
        + (f"{_plural(len(r.inconclusive), 'step time')} inconclusive, " if r.inconclusive else "")
        + f"{_plural(len(r.unchanged), 'metric')} unchanged, over {_plural(n_cfg, 'config')} present on both sides.",
        *([""] + [inconclusive_note([v.noise or 0.0 for v in r.inconclusive])] if r.inconclusive else []),
        *_lists(r),
    ]
    return "\n".join(lines) + "\n"
