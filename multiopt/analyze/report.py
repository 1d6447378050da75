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

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from tabulate import tabulate

from ..kinds import Status
from ..record import KEY_COLUMNS, PHASES, UNSTEADY_WHY, phase_order
from ..store import read_records, read_sources
from .frame import TWIN_COMBO, by_optimizer, from_sources, series_labels
from .gate import GateResult, compare, headline
from .gate import render as gate_render
from .plot import breakdown_rows, make_plots
from .ranks import BUFFERS, fsdp_records, rank_groups, rank_peak_phase, ranks_text
from .select import MAX_ROWS, cap, evenly, labelled_ok, largest
from ..units import fmt_bytes, fmt_ms, missing

__all__ = ["render", "write_report", "default_output", "CHECK"]

CHECK = "✓"
_STEP_WIDTHS = 6  # widths in a step-time table
_DETAIL_WIDTHS = 2  # widths per series in a detail table: smallest and largest
_DETAIL_BATCHES = 2
_SCALE_BATCHES = 4  # batches in the batch-scaling table


# --------------------------------------------------------------------------- formatting


def _b(v: Any) -> str:
    return "-" if missing(v) else fmt_bytes(float(v))


def _signed_b(v: Any) -> str:
    if missing(v):
        return "-"
    return ("+" if v > 0 else "") + fmt_bytes(float(v)) if v != 0 else "0 B"


def _ratio(v: Any) -> str:
    return "-" if missing(v) else f"{float(v):.2f}x"


def _num(v: Any, digits: int = 2) -> str:
    return "-" if missing(v) else f"{float(v):.{digits}f}"


def _ms(v: Any) -> str:
    return "-" if missing(v) else fmt_ms(float(v))


def _int(v: Any) -> str:
    return "-" if missing(v) else f"{int(v):,}"


def _cell(v: Any) -> str:
    """Any value as one table cell: no pipes or newlines to break the row."""
    s = "" if missing(v) else str(v)
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ").strip()


_NUMERIC = re.compile(r"^[-+]?[\d,.]+( ?[A-Za-z%]+)?( \(.*\))?$|^-$|^(" + "|".join(Status.values()) + ")$|^" + CHECK + "$")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A pipe table of preformatted cells; a column whose cells all read as numbers is right-aligned."""
    rows = [[_cell(c) for c in r] for r in rows]
    align = []
    for i in range(len(headers)):
        col = [r[i] for r in rows if r[i] != ""]
        align.append("right" if col and all(_NUMERIC.match(c) for c in col) else "left")
    return tabulate(rows, headers=[_cell(h) for h in headers], tablefmt="pipe", disable_numparse=True, colalign=align)


# --------------------------------------------------------------------------- sections


def _unique(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for v in values:
        if missing(v) or v == "":
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
    status = ", ".join(f"{int(counts[s])} {s}" for s in Status.values() if s in counts)
    others = [s for s in counts.index if s not in Status.values()]
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


def _at_widths(ok: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per series, its smallest-batch record at `k` evenly chosen widths (state does not
    depend on the batch), series in order of first appearance."""
    rows = ok.sort_values("batch", kind="stable").drop_duplicates(["_label", "width"], keep="first")
    keep = [i for _l, g in rows.groupby("_label", sort=False) for i in g[g["width"].isin(evenly(g["width"], k))].index]
    order = {l: i for i, l in enumerate(dict.fromkeys(ok["_label"]))}
    out = rows.loc[keep]
    return out.assign(_o=out["_label"].map(order)).sort_values(["_o", "width"], kind="stable").drop(columns="_o")


def _vs_sgd(delta: Any, ratio: Any = None) -> str:
    if missing(delta):
        return "-"
    return _signed_b(delta) + ("" if ratio is None or missing(ratio) else f" ({_ratio(ratio)})")


