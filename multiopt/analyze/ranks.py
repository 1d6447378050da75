"""Per rank: what each rank of an FSDP record holds, phase by phase, for the report and its plot.

An FSDP record (config ``fsdp > 1``) carries one row per rank in ``ranks_state``
(`record.RankRecord`): the rank's sharded parameters and gradients, its optimizer state (per
optimizer), its phase peaks, and FSDP2's own buffers per phase (unsharded parameters live, the
all-gather staging buffers, the reduce-scatter inputs). Ranks whose numbers are all equal (the
fake probe's `same_as` copies, or ranks measured alike) are one `RankGroup`, so a table or a
plot grows with the kinds of rank, not with the sharding degree.

Pure functions of a `select.labelled_ok` DataFrame; nothing here formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from ..record import PHASES
from ..units import missing
from .select import largest

__all__ = ["RankGroup", "fsdp_records", "rank_groups", "ranks_text", "BUFFERS", "resident_parts", "rank_peak_phase"]

# FSDP2's own buffers, per phase they are measured in: (RankRecord field, phase, what it is)
BUFFERS: tuple[tuple[str, str, str], ...] = (
    ("unsharded_forward", "forward", "unsharded params"),
    ("unsharded_backward", "backward", "unsharded params"),
    ("all_gather_forward", "forward", "all-gather staging"),
    ("all_gather_backward", "backward", "all-gather staging"),
    ("reduce_scatter_backward", "backward", "reduce-scatter inputs"),
)
# What tells ranks apart: every field but the rank's own name and where its numbers came from
_NOT_COMPARED = ("rank", "same_as")


@dataclass(frozen=True)
class RankGroup:
    """Ranks whose rows hold the same numbers: `ranks` in order, `row` the first one's dict."""

    ranks: tuple[int, ...]
    row: Mapping[str, Any]


def fsdp_records(ok: pd.DataFrame) -> pd.DataFrame:
    """Per series (``_label``), its largest ok FSDP record with per-rank rows."""
    if "fsdp" not in ok.columns or "ranks_state" not in ok.columns:
        return ok.iloc[0:0]
    has_rows = ok["ranks_state"].map(lambda v: isinstance(v, (list, tuple)) and len(v) > 0)
    return largest(ok[(ok["fsdp"] > 1) & has_rows], ["_label"])


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = (set(a) | set(b)) - set(_NOT_COMPARED)
    return all(a.get(k) == b.get(k) for k in keys)


def rank_groups(rows: Sequence[Mapping[str, Any]]) -> list[RankGroup]:
    """The ranks' rows, ranks with equal numbers merged, in order of their first rank."""
    groups: list[tuple[list[int], Mapping[str, Any]]] = []
    for row in sorted(rows, key=lambda r: r.get("rank", 0)):
        for ranks, first in groups:
            if _same(first, row):
                ranks.append(int(row.get("rank", 0)))
                break
        else:
            groups.append(([int(row.get("rank", 0))], row))
    return [RankGroup(tuple(ranks), first) for ranks, first in groups]


def ranks_text(ranks: Sequence[int]) -> str:
    """0, 2-7: ranks as runs of consecutive numbers."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def resident_parts(row: Mapping[str, Any]) -> dict[str, float]:
    """What a rank holds through its optimizer step, all live together there: sharded params,
    sharded grads, each optimizer's (sharded) state; then the rest of the rank's peak
    (activations, FSDP's buffers, temporaries at that moment), floored at 0. The parts sum to
    the rank's peak wherever the first three fit under it."""
    parts = {"sharded params": _num(row.get("param_bytes")), "sharded grads": _num(row.get("grad_bytes"))}
    for o in row.get("by_optimizer") or ():
        parts[f"state: {o.get('name')}"] = _num(o.get("state_bytes"))
    held = sum(parts.values())
    parts["rest of the peak"] = max(_num(row.get("peak_total")) - held, 0.0)
    return parts


def rank_peak_phase(row: Mapping[str, Any]) -> str | None:
    """The phase whose peak is the rank's largest (None when no phase was measured)."""
    peaks = [(row.get(f"peak_{p}"), p) for p in PHASES if not missing(row.get(f"peak_{p}"))]
    return max(peaks, key=lambda vp: vp[0])[1] if peaks else None


def _num(v: Any) -> float:
    return 0.0 if missing(v) else float(v)
