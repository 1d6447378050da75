"""Report plots: PNG files from a `frame.load` DataFrame (matplotlib, Agg canvas, no pyplot).

Each `plot_*(df, path)` draws only ok records, writes a PNG and returns a `Plot`: the path
plus the data read back from the drawn artists (lines' x/y, bars' heights), in raw units
(bytes, parameters, ms), so a test can check that a plot shows exactly the report's
numbers. Series are named by `frame.series_labels` (the combo, plus any config column that
differs from the run's usual value), the same names the report's tables use.

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
from matplotlib.ticker import FuncFormatter, Locator

from .frame import PEAK_PARTS, series_labels
from ..units import fmt_bytes, fmt_ms

__all__ = [
    "Plot",
    "plot_state_vs_params",
    "plot_peak_vs_batch",
    "plot_step_time_vs_width",
    "plot_peak_breakdown",
    "make_plots",
    "PLOTS",
]

PART_LABELS = {
    "peak_params": "params",
    "peak_grads": "grads",
    "peak_state": "optimizer state",
    "peak_activations": "activations",
    "peak_temporaries": "temporaries",
}


@dataclass(frozen=True)
class Plot:
    """A written plot. `data` maps a series (line) or bar name to what was drawn:
    lines -> (xs, ys) tuples; stacked bars -> {part: height}."""

    path: Path
    title: str
    data: dict[str, Any] = field(default_factory=dict)


def _legend(fig: Figure) -> None:
    """One legend for every panel, outside the axes to the right: a sweep has dozens of
    series, and a legend inside the axes hides the data."""
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + 3, max(h, 0.19 * len(seen) + 1))  # room for every entry
        fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize="x-small")


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    out = df[df["status"] == "ok"].copy()
    out["_label"] = series_labels(df).loc[out.index]
    return out


_STYLES = ("-", "--", ":", "-.")


def _style(ok: pd.DataFrame, label: str) -> dict[str, Any]:
    """The same color (and line style past ten series) for a series in every panel and plot."""
    i = list(pd.unique(ok["_label"])).index(label)
    return {"color": f"C{i % 10}", "linestyle": _STYLES[(i // 10) % len(_STYLES)], "marker": "o", "label": label}


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


def _empty(fig: Figure, title: str, why: str) -> None:
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _first_per(ok: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per key: the first ok record (optimizer state does not depend on batch)."""
    return ok.sort_values(keys + ["batch"], kind="stable").drop_duplicates(keys, keep="first")


def plot_state_vs_params(df: pd.DataFrame, path: str | Path) -> Plot:
    """Optimizer state bytes (requested) against parameter count, one line per series.

    Each (series, width) point is the first ok record by batch: the state does not depend
    on the batch."""
    title = "Optimizer state vs parameter count"
    ok = _ok(df)
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    if ok.empty or ok["opt_state_bytes"].isna().all():
        _empty(fig, title, "no ok records")
        return Plot(_save(fig, path), title, {})
    ax = fig.add_subplot(1, 1, 1)
    pts = _first_per(ok, ["_label", "width"])
    for label in pd.unique(ok["_label"]):
        sub = pts[pts["_label"] == label].sort_values("n_params")
        ax.plot(sub["n_params"].to_numpy(float), sub["opt_state_bytes"].to_numpy(float), **_style(ok, label))
    xs = pts["n_params"].astype(float)
    if xs.min() > 0 and xs.max() / xs.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("optimizer state")
    _bytes_axis(ax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(fig)
    return Plot(_save(fig, path), title, _lines_data(fig))


def _panels(full: pd.DataFrame, ok: pd.DataFrame, path: str | Path, title: str, *, panel: str, x: str, y: str,
            ylabel: str, yaxis: Callable[[Any], None]) -> Plot:
    """One panel per value of `panel`, one line per series of `y` against `x`. Data keys:
    "<panel>=V / series". `full` fixes each series' style, so colours match across plots."""
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    values = sorted(pd.unique(ok[panel]))
    fig.set_size_inches(max(7, 5 * len(values)), 4.5)
    for i, v in enumerate(values):
        ax = fig.add_subplot(1, len(values), i + 1)
        sub_v = ok[ok[panel] == v]
        for label in pd.unique(sub_v["_label"]):
            sub = sub_v[sub_v["_label"] == label].drop_duplicates(x, keep="last").sort_values(x)
            ax.plot(sub[x].to_numpy(float), sub[y].to_numpy(float), **_style(full, label))
        ax.set_title(f"{panel}={v}")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        yaxis(ax)
        ax.grid(alpha=0.3)
    _legend(fig)
    fig.suptitle(title)
    return Plot(_save(fig, path), title, _lines_data(fig, prefix_by_axes=True))


def plot_peak_vs_batch(df: pd.DataFrame, path: str | Path) -> Plot:
    """Peak memory (peak_total) against batch: one panel per width ("width=W"), one line per
    series. Data keys: "width=W / series"."""
    title = "Peak memory vs batch"
    ok = _ok(df)
    if ok.empty or ok["peak_total"].isna().all():
        fig = Figure(layout="constrained", figsize=(7, 4.5))
        _empty(fig, title, "no ok records")
        return Plot(_save(fig, path), title, {})
    return _panels(ok, ok, path, title, panel="width", x="batch", y="peak_total", ylabel="peak allocated",
                   yaxis=_bytes_axis)


def plot_step_time_vs_width(df: pd.DataFrame, path: str | Path) -> Plot:
    """Median step time (ms) against width: one panel per batch ("batch=B"), one line per
    series. Data keys: "batch=B / series"."""
    title = "Step time vs width"
    full = _ok(df)
    ok = full[full["step_ms_median"].notna()]
    if ok.empty:
        fig = Figure(layout="constrained", figsize=(7, 4.5))
        _empty(fig, title, "no timed ok records")
        return Plot(_save(fig, path), title, {})

    def ms_axis(ax: Any) -> None:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_ms(v)))

    return _panels(full, ok, path, title, panel="batch", x="width", y="step_ms_median",
                   ylabel="median step time", yaxis=ms_axis)


