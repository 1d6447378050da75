"""DataFrame -> markdown report (tabulate pipe tables) + PNG plots beside it.

`render(df, plots)` is a pure function of a `frame.load` DataFrame (and the relative paths
of plot files to link): header, headline, per-optimizer, phase, peak breakdown, batch
scaling, expected-vs-measured, implementation and failure sections. Numbers are in human
units (KiB/MiB/GiB, ms/us); the raw bytes are in the DataFrame, which `write_report` also
saves as CSV beside the markdown.

Rows are named by `frame.series_labels`: the combo, plus any config column (impl,
zero_grad_at, dtype, ...) that differs from the run's usual value, so no record is hidden
and no two rows of a table silently merge. Where a table has one cell per (series, width,
batch) and a run holds the same config twice (two runs loaded together are told apart by
``run=``), the last record wins.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from tabulate import tabulate

from ..record import PHASES, Record, phase_order
from .frame import by_optimizer, load, series_labels
from .plot import breakdown_rows, make_plots
from ..units import fmt_bytes, fmt_ms

__all__ = ["render", "write_report", "default_output", "CHECK"]

CHECK = "✓"
_PHASE_TITLES = {"zero_grad": "zero_grad", "forward": "forward", "backward": "backward", "step": "step"}


# --------------------------------------------------------------------------- formatting


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _b(v: Any) -> str:
    return "-" if _nan(v) else fmt_bytes(float(v))


def _signed_b(v: Any) -> str:
    if _nan(v):
        return "-"
    return ("+" if v > 0 else "") + fmt_bytes(float(v)) if v != 0 else "0 B"


def _ratio(v: Any) -> str:
    return "-" if _nan(v) else f"{float(v):.2f}x"


def _num(v: Any, digits: int = 2) -> str:
    return "-" if _nan(v) else f"{float(v):.{digits}f}"


def _ms(v: Any) -> str:
    return "-" if _nan(v) else fmt_ms(float(v))


def _int(v: Any) -> str:
    return "-" if _nan(v) else f"{int(v):,}"


def _cell(v: Any) -> str:
    """Any value as one table cell: no pipes or newlines to break the row."""
    s = "" if _nan(v) else str(v)
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ").strip()


_NUMERIC = re.compile(r"^[-+]?[\d,.]+( ?[A-Za-z%]+)?( \(.*\))?$|^-$|^(ok|oom|diverged|error)$|^" + "\u2713" + "$")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A pipe table of preformatted cells; a column whose cells all read as numbers is right-aligned."""
    rows = [[_cell(c) for c in r] for r in rows]
    align = []
    for i in range(len(headers)):
        col = [r[i] for r in rows if r[i] != ""]
        align.append("right" if col and all(_NUMERIC.match(c) for c in col) else "left")
    return tabulate(rows, headers=[_cell(h) for h in headers], tablefmt="pipe", disable_numparse=True, colalign=align)


def _width_sort(values: Iterable[Any]) -> list[Any]:
    return sorted(pd.unique(pd.Series(list(values))), key=lambda v: (_nan(v), v if not _nan(v) else 0))


# --------------------------------------------------------------------------- sections


