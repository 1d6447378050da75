"""The probe interface: one place every memory number of the suite comes from.

All backends answer in the semantics of ``torch.cuda.memory_allocated()``: bytes of live
tensor storage, each storage rounded up to a multiple of 512 bytes (``allocated``), and the
exact bytes (``requested``, like CUDA's ``requested_bytes``). A storage is counted once,
however many tensors view it; in-place ops allocate nothing.
"""

from __future__ import annotations

import sys
import weakref
from abc import ABC, abstractmethod
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, Callable, ContextManager, Hashable, Iterator

import torch
from torch import nn

from ...errors import UsageError

#: How a probe runs `torch.compile`d code: ledger probes force it eager (Dynamo cannot trace
#: through their dispatch mode), the cuda probe lets it compile.
EAGER_UNDER_PROBE = "eager-under-probe"
COMPILED = "compiled"
#: Whether a step ran compiled code could not be seen (another profiler held the hook).
COMPILED_UNKNOWN = "unknown: a C profiler was active"


class Watch:
    """What happened during the blocks a probe watched (`probe.watching(watch)`): the storages
    born (weakly held, grouped by `owner()`'s answer at each birth; None = nobody's), the ops
    run (OpOverloads) and how many `torch.compile`d functions were entered. Ledger probes fill
    births and ops; every probe counts compiled calls."""

    def __init__(self, owner: Callable[[], Hashable | None] = lambda: None) -> None:
        self.owner = owner
        self.births: dict[Hashable, list[weakref.ref]] = {}
        self.ops: set[Any] = set()
        self.compiled_calls: int | None = 0  # None: not countable (a C profiler was active)

    def born(self, storage: torch.UntypedStorage) -> None:
        self.births.setdefault(self.owner(), []).append(weakref.ref(storage))

    def alive(self, owner: Hashable) -> list[torch.UntypedStorage]:
        """The storages born to `owner` that are still alive."""
        return [st for ref in self.births.get(owner, ()) if (st := ref()) is not None]

    def op_names(self) -> set[str]:
        """Qualified names of the ops run: `aten::_foreach_add_.Scalar`."""
        return {op.name() if hasattr(op, "name") else str(op) for op in self.ops}

    @contextmanager
    def counting_compiled_calls(self) -> Iterator[None]:
        """Count entries into Dynamo's compiled-function wrapper while the block runs (a
        profile hook: the wrapper's frame is the one trace a compiled region leaves when a
        stance runs it eagerly)."""
        previous = sys.getprofile()
        if previous is not None and not callable(previous):
            # A profiler written in C (cProfile) cannot be chained from Python: leave it in
            # place; whether the block entered compiled code is then unknown.
            self.compiled_calls = None
            yield
            return

        def hook(frame: FrameType, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_name == _COMPILE_WRAPPER and \
                    frame.f_code.co_filename.endswith(_EVAL_FRAME_FILE):
                self.compiled_calls += 1
            if previous is not None:
                previous(frame, event, arg)

        sys.setprofile(hook)
        try:
            yield
        finally:
            sys.setprofile(previous)


# torch/_dynamo/eval_frame.py, `_TorchDynamoContext.__call__`: the function every
# torch.compile'd callable runs through (torch 2.13; `DisableContext` wraps in `_fn`).
_COMPILE_WRAPPER = "compile_wrapper"
_EVAL_FRAME_FILE = "eval_frame.py"


class Probe(ABC):
    """Memory instrument for one device; use as a context manager (enter = start tracking).

    `peak()` is the highest `allocated()` since the last `reset_peak()` (or since entering),
    so a phase's peak is read as: `reset_peak()`, run the phase, `peak()`.
    """

    name: str
    device: torch.device
    #: False when tensors hold no values (fake): never call `.item()` or check losses.
    computes: bool = True

    def __enter__(self) -> "Probe":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    @abstractmethod
    def allocated(self) -> int:
        """Live tensor bytes, each storage rounded up to 512."""

    @abstractmethod
    def requested(self) -> int:
        """Live tensor bytes, exact."""

    @abstractmethod
    def peak(self) -> int:
        """Max of `allocated()` since the last `reset_peak()`."""

    @abstractmethod
    def peak_requested(self) -> int:
        """Max of `requested()` since the last `reset_peak()` (exact-byte tools compare to this)."""

    @abstractmethod
    def reset_peak(self) -> None:
        """Start a new peak window (both peaks) at the current values."""

    def sync(self) -> None:
        """Wait for queued device work (CUDA); a no-op where ops are synchronous."""

    @abstractmethod
    def track(self, *objs: Any) -> None:
        """Count tensors that existed before tracking started (see `iter_tensors`)."""

    @abstractmethod
    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Build a model so that its parameters are counted and live on this probe's device."""

    @abstractmethod
    def paused(self) -> ContextManager[None]:
        """Tracking off for a while, so timing runs pay no instrumentation cost."""

    #: How `torch.compile`d code runs under this probe (EAGER_UNDER_PROBE or COMPILED).
    compile_mode: str = COMPILED
    #: Whether `watching` records storages born and ops run (a ledger probe).
    sees_births: bool = False

    @contextmanager
    def watching(self, watch: Watch) -> Iterator[Watch]:
        """Record into `watch` what the block does: compiled calls on every probe, and on
        ledger probes the storages born and the ops run."""
        with watch.counting_compiled_calls():
            yield watch

    @contextmanager
    def counting(self, counter: Callable[[Any, tuple, dict | None, Any], None]) -> Iterator[bool]:
        """Tell `counter` every op the block runs (instrument/work.py). Yields whether it is
        told: ledger probes count, the cuda probe does not (False)."""
        yield False

    def extra(self) -> dict[str, int]:
        """Backend-only figures (CUDA: reserved bytes); empty elsewhere."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device}>"


def iter_tensors(*objs: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `objs`, as `Probe.track` understands them.

    Accepts tensors, nn.Modules (parameters, buffers, and the parameters' grads),
    torch optimizers (every tensor in `optimizer.state`), and lists/tuples/dicts of those.
    None is skipped. Anything else is a UsageError naming its type, so a typo is not
    silently measured as zero bytes.
    """
    stack: list[Any] = list(reversed(objs))
    while stack:
        obj = stack.pop()
        if obj is None:
            continue
        if isinstance(obj, torch.Tensor):
            yield obj
            if obj.is_leaf and obj.grad is not None:
                yield obj.grad
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                stack.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
        else:
            raise UsageError(
                f"track(): cannot find tensors in a {type(obj).__module__}.{type(obj).__qualname__}; "
                "pass tensors, nn.Modules, torch optimizers, or lists/tuples/dicts of them"
            )