def _summary(ok: pd.DataFrame, gate: Any) -> str:
    """Three sentences computed from the data, and the gate's verdict when given."""
    st = largest(ok[ok["_main"]], ["model", "combo"])
    lines = []
    named = st[st["state_weight_ratio"].notna()]
    if not named.empty:
        # ratios equal to three places (Adam on any model: 2.00x) are a tie: the larger state wins
        ranked = named.assign(_r=named["state_weight_ratio"].round(3)).sort_values(["_r", "opt_state_bytes"], kind="stable")
        r = ranked.iloc[-1]
        vs = "" if missing(r["state_overhead_vs_sgd"]) else f" ({_vs_sgd(r['state_overhead_vs_sgd'])} vs SGD)"
        lines.append(f"Largest state overhead: **{r['combo']}** ({r['model']}, width {r['width']}) keeps "
                     f"{_b(r['opt_state_bytes'])} of optimizer state, {_ratio(r['state_weight_ratio'])} its weights{vs}.")
    per = st[st["state_bytes_per_param"].notna() & (st["combo"] != TWIN_COMBO)]
    if not per.empty:
        low = per["state_bytes_per_param"].min()
        names = _unique(f"**{c}** ({m})" for c, m in per[per["state_bytes_per_param"] == low][["combo", "model"]].itertuples(index=False))
        lines.append(f"Cheapest per parameter besides plain SGD: {', '.join(names[:3])} at {low:.2f} B/param.")
    pk = st[st["peak_overhead_vs_sgd"].notna()]
    if not pk.empty:
        r = pk.loc[pk["peak_overhead_vs_sgd"].abs().idxmax()]
        lines.append(f"Biggest peak change vs SGD: **{r['combo']}** ({r['model']}, width {r['width']}, batch {r['batch']}) "
                     f"{_vs_sgd(r['peak_overhead_vs_sgd'], r['peak_ratio_vs_sgd'])}: {_b(r['peak_total'])}.")
    if gate is not None:
        lines.append(f"Gate against `{gate.baseline_label}`: **{headline(gate)}** (details under Gate).")
    return _section("Summary", " ".join(lines) if lines else "No ok record of a model's usual config.")


def _state(ok: pd.DataFrame, plots: dict[str, str] | None) -> str:
    st = largest(ok[ok["_main"]], ["model", "combo"])
    rows = [[r["model"], r["combo"], r["width"], _int(r["n_params"]), _b(r["opt_state_bytes"]),
             _num(r["state_bytes_per_param"]), _ratio(r["state_weight_ratio"]), _vs_sgd(r["state_overhead_vs_sgd"])]
            for _, r in st.iterrows()]
    rows, more = cap(rows)
    note = ("What each combo's optimizer state costs, at its largest width (state does not depend on the batch): "
            "requested bytes (exact storage sizes); B/param excludes per-tensor scalars such as Adam's `step`; "
            "vs SGD compares with the plain-SGD record of the same config (`-`: the run has none).")
    headers = ["model", "combo", "width", "params", "state", "B/param", "state/weights", "vs SGD"]
    return _section("Optimizer state", note + "\n\n" + _table(headers, rows) + more
                    + _image(plots, "state_per_param", "optimizer state per parameter"))


def _peak(ok: pd.DataFrame, plots: dict[str, str] | None) -> str:
    st = largest(ok[ok["_main"]], ["model", "combo"])
    slack = st["peak_reserved"].notna().any() if "peak_reserved" in st.columns else False
    headers = ["model", "combo", "width", "batch", "peak", "vs SGD", "peak phase"] + (["reserved", "slack"] if slack else [])
    rows = []
    for _, r in st.iterrows():
        row = [r["model"], r["combo"], r["width"], r["batch"], _b(r["peak_total"]),
               _vs_sgd(r["peak_overhead_vs_sgd"], r["peak_ratio_vs_sgd"]), r["peak_phase"] if isinstance(r["peak_phase"], str) else "-"]
        if slack:
            row += [_b(r["peak_reserved"]), _b(r["peak_reserved"] - r["peak_total"])]
        rows.append(row)
    rows, more = cap(rows)
    note = ("What each combo does to peak memory, at its largest ok config (widest, then largest batch): "
            "the step's highest allocated memory (max over phases), against the plain-SGD record of the same config."
            + (" Reserved = the caching allocator's peak reserved memory; slack = reserved - allocated." if slack else ""))
    return _section("Peak memory", note + "\n\n" + _table(headers, rows) + more
                    + _image(plots, "peak_breakdown", "peak memory breakdown")
                    + _image(plots, "peak_vs_batch", "peak memory vs batch"))


