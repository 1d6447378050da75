"""Records -> a pandas DataFrame with derived columns.

`load(*paths)` reads run directories (``results.jsonl`` + optional ``env.json``), JSONL
files and pytest-benchmark JSON files (``--benchmark-json``) into one DataFrame, one row per
`Record` (`records_to_frame` builds it from Records in memory). Columns: every `Record` field
(in schema order), ``source`` (the file a row came from), and the derived columns below,
which are computed here and never stored.

Typing: an int field stays ``int64`` when no row has None there; a column with a None
(a failed config never measured it) becomes ``float64`` with NaN, so arithmetic and
comparisons never meet ``pd.NA``. Time fields are ``float64``; text fields are strings.

Derived columns (float64; NaN where an input is missing):

- ``state_bytes_per_param`` = (opt_state_bytes - opt_state_scalar_bytes) / n_params:
  the per-element state cost (Adam float32 -> 8.0, SGD -> 0.0, SGD momentum -> 4.0).
- ``state_weight_ratio`` = opt_state_bytes / param_bytes.
- ``state_overhead_vs_sgd`` = opt_state_bytes - twin's, ``peak_overhead_vs_sgd`` =
  peak_total - twin's, ``peak_ratio_vs_sgd`` = peak_total / twin's, where the twin is the
  record of the same source with the same config key except combo/rules and combo ==
  "sgd" (an ok one preferred). NaN without a twin.
- phases, in execution order: forward, backward, step, zero_grad when zero_grad_at ==
  "end"; zero_grad, forward, backward, step when "start". ``mem_before`` of a phase = the
  mem_after of the previous phase (``mem_step_start`` for the first).
  ``delta_<phase>`` = mem_after_<phase> - mem_before; ``transient_<phase>`` =
  peak_<phase> - mem_before; ``activation_bytes`` = delta_forward.
- peak breakdown (see `_peak_breakdown`): ``peak_phase`` (str), ``peak_params``,
  ``peak_grads``, ``peak_state``, ``peak_activations``, ``peak_temporaries``; the five
  sum to peak_total exactly for an ok record whose known parts fit under the peak.

`df.attrs["env"]` is a list of dicts, one per source: the run directory's env.json (or the
pytest-benchmark machine/commit info), plus ``source``.

`by_optimizer(df)` explodes the ``optimizers`` lists: one row per (record, optimizer).

Every function here is pure: no global state, no I/O except reading the given files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..kinds import Phase, Status
from ..record import (CONFIG_COLUMNS, FIELDS, OPTIMIZER_COLUMNS, PHASES, SERIES_COLUMNS, OptimizerRecord, Record,
                      phase_order, plain, scalar_types)
from ..store import Source, read_sources
from ..units import missing

__all__ = [
    "load",
    "records_to_frame",
    "by_optimizer",
    "add_derived",
    "PHASES",
    "phase_order",
    "INT_FIELDS",
    "FLOAT_FIELDS",
    "DERIVED_COLUMNS",
    "BY_OPTIMIZER_FIELDS",
    "TWIN_KEY",
    "PEAK_PARTS",
    "SERIES_COLUMNS",
    "series_labels",
    "from_sources",
    "source_names",
]

_FIELD_TYPES = scalar_types(Record)
INT_FIELDS: tuple[str, ...] = tuple(n for n, t in _FIELD_TYPES.items() if t is int)
FLOAT_FIELDS: tuple[str, ...] = tuple(n for n, t in _FIELD_TYPES.items() if t is float)

# Config key of the plain-SGD twin: every config column except the optimizer choice.
TWIN_KEY: tuple[str, ...] = tuple(c for c in CONFIG_COLUMNS if c not in OPTIMIZER_COLUMNS)
# The combo a twin has: plain SGD, the state-free baseline every overhead is measured against.
TWIN_COMBO = "sgd"

PEAK_PARTS: tuple[str, ...] = ("peak_params", "peak_grads", "peak_state", "peak_activations", "peak_temporaries")

DERIVED_COLUMNS: tuple[str, ...] = (
    "state_bytes_per_param",
    "state_weight_ratio",
    "state_overhead_vs_sgd",
    "peak_overhead_vs_sgd",
    "peak_ratio_vs_sgd",
    *(f"delta_{p}" for p in PHASES),
    *(f"transient_{p}" for p in PHASES),
    "activation_bytes",
    "peak_phase",
    *PEAK_PARTS,
)

BY_OPTIMIZER_FIELDS: tuple[str, ...] = (
    "name", "rule", "optimizer", "n_params", "n_tensors", "state_bytes",
    "state_scalar_bytes", "state_alloc_bytes", "expected", "step_temp_bytes",
)


def load(*paths: str | Path) -> pd.DataFrame:
    """Load run directories, JSONL files and pytest-benchmark JSON files into one DataFrame
    (see `store.read_sources` for what each may be and what is refused)."""
    return from_sources(read_sources(paths))


# --------------------------------------------------------------------------- frame


def from_sources(sources: Sequence[Source]) -> pd.DataFrame:
    """The frame of `store.read_sources`' sources: their records, each with its source, and
    one env dict per source (its env plus ``source``) in ``attrs["env"]``."""
    return records_to_frame([r for s in sources for r in s.records],
                            env=[{**s.env, "source": s.path} for s in sources],
                            sources=[s.path for s in sources for _ in s.records])


def records_to_frame(records: Iterable[Record | Mapping[str, Any]], env: list[dict[str, Any]] | None = None,
                     sources: Sequence[str | None] | None = None) -> pd.DataFrame:
    """Records -> typed DataFrame with derived columns (what `load` returns). `sources`: the
    file each record came from (None: unknown).

    A dict is read as a stored row (`Record.from_dict`: fields it lacks take their default,
    fields the schema does not know are dropped) and may name its ``source``."""
    items = list(records)
    if sources is None:
        sources = [r.get("source") if isinstance(r, Mapping) else None for r in items]
    recs = [r if isinstance(r, Record) else Record.from_dict(r) for r in items]
    data = {c: [plain(getattr(r, c)) for r in recs] for c in FIELDS}
    data["source"] = list(sources)
    df = pd.DataFrame(data, columns=[*FIELDS, "source"])
    for c in INT_FIELDS + FLOAT_FIELDS:
        df[c] = _numeric(df, c)
    df = add_derived(df)
    df.attrs["env"] = list(env or [])
    return df


def _numeric(df: pd.DataFrame, c: str) -> pd.Series:
    """Column `c` as int64 (no value missing) or float64 (NaN where missing); UsageError naming
    the source of the first value that is present but not a number."""
    num = pd.to_numeric(df[c], errors="coerce")
    bad = num.isna() & ~df[c].map(missing)
    if bad.any() or (df[c].map(type) == bool).any():
        i = df.index[bad | (df[c].map(type) == bool)][0]
        raise UsageError(f"{df.at[i, 'source'] or '?'}: field {c!r} holds {df.at[i, c]!r}, not a number; wrong schema?")
    if c in INT_FIELDS and len(num) and num.notna().all():
        return num.astype("int64")
    return num.astype("float64")


def _f(df: pd.DataFrame, col: str) -> pd.Series:
    return df[col].astype("float64")


def _div(a: pd.Series, b: pd.Series) -> pd.Series:
    b = b.where(b != 0)
    return a / b


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of `df` (Record columns) with the derived columns added."""
    df = df.copy()
    df["state_bytes_per_param"] = _div(_f(df, "opt_state_bytes") - _f(df, "opt_state_scalar_bytes"), _f(df, "n_params"))
    df["state_weight_ratio"] = _div(_f(df, "opt_state_bytes"), _f(df, "param_bytes"))
    _add_twin(df)
    _add_phases(df)
    _peak_breakdown(df)
    return df


