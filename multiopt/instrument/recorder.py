"""The hook recorder behind `multiopt.profile()`: hooks on a model and its optimizers that cut
a hand-written training loop into phase windows and one row per optimizer step.

What the windows and rows mean (phases from hooks, rows, memory, time) is written once, in
profile.py's docstring; this module is the machinery. A `Recorder` is started and stopped
by its `Profile`, which owns the probe and reads the rows.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ..kinds import Phase
from .probes import Probe
from .protocol import storage_bytes
from .state import StateBytes, measured_state
from .work import Work, WorkCounter

OTHER = "other"
"""The window key of whatever runs between phases (`peak_other`)."""


class Recorder:
    """Installs the hooks on `start()`, removes them on `stop()`, and appends a row to `rows`
    for every optimizer step seen in between. `tops` are the objects the loop steps (a
    MultiOptimizer, or each torch optimizer of a list); `optimizers` the named children that
    hold state."""

    def __init__(self, model: nn.Module, tops: list[torch.optim.Optimizer],
                 optimizers: OrderedDict[str, torch.optim.Optimizer], probe: Probe,
                 rows: list[dict[str, Any]]) -> None:
        self.model, self.tops, self.optimizers, self.probe = model, tops, optimizers, probe
        self.rows = rows
        self.row: dict[str, Any] | None = None  # the open row
        self.active = False
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str, Any, bool]] = []
        self._phase: Phase | None = None  # the phase the current window belongs to (None: between phases)
        self._fwd_depth = 0
        self._depth = {Phase.BACKWARD: 0, Phase.ZERO_GRAD: 0}  # nesting of the wrapped phases
        self._step_depth = 0
        self._child_start: dict[str, int] = {}
        self._last_step_end: float | None = None
        self._lone: str | None = None
        self._t = 0.0
        # Profile(gpu=...): a work counter told each window's phase and each child's step, and
        # told each closed row with the ops counted in it (work.py)
        self.counter: WorkCounter | None = None
        self.on_row_work: Callable[[dict[str, Any], Work], None] | None = None

    # --- starting and stopping ---------------------------------------------------------------

    def start(self) -> int:
        """Install the hooks and open the first window; returns the bytes allocated now."""
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        self.active = True
        self.probe.sync()
        now = self.probe.allocated()
        self.probe.reset_peak()
        self._t = time.perf_counter()
        return now

    def stop(self) -> int:
        """Close the open row (a partial one stays, `stepped` False) and remove every hook;
        returns the bytes allocated now."""
        try:
            if self.row is not None:
                now, _ = self._cut(None, close_row=True)
                return now
            return self.probe.allocated()
        finally:
            self.active = False
            self._uninstall()

    def _install(self) -> None:
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._on_forward_pre))
        self._handles.append(m.register_forward_hook(self._on_forward_post))
        tops = set(map(id, self.tops))
        children = {id(o) for o in self.optimizers.values()}
        for top in self.tops:
            self._handles.append(top.register_step_pre_hook(self._on_step_pre))
            if id(top) not in children:
                self._handles.append(top.register_step_post_hook(self._on_step_post))
        for key, opt in self.optimizers.items():
            self._handles.append(opt.register_step_pre_hook(self._child_pre(key)))
            self._handles.append(opt.register_step_post_hook(self._child_post(key)))
            if id(opt) in tops:  # a plain optimizer is its own phase: its post after the child's
                self._handles.append(opt.register_step_post_hook(self._on_step_post))
        for obj in [*self.tops, m]:
            self._patch(obj, "zero_grad", self._wrap_phase(Phase.ZERO_GRAD, obj.zero_grad))
        self._patch(torch.autograd, "backward", self._wrap_phase(
            Phase.BACKWARD, torch.autograd.backward, begun=self._count_backward, ended=self._grads))

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

    def _cut(self, next_phase: Phase | None, *, close_row: bool = False) -> tuple[int, int]:
        """Close the current window (its peak goes to its phase in the open row; `close_row`
        then closes that row) and open one for `next_phase`. Returns (allocated now, the
        closed window's peak)."""
        probe = self.probe
        probe.sync()
        t = time.perf_counter()
        now, peak = probe.allocated(), probe.peak()
        probe.reset_peak()
        row = self._open_row(now, t)
        key = self._phase or OTHER
        row[f"peak_{key}"] = max(row.get(f"peak_{key}") or 0, peak)
        if self._phase is not None:
            row[f"mem_after_{self._phase}"] = now  # the phase's last window wins
            row[f"{self._phase}_ms"] = (row.get(f"{self._phase}_ms") or 0.0) + (t - self._t) * 1e3
        if close_row:
            self._close_row()
        if next_phase is not None:
            self._open_row(now, t)
        self._phase = next_phase
        if self.counter is not None:
            self.counter.phase = next_phase
        self._t = t
        return now, peak

    def _open_row(self, now: int, t: float) -> dict[str, Any]:
        if self.row is None:
            self.row = {"step": len(self.rows) + 1, "mem_step_start": now, "_t0": t, "n_forward": 0,
                        "n_backward": 0, "stepped": False}
            if self.counter is not None:
                self.row["_ops0"] = len(self.counter.ops)
        return self.row

    def _begin(self, phase: Phase) -> None:
        """A phase begins. A forward or backward after a completed step starts the next row;
        a zero_grad (or another optimizer's step) after it stays in the step's row."""
        stepped = self.row is not None and self.row["stepped"]
        self._cut(phase, close_row=stepped and phase in (Phase.FORWARD, Phase.BACKWARD))

    def _end(self, phase: Phase) -> None:
        assert self._phase == phase
        self._cut(None)

    def _close_row(self) -> None:
        row = self.row
        if row is None:
            return
        self.row = None
        t0 = row.pop("_t0")
        end = row.pop("_t_step_end", None)
        start = self._last_step_end if self._last_step_end is not None else t0
        row["iter_ms"] = (end - start) * 1e3 if end is not None else None
        if end is not None:
            self._last_step_end = end
        peaks = [row[f"peak_{p}"] for p in Phase if row.get(f"peak_{p}") is not None]
        row["peak_total"] = max(peaks) if peaks else None
        if row.get("_before_step") is not None:
            row["step_temp_bytes"] = row["peak_step"] - row["_before_step"]
        row.pop("_before_step", None)
        first = row.pop("_ops0", None)
        if self.counter is not None and first is not None and self.on_row_work is not None:
            self.on_row_work(row, Work(tuple(self.counter.ops[first:]), self.counter.target))
        self.rows.append(row)

    # --- hooks --------------------------------------------------------------------------------

    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        self._fwd_depth += 1
        if self._fwd_depth == 1:
            self._begin(Phase.FORWARD)
            self.row["n_forward"] += 1  # type: ignore[index]

    def _on_forward_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._fwd_depth -= 1
        if self._fwd_depth == 0 and self.row is not None:
            self.probe.sync()
            self.row["mem_after_model"] = self.probe.allocated()

    def _count_backward(self) -> None:
        self.row["n_backward"] += 1  # type: ignore[index]

    def _grads(self) -> None:
        """Unique gradient storages, each rounded as the allocator does (as measure() counts)."""
        self.row["grad_bytes"] = storage_bytes(p.grad for p in self.model.parameters())  # type: ignore[index]

    def _wrap_phase(self, phase: Phase, original: Callable[..., Any], *, begun: Callable[[], None] | None = None,
                    ended: Callable[[], None] | None = None) -> Callable[..., Any]:
        """`original` as one `phase`: calls nested inside it (a MultiOptimizer's zero_grad calling
        its children's, autograd re-entering backward) belong to the outermost one."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth[phase] or not self.active:
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
            self._begin(Phase.STEP)
            assert self.row is not None
            self.row.setdefault("_before_step", self.probe.allocated())

    def _on_step_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._step_depth -= 1
        if self._step_depth == 0:
            self._end(Phase.STEP)
            row = self.row
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
            now, _ = self._cut(Phase.STEP)
            self._child_start[key] = now
            if self.counter is not None:
                self.counter.owner = key

        return pre

    def _child_post(self, key: str) -> Callable[..., None]:
        def post(opt: Any, args: Any, kwargs: Any) -> None:
            _, peak = self._cut(Phase.STEP)
            if self.counter is not None:
                self.counter.owner = None
            row = self.row
            assert row is not None
            col = f"step_temp_bytes:{key}"
            row[col] = max(row.get(col) or 0, peak - self._child_start.pop(key))
            if self._lone == key:
                self._lone = None
                self._on_step_post(opt, args, kwargs)

        return post
