"""`multiopt.profile()`: the measurement protocol's instruments around a user's own loop.

    with multiopt.profile(model, optimizer, probe="auto") as prof:
        for batch in loader:
            loss = loss_fn(model(batch)); loss.backward()
            optimizer.step(); optimizer.zero_grad()
    print(prof.summary())
    df = prof.to_frame()          # one row per optimizer step

`optimizer` is a MultiOptimizer, one torch optimizer, or a list (or dict) of torch
optimizers that the loop steps one after another.

Phases come from hooks, never from the user (the hooks are `recorder.Recorder`; a `Profile`
is the block and what it recorded). Every hook event closes a *window*: it
synchronises the probe, reads `allocated()` and `peak()`, and starts a new peak window with
`reset_peak()`, exactly as `measure()` does around the Trainer's phases, so with the tracked
probe the numbers equal the sweep's record for the same model, rules and batch.

- **forward**: from the model's forward pre-hook (the outermost call of the root module)
  until backward begins, so it holds the model *and the loss computed from its output*,
  as the Trainer's forward phase does. Backward's start is seen by wrapping
  `torch.autograd.backward` (what `Tensor.backward()` calls) for the duration of the
  `with` block: exact, where a forward post-hook would hand the loss's memory (for a
  language model, the log-softmax of every logit) to the backward phase. The allocated
  bytes when the model's forward returns are kept too, as `mem_after_model`.
- **backward**: exactly the `backward()` call (nested calls, e.g. reentrant checkpointing,
  count once). Gradients are counted when it returns (`grad_bytes`).
- **step**: from the optimizer's step pre-hook to its post-hook (a MultiOptimizer's own
  hooks; for a list, each optimizer's step is a window of the phase). Each child
  optimizer's own step pre/post hooks give its temporaries (`step_temp_bytes:<name>`: its
  peak above the memory at its start), as in the record's `optimizers`. The first step's
  figure includes the state it creates (lazily, in that step), so the summary and
  `optimizer_frame()` report the largest over the steps after the first.
- **zero_grad**: the optimizer's (or the model's) `zero_grad()`, wrapped for the duration
  of the block and restored on exit.
- Anything between phases (data loading, logging, clipping between backward and step) is
  *other*: its peak is kept as `peak_other`, so nothing escapes the windows, but
  `peak_total` is the max over the four phases, as in the record.

Rows: a row is one optimizer step. It starts at the first hook event after the previous
step and ends at the first forward (or backward, or step) after its own step, so a
`zero_grad()` right after `step()` belongs to the step before it (the Trainer's
`zero_grad_at="end"`), and one before the first forward belongs to the first step.
Several forwards/backwards in one row (gradient accumulation) are one phase each:
peak = the max, `mem_after_*` = after the last, counted in `n_forward`/`n_backward`.
A block that ends before its last step completes keeps that partial row (`stepped`
False).

Memory: the probe must see tensors made before the block (parameters, gradients, existing
optimizer state): `probe.track(model, optimizer)` on entry. Pass anything else made before
(a batch already on the device) as `track=`. With the cuda probe, torch.cuda sees
everything on its own.

Per-optimizer state: `multiopt.state.measured_state` and `expected_state` per child
optimizer after every step (`opt_state_bytes` per row, `prof.optimizer_frame()`).

Time: `perf_counter` at every window boundary, after the probe's sync (so CUDA work is
finished). Times are *instrumented* time: they include the probe's tracking (the tracked
probe's dispatch mode costs several x on small models) and the syncs at every boundary.
`iter_ms` runs from the end of the previous step (row 1: its first hook event) to the end
of this one, data loading included; `<phase>_ms` sum the phase's windows. For clean step
times use `measure()` (timed with tracking paused).
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from tabulate import tabulate
from torch import nn

from .. import kinds
from ..errors import UsageError
from ..kinds import Phase, Target
from ..train import optimizers as registry
from ..train.multi import MultiOptimizer, impl_of
from ..units import fmt_bytes, fmt_ms, missing
from .probes import Probe, make_probe
from .gpu import check_gpu, predict
from .recorder import OTHER, Recorder
from .work import Work, WorkCounter
from .state import expected_state, measured_state

__all__ = ["Profile", "profile"]

_ACTIVE: list["Profile"] = []  # at most one: hooks on torch.autograd.backward are process-wide

# to_frame()'s columns before the per-optimizer ones, phases in record order (kinds.Phase)
_STEP_COLUMNS = ("step", "stepped", "n_forward", "n_backward", "mem_step_start", "mem_after_model",
                 *(c for p in Phase for c in (f"mem_after_{p}", f"peak_{p}")), f"peak_{OTHER}", "peak_total",
                 "grad_bytes", "step_temp_bytes", "opt_state_bytes", *(f"{p}_ms" for p in Phase), "iter_ms")
_SHORT = {Phase.FORWARD: "fwd", Phase.BACKWARD: "bwd"}  # the summary's column names; others as they are


def profile(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | Mapping[str, torch.optim.Optimizer],
    probe: str | Probe = "auto",
    *,
    track: Iterable[Any] = (),
    target: str = Target.CPU,
    gpu: str | None = None,
) -> "Profile":
    """Instruments for a hand-written training loop; use as `with profile(...) as prof:`.

    probe: "auto" (cuda when torch sees a GPU and the model is on it, else tracked), "cuda",
    "tracked", or a Probe instance (entered here unless already active; an active one is
    left active on exit). track: tensors/modules/optimizers made before the block that the
    loop uses (the model and the optimizers are tracked anyway). target: "cuda" makes the
    tracked probe report what a CUDA device would (allocator blocks, reserved, workspaces).
    gpu: with target "cuda" on the tracked probe, count each step's work (instrument/work.py)
    and predict its time on this GPU (instrument/gpu.py: h100, h200, a100, l4, rtx4090): row
    fields step_flops, step_bytes, step_kernels, predicted_step_ms, predicted_ms_<phase>."""
    return Profile(model, optimizer, probe, track=track, target=target, gpu=gpu)


class Profile:
    """A profiled block and what it recorded: the `with` statement enters the probe and starts
    a `Recorder` (the hooks); the rows it writes are read here, as frames and text, during the
    block and after it. See the module docstring for the semantics."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        probe: str | Probe = "auto",
        *,
        track: Iterable[Any] = (),
        target: str = Target.CPU,
        gpu: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"profile() needs the model (a torch.nn.Module) first, got {type(model).__name__}")
        if gpu is not None:
            check_gpu(gpu, target, probe if isinstance(probe, str) else probe.name)
        self._gpu = gpu
        self._counting: Any = None
        self.model = model
        self._tops, self.optimizers = _optimizers(optimizer, model)
        self._probe_arg = probe
        self._target = target
        self._track = list(track)
        self.probe: Probe | None = None
        self._owns_probe = False
        self._recorder: Recorder | None = None
        self.rows: list[dict[str, Any]] = []
        self.mem_enter: int | None = None
        self.mem_exit: int | None = None

    # --- entering and leaving -------------------------------------------------------------

    @property
    def _active(self) -> bool:
        return self._recorder is not None and self._recorder.active

    def __enter__(self) -> "Profile":
        if self._active:
            raise UsageError("this profile is already active; use a new multiopt.profile(...) for another block")
        if _ACTIVE:
            raise UsageError("another multiopt.profile block is active; profiles do not nest")
        self.probe = probe = self._make_probe()
        if not _probe_active(probe):
            probe.__enter__()
            self._owns_probe = True
        recorder = Recorder(self.model, self._tops, self.optimizers, probe, self.rows)
        try:
            probe.track(self.model, *self.optimizers.values(), *self._track)
            if self._gpu is not None:
                self._count_work(probe, recorder)
            self.mem_enter = recorder.start()
        except BaseException:
            self._leave_probe(None, None, None)
            raise
        self._recorder = recorder
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._active:
            return
        try:
            self.mem_exit = self._recorder.stop()  # type: ignore[union-attr]
        finally:
            _ACTIVE.remove(self)
            self._leave_probe(*exc)

    def _count_work(self, probe: Probe, recorder: Recorder) -> None:
        """Count every op of the loop's phases (work.py), for the GPU prediction."""
        counter = WorkCounter(getattr(probe, "target", Target.CPU), host=getattr(probe, "is_host", lambda key: False))
        counting = probe.counting(counter)
        if not counting.__enter__():
            counting.__exit__(None, None, None)
            raise UsageError(f"gpu={self._gpu!r} predicts from the tracked probe's work counters; the "
                             f"{probe.name} probe counts none: use probe='tracked' with target='cuda'")
        self._counting = counting
        recorder.counter, recorder.on_row_work = counter, self._predict

    def _predict(self, row: dict[str, Any], work: Work) -> None:
        total = work.total()
        row.update(step_flops=total.flops, step_bytes=total.bytes, step_kernels=total.kernels)
        p = predict(work, self._gpu)  # type: ignore[arg-type]
        row.update(gpu=p.gpu, predicted_step_ms=p.step_ms, predicted_check=p.checked,
                   **{f"predicted_ms_{phase}": ms for phase, ms in p.phase_ms.items()})

    def _leave_probe(self, *exc: Any) -> None:
        if self._counting is not None:
            counting, self._counting = self._counting, None
            counting.__exit__(None, None, None)
        if self._owns_probe and self.probe is not None:
            self._owns_probe = False
            self.probe.__exit__(*exc)

    def _make_probe(self) -> Probe:
        arg = self._probe_arg
        if isinstance(arg, Probe):
            return arg
        if not isinstance(arg, str):
            raise UsageError(f"probe must be 'auto', 'cuda', 'tracked' or a Probe, got {type(arg).__name__}")
        kind = arg.strip().lower()
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        if kind == "auto":
            on_gpu = device.type == "cuda" and torch.cuda.is_available()
            kind = kinds.Probe.CUDA if on_gpu else kinds.Probe.TRACKED
        if kind == kinds.Probe.FAKE:
            raise UsageError("profile() runs your loop on real tensors; use probe='tracked' (CPU) or 'cuda'")
        if kind == kinds.Probe.TRACKED and device.type != "cpu":
            raise UsageError(f"the tracked probe measures CPU tensors, and the model is on {device}; use probe='cuda'")
        if kind == kinds.Probe.CUDA:
            return make_probe(kind, device=device)
        return make_probe(kind, device="cpu", target=self._target)

    # --- results --------------------------------------------------------------------------------

    def state(self) -> "OrderedDict[str, dict[str, Any]]":
        """Per optimizer, now: measured and expected state (StateBytes; expected None for
        optimizers outside the registry), class, implementation and parameter counts."""
        out: OrderedDict[str, dict[str, Any]] = OrderedDict()
        for key, opt in self.optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            out[key] = {
                "optimizer": registry.name_of(opt),
                "impl": impl_of(opt),
                "n_params": sum(p.numel() for p in params),
                "n_param_tensors": len(params),
                "measured": measured_state(opt),
                "expected": expected_state(opt),
            }
        return out

    def optimizer_frame(self) -> pd.DataFrame:
        """One row per optimizer: state bytes measured and expected, their match, and the
        largest step temporaries seen in steps after the first (None until there is one):
        the first step also creates the lazily built state, which is not a temporary."""
        rows = []
        for key, s in self.state().items():
            m, e = s["measured"], s["expected"]
            col = f"step_temp_bytes:{key}"
            temps = [r[col] for r in self._rows_after_first() if r.get(col) is not None]
            rows.append({
                "name": key, "optimizer": s["optimizer"], "impl": s["impl"], "n_params": s["n_params"],
                "n_param_tensors": s["n_param_tensors"], "n_tensors": m.n_tensors,
                "state_bytes": m.total, "state_scalar_bytes": m.scalar, "state_alloc_bytes": m.alloc,
                "expected": None if e is None else e.total,
                "matches": None if e is None else e.total == m.total,
                "step_temp_bytes": max(temps) if temps else None,
            })
        return pd.DataFrame(rows)

    def _rows_after_first(self) -> list[dict[str, Any]]:
        """The rows after the first row that stepped (rows before it hold no step)."""
        first = next((i for i, r in enumerate(self.rows) if r.get("stepped")), len(self.rows))
        return self.rows[first + 1:]

    def to_frame(self) -> pd.DataFrame:
        """One row per step (pandas DataFrame), columns in a stable order; absent values NaN."""
        rows = list(self.rows)
        open_row = self._recorder.row if self._active else None  # type: ignore[union-attr]
        if open_row is not None:  # a row still open inside the block
            rows.append({k: v for k, v in open_row.items() if not k.startswith("_")})
        per_opt = [f"{kind}:{k}" for kind in ("opt_state_bytes", "step_temp_bytes") for k in self.optimizers]
        known = {*_STEP_COLUMNS, *per_opt}
        cols = [*_STEP_COLUMNS, *per_opt, *sorted({c for r in rows for c in r} - known)]
        df = pd.DataFrame(rows, columns=cols)
        df.attrs.update(probe=self.probe.name if self.probe else None, time="instrumented")
        return df

    def summary(self, max_rows: int = 8) -> str:
        """Per-phase allocated/peak per step, per-optimizer state bytes (measured vs expected)
        and step times, as text."""
        probe = self.probe.name if self.probe else "?"
        lines = [f"multiopt.profile: {len(self.rows)} step(s), {probe} probe, "
                 f"{len(self.optimizers)} optimizer(s); bytes in memory_allocated terms"]
        df = self.to_frame()
        if len(df):
            lines += ["", _steps_table(df, max_rows)]
            if len(df) > max_rows:
                lines.append(f"({len(df) - max_rows} step(s) not shown; prof.to_frame() has them all)")
        lines += ["", _optimizers_table(self.optimizer_frame())]
        times = [r["iter_ms"] for r in self.rows[1:] if r.get("iter_ms") is not None]
        if times:
            q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
            lines += ["", f"iteration time (instrumented: {probe} probe on, synced at every phase boundary; "
                          f"steps 2..{len(self.rows)}): median {fmt_ms(statistics.median(times))}, "
                          f"IQR {fmt_ms(q[2] - q[0])}, min {fmt_ms(min(times))}"]
        unmodelled = getattr(self.probe, "unmodelled", ())
        if unmodelled:
            lines += ["", f"target cuda, not modelled: {', '.join(unmodelled)} (CUDA's kernels allocate differently: "
                          "those bytes are the CPU kernels', not CUDA's)"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<multiopt.Profile {len(self.rows)} steps, {len(self.optimizers)} optimizers>"


def _steps_table(df: pd.DataFrame, max_rows: int) -> str:
    """Allocated and peak per phase, one line per step (the first max_rows - 1 and the last)."""
    shown = df if len(df) <= max_rows else df.iloc[list(range(max_rows - 1)) + [len(df) - 1]]
    cols = ["mem_step_start", *(c for p in Phase for c in (f"mem_after_{p}", f"peak_{p}")), "peak_total"]
    headers = ["step", "start", *(h for p in Phase for h in (f"after {_SHORT.get(p, p)}", f"peak {_SHORT.get(p, p)}")),
               "peak", "iter (instr.)"]
    table = [[int(r["step"]), *(_fmt(r.get(c), _bytes) for c in cols), _fmt(r.get("iter_ms"), fmt_ms)]
             for _, r in shown.iterrows()]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def _optimizers_table(opt: pd.DataFrame) -> str:
    """State bytes measured against expected, and step temporaries, one line per optimizer."""
    rows = [(r["name"], r["optimizer"], r["impl"], f"{r['n_params']:,}", fmt_bytes(r["state_bytes"]),
             f"{r['state_bytes']:,}", _fmt(r["expected"], lambda v: f"{int(v):,}"),
             _fmt(r["matches"], lambda v: "yes" if v else "NO"), _fmt(r["step_temp_bytes"], _bytes))
            for _, r in opt.iterrows()]
    return tabulate(rows, headers=["optimizer", "class", "impl", "params", "state", "state bytes", "expected bytes",
                                   "match", "step temporaries (steps 2+)"], tablefmt="github", disable_numparse=True)


def _fmt(v: Any, f: Callable[[Any], str]) -> str:
    """`f(v)` for a value; "-" for a missing one (None, NaN)."""
    return "-" if missing(v) else f(v)


def _bytes(v: Any) -> str:
    """Byte columns come back from pandas as floats when some rows lack them."""
    return fmt_bytes(int(v))


def _probe_active(probe: Probe) -> bool:
    return bool(getattr(probe, "active", getattr(probe, "_active", False)))


def _optimizers(optimizer: Any, model: nn.Module) -> tuple[list[torch.optim.Optimizer], "OrderedDict[str, torch.optim.Optimizer]"]:
    """The objects the loop steps (hooks for phases) and the children that hold state (named)."""
    if isinstance(optimizer, MultiOptimizer):
        return [optimizer], OrderedDict(optimizer.optimizers)
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer], OrderedDict([(registry.name_of(optimizer), optimizer)])
    if isinstance(optimizer, (Mapping, list, tuple)):
        items = list(optimizer.values()) if isinstance(optimizer, Mapping) else list(optimizer)
        if not items:
            raise UsageError("profile() needs at least one optimizer")
        nested = [o for o in items if isinstance(o, MultiOptimizer)]
        if nested:
            raise UsageError("pass a MultiOptimizer on its own, not inside a list")
        # Validates types and disjointness, and names them the way MultiOptimizer does.
        multi = MultiOptimizer(optimizer, model=model)
        return items, OrderedDict(multi.optimizers)
    raise UsageError(f"profile() needs a MultiOptimizer, a torch optimizer or a list of them, got {type(optimizer).__name__}")
