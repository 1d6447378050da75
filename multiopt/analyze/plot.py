"""Report plots: matplotlib Figures (Agg canvas, no pyplot) from a `frame.load` DataFrame.

`figures(df)` builds every plot without writing anything: {name: Plot}, each with its
Figure and the data read back from the drawn artists (lines' x/y, bars' heights) in raw
units (bytes, B/param, ms), so a test can check that a plot shows exactly the report's
numbers and count its panels and series. `make_plots` writes them as PNGs.

Every plot is bounded by what it shows, not by the run's size (see `select`): bars per
model for state per parameter and for the peak breakdown (one panel per model, at most
`MAX_PANELS`, `MAX_BARS` bars each, short labels), and lines for peak vs batch and step
time vs width (the main model's usual variants, at most `MAX_SERIES` lines in a few evenly
chosen panels). Step time is on a log axis: steps of one run span orders of magnitude (a
Muon step of 400 ms beside SGD's 1 ms), and a linear axis flattens all but the slowest line.
Where records carry a predicted step time (`predicted_step_ms`), one more plot puts each
config's prediction against its measurement (`predicted_vs_measured`); without them it is
not built. Colours come from one qualitative palette (tab10) and never repeat within
a plot; figure sizes are fixed.

No global matplotlib state is touched: figures are built on a `FigureCanvasAgg` directly,
so importing this module never changes the caller's backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, Locator, LogFormatterSciNotation

from ..kinds import Status
from .frame import PEAK_PARTS
from .ranks import BUFFERS, fsdp_records, rank_groups, ranks_text, resident_parts
from .select import MAX_BARS, MAX_PANELS, MAX_SERIES, evenly, labelled_ok, largest, main_model
from ..units import fmt_bytes, fmt_ms

__all__ = ["Plot", "figures", "make_plots", "breakdown_rows", "breakdown_bar_label", "has_predictions", "PLOTS",
           "SLACK", "rank_bar_label", "RANK_PEAK"]

PART_LABELS = {
    "peak_params": "params",
    "peak_grads": "grads",
    "peak_state": "optimizer state",
    "peak_activations": "activations",
    "peak_temporaries": "temporaries",
}
SLACK = "slack"  # reserved - allocated at the peak: what the caching allocator holds unused
_PALETTE = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]


@dataclass(frozen=True)
class Plot:
    """A built plot. `data` maps a series (line) or bar name to what was drawn:
    lines -> (xs, ys) tuples; bars -> a number; stacked bars -> {part: height}.
    `path` is set once written."""

    title: str
    figure: Figure
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

class _BinaryLocator(Locator):
    """Ticks at multiples of a power of two (times 1, KiB, MiB, GiB), so labels read 64.00 KiB, not 97.66 KiB."""

    def __init__(self, nbins: int = 7) -> None:
        self.nbins = nbins

    def __call__(self) -> list[float]:
        lo, hi = self.axis.get_view_interval()
        return self.tick_values(lo, hi)

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        lo, hi = sorted((vmin, vmax))
        span = hi - lo
        if not math.isfinite(span) or span <= 0:
            return [lo]
        step = 1.0
        while span / step > self.nbins:
            step *= 2.0
        while span / step < self.nbins / 2.5 and step > 1.0:
            step /= 2.0
        first = math.ceil(lo / step) * step
        return [first + i * step for i in range(int((hi - first) // step) + 1)]


def _bytes_axis(ax: Any) -> None:
    ax.yaxis.set_major_locator(_BinaryLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v)))


def _lines_data(fig: Figure, prefix_by_axes: bool = False) -> dict[str, tuple[tuple, tuple]]:
    data: dict[str, tuple[tuple, tuple]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            name = line.get_label()
            if prefix_by_axes and ax.get_title():
                name = f"{ax.get_title()} / {name}"
            data[name] = (tuple(float(x) for x in line.get_xdata()), tuple(float(y) for y in line.get_ydata()))
    return data


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def _empty(title: str, why: str) -> Plot:
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return Plot(title, fig, {})


def _panels(fig: Figure, n: int, width: float, height: float, ratios: list[float] | None = None) -> list[Any]:
    """`n` panels side by side; `ratios` (relative widths) sum to `n` when given."""
    fig.set_size_inches(width * n + 2.5, height)
    return list(fig.subplots(1, n, squeeze=False, width_ratios=ratios)[0])


def _state_per_param(ok: pd.DataFrame) -> Plot:
    """Horizontal bars: state bytes per parameter of each combo (the model's usual variant at
    its largest config), one panel per model. Data: {"model / combo": B/param}."""
    title = "Optimizer state per parameter"
    rows = largest(ok[ok["_main"] & ok["state_bytes_per_param"].notna()], ["model", "combo"])
    if rows.empty:
        return _empty(title, "no ok records with optimizer state")
    models = list(dict.fromkeys(rows["model"]))[:MAX_PANELS]
    fig = Figure(layout="constrained")
    data: dict[str, Any] = {}
    for ax, model in zip(_panels(fig, len(models), 4.0, 4.5), models):
        sub = rows[rows["model"] == model].head(MAX_BARS).sort_values("state_bytes_per_param", kind="stable")
        names, vals = list(sub["combo"].astype(str)), sub["state_bytes_per_param"].to_numpy(float)
        bars = ax.barh(range(len(names)), vals, color=_PALETTE[0])
        ax.set_yticks(range(len(names)), names)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], padding=3, fontsize="small")
        ax.set_xlim(0, max(float(vals.max()) * 1.25, 1.0))  # room for the value labels
        ax.set(title=model, xlabel="state bytes per parameter")
        ax.grid(axis="x", alpha=0.3)
        data.update({f"{model} / {n}": float(p.get_width()) for n, p in zip(names, bars.patches)})
    fig.suptitle(f"{title} (each combo at its largest width)")
    return Plot(title, fig, data)


def breakdown_bar_label(label: str, width: Any, batch: Any) -> str:
    return f"{label} w={width} b={batch}"


def breakdown_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """The records a breakdown shows: per series (``_label``, from `select.labelled_ok`) its
    largest ok config with a measured peak, ordered by model then first appearance."""
    ok = ok[ok["peak_phase"].notna()]
    if ok.empty:
        return ok
    best = largest(ok, ["_label"])
    models = list(dict.fromkeys(ok["model"]))
    return best.assign(_model=best["model"].map(models.index)).sort_values("_model", kind="stable").drop(columns="_model")


def _slack(rows: pd.DataFrame) -> pd.Series | None:
    """reserved - allocated at the peak, where the records carry peak_reserved (CUDA, or a
    CPU probe's cuda target); None when none does."""
    if "peak_reserved" not in rows.columns or rows["peak_reserved"].isna().all():
        return None
    return (rows["peak_reserved"] - rows["peak_total"]).clip(lower=0.0).fillna(0.0)


def _stack(ax: Any, sub: pd.DataFrame, slack: pd.Series | None) -> dict[str, dict[str, float]]:
    """One stacked bar per row of `sub`: the peak's parts, then the allocator's slack."""
    names = [breakdown_bar_label(l, w, b) for l, w, b in zip(sub["_label"], sub["width"], sub["batch"])]
    xs = list(range(len(names)))
    bottom = [0.0] * len(names)
    parts = [(p, PART_LABELS[p], sub[p].fillna(0.0), _PALETTE[i]) for i, p in enumerate(PEAK_PARTS)]
    if slack is not None:
        parts.append((SLACK, "slack (reserved - allocated)", slack.loc[sub.index], "lightgray"))
    data: dict[str, dict[str, float]] = {n: {} for n in names}
    for key, text, heights, colour in parts:
        hs = heights.to_numpy(float).tolist()
        bars = ax.bar(xs, hs, bottom=bottom, label=text, color=colour, hatch="//" if key == SLACK else None)
        for n, patch in zip(names, bars.patches):
            data[n][key] = float(patch.get_height())
        bottom = [b + h for b, h in zip(bottom, hs)]
    one = sub["width"].nunique() == 1 and sub["batch"].nunique() == 1  # then the panel title says it
    ticks = sub["combo"] if one else [f"{c}\nw={w} b={b}" for c, w, b in zip(sub["combo"], sub["width"], sub["batch"])]
    ax.set_xticks(xs, list(ticks), rotation=45, ha="right", fontsize="small")
    return data


def _peak_breakdown(ok: pd.DataFrame) -> Plot:
    """Stacked bars of what was live at the step's peak (`frame._peak_breakdown`), one bar
    per combo (the model's usual variant at its largest config), one panel per model.
    Data: {breakdown_bar_label: {part column (or SLACK): height}}; the parts sum to peak_total
    (to peak_reserved with the slack)."""
    title = "What the peak is made of"
    rows = breakdown_rows(ok[ok["_main"]])
    if rows.empty:
        return _empty(title, "no ok records with a measured peak")
    slack = _slack(rows)
    models = list(dict.fromkeys(rows["model"]))[:MAX_PANELS]
    fig = Figure(layout="constrained")
    data: dict[str, Any] = {}
    subs = [rows[rows["model"] == m].head(MAX_BARS) for m in models]
    bars = [max(len(s), 3) for s in subs]
    axes = _panels(fig, len(models), 5.0, 5.5, [len(models) * b / sum(bars) for b in bars])
    for ax, model, sub in zip(axes, models, subs):
        data.update(_stack(ax, sub, slack))
        _bytes_axis(ax)
        one = sub["width"].nunique() == 1 and sub["batch"].nunique() == 1
        ax.set_title(f"{model}, width {sub['width'].iloc[0]}, batch {sub['batch'].iloc[0]}" if one else model,
                     fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("bytes at the step's peak")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right center", fontsize="small")  # clear of the title
    fig.suptitle(f"{title} (each combo at its largest config)")
    return Plot(title, fig, data)


def _lines(ok: pd.DataFrame, title: str, *, panel: str, x: str, y: str, ylabel: str,
           yaxis: Callable[[Any], None]) -> Plot:
    """`y` against `x`, one line per combo (the main model's usual variants, at most
    MAX_SERIES), one panel per value of `panel` (at most MAX_PANELS, chosen evenly among
    those where a line has two points). Data keys: "<panel>=V / combo"."""
    model = main_model(ok)
    sub = ok[ok["_main"] & (ok["model"] == model) & ok[y].notna()]
    if sub.empty:
        return _empty(title, f"no ok records with {y}")
    combos = list(dict.fromkeys(sub["combo"]))[:MAX_SERIES]
    sub = sub[sub["combo"].isin(combos)]
    points = sub.groupby([panel, "combo"])[x].nunique()
    several = points[points >= 2].index.get_level_values(0)
    values = evenly(several if len(several) else sub[panel], MAX_PANELS)
    fig = Figure(layout="constrained")
    for ax, v in zip(_panels(fig, len(values), 4.2, 4.2), values):
        at = sub[sub[panel] == v]
        for colour, combo in zip(_PALETTE, combos):
            line = at[at["combo"] == combo].drop_duplicates(x, keep="last").sort_values(x)
            if not line.empty:
                dots = "o" if len(line) <= 50 else None  # a marker per point hides a dense line
                ax.plot(line[x].to_numpy(float), line[y].to_numpy(float), color=colour, marker=dots, label=combo)
        xs = at[x].astype(float)
        if len(xs) and xs.min() > 0 and xs.max() / xs.min() > 20:
            ax.set_xscale("log", base=2)
        ax.set(title=f"{panel}={v}", xlabel=x, ylabel=ylabel)
        yaxis(ax)
        ax.grid(alpha=0.3)
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize="small")
    several_models = ok["model"].nunique() > 1
    fig.suptitle(f"{title} ({model})" if several_models else title)
    return Plot(title, fig, _lines_data(fig, prefix_by_axes=True))


def _peak_vs_batch(ok: pd.DataFrame) -> Plot:
    return _lines(ok, "Peak memory vs batch", panel="width", x="batch", y="peak_total", ylabel="peak allocated",
                  yaxis=_bytes_axis)


class _MsLogFormatter(LogFormatterSciNotation):
    """Log-axis labels in ms units (`fmt_ms`), on the ticks matplotlib's log formatter labels
    (every decade; over a narrow range some minor ticks too, so an axis within one decade
    still has labels)."""

    def __init__(self) -> None:
        super().__init__(labelOnlyBase=False)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return fmt_ms(x) if super().__call__(x, pos) else ""


def _ms_log_axis(ax: Any, which: str = "y") -> None:
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(_MsLogFormatter())
    axis.set_minor_formatter(_MsLogFormatter())


def _step_time_vs_width(ok: pd.DataFrame) -> Plot:
    return _lines(ok, "Step time vs width", panel="batch", x="width", y="step_ms_median",
                  ylabel="median step time (log)", yaxis=_ms_log_axis)


PREDICTED = "predicted_step_ms"


def has_predictions(df: pd.DataFrame) -> bool:
    """Whether any ok, timed record carries a predicted step time."""
    if PREDICTED not in df.columns or "step_ms_median" not in df.columns:
        return False
    ok = df[df["status"] == Status.OK]
    return bool((pd.to_numeric(ok[PREDICTED], errors="coerce").notna() & ok["step_ms_median"].notna()).any())


def _predicted_vs_measured(ok: pd.DataFrame) -> Plot:
    """One point per config: measured median step time (x) against the prediction (y), both
    on log axes, with the line where they agree and the +/-15% and +/-35% bands (the
    prediction's goals in issue 21); one colour per combo (the first MAX_SERIES; the rest
    grey). Data: {"<label> w=W b=B": (measured, predicted)}, every point drawn."""
    title = "Predicted vs measured step time"
    pred = pd.to_numeric(ok[PREDICTED], errors="coerce")
    rows = ok[pred.notna() & ok["step_ms_median"].notna() & (pred > 0) & (ok["step_ms_median"] > 0)].assign(
        _pred=pred)
    if rows.empty:
        return _empty(title, "no ok records with both a measured and a predicted step time")
    fig = Figure(layout="constrained", figsize=(7, 6))
    ax = fig.add_subplot(1, 1, 1)
    combos = list(dict.fromkeys(rows["_label"].astype(str)))
    colour = {c: _PALETTE[i] for i, c in enumerate(combos[:MAX_SERIES])}
    data: dict[str, Any] = {}
    for i, combo in enumerate(combos):
        sub = rows[rows["_label"].astype(str) == combo]
        xs, ys = sub["step_ms_median"].to_numpy(float), sub["_pred"].to_numpy(float)
        other = "other combos" if i == MAX_SERIES else "_nolegend_"
        ax.scatter(xs, ys, color=colour.get(combo, "tab:gray"), s=18, label=combo if combo in colour else other)
        for (_, r), x, y in zip(sub.iterrows(), xs, ys):
            data[f"{combo} w={r['width']} b={r['batch']}"] = (float(x), float(y))
    lo = min(min(v) for v in data.values()) / 1.5
    hi = max(max(v) for v in data.values()) * 1.5
    for f, style in ((1.0, "-"), (1.15, "--"), (1 / 1.15, "--"), (1.35, ":"), (1 / 1.35, ":")):
        ax.plot([lo, hi], [lo * f, hi * f], color="black", linestyle=style, linewidth=0.8, alpha=0.6,
                label={1.0: "predicted = measured", 1.15: "+/-15%", 1.35: "+/-35%"}.get(f, "_nolegend_"))
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="measured median step time (log)",
           ylabel="predicted step time (log)")
    _ms_log_axis(ax, "x")
    _ms_log_axis(ax, "y")
    ax.grid(alpha=0.3, which="both")
    gpus = sorted(set(ok["gpu"].dropna().astype(str))) if "gpu" in ok.columns else []
    ax.set_title(f"{title}" + (f" ({', '.join(gpus)})" if gpus else ""))
    ax.legend(loc="upper left", fontsize="small")
    return Plot(title, fig, data)


