"""A plan's candidates against its budget: one horizontal stacked bar per candidate that fits
(its breakdown at its largest batch: weights, grads, state, activations, temporaries,
workspaces, slack, context), the budget as a vertical line. Reads the plan as plain data
(`run.plan.as_dict`), so analyze stays free of the engine; Agg canvas, no pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..units import fmt_bytes

__all__ = ["plan_figure", "plot_plan"]

MAX_ROWS = 40  # bars beyond this are left to the markdown and JSON


def plan_figure(plan: Mapping[str, Any]) -> Figure:
    """The figure; bars in the order of the plan's rows that carry a breakdown, frontier first."""
    rows = [r for r in plan["rows"] if r.get("breakdown")]
    rows = sorted(rows, key=lambda r: (not r["frontier"], -r["batch"]))[:MAX_ROWS]
    parts = list(rows[0]["breakdown"]) if rows else []
    fig = Figure(figsize=(10, 2.2 + 0.38 * max(len(rows), 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(len(parts))]
    labels = [("* " if r["frontier"] else "") + ", ".join(f"{k} {v}" for k, v in r["candidate"].items()) + f"  (batch {r['batch']:,})"
              for r in rows]
    for i, part in enumerate(parts):
        left = [sum(r["breakdown"][p] for p in parts[:i]) for r in rows]
        ax.barh(range(len(rows)), [r["breakdown"][part] for r in rows], left=left, color=colours[i], label=part)
    ax.axvline(plan["budget"], color="black", linestyle="--", linewidth=1.2, label=f"budget {fmt_bytes(plan['budget'])}")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_bytes(int(x))))
    ax.set_xlabel("memory at each candidate's largest batch (* frontier)")
    ax.set_title("candidates against the budget", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=5, frameon=False)
    fig.tight_layout()
    return fig


def plot_plan(plan: Mapping[str, Any], path: Path) -> Path:
    """Write `plan_figure` as a PNG at `path`; returns the path."""
    fig = plan_figure(plan)
    fig.savefig(path, dpi=110)
    return path