def _step_batch(main: pd.DataFrame) -> Any:
    """The batch a model's step-time table reads: the one timed at the most widths (largest on ties)."""
    n = main.groupby("batch")["width"].nunique()
    return max(n.index, key=lambda b: (n[b], b))


def _step_time(df: pd.DataFrame, ok: pd.DataFrame, plots: dict[str, str] | None) -> str:
    tables = []
    timed = ok[ok["_main"] & ok["step_ms_median"].notna()]
    failed = df[df["status"] != Status.OK]
    for model, main in timed.groupby("model", sort=False):
        batch = _step_batch(main)
        at = _last_per(main[main["batch"] == batch], ["combo", "width"]).set_index(["combo", "width"])
        gone = _last_per(failed[(failed["model"] == model) & (failed["batch"] == batch)], ["combo", "width"])
        gone = gone.set_index(["combo", "width"])["status"]
        widths = evenly(main[main["batch"] == batch]["width"], _STEP_WIDTHS)
        rows = []
        for combo in dict.fromkeys(main["combo"]):
            cells = [_ms(at.at[(combo, w), "step_ms_median"]) if (combo, w) in at.index
                     else gone.get((combo, w), "") for w in widths]
            rows.append([combo, batch, *cells])
        rows, more = cap(rows)
        tables.append(f"### {model}\n\n" + _table(["combo", "batch", *(f"w={w}" for w in widths)], rows) + more)
    if not tables:
        return _section("Step time", "No timed ok records.")
    note = (f"Median step time, at the batch timed at the most widths and up to {_STEP_WIDTHS} widths chosen evenly "
            "(every width is in the CSV). A failed config shows its status.")
    return _section("Step time", note + "\n\n" + "\n\n".join(tables)
                    + _image(plots, "step_time_vs_width", "step time vs width")
                    + _image(plots, "predicted_vs_measured", "predicted vs measured step time"))


def _per_optimizer(ok: pd.DataFrame) -> str:
    rec = _at_widths(ok, _DETAIL_WIDTHS)
    opt = by_optimizer(rec)
    if opt.empty:
        return _section("Per optimizer", "No per-optimizer state in these records.")
    rows = []
    for _, o in opt.iterrows():
        total = rec.at[o["record"], "n_params"]
        share = "" if missing(total) or not total or missing(o["n_params"]) else f" ({100.0 * o['n_params'] / total:.1f}%)"
        rows.append([
            rec.at[o["record"], "_label"], o["width"], o["name"], o["optimizer"], "" if missing(o.get("opt_impl")) else o.get("opt_impl"),
            _int(o["n_params"]) + share, _int(o.get("n_param_tensors")), _b(o["state_bytes"]),
            _num(o["state_bytes_per_param"]), _int(o["n_tensors"]), _b(o["state_alloc_bytes"]), _b(o["step_temp_bytes"]),
        ])
    rows, more = cap(rows)
    headers = ["combo", "width", "rule", "optimizer", "impl", "params (share)", "param tensors", "state",
               "B/param", "state tensors", "state allocated", "step temp"]
    note = (f"Who owns which parameters, and what their state costs, per series at up to {_DETAIL_WIDTHS} widths "
            "(smallest and largest; first ok record by batch: state does not depend on the batch).")
    return _section("Per optimizer", note + "\n\n" + _table(headers, rows) + more)


def _grid(ok: pd.DataFrame) -> pd.DataFrame:
    """Per series, the last record at up to _DETAIL_WIDTHS widths x _DETAIL_BATCHES batches chosen evenly."""
    last = _last_per(ok, ["_label", "width", "batch"])
    keep = []
    for _l, g in last.groupby("_label", sort=False):
        keep += list(g[g["width"].isin(evenly(g["width"], _DETAIL_WIDTHS))
                       & g["batch"].isin(evenly(g["batch"], _DETAIL_BATCHES))].index)
    return last.loc[keep].sort_values(["width", "batch"], kind="stable")


