"""`multiopt.profile()`: the measurement protocol's instruments around a user's own loop.

    with multiopt.profile(model, optimizer, probe="auto") as prof:
        for batch in loader:
            loss = loss_fn(model(batch)); loss.backward()
            optimizer.step(); optimizer.zero_grad()
    print(prof.summary())
    df = prof.to_frame()          # one row per optimizer step

`optimizer` is a MultiOptimizer, one torch optimizer, or a list (or dict) of torch
optimizers that the loop steps one after another.

Phases come from hooks, never from the user. Every hook event closes a *window*: it
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

import math
import statistics
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..train import optimizers as registry
from ..errors import UsageError
from ..train.multi import MultiOptimizer, impl_of
from ..units import fmt_bytes, fmt_ms
from .probes import Probe, make_probe
from .protocol import storage_bytes
from .gpu import check_gpu, predict
from .state import StateBytes, expected_state, measured_state
from .work import Work, WorkCounter

__all__ = ["Profile", "profile", "PHASES"]

PHASES = ("forward", "backward", "step", "zero_grad")

_ACTIVE: list["Profile"] = []  # at most one: hooks on torch.autograd.backward are process-wide


def profile(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | Mapping[str, torch.optim.Optimizer],
    probe: str | Probe = "auto",
    *,
    track: Iterable[Any] = (),
    target: str = "cpu",
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
    """The instruments and what they recorded; see the module docstring for the semantics."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        probe: str | Probe = "auto",
        *,
        track: Iterable[Any] = (),
        target: str = "cpu",
        gpu: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"profile() needs the model (a torch.nn.Module) first, got {type(model).__name__}")
        if gpu is not None:
            check_gpu(gpu, target, probe if isinstance(probe, str) else getattr(probe, "name", "tracked"))
        self._gpu = gpu
        self._counter: WorkCounter | None = None
        self._counting: Any = None
        self.model = model
        self._tops, self.optimizers = _optimizers(optimizer, model)
        self._probe_arg = probe
        self._target = target
        self._track = list(track)
        self.probe: Probe | None = None
        self._owns_probe = False
        self.rows: list[dict[str, Any]] = []
        self._row: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, Any, bool]] = []
        self._active = False
        self.mem_enter: int | None = None
        self.mem_exit: int | None = None

    # --- entering and leaving -------------------------------------------------------------

    def __enter__(self) -> "Profile":
        if self._active:
            raise UsageError("this profile is already active; use a new multiopt.profile(...) for another block")
        if _ACTIVE:
            raise UsageError("another multiopt.profile block is active; profiles do not nest")
        self.probe = self._make_probe()
        if not _probe_active(self.probe):
            self.probe.__enter__()
            self._owns_probe = True
        try:
            self.probe.track(self.model, *self.optimizers.values(), *self._track)
            self._install()
            if self._gpu is not None:
                self._count_work()
        except BaseException:
            self._uninstall()
            if self._owns_probe:
                self.probe.__exit__(None, None, None)
            raise
        _ACTIVE.append(self)
        self._active = True
        # Window bookkeeping: the phase the current window belongs to (None: between phases).
        self._phase: str | None = None
        self._fwd_depth = 0
        self._depth = {"backward": 0, "zero_grad": 0}  # nesting of the wrapped phases
        self._step_depth = 0
        self._child_start: dict[str, int] = {}
        self._last_step_end: float | None = None
        self._lone: str | None = None
        self.probe.sync()
        self.mem_enter = self.probe.allocated()
        self.probe.reset_peak()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._active:
            return
        try:
            if self._row is not None:
                self.mem_exit, _ = self._cut(None, close_row=True)
            elif self.probe is not None:
                self.mem_exit = self.probe.allocated()
        finally:
            self._active = False
            _ACTIVE.remove(self)
            if self._counting is not None:
                counting, self._counting = self._counting, None
                counting.__exit__(None, None, None)
            self._uninstall()
            if self._owns_probe and self.probe is not None:
                self._owns_probe = False
                self.probe.__exit__(*exc)

    def _count_work(self) -> None:
        """Count every op of the loop's phases (work.py), for the GPU prediction."""
        probe = self.probe
        counter = WorkCounter(getattr(probe, "target", "cpu"), host=getattr(probe, "is_host", lambda key: False))
        counting = probe.counting(counter)  # type: ignore[union-attr]
        if not counting.__enter__():
            counting.__exit__(None, None, None)
            raise UsageError(f"gpu={self._gpu!r} predicts from the tracked probe's work counters; the "
                             f"{probe.name} probe counts none: use probe='tracked' with target='cuda'")  # type: ignore[union-attr]
        self._counter, self._counting = counter, counting

    def _make_probe(self) -> Probe:
        arg = self._probe_arg
        if isinstance(arg, Probe):
            return arg
        if not isinstance(arg, str):
            raise UsageError(f"probe must be 'auto', 'cuda', 'tracked' or a Probe, got {type(arg).__name__}")
        name = arg.strip().lower()
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        if name == "auto":
            name = "cuda" if device.type == "cuda" and torch.cuda.is_available() else "tracked"
        if name == "fake":
            raise UsageError("profile() runs your loop on real tensors; use probe='tracked' (CPU) or 'cuda'")
        if name == "tracked" and device.type != "cpu":
            raise UsageError(f"the tracked probe measures CPU tensors, and the model is on {device}; use probe='cuda'")
        if name == "cuda":
            return make_probe(name, device=device)
        return make_probe(name, device="cpu", target=self._target)

    def _install(self) -> None:
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._on_forward_pre))
        self._handles.append(m.register_forward_hook(self._on_forward_post))
        tops = set(map(id, self._tops))
        for top in self._tops:
            self._handles.append(top.register_step_pre_hook(self._on_step_pre))
            if id(top) not in {id(o) for o in self.optimizers.values()}:
                self._handles.append(top.register_step_post_hook(self._on_step_post))
        for key, opt in self.optimizers.items():
            self._handles.append(opt.register_step_pre_hook(self._child_pre(key)))
            self._handles.append(opt.register_step_post_hook(self._child_post(key)))
            if id(opt) in tops:  # a plain optimizer is its own phase: its post after the child's
                self._handles.append(opt.register_step_post_hook(self._on_step_post))
        for obj in [*self._tops, m]:
            self._patch(obj, "zero_grad", self._wrap_zero_grad(obj.zero_grad))
        self._patch(torch.autograd, "backward", self._wrap_backward(torch.autograd.backward))

    def _patch(self, obj: Any, name: str, new: Any) -> None:
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, new)
        self._patched.append((obj, name, old, had))

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._patched:
            obj, name, old, had = self._patched.pop()
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

    # --- windows ------------------------------------------------------------------------------

    def _cut(self, next_phase: str | None, *, close_row: bool = False) -> tuple[int, int]:
        """Close the current window (its peak goes to its phase in the open row; `close_row`
        then closes that row) and open one for `next_phase`. Returns (allocated now, the
        closed window's peak)."""
        probe = self.probe
        assert probe is not None
        probe.sync()
        t = time.perf_counter()
        now, peak = probe.allocated(), probe.peak()
        probe.reset_peak()
        row = self._open_row(now, t)
        key = self._phase or "other"
        row[f"peak_{key}"] = max(row.get(f"peak_{key}") or 0, peak)
        if self._phase is not None:
            row[f"mem_after_{self._phase}"] = now  # the phase's last window wins
            row[f"{self._phase}_ms"] = (row.get(f"{self._phase}_ms") or 0.0) + (t - self._t) * 1e3
        if close_row:
            self._close_row()
        if next_phase is not None:
            self._open_row(now, t)
        self._phase = next_phase
        if self._counter is not None:
            self._counter.phase = next_phase
        self._t = t
        return now, peak

    def _open_row(self, now: int, t: float) -> dict[str, Any]:
        if self._row is None:
            self._row = {"step": len(self.rows) + 1, "mem_step_start": now, "_t0": t, "n_forward": 0, "n_backward": 0,
                         "stepped": False}
            if self._counter is not None:
                self._row["_ops0"] = len(self._counter.ops)
        return self._row

    def _begin(self, phase: str) -> None:
        """A phase begins. A forward or backward after a completed step starts the next row;
        a zero_grad (or another optimizer's step) after it stays in the step's row."""
        stepped = self._row is not None and self._row["stepped"]
        self._cut(phase, close_row=stepped and phase in ("forward", "backward"))

    def _end(self, phase: str) -> int:
        assert self._phase == phase
        now, _ = self._cut(None)
        return now

    def _close_row(self) -> None:
        row = self._row
        if row is None:
            return
        self._row = None
        t0 = row.pop("_t0")
        end = row.pop("_t_step_end", None)
        start = self._last_step_end if self._last_step_end is not None else t0
        row["iter_ms"] = (end - start) * 1e3 if end is not None else None
        if end is not None:
            self._last_step_end = end
        peaks = [row.get(f"peak_{p}") for p in PHASES if row.get(f"peak_{p}") is not None]
        row["peak_total"] = max(peaks) if peaks else None
        if row.get("_before_step") is not None:
            row["step_temp_bytes"] = row["peak_step"] - row["_before_step"]
        row.pop("_before_step", None)
        first = row.pop("_ops0", None)
        if self._counter is not None and first is not None:
            self._predict(row, Work(tuple(self._counter.ops[first:]), self._counter.target))
        self.rows.append(row)

    def _predict(self, row: dict[str, Any], work: Work) -> None:
        total = work.total()
        row.update(step_flops=total.flops, step_bytes=total.bytes, step_kernels=total.kernels)
        p = predict(work, self._gpu)  # type: ignore[arg-type]
        row.update(gpu=p.gpu, predicted_step_ms=p.step_ms, predicted_check=p.checked,
                   **{f"predicted_ms_{phase}": ms for phase, ms in p.phase_ms.items()})

    # --- hooks --------------------------------------------------------------------------------

    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        self._fwd_depth += 1
        if self._fwd_depth == 1:
            self._begin("forward")
            self._row["n_forward"] += 1  # type: ignore[index]

    def _on_forward_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._fwd_depth -= 1
        if self._fwd_depth == 0 and self._row is not None:
            self.probe.sync()  # type: ignore[union-attr]
            self._row["mem_after_model"] = self.probe.allocated()  # type: ignore[union-attr]

    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted() -> None:
            self._row["n_backward"] += 1  # type: ignore[index]

        def grads() -> None:
            self._row["grad_bytes"] = _grad_bytes(self.model)  # type: ignore[index]

        return self._wrap_phase("backward", original, begun=counted, ended=grads)

    def _wrap_zero_grad(self, original: Callable[..., Any]) -> Callable[..., Any]:
        return self._wrap_phase("zero_grad", original)

    def _wrap_phase(self, phase: str, original: Callable[..., Any], *, begun: Callable[[], None] | None = None,
                    ended: Callable[[], None] | None = None) -> Callable[..., Any]:
        """`original` as one `phase`: calls nested inside it (a MultiOptimizer's zero_grad calling
        its children's, autograd re-entering backward) belong to the outermost one."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth[phase] or not self._active:
                return original(*args, **kwargs)
            self._depth[phase] += 1
            try:
                self._begin(phase)
                if begun is not None:
                    begun()
                result = original(*args, **kwargs)
                self._end(phase)
                if ended is not None:
                    ended()
                return result
            finally:
                self._depth[phase] -= 1

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    def _on_step_pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._step_depth += 1
        if self._step_depth == 1:
            self._begin("step")
            assert self._row is not None
            self._row.setdefault("_before_step", self.probe.allocated())  # type: ignore[union-attr]

    def _on_step_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._step_depth -= 1
        if self._step_depth == 0:
            self._end("step")
            row = self._row
            assert row is not None
            row["_t_step_end"] = self._t
            row["stepped"] = True
            total = StateBytes(0, 0, 0, 0)
            for key, o in self.optimizers.items():
                s = measured_state(o)
                row[f"opt_state_bytes:{key}"] = s.total
                total = total + s
            row["opt_state_bytes"] = total.total

    def _child_pre(self, key: str) -> Callable[..., None]:
        def pre(opt: Any, args: Any, kwargs: Any) -> None:
            if self._step_depth == 0:  # stepped on its own although a MultiOptimizer wraps it
                self._on_step_pre(opt, args, kwargs)
                self._lone = key
            now, _ = self._cut("step")
            self._child_start[key] = now
            if self._counter is not None:
                self._counter.owner = key

        return pre

    def _child_post(self, key: str) -> Callable[..., None]:
        def post(opt: Any, args: Any, kwargs: Any) -> None:
            _, peak = self._cut("step")
            if self._counter is not None:
                self._counter.owner = None
            row = self._row
            assert row is not None
            col = f"step_temp_bytes:{key}"
            row[col] = max(row.get(col) or 0, peak - self._child_start.pop(key))
            if self._lone == key:
                self._lone = None
                self._on_step_post(opt, args, kwargs)

        return post

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

    def optimizer_frame(self) -> Any:
        """One row per optimizer: state bytes measured and expected, their match, and the
        largest step temporaries seen in steps after the first (None until there is one):
        the first step also creates the lazily built state, which is not a temporary."""
        import pandas as pd

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

    def to_frame(self) -> Any:
        """One row per step (pandas DataFrame), columns in a stable order; absent values NaN."""
        import pandas as pd

        rows = list(self.rows)
        if self._active and self._row is not None:  # a row still open inside the block
            rows.append({k: v for k, v in self._row.items() if not k.startswith("_")})
        base = ["step", "stepped", "n_forward", "n_backward", "mem_step_start", "mem_after_model",
                "mem_after_forward", "peak_forward", "mem_after_backward", "peak_backward",
                "mem_after_step", "peak_step", "mem_after_zero_grad", "peak_zero_grad", "peak_other", "peak_total",
                "grad_bytes", "step_temp_bytes", "opt_state_bytes",
                "forward_ms", "backward_ms", "step_ms", "zero_grad_ms", "iter_ms"]
        per_opt = [f"{kind}:{k}" for kind in ("opt_state_bytes", "step_temp_bytes") for k in self.optimizers]
        cols = base + per_opt + sorted({c for r in rows for c in r} - set(base) - set(per_opt))
        df = pd.DataFrame(rows, columns=cols)
        df.attrs.update(probe=self.probe.name if self.probe else None, time="instrumented")
        return df

    def summary(self, max_rows: int = 8) -> str:
        """Per-phase allocated/peak per step, per-optimizer state bytes (measured vs expected)
        and step times, as text."""
        from tabulate import tabulate


        probe = self.probe.name if self.probe else "?"
        lines = [f"multiopt.profile: {len(self.rows)} step(s), {probe} probe, "
                 f"{len(self.optimizers)} optimizer(s); bytes in memory_allocated terms"]
        df = self.to_frame()
        if len(df):
            shown = df if len(df) <= max_rows else df.iloc[list(range(max_rows - 1)) + [len(df) - 1]]
            table = []
            for _, r in shown.iterrows():
                table.append([int(r["step"])] + [
                    _fmt(r.get(c), _bytes)
                    for c in ("mem_step_start", "mem_after_forward", "peak_forward", "mem_after_backward", "peak_backward",
                              "mem_after_step", "peak_step", "mem_after_zero_grad", "peak_zero_grad", "peak_total")
                ] + [_fmt(r.get("iter_ms"), fmt_ms)])
            lines += ["", tabulate(table, headers=["step", "start", "after fwd", "peak fwd", "after bwd", "peak bwd",
                                                   "after step", "peak step", "after zero_grad", "peak zero_grad",
                                                   "peak", "iter (instr.)"],
                                   tablefmt="github", disable_numparse=True)]
            if len(df) > max_rows:
                lines.append(f"({len(df) - max_rows} step(s) not shown; prof.to_frame() has them all)")
        opt = self.optimizer_frame()
        lines += ["", tabulate(
            [(r["name"], r["optimizer"], r["impl"], f"{r['n_params']:,}", fmt_bytes(r["state_bytes"]),
              f"{r['state_bytes']:,}", "-" if r["expected"] is None or _nan(r["expected"]) else f"{int(r['expected']):,}",
              "-" if r["matches"] is None or _nan(r["matches"]) else ("yes" if r["matches"] else "NO"),
              _fmt(r["step_temp_bytes"], _bytes)) for _, r in opt.iterrows()],
            headers=["optimizer", "class", "impl", "params", "state", "state bytes", "expected bytes", "match",
                     "step temporaries (steps 2+)"],
            tablefmt="github", disable_numparse=True)]
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


def _fmt(v: Any, f: Callable[[Any], str]) -> str:
    """`f(v)` for a number; "-" for None/NaN. Byte columns come back from pandas as floats
    when some rows lack them: `f` gets an int for those (see `_bytes`)."""
    if v is None or _nan(v):
        return "-"
    return f(v)


def _bytes(v: Any) -> str:

    return fmt_bytes(int(v))


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _probe_active(probe: Probe) -> bool:
    return bool(getattr(probe, "active", getattr(probe, "_active", False)))


def _grad_bytes(model: nn.Module) -> int:
    """Unique gradient storages, each rounded as the allocator does (as measure() counts)."""
    return storage_bytes(p.grad for p in model.parameters())


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
