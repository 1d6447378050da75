"""The probe interface: one place every memory number of the suite comes from.

All backends answer in the semantics of ``torch.cuda.memory_allocated()``: bytes of live
tensor storage, each storage rounded up to a multiple of 512 bytes (``allocated``), and the
exact bytes (``requested``, like CUDA's ``requested_bytes``). A storage is counted once,
however many tensors view it; in-place ops allocate nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from ...errors import UsageError
from ...units import ALLOC_GRANULE, round_alloc

#: CUDA's caching allocator hands out blocks in multiples of this (kMinBlockSize).
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