def _phases(ok: pd.DataFrame) -> str:
    grid = _grid(ok)
    key = lambda r: [r["_label"], r["width"], r["batch"]]  # noqa: E731
    peaks = [key(r) + [_b(r[f"peak_{p}"]) for p in PHASES] + [_b(r["activation_bytes"]),
             r["peak_phase"] if isinstance(r["peak_phase"], str) else "-"] for _, r in grid.iterrows()]
    after = [key(r) + [_b(r[f"mem_after_{p}"]) for p in PHASES] for _, r in grid.iterrows()]
    peaks, more = cap(peaks)
    after, _ = cap(after)
    orders = "; ".join(f"zero_grad_at={z}: {', '.join(phase_order(z))}" for z in _unique(ok["zero_grad_at"]))
    note = (f"Per series at up to {_DETAIL_WIDTHS} widths and {_DETAIL_BATCHES} batches (smallest and largest). "
            "The peak counter is reset before each phase. "
            f"Execution order: {orders}. Activations = what forward left allocated.")
    head = ["combo", "width", "batch"]
    return _section("Phases", note + "\n\n### Peak within each phase\n\n"
                    + _table(head + [f"{p} peak" for p in PHASES] + ["activations", "peak phase"], peaks) + more
                    + "\n\n### Allocated after each phase\n\n" + _table(head + [f"{p} allocated" for p in PHASES], after))


def _breakdown(ok: pd.DataFrame) -> str:
    sub = breakdown_rows(ok)
    if sub.empty:
        return _section("What the peak is made of", "No ok record has per-phase peaks.")
    slack = sub["peak_reserved"].notna().any() if "peak_reserved" in sub.columns else False
    headers = ["combo", "width", "batch", "peak phase", "params", "grads", "state", "activations", "temporaries", "peak"]
    headers += ["reserved", "slack"] if slack else []
    rows = []
    for _, r in sub.iterrows():
        row = [r["_label"], r["width"], r["batch"], r["peak_phase"], _b(r["peak_params"]), _b(r["peak_grads"]),
               _b(r["peak_state"]), _b(r["peak_activations"]), _b(r["peak_temporaries"]), _b(r["peak_total"])]
        rows.append(row + ([_b(r["peak_reserved"]), _b(r["peak_reserved"] - r["peak_total"])] if slack else []))
    rows, more = cap(rows)
    note = (
        "Each series at its largest ok config. The step's peak, reached in the phase named, split into what was live then: params, grads "
        "(in backward/step, or when zero_grad keeps them), optimizer state (allocated), activations "
        "(in forward/backward) and temporaries (the rest: the phase's transient buffers, the batch, "
        "memory live before the model). In backward grads grow as activations shrink, so counting "
        "both in full over-states them; temporaries are floored at 0."
    )
    return _section("What the peak is made of", note + "\n\n" + _table(headers, rows) + more)


def _batch_scaling(ok: pd.DataFrame) -> str:
    batches = evenly(ok["batch"], _SCALE_BATCHES)
    if len(batches) < 2:
        return _section("Batch scaling", f"One batch size only ({batches[0] if batches else '-'}); nothing to scale.")
    cells = _last_per(ok, ["_label", "width", "batch"]).set_index(["_label", "width", "batch"])
    keys = list(dict.fromkeys(zip(_at_widths(ok, _DETAIL_WIDTHS)["_label"], _at_widths(ok, _DETAIL_WIDTHS)["width"])))
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
        return _section("Batch scaling", "No combo has ok records at two of the batch sizes shown.")
    rows, more = cap(rows)
    note = (f"Peak memory against batch (up to {_SCALE_BATCHES} batches chosen evenly, per series at up to "
            f"{_DETAIL_WIDTHS} widths): activations grow with the batch, optimizer state does not.")
    return _section("Batch scaling", note + "\n\n" + _table(headers, rows) + more)


