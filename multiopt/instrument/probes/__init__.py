"""Memory probes: where every memory number of the suite comes from.

Three backends with one API (`Probe`), all in `torch.cuda.memory_allocated()` semantics:

- ``cuda``: torch.cuda's allocator statistics, on a GPU;
- ``tracked``: real CPU tensors, each storage counted as it is created and freed;
- ``fake``: FakeTensorMode tensors, sizes without compute, for configs too big to run.

``make_probe("auto")`` picks cuda when a GPU is available, else tracked.
"""

from __future__ import annotations

import torch

from ...errors import UsageError
from ...kinds import Probe as ProbeName, Target
from ..allocator import AllocatorConfig
from ...units import ALLOC_GRANULE, round_alloc
from .base import COMPILED, COMPILED_UNKNOWN, EAGER_UNDER_PROBE, Probe, Watch, iter_tensors
from .cuda import CudaProbe
from .fake import FakeProbe
from .target import CudaTarget, Workspaces
from .tracked import StorageLedger, TrackedProbe

# "auto" is not a probe: it stands for cuda where torch sees a GPU, else tracked
PROBE_NAMES: tuple[str, ...] = ("auto", *ProbeName.values())

__all__ = [
    "ALLOC_GRANULE",
    "COMPILED",
    "COMPILED_UNKNOWN",
    "EAGER_UNDER_PROBE",
    "Watch",
    "CudaProbe",
    "FakeProbe",
    "PROBE_NAMES",
    "Probe",
    "StorageLedger",
    "TrackedProbe",
    "CudaTarget",
    "Workspaces",
    "iter_tensors",
    "make_probe",
    "resolve_probe",
    "round_alloc",
]


def make_probe(
    name: str,
    *,
    device: torch.device | str | int | None = None,
    limit_bytes: int | None = None,
    target: str = Target.CPU,
    alloc_config: AllocatorConfig | None = None,
    workspaces: Workspaces = Workspaces(),
) -> Probe:
    """The probe called `name` ("auto", "cuda", "tracked" or "fake"), not yet entered.

    `limit_bytes` makes an allocation that would take `allocated()` past it raise
    `torch.OutOfMemoryError`, as a smaller device would (target cuda: `reserved` past it).
    `target="cuda"` makes a tracked or fake probe report what a CUDA device would
    (probes/target.py); `alloc_config` (default: PYTORCH_CUDA_ALLOC_CONF) and `workspaces` tune it.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "auto":
        key = resolve_probe("auto")[0]
    if key == ProbeName.CUDA:
        return CudaProbe(device, limit_bytes=limit_bytes)
    if key == ProbeName.TRACKED:
        return TrackedProbe(device, limit_bytes, target, alloc_config, workspaces)
    if key == ProbeName.FAKE:
        return FakeProbe(device, limit_bytes, target, alloc_config, workspaces)
    raise UsageError(f"unknown probe {name!r}; valid probes: {', '.join(PROBE_NAMES)}")


def resolve_probe(name: str) -> tuple[str, str]:
    """The probe `name` stands for ("auto": cuda when torch sees a GPU, else tracked) and the
    device its configs run on. The one place "auto" is resolved."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "auto":
        key = ProbeName.CUDA if torch.cuda.is_available() else ProbeName.TRACKED
    if key not in ProbeName.values():
        raise UsageError(f"unknown probe {name!r}; valid probes: {', '.join(PROBE_NAMES)}")
    probe = ProbeName(key)
    if probe == ProbeName.CUDA and not torch.cuda.is_available():
        raise UsageError("--probe cuda needs a CUDA GPU, and torch sees none; use --probe tracked or fake")
    # a probe's configs run where it measures: the GPU for cuda, this CPU for tracked and fake
    return probe, ("cuda" if probe == ProbeName.CUDA else "cpu")
