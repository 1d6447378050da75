"""`multiopt fit`: what fits in N bytes, per combo: the largest batch (and, for a model whose
factory takes a width, the largest width at a given batch). A plan (`run/plan.py`) with one
candidate axis, the combo, on the same engine: the same fake runs, predictions and
confirmation at the boundary, with every measurement reused between the questions.

Target cuda (the CLI's default): a config fits when its predicted peak *reserved* memory
(the caching-allocator model, workspaces included) plus the CUDA context stays within the
budget: the protocol runs with the allocator's limit at `budget - context`, as
`torch.cuda.set_per_process_memory_fraction` would cap it, cached blocks released and
retried before an out-of-memory error, as CUDA does. `CONTEXT` (plan.py) holds a default per
GPU family (an estimate: measure yours with nvidia-smi and pass `--context`).

Target cpu: "fits" means exactly what a device of `budget` bytes would say: the whole protocol
(build, warm-up, the instrumented step) runs on the fake probe with `limit_bytes=budget`, and
the config fits when no allocation takes `memory_allocated` past the budget. The tracked probe
with the same limit gives the same answer to the byte.

The batch comes from the plan's affine prediction; the width (weights, gradients and state
grow with its square) from the peaks of unlimited fake runs, interpolated inside the bracket
[fits, does not fit] (regula falsi, with a bisection step whenever the bracket fails to
halve). Either answer is confirmed with the limit itself: `value` runs ok under the budget and
`value + 1` runs out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from tabulate import tabulate

from ..errors import UsageError
from ..instrument.protocol import Config, Protocol, validate
from ..kinds import Probe, Status, Target
from ..record import UNSTEADY_WHY, Record
from ..train import models
from ..rules import Rules
from ..units import fmt_bytes
from .plan import CONTEXT, DEFAULT_CONTEXT, Runner, boundary, combo_axis, context_bytes, metric, plan, split

__all__ = ["CONTEXT", "DEFAULT_CONTEXT", "Answer", "context_bytes", "fit", "largest", "render", "split"]

#: Searches stop here (a model whose peak does not grow with the axis, e.g. `simple` in width).
CAPS = {"batch": 1 << 24, "width": 1 << 20}
DEFAULT_COMBOS = ("sgd", "sgd-momentum", "adam", "adamw", "muon+adamw", "sgd+adam")


class FitFailed(Exception):
    """A fake run ended neither ok nor oom (an error in the model or optimizer)."""


@dataclass(frozen=True)
class Answer:
    """The largest `axis` value that fits, with the other axis fixed."""

    combo: str
    rules: str
    axis: str  # "batch" or "width"
    fixed: tuple[str, int] | None  # the other size and its value (None: a model without a width)
    value: int  # 0: not even 1 fits
    capped: bool  # the search reached CAPS[axis] and it still fit
    record: Record | None  # the fake run at `value` (status ok), None when value == 0
    over: int | None  # the first value that does not fit (value + 1), None when capped
    over_peak: int | None  # its peak_total without a limit: what it would need
    runs: int  # fake runs the search took
    error: str | None = None
    context: int = 0  # CUDA context bytes counted against the budget (target cuda)
    reserved: int | None = None  # the run's peak reserved over the whole run, under the budget (`Runner.reserved`)


def largest(config: Config, axis: str, budget: int, *, warmup: int | None = None,
            cap: int | None = None, alloc_conf: str | None = None, context: int = 0,
            runner: Runner | None = None, gpu: str | None = None) -> Answer:
    """The largest value of `axis` ("batch" or "width") for which `config` fits `budget`
    (target cuda: peak reserved + `context`; target cpu: peak allocated). `runner` shares
    fake runs between questions. `gpu`: each record also predicts its step time on that GPU
    (instrument/gpu.py)."""
    if axis not in CAPS:
        raise UsageError(f"axis must be batch or width, got {axis!r}")
    cap = CAPS[axis] if cap is None else cap
    limit = max(budget - context, 0)
    runner = runner or Runner(limit, warmup=warmup, alloc_conf=alloc_conf, gpu=gpu)
    fixed = None
    if axis == "batch":
        if "width" in models.resolve(config.model).takes:
            fixed = ("width", config.width)
    else:
        fixed = ("batch", config.batch)
    base = dict(combo=config.combo, rules=config.rules, axis=axis, fixed=fixed, context=context)
    before = runner.runs
    try:
        if axis == "batch":
            value, capped, record, base["reserved"] = _largest_batch(config, budget, context, cap, runner)
        else:
            value, capped, record = _largest_width(config, limit, cap, runner)
            base["reserved"] = runner.reserved(replace(config, width=value), limit) if value else None
    except FitFailed as e:
        return Answer(**base, value=0, capped=False, record=None, over=None, over_peak=None,
                      runs=runner.runs - before, error=str(e))
    over = None if capped else value + 1
    over_peak = None
    if over is not None:
        r = runner.run(replace(config, **{axis: over}), None)
        over_peak = metric(r) if r.status == Status.OK else None
    return Answer(**base, value=value, capped=capped, record=record, over=over, over_peak=over_peak,
                  runs=runner.runs - before)


def _largest_batch(config: Config, budget: int, context: int, cap: int,
                   runner: Runner) -> tuple[int, bool, Record | None, int | None]:
    p = plan(config, [combo_axis([(config.combo, config.rules)])], budget, context=context, confirm="all",
             cap=cap, runner=runner)
    row = p.rows[0]
    if row.why is not None and not (row.confirmed and row.batch == 0):
        raise FitFailed(row.why)
    return row.batch, row.capped, row.record, row.reserved


def _largest_width(config: Config, limit: int, cap: int, runner: Runner) -> tuple[int, bool, Record | None]:
    def run(n: int, lim: int | None) -> Record:
        r = runner.run(replace(config, width=n), lim)
        if r.status not in (Status.OK, Status.OOM):
            raise FitFailed(f"width={n}: {r.status}: {r.error}")
        return r

    def peak(n: int) -> int:
        return metric(run(n, None))

    def ok(n: int) -> bool:  # what a device of `limit` bytes says
        return run(n, limit).status == Status.OK

    guess, capped = _interpolate(peak, limit, cap)
    value, capped = boundary(ok, guess, cap)
    return value, capped, run(value, limit) if value else None


def _interpolate(peak: Callable[[int], int], budget: int, cap: int) -> tuple[int, bool]:
    """Largest n in 1..cap with peak(n) <= budget, for peak non-decreasing; 0 if none.

    Guesses come from a polynomial (degree <= 2: peak is about a + b n + c n^2) through the
    measured points nearest the answer; a guess is tested together with its neighbour, so a
    right model ends the search in two runs. A guess that fails to halve the bracket is
    followed by a bisection step, and with no usable model the search doubles."""
    if peak(1) > budget:
        return 0, False
    known: dict[int, int] = {1: peak(1)}

    def at(n: int) -> int:
        known[n] = peak(n)
        return known[n]

    lo, hi = 1, None
    while hi is None:  # grow until a value does not fit
        if lo >= cap:
            return cap, True
        g = _root(known, budget, lo, None)
        n = lo * 2 if g is None else max(lo + 1, min(int(g * 1.02) + 1, lo * 64))
        n = min(n, cap)
        if at(n) > budget:
            hi = n
        else:
            lo = n
    while hi - lo > 1:  # inside [lo fits, hi does not]
        span = hi - lo
        g = _root(known, budget, lo, hi)
        g = (lo + hi) // 2 if g is None else min(max(int(g), lo + 1), hi - 1)
        if at(g) <= budget:
            lo = g
            if g + 1 < hi and at(g + 1) > budget:
                hi = g + 1
        else:
            hi = g
            if g - 1 > lo and at(g - 1) <= budget:
                lo = g - 1
        if hi - lo > 1 and hi - lo > span // 2:
            mid = (lo + hi) // 2
            if at(mid) <= budget:
                lo = mid
            else:
                hi = mid
    return lo, False


def _root(known: dict[int, int], budget: int, lo: int, hi: int | None) -> float | None:
    """Where a polynomial through the (up to) three known points nearest [lo, hi] reaches
    `budget`, strictly above lo (and below hi); None when no such root exists."""

    pivot = lo if hi is None else (lo + hi) / 2
    near = sorted(known, key=lambda n: abs(n - pivot))[:3]
    if len(near) < 2:
        return None
    xs = np.array(near, dtype=np.float64)
    scale = xs.max()
    ys = np.array([known[n] for n in near], dtype=np.float64) - budget
    coef = np.polyfit(xs / scale, ys, len(near) - 1)
    roots = [r.real * scale for r in np.atleast_1d(np.roots(coef)) if abs(r.imag) < 1e-9]
    roots = [r for r in roots if r > lo and (hi is None or r < hi)]
    return min(roots) if roots else None


def fit(combos: Sequence[tuple[str, str]], budget: int, *, width: int, batch: int, model: str = "mlp",
        depth: int = 4, dtype: str = "float32", impl: str = "default", warmup: int | None = None,
        target: str = Target.CPU, alloc_conf: str | None = None, context: int = 0,
        gpu: str | None = None, jobs: int = 1) -> list[Answer]:
    """For every combo: the largest batch (at `width`, where the model takes one), and the
    largest width at `batch` for a model whose factory takes a width. One Runner: every
    measurement is made once. target "cuda": on predicted peak reserved plus `context` bytes.
    `jobs`: fake runs at once, in forked processes (`plan.Runner.prefetch`)."""
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give 1 or more")
    if budget < 1:
        raise UsageError(f"the budget must be at least 1 byte, got {budget}")
    if width < 1 or batch < 1 or depth < 1:
        raise UsageError(f"width, batch and depth must be >= 1, got width={width}, batch={batch}, depth={depth}")
    spec = models.resolve(model)
    width_, depth_ = spec.sizes(width, depth)
    configs = [Config(model=model, width=width_, depth=depth_, batch=batch, dtype=dtype, combo=name,
                      rules=Rules(rules), impl=impl, target=target) for name, rules in combos]
    fake = Protocol(probe=Probe.FAKE, steps=0, limit_bytes=budget)
    for c in configs:
        try:
            validate(c, fake)
        except UsageError as e:
            raise UsageError(f"combo {c.combo!r} (fit estimates on the fake probe): {e}") from None
    runner = Runner(max(budget - context, 0), warmup=warmup, alloc_conf=alloc_conf, gpu=gpu, jobs=jobs)
    axes = ("batch", "width") if "width" in spec.takes else ("batch",)
    return [largest(c, axis, budget, alloc_conf=alloc_conf, context=context, runner=runner)
            for c in configs for axis in axes]


def render(answers: Sequence[Answer], budget: int, *, model: str, depth: int, dtype: str) -> str:
    """Markdown: one table per combo, human units."""
    cuda = [a for a in answers if a.record is not None and a.record.target == Target.CUDA]
    semantics = (f"fake probe, target cuda: peak = predicted peak reserved (CUDA caching-allocator model, "
                 f"cuBLAS workspaces) + CUDA context {fmt_bytes(cuda[0].context)}" if cuda else
                 "fake probe (`memory_allocated` semantics: live tensor bytes, 512-byte blocks). A GPU needs more "
                 "on top: the CUDA context, library workspaces and fragmentation (use --target cuda)")
    shape = f", depth {depth}" if "depth" in models.resolve(model).takes else ""  # an hf: model's is its config's
    lines = [f"# What fits in {fmt_bytes(budget)} ({budget:,} bytes)", "", f"{model}{shape}, {dtype}; {semantics}."]
    by_combo: dict[str, list[Answer]] = {}
    for a in answers:
        by_combo.setdefault(a.combo, []).append(a)
    for combo, group in by_combo.items():
        lines += ["", f"## {combo}: `{Rules(group[0].rules)}`", ""]
        rows, splits = [], []
        for a in group:
            question = f"largest {a.axis}" + (f" at {a.fixed[0]} {a.fixed[1]:,}" if a.fixed else "")
            if a.error:
                rows.append((question, Status.ERROR, a.error, "", "", "", "", ""))
                continue
            r = a.record
            if a.value == 0:
                need = f"needs {fmt_bytes(a.over_peak)}" if a.over_peak is not None else "oom"
                rows.append((question, f"none ({a.axis} 1 {need})", "-", "-", "-", "-", "-", "-"))
                continue
            answer = f"{a.axis} {a.value:,}" + (" (search cap; more may fit)" if a.capped else "")
            used = _used(r, a.context, a.reserved)
            nxt = "-" if a.over is None else f"{a.axis} {a.over:,}: {fmt_bytes(a.over_peak + a.context - budget)} over"
            if r.predicted_step_ms is not None:
                answer += f" ({r.predicted_step_ms:.2f} ms/step on {r.gpu})"
            if r.target == Target.CUDA:
                splits.append(f"- {combo}, {answer}: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in split(r, a.context, reserved=a.reserved).items()))
            rows.append((question, answer, fmt_bytes(used), fmt_bytes(budget - used),
                         fmt_bytes(r.param_bytes), fmt_bytes(r.grad_bytes), fmt_bytes(r.opt_state_alloc_bytes), nxt))
        lines.append(tabulate(rows, headers=["question", "fits", "peak", "headroom", "weights", "grads",
                                             "optimizer state", "first that does not fit"],
                              tablefmt="github", disable_numparse=True))
        if splits:
            lines += ["", "How the budget splits at the peak (target cuda):", "", *splits]
        checked = sorted({a.record.predicted_check for a in group if a.record is not None and a.record.predicted_check})
        if checked:
            lines += ["", f"Step times predicted from the work counters (instrument/gpu.py); checked on {checked[0]}."]
        unmodelled = sorted({a.record.unmodelled for a in group if a.record is not None and a.record.unmodelled})
        if unmodelled:
            lines += ["", f"Estimate, not CUDA's to the byte: this model runs ops whose CUDA kernels allocate "
                          f"differently and are not modelled ({'; '.join(unmodelled)}); leave headroom."]
        unsteady = [a.combo for a in group if a.record is not None and a.record.step_growth]
        if unsteady:
            lines += ["", f"NOT STEADY: the measured step of {', '.join(unsteady)} ended with a different amount "
                          f"allocated than it started with ({UNSTEADY_WHY}): its answer may not "
                          "hold on later steps; fit again with more --warmup steps."]
    return "\n".join(lines) + "\n"


def _used(r: Record, context: int, reserved: int | None = None) -> int:
    """What counts against the budget: peak reserved (the whole run's, where known) + context
    (target cuda), else peak allocated."""
    if r.target == Target.CUDA and (reserved is not None or r.peak_reserved is not None):
        return metric(r, reserved) + context
    return r.peak_total or 0