def rank_bar_label(label: str, width: Any, batch: Any, ranks: str) -> str:
    return f"{breakdown_bar_label(label, width, batch)} ranks {ranks}"


RANK_PEAK = "peak"  # a rank bar's data key for the rank's peak (the black tick)
_BUFFER_MARKERS = {"unsharded params": "o", "all-gather staging": "^", "reduce-scatter inputs": "s"}


def _rank_bars(ax: Any, r: pd.Series, colours: dict[str, str]) -> dict[str, dict[str, float]]:
    """One stacked bar per kind of rank of FSDP record `r` (`ranks.resident_parts`), a black
    tick at its peak and a marker per FSDP2 buffer at its largest over the phases."""
    groups = rank_groups(r["ranks_state"])[:MAX_BARS]
    data: dict[str, dict[str, float]] = {}
    for x, g in enumerate(groups):
        name = rank_bar_label(r["_label"], r["width"], r["batch"], ranks_text(g.ranks))
        bottom, bar = 0.0, {}
        for part, h in resident_parts(g.row).items():
            colour = colours.setdefault(part, _PALETTE[len(colours) % len(_PALETTE)])
            ax.bar(x, h, bottom=bottom, color=colour, label=part, width=0.6)
            bottom, bar[part] = bottom + h, h
        bar[RANK_PEAK] = float(g.row.get("peak_total") or 0.0)
        ax.plot([x - 0.35, x + 0.35], [bar[RANK_PEAK]] * 2, color="black", linewidth=2, label="rank's peak")
        for what, marker in _BUFFER_MARKERS.items():
            largest_of = max((float(g.row.get(f) or 0.0) for f, _p, w in BUFFERS if w == what), default=0.0)
            ax.plot([x + 0.45], [largest_of], marker=marker, color="black", linestyle="none",
                    label=f"{what} (largest in a phase)")
            bar[what] = largest_of
        data[name] = bar
    ax.set_xticks(range(len(groups)), [f"ranks {ranks_text(g.ranks)}" for g in groups], fontsize="small")
    return data