def _add_twin(df: pd.DataFrame) -> None:
    """Overheads against the plain-SGD twin: same source and TWIN_KEY, combo == 'sgd'."""
    key = ["source", *TWIN_KEY]
    sgd = df[df["combo"] == TWIN_COMBO].copy()
    # several sgd candidates for one key (a re-run): prefer an ok one, then the latest
    sgd["_ok"] = (sgd["status"] == Status.OK).astype(int)
    sgd["_pos"] = np.arange(len(sgd))
    sgd = sgd.sort_values(["_ok", "_pos"], kind="stable").drop_duplicates(key, keep="last")
    twin = sgd[key + ["opt_state_bytes", "peak_total"]].rename(
        columns={"opt_state_bytes": "_twin_state", "peak_total": "_twin_peak"}
    )
    left = df[key].copy()
    left["_row"] = np.arange(len(df))
    m = left.merge(twin, on=key, how="left", sort=False).sort_values("_row")
    twin_state = pd.Series(m["_twin_state"].to_numpy(dtype="float64"), index=df.index)
    twin_peak = pd.Series(m["_twin_peak"].to_numpy(dtype="float64"), index=df.index)
    df["state_overhead_vs_sgd"] = _f(df, "opt_state_bytes") - twin_state
    df["peak_overhead_vs_sgd"] = _f(df, "peak_total") - twin_peak
    df["peak_ratio_vs_sgd"] = _div(_f(df, "peak_total"), twin_peak)


