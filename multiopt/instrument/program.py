"""A run's allocator program: the requests a tracked or fake run (target cuda) made of the
allocator model, in order, and what they answer without running again.

`measure(..., requests=log)` fills `log` through `allocator.LoggedAllocator`; `Program.of`
keeps it in canonical form: every malloc named by its position, every free by the position
of the malloc it frees, so two runs compare event by event whatever their storages' ids.

- **Any limit, one run.** The requests are the program's, not the allocator's decisions: a
  run under a limit makes the same requests as the unlimited run up to the malloc that runs
  out of memory (that malloc is where the probe raises). So `fits(limit)` replays the
  unlimited run's program under the limit, and answers what the limited run would (status
  ok or oom, to the request: tests/test_program.py checks it against limited runs).
- **Another batch, no run.** Where two runs at batches p < q make the same program (the
  same mallocs and frees in the same order; their sizes may differ), every request's size is
  taken affine in the batch: `between(a, b, n)` is the program at batch n. Exact where each
  size is affine: a tensor's bytes are numel x element size, and numel is linear in the
  batch for a fixed sequence length. A CUDA reduction's scratch is not (it appears only past
  a size, and saturates at the GPU's block count: probes/reduce.py), so a program keeps each
  reduction as the layout that sizes it (a `stage`), its shape and strides affine in the
  batch, and sizes the scratch again at replay. Still not so: anything else that picks its
  kernel, or its allocations, by size. So a program between two batches is a *prediction*,
  and the plan confirms it with a run (run/plan.py); batch 1 often makes another program
  (ops squeeze a size-1 dimension), which `same_program` refuses.

Replay costs about 2 us a request (a 1B Llama step: 15,000 requests, ~30 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .allocator import AllocatorConfig, AllocatorOOM, CachingAllocator
from .probes.reduce import staging

MALLOC, FREE, EMPTY_CACHE, STAGE = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class Program:
    """One run's allocator requests at `batch`: `ops[i]` (MALLOC, FREE, EMPTY_CACHE, STAGE),
    `refs[i]` (a malloc's own index; a free's malloc's index; a stage's index in `stages`; 0),
    `sizes[i]` (a malloc's bytes; 0). `stages`: each reduction's (layout, GPU) that sizes its
    scratch (probes/reduce.py), sized again at replay: at another batch the layout changes,
    and a scratch that was 0 bytes may not be."""

    batch: int
    ops: bytes
    refs: tuple[int, ...]
    sizes: tuple[int, ...]
    stages: tuple[tuple[Any, Any], ...] = ()

    @classmethod
    def of(cls, batch: int, log: Sequence[tuple]) -> "Program":
        """From a LoggedAllocator's log. A key malloc'ed again after its free is a new malloc."""
        live: dict = {}
        ops = bytearray(len(log))
        refs = [0] * len(log)
        sizes = [0] * len(log)
        stages = []
        for i, ev in enumerate(log):
            kind = ev[0]
            if kind == "malloc":
                live[ev[1]] = i
                refs[i], sizes[i] = i, ev[2]
            elif kind == "free":
                ops[i], refs[i] = FREE, live.pop(ev[1])
            elif kind == "stage":
                ops[i], refs[i] = STAGE, len(stages)
                stages.append(ev[1])
            else:
                ops[i] = EMPTY_CACHE
        return cls(batch, bytes(ops), tuple(refs), tuple(sizes), tuple(stages))

    def __len__(self) -> int:
        return len(self.ops)

    def same_program(self, other: "Program") -> bool:
        """The same requests in the same order, sizes aside (and reductions' shapes and strides)."""
        return (self.ops == other.ops and self.refs == other.refs
                and [_kind(s) for s in self.stages] == [_kind(s) for s in other.stages])

    def replay(self, config: AllocatorConfig, limit: int | None = None) -> CachingAllocator:
        """The allocator model after these requests. Raises AllocatorOOM where `limit` is met."""
        a = CachingAllocator(config, limit)
        malloc, free, empty, stage = a.malloc, a.free, a.empty_cache, a.stage
        stages = self.stages
        for op, ref, size in zip(self.ops, self.refs, self.sizes):
            if op == MALLOC:
                malloc(ref, size)
            elif op == FREE:
                free(ref)
            elif op == STAGE:
                key, gpu = stages[ref]
                stage(*staging(key, gpu))
            else:
                empty()
        return a

    def fits(self, config: AllocatorConfig, limit: int) -> bool:
        """Whether the run holds `limit` (the allocator's, on reserved bytes): what a run of
        the same config with that limit ends as, ok (True) or out of memory (False)."""
        try:
            self.replay(config, limit)
        except AllocatorOOM:
            return False
        return True


def _kind(stage: tuple[Any, Any]) -> tuple:
    """A stage's layout with its shape and strides' values left out: what must not change."""
    (shape, strides, offset, reduced, dtype, acc), gpu = stage
    return len(shape), len(strides), offset, reduced, dtype, acc, gpu


def between(a: Program, b: Program, batch: int) -> Program | None:
    """The program at `batch` from the same program at two batches, each request's size (and
    each reduction's shape and strides) affine in the batch (module doc: a prediction); None
    when `a` and `b` are different programs or at one batch."""
    if a.batch == b.batch or not a.same_program(b):
        return None
    p, q = a.batch, b.batch

    def at(x: int, y: int) -> int:
        return max(x + (y - x) * (batch - p) // (q - p), 0)

    sizes = tuple(at(x, y) for x, y in zip(a.sizes, b.sizes))
    stages = tuple(((tuple(map(at, sa[0][0], sb[0][0])), tuple(map(at, sa[0][1], sb[0][1])), *sa[0][2:]), sa[1])
                   for sa, sb in zip(a.stages, b.stages))
    return Program(batch, a.ops, a.refs, sizes, stages)