def _variants(ok: pd.DataFrame) -> str:
    """Series other than a model's usual config (dtype, impl, zero_grad placement, ...) at their largest config."""
    st = largest(ok[~ok["_main"]], ["_label"])
    if st.empty:
        return ""
    rows = [[r["_label"], r["width"], r["batch"], _b(r["opt_state_bytes"]), _num(r["state_bytes_per_param"]),
             _b(r["peak_total"]), _vs_sgd(r["peak_overhead_vs_sgd"], r["peak_ratio_vs_sgd"]), _ms(r["step_ms_median"])]
            for _, r in st.iterrows()]
    rows, more = cap(rows)
    note = ("Configs other than each model's usual one (another dtype, implementation, zero_grad placement, ...), "
            "each at its largest ok config; the summary tables above show only the usual ones.")
    headers = ["series", "width", "batch", "state", "B/param", "peak", "peak vs SGD", "step"]
    return _section("Variants", note + "\n\n" + _table(headers, rows) + more)


def _expected(ok: pd.DataFrame) -> str:
    rec = _at_widths(ok, _DETAIL_WIDTHS)
    opt = by_optimizer(rec)
    rows = []
    for idx, r in rec.iterrows():
        exp, got = r["opt_state_expected"], r["opt_state_bytes"]
        if missing(exp):
            verdict = "no formula"
        elif missing(got):
            verdict = "not measured"
        elif int(got) == int(exp):
            verdict = CHECK
        else:
            diff = int(got) - int(exp)
            who = []
            for _, o in opt[opt["record"] == idx].iterrows():
                if not missing(o["expected"]) and not missing(o["state_bytes"]) and int(o["state_bytes"]) != int(o["expected"]):
                    who.append(f"{o['name']} {int(o['state_bytes']) - int(o['expected']):+d} B")
            verdict = f"{diff:+d} B" + (f" ({'; '.join(who)})" if who else "")
        rows.append([r["_label"], r["width"], _int(exp), _int(got), verdict])
    if not rows:
        return _section("Expected vs measured state", "No ok records.")
    rows, more = cap(rows)
    note = (f"Measured optimizer state against the registry's formula, in bytes: {CHECK} when equal, "
            "else measured minus expected (and which optimizer differs).")
    return _section("Expected vs measured state", note + "\n\n"
                    + _table(["combo", "width", "expected (B)", "measured (B)", "check"], rows) + more)


def _attribution(ok: pd.DataFrame) -> str:
    """Optimizers whose state the walk and the allocation ledger disagree on (state held where
    the walk cannot see it), and steps measured eagerly though they run compiled on a GPU."""
    opt = by_optimizer(ok)
    if opt.empty:
        return ""
    gap = opt["state_gap_bytes"] if "state_gap_bytes" in opt.columns else pd.Series(0.0, index=opt.index)
    compiled = opt["compiled"] if "compiled" in opt.columns else pd.Series("", index=opt.index)
    flagged = opt[(pd.to_numeric(gap, errors="coerce").fillna(0) != 0) | compiled.fillna("").astype(str).ne("")]
    if flagged.empty:
        return ""
    labels = ok["_label"]
    rows = [[labels.get(r["record"], r["combo"]), r["width"], r["name"], _int(r["state_bytes"]),
             _int(r.get("state_attributed_bytes")), _signed_b(r.get("state_gap_bytes")) if not missing(r.get("state_gap_bytes")) else "-",
             r.get("compiled") or "-"] for _, r in flagged.iterrows()]
    rows, more = cap(rows)
    note = ("Each optimizer's state is counted twice on the tracked and fake probes: walked (every tensor "
            "reachable from the optimizer) and attributed (storages its construction and steps allocated "
            "that are still alive). A gap means state the walk cannot see (positive) or walked state "
            "allocated elsewhere (negative): the walked number is then not the whole truth. "
            "`eager-under-probe`: the step runs `torch.compile`d code, measured eagerly on the CPU probes.")
    return _section("Flagged: state attribution and compiled steps", note + "\n\n" + _table(
        ["combo", "width", "optimizer", "walked (B)", "attributed (B)", "gap", "compiled"], rows) + more)