def _add_phases(df: pd.DataFrame) -> None:
    start = df["zero_grad_at"] == "start"
    for p in PHASES:
        df[f"delta_{p}"] = np.nan
        df[f"transient_{p}"] = np.nan
    for is_start, idx in ((True, df.index[start]), (False, df.index[~start])):
        if len(idx) == 0:
            continue
        sub = df.loc[idx]
        before = _f(sub, "mem_step_start")
        for p in phase_order("start" if is_start else "end"):
            after = _f(sub, f"mem_after_{p}")
            df.loc[idx, f"delta_{p}"] = after - before
            df.loc[idx, f"transient_{p}"] = _f(sub, f"peak_{p}") - before
            before = after
    df["activation_bytes"] = df[f"delta_{Phase.FORWARD}"]


def _peak_breakdown(df: pd.DataFrame) -> None:
    """Decompose peak_total into what was live when the step reached it.

    The decomposed peak is ``peak_total``, reached in ``peak_phase``: the first phase, in
    execution order, whose ``peak_<phase>`` equals peak_total. Its parts:

    - ``peak_params`` = param_bytes, ``peak_state`` = opt_state_alloc_bytes: live all step
      (the state exists after warm-up).
    - ``peak_grads`` = grad_bytes when the peak is in backward or step (the grads are being
      built, or are complete); in forward or zero_grad only when zero_grad did not free
      them (delta_zero_grad > -grad_bytes, i.e. zero_grad(set_to_none=False)), else 0.
    - ``peak_activations`` = activation_bytes (what forward left live for backward) when
      the peak is in forward or backward, else 0 (backward freed the graph).
    - ``peak_temporaries`` = peak_total minus the four above, floored at 0: the phase's
      transient buffers (autograd temporaries, foreach/fused step intermediates), the
      input batch, and mem_base (what was live before the model was built).

    In backward the grads grow while the activations shrink, so counting both in full
    over-states them and the temporaries absorb the difference (floored at 0); the
    breakdown is exact at a step peak, where every part is fully live.
    """
    order_start = phase_order("start")
    order_end = phase_order("end")
    phase = []
    for zg, *peaks in df[["zero_grad_at", "peak_total", *(f"peak_{p}" for p in PHASES)]].itertuples(index=False):
        total, by_phase = peaks[0], dict(zip(PHASES, peaks[1:]))
        order = order_start if zg == "start" else order_end
        chosen = None
        if not missing(total):
            vals = [(p, by_phase[p]) for p in order if not missing(by_phase[p])]
            chosen = next((p for p, v in vals if v == total), None)
            if chosen is None and vals:
                chosen = max(vals, key=lambda pv: pv[1])[0]
        phase.append(chosen)
    df["peak_phase"] = pd.Series(phase, index=df.index, dtype="object")
    ph = df["peak_phase"]
    params = _f(df, "param_bytes")
    state = _f(df, "opt_state_alloc_bytes")
    grads_all = _f(df, "grad_bytes")
    grads_kept = _f(df, f"delta_{Phase.ZERO_GRAD}") > -grads_all
    grads = grads_all.where(ph.isin([Phase.BACKWARD, Phase.STEP]) | grads_kept, 0.0)
    acts = _f(df, "activation_bytes").where(ph.isin([Phase.FORWARD, Phase.BACKWARD]), 0.0)
    known = ph.notna()
    df["peak_params"] = params.where(known)
    df["peak_grads"] = grads.where(known)
    df["peak_state"] = state.where(known)
    df["peak_activations"] = acts.where(known)
    rest = _f(df, "peak_total") - params - grads - state - acts
    df["peak_temporaries"] = rest.clip(lower=0.0).where(known)