def breakdown_bar_label(label: str, width: Any, batch: Any) -> str:
    return f"{label} w={width} b={batch}"


def breakdown_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The records the breakdown shows: per series (combo, impl, ...), its largest ok config
    (widest, then largest batch) with a measured peak, ordered by model then first appearance.
    One bar per series keeps the chart readable for a sweep of hundreds of configs."""
    ok = _ok(df)
    ok = ok[ok["peak_phase"].notna()]
    if ok.empty:
        return ok
    order = {label: i for i, label in enumerate(dict.fromkeys(ok["_label"]))}
    best = ok.sort_values(["width", "batch"], kind="stable").groupby("_label", sort=False).tail(1)
    models = list(dict.fromkeys(ok["model"]))
    return best.assign(_order=best["_label"].map(order), _model=best["model"].map(models.index)) \
        .sort_values(["_model", "_order"], kind="stable").drop(columns=["_order", "_model"])


def plot_peak_breakdown(df: pd.DataFrame, path: str | Path) -> Plot:
    """One stacked bar per series at its largest ok config (`breakdown_rows`): params, grads,
    optimizer state, activations and temporaries at the peak (see `frame._peak_breakdown` for
    which phase's peak and what each part means); one panel per model, since their scales
    differ. Data: {bar: {part column: height}}; the parts of a bar sum to its peak_total."""
    title = "What the peak is made of"
    rows = breakdown_rows(df)
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    if rows.empty:
        _empty(fig, title, "no ok records with a measured peak")
        return Plot(_save(fig, path), title, {})
    models = list(dict.fromkeys(rows["model"]))
    counts = [int((rows["model"] == m).sum()) for m in models]
    fig.set_size_inches(max(7, 0.6 * sum(counts) + 2.5 * len(models)), 5.5)
    axes = fig.subplots(1, len(models), squeeze=False, width_ratios=[max(c, 2) for c in counts])[0]
    data: dict[str, dict[str, float]] = {}
    for ax, model in zip(axes, models):
        sub = rows[rows["model"] == model]
        names = [breakdown_bar_label(l, w, b) for l, w, b in zip(sub["_label"], sub["width"], sub["batch"])]
        xs = list(range(len(names)))
        bottom = [0.0] * len(names)
        for part in PEAK_PARTS:
            heights = sub[part].fillna(0.0).to_numpy(float).tolist()
            ax.bar(xs, heights, bottom=bottom, label=PART_LABELS[part])
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize="small")
        _bytes_axis(ax)
        ax.set_title(model if len(models) > 1 else title, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        for part, container in zip(PEAK_PARTS, ax.containers):
            for n, patch in zip(names, container.patches):
                data.setdefault(n, {})[part] = float(patch.get_height())
    axes[0].set_ylabel("bytes at the step's peak")
    axes[0].legend(fontsize="small")
    if len(models) > 1:
        fig.suptitle(title)
    return Plot(_save(fig, path), title, data)


# name -> function; the report links them in this order under these keys
PLOTS = {
    "state_vs_params": plot_state_vs_params,
    "peak_vs_batch": plot_peak_vs_batch,
    "step_time_vs_width": plot_step_time_vs_width,
    "peak_breakdown": plot_peak_breakdown,
}


def make_plots(df: pd.DataFrame, out_dir: str | Path, stem: str = "report") -> dict[str, Plot]:
    """Write every plot as `<out_dir>/<stem>_<name>.png`; {name: Plot}. Nothing when no ok record."""
    if len(df) == 0 or not (df["status"] == "ok").any():
        return {}
    out_dir = Path(out_dir)
    return {name: fn(df, out_dir / f"{stem}_{name}.png") for name, fn in PLOTS.items()}