def _unmodelled(ok: pd.DataFrame) -> str:
    """Configs measured for a CUDA target that ran ops whose CUDA allocations are not modelled:
    their numbers are estimates there, not CUDA's to the byte."""
    if "unmodelled" not in ok.columns:
        return ""
    flagged = ok[ok["unmodelled"].fillna("").astype(str).ne("")]
    if flagged.empty:
        return ""
    rows, more = cap([[r["_label"], r["model"], r["width"], r["batch"], r["unmodelled"]] for _, r in flagged.iterrows()])
    note = ("Measured with `--target cuda` on a CPU probe, these configs ran ops whose CUDA kernels keep or "
            "borrow different memory from the CPU kernel that ran (attention: CUDA picks flash, "
            "memory-efficient or cuDNN kernels by dtype, shape and GPU). Their memory numbers are the CPU "
            "kernels' with CUDA's allocator around them: not CUDA's to the byte.")
    return _section("Flagged: not modelled for CUDA", note + "\n\n"
                    + _table(["config", "model", "width", "batch", "not modelled"], rows) + more)


def _unsteady(ok: pd.DataFrame) -> str:
    """Configs whose measured step did not end where it started: their peaks may not repeat."""
    if "mem_step_end" not in ok.columns:
        return ""
    growth = pd.to_numeric(ok["mem_step_end"], errors="coerce") - pd.to_numeric(ok["mem_step_start"], errors="coerce")
    flagged = ok[growth.fillna(0).ne(0)]
    if flagged.empty:
        return ""
    rows, more = cap([[r["_label"], r["model"], r["width"], r["batch"], _b(r["mem_step_start"]), _b(r["mem_step_end"])]
                      for _, r in flagged.iterrows()])
    note = ("The measured step of these configs ended with a different amount allocated than it started "
            f"with: {UNSTEADY_WHY}. Their peaks may not repeat on the next step: rerun them with more "
            "`--warmup` steps.")
    return _section("Flagged: not steady", note + "\n\n"
                    + _table(["config", "model", "width", "batch", "allocated at step start", "at step end"], rows) + more)


# A ZeRO record's twin: the same config in one process (every key column but zero and ranks).
_ZERO_TWIN = tuple(c for c in KEY_COLUMNS if c not in ("zero", "ranks"))


def _zero(ok: pd.DataFrame) -> str:
    """ZeRO-1 records next to the ZeRO paper's model: each rank holds state / ranks, give or
    take whole parameters (ZeroRedundancyOptimizer partitions by parameter)."""
    if "zero" not in ok.columns or not (ok["zero"] == 1).any():
        return ""
    twins = {tuple(r[c] for c in _ZERO_TWIN): r for _, r in ok[ok["zero"] != 1].iterrows()}
    headers = ["combo", "width", "batch", "ranks", "unsharded state", "per rank", "model: state/ranks",
               "largest rank share", "ideal share", "peak, no ZeRO", "peak, rank 0"]
    # named as a series apart from ZeRO itself: the table's own columns say zero and ranks
    names = series_labels(ok.drop(columns=["zero", "ranks", "seed"]))
    rows = []
    for i, r in ok[ok["zero"] == 1].iterrows():
        per = [e.get("state_bytes") for e in (r.get("ranks_state") or [])]
        total, ranks = r.get("opt_state_unsharded"), int(r["ranks"])
        twin = twins.get(tuple(r[c] for c in _ZERO_TWIN))
        share = f"{max(per) / total:.3f}" if per and total else "-"
        rows.append([names[i], r["width"], r["batch"], ranks, _b(total), " / ".join(_b(x) for x in per),
                     _b(total / ranks) if total else "-", share, f"{1 / ranks:.3f}",
                     _b(twin["peak_total"]) if twin is not None else "-", _b(r["peak_total"])])
    rows, more = cap(rows)
    note = ("Optimizer state under ZeRO-1 (`torch.distributed.optim.ZeroRedundancyOptimizer`): what each rank "
            "holds, against the ZeRO model (unsharded state / ranks). Partitions are whole parameters, so a "
            "rank can hold up to one tensor's state more than its ideal share.")
    return _section("ZeRO: optimizer state per rank", note + "\n\n" + _table(headers, rows) + more)


def _rank_state(o: Any) -> str:
    return f"{o.get('name')} {_b(o.get('state_bytes'))}"