# --------------------------------------------------------------------------- naming


def source_names(df: pd.DataFrame) -> pd.Series:
    """Short name of each row's source: the run directory's name for a results.jsonl, else
    the file name; the full path where two sources would share a short name."""
    if "source" not in df.columns:
        return pd.Series([""] * len(df), index=df.index, dtype="object")
    full = df["source"].astype(str)
    uniq = list(pd.unique(full))
    short = {s: (Path(s).parent.name if Path(s).name == "results.jsonl" else Path(s).name) or s for s in uniq}
    if len(set(short.values())) < len(uniq):
        short = {s: s for s in uniq}
    return full.map(short)


def series_labels(df: pd.DataFrame) -> pd.Series:
    """A name per row for tables and plot legends: the combo, plus ``col=value`` for every
    `record.SERIES_COLUMNS` column (every config column but the combo, its rules, width and
    batch) whose value differs from that column's most common value in `df`
    (``adam (impl=foreach)``), plus ``run=NAME`` when `df` holds several sources.
    Column-wise string operations, so 10,000 rows take milliseconds."""
    bits = pd.Series([""] * len(df), index=df.index, dtype="object")
    for c in SERIES_COLUMNS:
        if c in df.columns and df[c].nunique(dropna=False) > 1:
            text = df[c].astype(str)
            mode = text.value_counts(sort=False).idxmax()
            bits = bits.where(text == mode, bits + ", " + c + "=" + text)
    if "source" in df.columns and df["source"].nunique() > 1:
        bits = bits + ", run=" + source_names(df).astype(str)
    combo = df["combo"].astype(str)
    bits = bits.str[2:]
    return combo.where(bits == "", combo + " (" + bits + ")").astype("object")


# --------------------------------------------------------------------------- per optimizer


def by_optimizer(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (record, optimizer) from the record's ``optimizers`` list.

    Columns: ``record`` (the index label of the record in `df`), the config columns,
    ``status``, ``run_id``, ``source``, then each optimizer's fields (name, rule,
    optimizer, n_params, n_tensors, state_bytes, state_scalar_bytes, state_alloc_bytes,
    expected, step_temp_bytes; None where an entry lacks one), then any other keys the
    entries carry (``n_param_tensors``, the resolved ``impl``, ...), renamed ``opt_<key>``
    where they would clash with a record column (``impl`` -> ``opt_impl``), and
    ``state_bytes_per_param`` = (state_bytes - state_scalar_bytes) / n_params. A record
    with no optimizer entries (a failed config) has no rows.
    """
    keep = [c for c in (*CONFIG_COLUMNS, "status", "run_id", "source") if c in df.columns]
    taken = set(keep) | {"record", *BY_OPTIMIZER_FIELDS, "state_bytes_per_param"}
    extras: dict[str, str] = {}  # JSON key -> column
    out: list[dict[str, Any]] = []
    for label, row in df.iterrows():
        items = row.get("optimizers")
        if not isinstance(items, (list, tuple)):
            continue  # a record read without its optimizers (a failed config)
        for item in items:
            rec = {"record": label}
            rec.update({c: row[c] for c in keep})
            for f in BY_OPTIMIZER_FIELDS:
                rec[f] = item.get(f)
            for k, v in item.items():
                if k in BY_OPTIMIZER_FIELDS:
                    continue
                if k not in extras:
                    extras[k] = f"opt_{k}" if k in taken else k
                rec[extras[k]] = v
            out.append(rec)
    cols = ["record", *keep, *BY_OPTIMIZER_FIELDS, *extras.values()]
    res = pd.DataFrame(out, columns=cols)
    columns = {f: f for f in BY_OPTIMIZER_FIELDS} | extras
    numeric = [columns[f] for f, t in scalar_types(OptimizerRecord).items() if t is int and f in columns]
    for c in numeric:
        num = pd.to_numeric(res[c], errors="coerce")
        res[c] = num.astype("int64") if len(num) and num.notna().all() else num.astype("float64")
    res["state_bytes_per_param"] = _div(_f(res, "state_bytes") - _f(res, "state_scalar_bytes"), _f(res, "n_params"))
    return res
