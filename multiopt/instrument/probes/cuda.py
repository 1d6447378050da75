"""CUDA probe: a thin adapter over torch.cuda's own allocator statistics for one device.

Nothing is tracked by us: the caching allocator already counts every block, so entering
the probe only checks the device and starts a peak window, and `track()` has nothing to do.
`limit_bytes` is applied with `torch.cuda.set_per_process_memory_fraction` (it caps what
the allocator may *reserve*, which is what makes CUDA raise OutOfMemoryError) and the
previous fraction is restored on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ...errors import UsageError
from ...kinds import Probe as ProbeName
from .base import Probe, iter_tensors


class CudaProbe(Probe):
    """Memory numbers straight from torch.cuda (memory_allocated semantics by definition)."""

    name = ProbeName.CUDA
    computes = True

    def __init__(self, device: torch.device | str | int | None = None, limit_bytes: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise UsageError("the cuda probe needs a CUDA device, and torch.cuda.is_available() is False here; "
                             "use the tracked or fake probe")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        else:
            device = torch.device(device)
        if device.type != "cuda":
            raise UsageError(f"the cuda probe measures a CUDA device; got device {str(device)!r}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"no such CUDA device {str(device)!r}: {torch.cuda.device_count()} visible")
        if limit_bytes is not None and (not isinstance(limit_bytes, int) or limit_bytes < 0):
            raise UsageError(f"limit_bytes must be a non-negative int of bytes, got {limit_bytes!r}")
        self.device = device
        self.limit_bytes = limit_bytes
        self._old_fraction: float | None = None
        self._active = False

    def __enter__(self) -> "CudaProbe":
        if self._active:
            raise UsageError("the cuda probe is already active; a probe cannot be entered twice")
        if self.limit_bytes is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
            self._old_fraction = getter(self.device) if getter is not None else 1.0
            torch.cuda.set_per_process_memory_fraction(min(self.limit_bytes / total, 1.0), self.device)
        self._active = True
        self.reset_peak()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._active:
            return
        self._active = False
        if self._old_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self._old_fraction, self.device)
            self._old_fraction = None

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def requested(self) -> int:
        return int(torch.cuda.memory_stats(self.device).get("requested_bytes.all.current", 0))

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def peak_requested(self) -> int:
        return int(torch.cuda.memory_stats(self.device).get("requested_bytes.all.peak", 0))

    def reset_peak(self) -> None:
        # Resets every peak stat of the device (allocated and reserved alike): CUDA keeps one window.
        torch.cuda.reset_peak_memory_stats(self.device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def track(self, *objs: Any) -> None:
        """Nothing to register (the allocator sees everything); still validates `objs`."""
        for _ in iter_tensors(*objs):
            pass

    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        with torch.device(self.device):
            return factory()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing to pause: torch.cuda counts at no cost."""
        yield

    def extra(self) -> dict[str, int]:
        return {
            "reserved": torch.cuda.memory_reserved(self.device),
            "peak_reserved": torch.cuda.max_memory_reserved(self.device),
        }