def _fsdp_held(fs: pd.DataFrame) -> list[list[Any]]:
    rows = []
    for _, r in fs.iterrows():
        for g in rank_groups(r["ranks_state"]):
            e = g.row
            state = ", ".join(_rank_state(o) for o in e.get("by_optimizer") or ()) or _b(e.get("state_bytes"))
            rows.append([r["_label"], r["width"], r["batch"], ranks_text(g.ranks), _b(e.get("param_bytes")),
                         _b(e.get("grad_bytes")), state, _b(e.get("mem_step_start")), _b(e.get("peak_total")),
                         rank_peak_phase(e) or "-"])
    return rows


def _fsdp_phases(fs: pd.DataFrame) -> list[list[Any]]:
    field = {(what, phase): f for f, phase, what in BUFFERS}
    rows = []
    for _, r in fs.iterrows():
        for g in rank_groups(r["ranks_state"]):
            for p in phase_order(str(r["zero_grad_at"])):
                buffers = [_b(g.row.get(field[w, p])) if (w, p) in field else "-" for w in _BUFFER_NAMES]
                rows.append([r["_label"], r["width"], r["batch"], ranks_text(g.ranks), p,
                             _b(g.row.get(f"peak_{p}")), *buffers])
    return rows


_BUFFER_NAMES = tuple(dict.fromkeys(w for _f, _p, w in BUFFERS))


def _fsdp(ok: pd.DataFrame, plots: dict[str, str] | None) -> str:
    """FSDP records per rank: what each kind of rank holds, and FSDP2's buffers per phase."""
    fs = fsdp_records(ok)
    if fs.empty:
        return ""
    held, more = cap(_fsdp_held(fs))
    phases, more_phases = cap(_fsdp_phases(fs))
    note = ("Per rank of each FSDP2 series (`fully_shard`; its largest ok config); ranks holding the same numbers "
            "share a row (`0, 2-7`). Sharded params and grads are the rank's local shards with their padding; "
            "optimizer state is per optimizer, on the rank's shards; step start = what the rank holds "
            "between steps; peak = the rank's highest allocated memory, in the phase named.")
    phase_note = ("Per phase: the rank's peak, and FSDP2's own buffers at their largest in that phase: unsharded "
                  "params (all-gather outputs, live while a block computes), the all-gather staging buffers "
                  "and the reduce-scatter inputs (`-`: the phase has none).")
    headers = ["series", "width", "batch", "ranks", "sharded params", "sharded grads", "optimizer state",
               "step start", "peak", "peak phase"]
    return _section("FSDP: memory per rank", note + "\n\n" + _table(headers, held) + more
                    + _image(plots, "rank_breakdown", "memory per rank") + "\n\n" + phase_note + "\n\n"
                    + _table(["series", "width", "batch", "ranks", "phase", "peak", *_BUFFER_NAMES], phases)
                    + more_phases)


def _implementations(df: pd.DataFrame, ok: pd.DataFrame) -> str:
    if ok["impl"].nunique() < 2:
        return ""
    base = series_labels(df.drop(columns=["impl", "seed"], errors="ignore").assign(impl="")).loc[ok.index]
    ok = ok.assign(_base=base)
    keys = ["_base", "width", "batch"]
    # one groupby pass, not a Python loop per config: a run can hold thousands of configs
    multi = ok[ok.groupby(keys, sort=False)["impl"].transform("nunique") > 1]
    if multi.empty:
        return _section("Implementations", "No config was measured with more than one implementation.")
    headers = ["combo", "width", "batch", "impl", "step peak", "step transient", "step temp (largest optimizer)", "peak", "step"]
    shown = _last_per(multi, keys + ["impl"])
    order = {k: i for i, k in enumerate(dict.fromkeys(zip(*(shown[k] for k in keys))))}
    shown = shown.assign(_o=[order[k] for k in zip(*(shown[k] for k in keys))]).sort_values("_o", kind="stable")
    rows = [[r["_base"], r["width"], r["batch"], r["impl"], _b(r["peak_step"]), _b(r["transient_step"]),
             _b(r["step_temp_bytes"]), _b(r["peak_total"]), _ms(r["step_ms_median"])]
            for _, r in shown.head(MAX_ROWS + 1).iterrows()]
    rows = rows + [None] * (len(shown) - len(rows))  # counted for the note, never formatted
    rows, more = cap(rows)
    note = ("foreach / fused / forloop optimizer steps of the same config. Step transient = step peak "
            "minus memory before the step; step temp = the largest single optimizer's step temporaries.")
    return _section("Implementations", note + "\n\n" + _table(headers, rows) + more)


