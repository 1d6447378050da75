"""The project's closed vocabularies as enums: probe, target, status, phase.

Each is a `str` enum, so a member *is* its text: records, JSON and DataFrames carry the
same strings as before (`json.dumps(Probe.FAKE) == '"fake"'`, `Probe.FAKE == "fake"`), while
code names members instead of spelling strings. This module is the one place those strings
are written (tests/test_layers.py holds the rest of the package to it).
"""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    """A str-valued enum that prints and formats as its value (Python 3.12 changed
    `format()` of mixed-in enums to the member name)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Probe(_Word):
    """Where memory numbers come from (docs/DESIGN.md, Memory semantics)."""

    CUDA = "cuda"        # torch.cuda on a real GPU
    TRACKED = "tracked"  # real CPU tensors, every storage counted
    FAKE = "fake"        # FakeTensorMode: sizes only, no data


class Target(_Word):
    """The device whose numbers a CPU probe reports."""

    CPU = "cpu"    # what this machine allocates
    CUDA = "cuda"  # what a CUDA device would report (its defaults, workspaces, allocator)


class Status(_Word):
    """How one config's measurement ended."""

    OK = "ok"
    OOM = "oom"
    DIVERGED = "diverged"
    ERROR = "error"


class Phase(_Word):
    """The four phases of a training step, in record order (`mem_after_<phase>`,
    `peak_<phase>`); execution order depends on zero_grad_at (record.phase_order)."""

    ZERO_GRAD = "zero_grad"
    FORWARD = "forward"
    BACKWARD = "backward"
    STEP = "step"


def effective_target(probe: str, target: str) -> Target:
    """The target a measurement reports: a cuda probe always reports CUDA's own numbers,
    whatever target the config asked for; a CPU probe reports the config's target."""
    return Target.CUDA if probe == Probe.CUDA else Target(target)