def _rank_breakdown(ok: pd.DataFrame) -> Plot:
    """Per FSDP record (one panel each, at most MAX_PANELS), a bar per kind of rank: what it
    holds through the step stacked (sharded params, sharded grads, each optimizer's state, the
    rest of its peak), FSDP2's buffers as markers. Data: {rank_bar_label: {part: height,
    RANK_PEAK: peak, buffer: its largest}}; the stacked parts sum to the peak."""
    title = "Memory per rank (FSDP)"
    rows = fsdp_records(ok).head(MAX_PANELS)
    if rows.empty:
        return _empty(title, "no ok FSDP records with per-rank rows")
    fig = Figure(layout="constrained")
    colours: dict[str, str] = {}
    data: dict[str, Any] = {}
    axes = _panels(fig, len(rows), 4.5, 5.0)
    for ax, (_, r) in zip(axes, rows.iterrows()):
        data.update(_rank_bars(ax, r, colours))
        _bytes_axis(ax)
        ax.set_title(f"{r['_label']}, fsdp {r['fsdp']}\nwidth {r['width']}, batch {r['batch']}", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("bytes per rank")
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize="small")
    fig.suptitle(f"{title}: held through the step, stacked; FSDP2's buffers as markers")
    return Plot(title, fig, data)


# name -> builder over `select.labelled_ok` records; the report links them under these keys
PLOTS: dict[str, Callable[[pd.DataFrame], Plot]] = {
    "state_per_param": _state_per_param,
    "peak_breakdown": _peak_breakdown,
    "peak_vs_batch": _peak_vs_batch,
    "step_time_vs_width": _step_time_vs_width,
}


def figures(df: pd.DataFrame) -> dict[str, Plot]:
    """Every plot of a `frame.load` DataFrame, built, not written; nothing when no ok record.
    `predicted_vs_measured` only where records carry predictions, `rank_breakdown` only where
    there are FSDP records with per-rank rows."""
    if len(df) == 0 or not (df["status"] == Status.OK).any():
        return {}
    ok = labelled_ok(df)
    out = {name: build(ok) for name, build in PLOTS.items()}
    if has_predictions(df):
        out["predicted_vs_measured"] = _predicted_vs_measured(ok)
    if not fsdp_records(ok).empty:
        out["rank_breakdown"] = _rank_breakdown(ok)
    return out


def make_plots(df: pd.DataFrame, out_dir: str | Path, stem: str = "report") -> dict[str, Plot]:
    """Write every plot as `<out_dir>/<stem>_<name>.png`; {name: Plot with its path}."""
    out_dir = Path(out_dir)
    return {name: Plot(p.title, p.figure, p.data, _save(p.figure, out_dir / f"{stem}_{name}.png"))
            for name, p in figures(df).items()}