def _failures(df: pd.DataFrame) -> str:
    bad = df[df["status"] != Status.OK]
    if bad.empty:
        return ""
    rows = [[r["status"], r["model"], r["combo"], r["width"], r["batch"], r["dtype"], r["impl"],
             r["error"] if not missing(r["error"]) else "(no message)"] for _, r in bad.iterrows()]
    rows, more = cap(rows)
    return _section(f"Failures ({len(bad)})",
                    _table(["status", "model", "combo", "width", "batch", "dtype", "impl", "message"], rows) + more)


def _gate(gate: GateResult | None) -> str:
    """The gate's own markdown, one heading level down."""
    if gate is None:
        return ""
    text = gate_render(gate).replace("\n### ", "\n#### ")
    return text.replace("## multiopt gate: ", "## Gate: ", 1).rstrip()


# --------------------------------------------------------------------------- public


def render(df: pd.DataFrame, plots: dict[str, str] | None = None, gate: GateResult | None = None) -> str:
    """The markdown report of a `frame.load` DataFrame; `plots` maps plot names
    (`plot.PLOTS` keys) to relative paths to link; `gate` (a `gate.compare` result) adds its
    verdict. Pure: same input, same text. Summary tables first (one question each), then
    details; every table is bounded (see `select`), the rest is in the CSV."""
    parts = [_header(df)]
    if len(df) == 0:
        parts.append("No records.")
        return "\n\n".join(parts) + "\n"
    ok = labelled_ok(df)
    if ok.empty:
        counts = df["status"].value_counts()
        parts.append(f"No ok records: all {len(df)} configs failed "
                     f"({', '.join(f'{int(n)} {s}' for s, n in counts.items())}); nothing to tabulate.")
        parts += [_failures(df), _gate(gate)]
        return "\n\n".join(p for p in parts if p) + "\n"
    parts += [
        _summary(ok, gate),
        _state(ok, plots),
        _peak(ok, plots),
        _step_time(df, ok, plots),
        _failures(df),
        _gate(gate),
        _section("Details", "Per optimizer, per phase, per series (implementation, dtype, zero_grad placement, "
                 "model), ZeRO, FSDP per rank: each table bounded like the ones above, every record in the CSV."),
        _per_optimizer(ok),
        _phases(ok),
        _breakdown(ok),
        _batch_scaling(ok),
        _expected(ok),
        _attribution(ok),
        _unmodelled(ok),
        _unsteady(ok),
        _variants(ok),
        _implementations(df, ok),
        _zero(ok),
        _fsdp(ok, plots),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def default_output(first: str | Path) -> Path:
    """report.md beside the first run: inside a run directory, else beside the file."""
    first = Path(first)
    return (first if first.is_dir() else first.parent) / "report.md"


def write_report(paths: Sequence[str | Path] | str | Path, out: str | Path | None = None,
                 baseline: str | Path | None = None) -> Path:
    """Load `paths`, write PNG plots and `<stem>.csv` (every column, raw bytes) beside `out`,
    render the markdown to `out`; returns `out`. `out` defaults to `default_output`.
    `baseline` (records the gate reads) adds the gate's verdict, at its default tolerances."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    sources = read_sources(paths)
    df = from_sources(sources)
    out = Path(out) if out is not None else default_output(paths[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    made = make_plots(df, out.parent, stem=out.stem)
    links = {name: p.path.name for name, p in made.items()}
    current = [r for s in sources for r in s.records]
    gate = None if baseline is None else replace(compare(read_records(baseline), current), baseline_label=str(baseline),
                                                  current_label=", ".join(str(p) for p in paths))
    text = render(df, links, gate)
    csv = out.with_suffix(".csv")
    df.to_csv(csv, index=False)
    text += f"\nRaw data (every column, bytes and ms): [{csv.name}]({csv.name})\n"
    out.write_text(text, encoding="utf-8")
    return out