def _unique(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for v in values:
        if _nan(v) or v == "":
            continue
        s = str(v)
        if s not in out:
            out.append(s)
    return out


def _header(df: pd.DataFrame) -> str:
    envs = list(df.attrs.get("env") or [])

    def facts(env_key: str, col: str | None = None) -> str:
        vals = [e.get(env_key) for e in envs]
        if col and col in df.columns:
            vals += list(df[col])
        u = _unique(vals)
        return ", ".join(u) if u else "unknown"

    created = _unique(df["created_at"]) if "created_at" in df.columns else []
    created += [c for c in _unique(e.get("created_at") for e in envs) if c not in created]
    when = "unknown"
    if created:
        s = sorted(created)
        when = s[0] if len(s) == 1 else f"{s[0]} to {s[-1]}"
    cuda = _unique(e.get("cuda") for e in envs)
    cuda_s = ", ".join(cuda) if cuda else ("none (CPU)" if all(str(d).startswith("cpu") for d in df.get("device", [])) else "unknown")
    counts = df["status"].value_counts()
    status = ", ".join(f"{int(counts[s])} {s}" for s in ("ok", "oom", "diverged", "error") if s in counts)
    others = [s for s in counts.index if s not in ("ok", "oom", "diverged", "error")]
    status += "".join(f", {int(counts[s])} {s}" for s in others)
    sources = _unique(e.get("source") for e in envs) or _unique(df.get("source", []))
    lines = [
        "# multiopt report",
        "",
        f"- **When:** {when}",
        f"- **Device:** {facts('device_name', 'device_name')} ({facts('device', 'device')})",
        f"- **torch:** {facts('torch', 'torch')}; **CUDA:** {cuda_s}",
        f"- **CPU:** {facts('cpu')}",
        f"- **Git sha:** {facts('git_sha', 'git_sha')}",
        f"- **Probe:** {facts('probe', 'probe')}; **preset:** {facts('preset', 'preset')}",
        f"- **Records:** {len(df)} ({status})" if len(df) else "- **Records:** 0",
    ]
    if sources:
        lines.append(f"- **Sources:** {', '.join(f'`{s}`' for s in sources)}")
    return "\n".join(lines)


def _section(title: str, body: str) -> str:
    return f"## {title}\n\n{body}"


def _image(plots: dict[str, str] | None, key: str, alt: str) -> str:
    if not plots or key not in plots:
        return ""
    return f"\n\n![{alt}]({plots[key]})"


def _last_per(ok: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return ok.drop_duplicates(keys, keep="last")


def _first_per(ok: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The smallest-batch record per key, keys in order of first appearance."""
    order = {k: i for i, k in enumerate(dict.fromkeys(zip(*(ok[k] for k in keys))))}
    rank = pd.Series([order[k] for k in zip(*(ok[k] for k in keys))], index=ok.index)
    return (ok.assign(_rank=rank).sort_values(["_rank", "batch"], kind="stable")
            .drop_duplicates(keys, keep="first").drop(columns="_rank"))


def _peak_vs_sgd(r: pd.Series) -> str:
    if _nan(r["peak_overhead_vs_sgd"]):
        return "-"
    return f"{_signed_b(r['peak_overhead_vs_sgd'])} ({_ratio(r['peak_ratio_vs_sgd'])})"


def _headline(df: pd.DataFrame, ok: pd.DataFrame, plots: dict[str, str] | None) -> str:
    widths = _width_sort(ok["width"])
    metrics = [
        ("state B/param", lambda r: _num(r["state_bytes_per_param"])),
        ("state/weights", lambda r: _ratio(r["state_weight_ratio"])),
        ("state vs SGD", lambda r: _signed_b(r["state_overhead_vs_sgd"])),
        ("peak", lambda r: _b(r["peak_total"])),
        ("peak vs SGD", _peak_vs_sgd),
        ("step", lambda r: _ms(r["step_ms_median"])),
    ]
    labels = series_labels(df)
    allrec = df.assign(_label=labels)
    cells = _last_per(ok, ["_label", "batch", "width"]).set_index(["_label", "batch", "width"])
    failed = (allrec[allrec["status"] != "ok"].drop_duplicates(["_label", "batch", "width"], keep="last")
              .set_index(["_label", "batch", "width"])["status"])
    order = list(dict.fromkeys(ok["_label"]))
    keys = [k for k in dict.fromkeys(zip(allrec["_label"], allrec["batch"])) if k[0] in order]
    keys.sort(key=lambda k: (order.index(k[0]), k[1]))
    headers = ["combo", "batch"] + [f"{m} w={w}" for m, _f in metrics for w in widths]
    rows = []
    for label, batch in keys:
        row: list[Any] = [label, batch]
        for m, fmt in metrics:
            for w in widths:
                key = (label, batch, w)
                if key in cells.index:
                    row.append(fmt(cells.loc[key]))
                elif key in failed.index and m in ("peak", "step"):
                    row.append(failed.loc[key])
                else:
                    row.append("")
        rows.append(row)
    note = (
        "Optimizer state in requested bytes (exact storage sizes); B/param excludes per-tensor "
        "scalars such as Adam's `step`. Peak = the step's highest allocated memory (max over phases). "
        "SGD columns compare with the plain-SGD record of the same config (`-`: the run has none). "
        "A failed config shows its status (oom, diverged, error) under peak and step."
    )
    return _section("Headline", note + "\n\n" + _table(headers, rows)
                    + _image(plots, "state_vs_params", "optimizer state vs parameter count")
                    + _image(plots, "step_time_vs_width", "step time vs width"))


def _per_optimizer(df: pd.DataFrame, ok: pd.DataFrame) -> str:
    rec = _first_per(ok, ["_label", "width"])
    opt = by_optimizer(rec)
    if opt.empty:
        return _section("Per optimizer", "No per-optimizer state in these records.")
    labels = rec["_label"]
    totals = rec["n_params"]
    rows = []
    for _, o in opt.iterrows():
        total = totals.loc[o["record"]]
        share = "-" if _nan(total) or not total or _nan(o["n_params"]) else f"{100.0 * o['n_params'] / total:.1f}%"
        rows.append([
            labels.loc[o["record"]], o["width"], o["name"], o["optimizer"], o.get("opt_impl", "") if not _nan(o.get("opt_impl")) else "",
            _int(o["n_params"]), share, _int(o.get("n_param_tensors")), _b(o["state_bytes"]),
            _num(o["state_bytes_per_param"]), _int(o["n_tensors"]), _b(o["state_alloc_bytes"]), _b(o["step_temp_bytes"]),
        ])
    headers = ["combo", "width", "rule", "optimizer", "impl", "params", "share", "param tensors", "state",
               "state B/param", "state tensors", "state allocated", "step temp"]
    note = "Who owns which parameters, and what their state costs (first ok record per combo and width; state does not depend on the batch)."
    return _section("Per optimizer", note + "\n\n" + _table(headers, rows))


def _phases(ok: pd.DataFrame) -> str:
    headers = ["combo", "width", "batch", "zero_grad_at"]
    for p in PHASES:
        headers += [f"{p} allocated", f"{p} peak"]
    headers += ["activations", "peak phase"]
    rows = []
    for _, r in ok.sort_values(["width", "batch"], kind="stable").iterrows():
        row: list[Any] = [r["_label"], r["width"], r["batch"], r["zero_grad_at"]]
        for p in PHASES:
            row += [_b(r[f"mem_after_{p}"]), _b(r[f"peak_{p}"])]
        row += [_b(r["activation_bytes"]), r["peak_phase"] if isinstance(r["peak_phase"], str) else "-"]
        rows.append(row)
    orders = "; ".join(f"zero_grad_at={z}: {', '.join(phase_order(z))}" for z in _unique(ok["zero_grad_at"]))
    note = (
        "Allocated memory after each phase and its peak (the peak counter is reset before each phase). "
        f"Execution order: {orders}. Activations = what forward left allocated."
    )
    return _section("Phases", note + "\n\n" + _table(headers, rows))


def _breakdown(ok: pd.DataFrame, plots: dict[str, str] | None) -> str:
    headers = ["combo", "width", "batch", "peak phase", "params", "grads", "state", "activations", "temporaries", "peak"]
    rows = []
    sub = breakdown_rows(ok)
    for _, r in sub.iterrows():
        rows.append([r["_label"], r["width"], r["batch"], r["peak_phase"], _b(r["peak_params"]), _b(r["peak_grads"]),
                     _b(r["peak_state"]), _b(r["peak_activations"]), _b(r["peak_temporaries"]), _b(r["peak_total"])])
    if not rows:
        return _section("What the peak is made of", "No ok record has per-phase peaks.")
    note = (
        "Each combo at its largest ok config. The step's peak, reached in the phase named, split into what was live then: params, grads "
        "(in backward/step, or when zero_grad keeps them), optimizer state (allocated), activations "
        "(in forward/backward) and temporaries (the rest: the phase's transient buffers, the batch, "
        "memory live before the model). In backward grads grow as activations shrink, so counting "
        "both in full over-states them; temporaries are floored at 0."
    )
    return _section("What the peak is made of", note + "\n\n" + _table(headers, rows)
                    + _image(plots, "peak_breakdown", "peak memory breakdown"))


def _batch_scaling(ok: pd.DataFrame, plots: dict[str, str] | None) -> str:
    batches = _width_sort(ok["batch"])
    if len(batches) < 2:
        return _section("Batch scaling", f"One batch size only ({batches[0] if batches else '-'}); nothing to scale.")
    cells = _last_per(ok, ["_label", "width", "batch"]).set_index(["_label", "width", "batch"])
    keys = list(dict.fromkeys(zip(ok["_label"], ok["width"])))
    order = list(dict.fromkeys(ok["_label"]))
    keys.sort(key=lambda k: (order.index(k[0]), k[1]))
    headers = ["combo", "width", "state"] + [f"peak b={b}" for b in batches] + [f"activations b={b}" for b in batches]
    rows = []
    for label, w in keys:
        got = [(label, w, b) in cells.index for b in batches]
        if sum(got) < 2:
            continue
        first = next(cells.loc[(label, w, b)] for b, g in zip(batches, got) if g)
        row: list[Any] = [label, w, _b(first["opt_state_bytes"])]
        row += [_b(cells.at[(label, w, b), "peak_total"]) if g else "" for b, g in zip(batches, got)]
        row += [_b(cells.at[(label, w, b), "activation_bytes"]) if g else "" for b, g in zip(batches, got)]
        rows.append(row)
    if not rows:
        return _section("Batch scaling", "No combo has ok records at two batch sizes.")
    note = "Peak memory against batch: activations grow with the batch, optimizer state does not."
    return _section("Batch scaling", note + "\n\n" + _table(headers, rows)
                    + _image(plots, "peak_vs_batch", "peak memory vs batch"))


def _expected(ok: pd.DataFrame) -> str:
    rec = _first_per(ok, ["_label", "width"])
    opt = by_optimizer(rec)
    rows = []
    for idx, r in rec.iterrows():
        exp, got = r["opt_state_expected"], r["opt_state_bytes"]
        if _nan(exp):
            verdict = "no formula"
        elif _nan(got):
            verdict = "not measured"
        elif int(got) == int(exp):
            verdict = CHECK
        else:
            diff = int(got) - int(exp)
            who = []
            for _, o in opt[opt["record"] == idx].iterrows():
                if not _nan(o["expected"]) and not _nan(o["state_bytes"]) and int(o["state_bytes"]) != int(o["expected"]):
                    who.append(f"{o['name']} {int(o['state_bytes']) - int(o['expected']):+d} B")
            verdict = f"{diff:+d} B" + (f" ({'; '.join(who)})" if who else "")
        rows.append([r["_label"], r["width"], _int(exp), _int(got), verdict])
    if not rows:
        return _section("Expected vs measured state", "No ok records.")
    note = (f"Measured optimizer state against the registry's formula, in bytes: {CHECK} when equal, "
            "else measured minus expected (and which optimizer differs).")
    return _section("Expected vs measured state", note + "\n\n"
                    + _table(["combo", "width", "expected (B)", "measured (B)", "check"], rows))


def _zero(ok: pd.DataFrame) -> str:
    """ZeRO-1 records next to the ZeRO paper's model: each rank holds state / ranks, give or
    take whole parameters (ZeroRedundancyOptimizer partitions by parameter)."""
    if "zero" not in ok.columns or not (ok["zero"] == 1).any():
        return ""
    twins = {(r["combo"], r["model"], r["width"], r["depth"], r["batch"], r["dtype"], r["impl"]): r
             for _, r in ok[ok["zero"] != 1].iterrows()}
    headers = ["combo", "width", "batch", "ranks", "unsharded state", "per rank", "model: state/ranks",
               "largest rank share", "ideal share", "peak, no ZeRO", "peak, rank 0"]
    rows = []
    for _, r in ok[ok["zero"] == 1].iterrows():
        per = [e.get("state_bytes") for e in (r.get("ranks_state") or [])]
        total, ranks = r.get("opt_state_unsharded"), int(r["ranks"])
        twin = twins.get((r["combo"], r["model"], r["width"], r["depth"], r["batch"], r["dtype"], r["impl"]))
        share = f"{max(per) / total:.3f}" if per and total else "-"
        rows.append([r["_label"], r["width"], r["batch"], ranks, _b(total), " / ".join(_b(x) for x in per),
                     _b(total / ranks) if total else "-", share, f"{1 / ranks:.3f}",
                     _b(twin["peak_total"]) if twin is not None else "-", _b(r["peak_total"])])
    note = ("Optimizer state under ZeRO-1 (`torch.distributed.optim.ZeroRedundancyOptimizer`): what each rank "
            "holds, against the ZeRO model (unsharded state / ranks). Partitions are whole parameters, so a "
            "rank can hold up to one tensor's state more than its ideal share.")
    return _section("ZeRO: optimizer state per rank", note + "\n\n" + _table(headers, rows))


def _implementations(df: pd.DataFrame, ok: pd.DataFrame) -> str:
    if ok["impl"].nunique() < 2:
        return ""
    base = series_labels(df.drop(columns=["impl"]).assign(impl="")).loc[ok.index]
    ok = ok.assign(_base=base)
    groups = []
    for key, g in ok.groupby(["_base", "width", "batch"], sort=False):
        if g["impl"].nunique() > 1:
            groups.append((key, g))
    if not groups:
        return _section("Implementations", "No config was measured with more than one implementation.")
    headers = ["combo", "width", "batch", "impl", "step peak", "step transient", "step temp (largest optimizer)", "peak", "step"]
    rows = []
    for (label, w, b), g in groups:
        for _, r in g.drop_duplicates("impl", keep="last").iterrows():
            rows.append([label, w, b, r["impl"], _b(r["peak_step"]), _b(r["transient_step"]),
                         _b(r["step_temp_bytes"]), _b(r["peak_total"]), _ms(r["step_ms_median"])])
    note = ("foreach / fused / forloop optimizer steps of the same config. Step transient = step peak "
            "minus memory before the step; step temp = the largest single optimizer's step temporaries.")
    return _section("Implementations", note + "\n\n" + _table(headers, rows))


def _failures(df: pd.DataFrame) -> str:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return ""
    labels = series_labels(df).loc[bad.index]
    rows = [[r["status"], labels.loc[i], r["width"], r["batch"], r["impl"], r["error"] if not _nan(r["error"]) else "(no message)"]
            for i, r in bad.iterrows()]
    return _section(f"Failures ({len(bad)})", _table(["status", "combo", "width", "batch", "impl", "message"], rows))


# --------------------------------------------------------------------------- public


def render(df: pd.DataFrame, plots: dict[str, str] | None = None) -> str:
    """The markdown report of a `frame.load` DataFrame; `plots` maps plot names
    (`plot.PLOTS` keys) to relative paths to link. Pure: same input, same text."""
    parts = [_header(df)]
    if len(df) == 0:
        parts.append("No records.")
        return "\n\n".join(parts) + "\n"
    ok = df[df["status"] == "ok"].copy()
    ok["_label"] = series_labels(df).loc[ok.index]
    if ok.empty:
        counts = df["status"].value_counts()
        parts.append(f"No ok records: all {len(df)} configs failed "
                     f"({', '.join(f'{int(n)} {s}' for s, n in counts.items())}); nothing to tabulate.")
        parts.append(_failures(df))
        return "\n\n".join(p for p in parts if p) + "\n"
    parts += [
        _headline(df, ok, plots),
        _per_optimizer(df, ok),
        _phases(ok),
        _breakdown(ok, plots),
        _batch_scaling(ok, plots),
        _expected(ok),
        _implementations(df, ok),
        _zero(ok),
        _failures(df),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def default_output(first: str | Path) -> Path:
    """report.md beside the first run: inside a run directory, else beside the file."""
    first = Path(first)
    return (first if first.is_dir() else first.parent) / "report.md"


def write_report(paths: Sequence[str | Path] | str | Path, out: str | Path | None = None) -> Path:
    """Load `paths`, write PNG plots and `<stem>.csv` (every column, raw bytes) beside `out`,
    render the markdown to `out`; returns `out`. `out` defaults to `default_output`."""

    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    df = load(*paths)
    out = Path(out) if out is not None else default_output(paths[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    made = make_plots(df, out.parent, stem=out.stem)
    links = {name: p.path.name for name, p in made.items()}
    text = render(df, links)
    csv = out.with_suffix(".csv")
    df.to_csv(csv, index=False)
    text += f"\nRaw data (every column, bytes and ms): [{csv.name}]({csv.name})\n"
    out.write_text(text, encoding="utf-8")
    return out


# --------------------------------------------------------------------------- one record


def record_text(record: Record) -> str:
    """One record as a person reads it (`multiopt measure`): every field with human units
    and raw numbers, then one row per optimizer."""
    rows = []
    for k, v in record.to_dict().items():
        if k in ("optimizers", "ranks_state"):
            continue
        if isinstance(v, int) and not isinstance(v, bool) and (k.startswith(("mem_", "peak_")) or k.endswith("_bytes") or k == "opt_state_expected"):
            rows.append((k, fmt_bytes(v), f"{v:,}"))
        elif isinstance(v, float) and k.startswith("step_ms"):
            rows.append((k, fmt_ms(v), f"{v:.4f}"))
        else:
            rows.append((k, "" if v is None else v, ""))
    text = tabulate(rows, headers=["field", "value", "raw"], tablefmt="github", disable_numparse=True)
    if record.optimizers:
        text += "\n\n" + tabulate(
            [(o.name, o.optimizer, o.impl, f"{o.n_params:,}", fmt_bytes(o.state_bytes), f"{o.state_bytes:,}",
              "-" if o.expected is None else f"{o.expected:,}", fmt_bytes(o.step_temp_bytes)) for o in record.optimizers],
            headers=["optimizer", "class", "impl", "params", "state", "state bytes", "expected bytes", "step temporaries"],
            tablefmt="github", disable_numparse=True,
        )
    return text
