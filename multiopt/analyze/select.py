"""Which records a report shows: bounded summaries of a run of any size.

A report's cost must follow what it shows, not how many records or distinct configs a run
holds (a week of nightly runs, a fine width sweep). So tables and plots show:

- per series, its largest config (widest, then largest batch), or a few widths/batches
  chosen evenly (`evenly`: always the smallest and the largest);
- at most `MAX_ROWS` rows per table and `MAX_SERIES` lines / `MAX_BARS` bars /
  `MAX_PANELS` panels per plot; the rest stays in the CSV and the report says so.

Seeds are repeats of one config (memory does not depend on the seed), so series are named
without them and, as for any repeated config, the last record wins.

``_label`` names a series across the whole run (`frame.series_labels`: combo plus what
differs from the run's usual config). ``_main`` marks a model's usual variant (default
impl, dtype, amp, zero_grad placement, ...): the rows of the summary tables, one per
(model, combo).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import pandas as pd

from ..kinds import Status
from .frame import series_labels

__all__ = ["MAX_ROWS", "MAX_SERIES", "MAX_BARS", "MAX_PANELS", "evenly", "labelled_ok", "largest", "cap",
           "main_model"]

MAX_ROWS = 40  # rows per table; a GitHub job summary stays readable
MAX_SERIES = 10  # lines per panel: one tab10 colour each, never repeated
MAX_BARS = 12  # bars per panel
MAX_PANELS = 3  # panels per plot

# Columns that tell a series apart but not a model's usual variant from its others.
_NOT_VARIANT = ("seed", "model", "depth", "source")


def evenly(values: Iterable[Any], k: int) -> list[Any]:
    """At most `k` of the sorted distinct `values`, evenly spaced, smallest and largest kept."""
    vals = sorted(pd.unique(pd.Series(list(values)).dropna()))
    if len(vals) <= k:
        return list(vals)
    if k <= 1:
        return [vals[-1]]
    idx = sorted({round(i * (len(vals) - 1) / (k - 1)) for i in range(k)})
    return [vals[i] for i in idx]


def labelled_ok(df: pd.DataFrame) -> pd.DataFrame:
    """The ok records with ``_label`` (series, seeds merged) and ``_main`` (the model's usual variant)."""
    ok = df[df["status"] == Status.OK].copy()
    ok["_label"] = series_labels(df.drop(columns=["seed"], errors="ignore")).loc[ok.index]
    ok["_main"] = False
    for _model, idx in df.groupby("model", sort=False).groups.items():
        sub = df.loc[idx].drop(columns=[c for c in _NOT_VARIANT if c in df.columns])
        variant = series_labels(sub)
        main = variant[variant == sub["combo"].astype(str)].index.intersection(ok.index)
        ok.loc[main, "_main"] = True
    return ok


def largest(ok: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per key, the largest config (widest, then largest batch; the last record of a repeat),
    keys in order of first appearance."""
    if ok.empty:
        return ok
    order = {k: i for i, k in enumerate(dict.fromkeys(zip(*(ok[k] for k in keys))))}
    rank = pd.Series([order[k] for k in zip(*(ok[k] for k in keys))], index=ok.index)
    best = ok.assign(_pos=range(len(ok))).sort_values(["width", "batch", "_pos"], kind="stable")
    best = best.groupby(list(keys), sort=False).tail(1)
    return best.assign(_rank=rank.loc[best.index]).sort_values("_rank", kind="stable").drop(columns=["_rank", "_pos"])


def main_model(ok: pd.DataFrame) -> Any:
    """The model most main records measure: the one line plots draw (widths differ per model)."""
    main = ok[ok["_main"]]
    return (main if not main.empty else ok)["model"].astype(str).value_counts(sort=False).idxmax()


def cap(rows: list[Any], limit: int = MAX_ROWS) -> tuple[list[Any], str]:
    """The first `limit` rows, and a sentence saying how many more the CSV holds."""
    if len(rows) <= limit:
        return rows, ""
    return rows[:limit], f"\n\nFirst {limit} of {len(rows)} rows; the rest are in the CSV."
