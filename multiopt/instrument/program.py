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
- **Another member's optimizers, no run of its model.** A run marks its phases, its
  optimizers' construction, each train step and its end, and before each step which malloc
  holds each parameter's gradient. `spliced(base, steps)` puts another run's optimizer spans
  (over the same parameters; it may have made its gradients by hand) in place of `base`'s.
- **A step's model side, made once.** `repeated(p)`: a run whose last step made its
  gradients by hand, that step's forward and backward made again from the step before's
  (what persists, like cuBLAS workspaces, made once). Both walk a program as one stream of
  requests, marks and gradient tables (`_stream`, `_substitute`); both are exact against
  full runs in tests/test_program.py, and both serve the plan's predictions only.
- **One burst of frees, one order.** `Program.of` keeps each run of consecutive frees in
  its mallocs' order (`_sort_frees`): the allocator's state after the burst does not depend
  on it, and some frees' order follows storage addresses.

Replay costs about 2 us a request (a 1B Llama step: 15,000 requests, ~30 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

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
    #: (position, name): where the run passed a named point ("step:before", ...; `mark`
    #: events, which are not requests): the optimizers' spans are found by them (`spliced`)
    marks: tuple[tuple[int, str], ...] = ()
    #: (position, each trainable parameter's gradient as the index of its live malloc, -1:
    #: none): what the gradients were when the optimizers were about to step (`grads` events)
    grads: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @classmethod
    def of(cls, batch: int, log: Sequence[tuple]) -> "Program":
        """From a LoggedAllocator's log (with the run's ``("mark", name)`` and ``("grads",
        keys)`` events, if any). A key malloc'ed again after its free is a new malloc."""
        live: dict = {}
        ops = bytearray()
        refs: list[int] = []
        sizes: list[int] = []
        stages = []
        marks = []
        grads = []
        for ev in log:
            kind, i = ev[0], len(ops)
            if kind == "malloc":
                live[ev[1]] = i
                ops.append(MALLOC), refs.append(i), sizes.append(ev[2])
            elif kind == "free":
                ops.append(FREE), refs.append(live.pop(ev[1])), sizes.append(0)
            elif kind == "stage":
                ops.append(STAGE), refs.append(len(stages)), sizes.append(0)
                stages.append(ev[1])
            elif kind == "empty_cache":
                ops.append(EMPTY_CACHE), refs.append(0), sizes.append(0)
            elif kind == "mark":
                marks.append((i, ev[1]))
            elif kind == "grads":
                grads.append((i, tuple(-1 if k is None else live.get(k, -1) for k in ev[1])))
            else:
                raise ValueError(f"not an allocator request or a run's mark: {ev!r}")
        _sort_frees(ops, refs, {pos for pos, _ in marks} | {pos for pos, _ in grads})
        return cls(batch, bytes(ops), tuple(refs), tuple(sizes), tuple(stages), tuple(marks), tuple(grads))

    def __len__(self) -> int:
        return len(self.ops)

    def same_program(self, other: "Program") -> bool:
        """The same requests in the same order, sizes aside (and reductions' shapes and strides)."""
        return (self.ops == other.ops and self.refs == other.refs and self.marks == other.marks
                and self.grads == other.grads and [_kind(s) for s in self.stages] == [_kind(s) for s in other.stages])

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


def _sort_frees(ops: bytearray, refs: list[int], cuts: set[int]) -> None:
    """Each run of consecutive frees (not across a mark) in the order of their mallocs. Which
    of them Python or autocast frees first may follow storage addresses (autocast's cast
    cache, cleared at its exit under checkpointing), so two runs of one config free one burst
    in different orders; the allocator's state after the burst is the same either way (free
    blocks are filed and merged by address), so one order makes one program."""
    i, n = 0, len(ops)
    while i < n:
        if ops[i] != FREE:
            i += 1
            continue
        j = i + 1
        while j < n and ops[j] == FREE and j not in cuts:
            j += 1
        if j - i > 1:
            refs[i:j] = sorted(refs[i:j])
        i = j


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

    # every size at once (a 1B step: 15,000 requests; a plan asks for ~100 batches): exact in
    # int64, floor division as Python's
    xa, xb = torch.tensor(a.sizes, dtype=torch.int64), torch.tensor(b.sizes, dtype=torch.int64)
    sizes = tuple(torch.clamp(xa + torch.div((xb - xa) * (batch - p), q - p, rounding_mode="floor"), min=0).tolist())
    stages = tuple(((tuple(map(at, sa[0][0], sb[0][0])), tuple(map(at, sa[0][1], sb[0][1])), *sa[0][2:]), sa[1])
                   for sa, sb in zip(a.stages, b.stages))
    return Program(batch, a.ops, a.refs, sizes, stages, a.marks, a.grads)


#: the spans of a run that are its optimizers' (their construction, each step, each
#: zero_grad, each parameter's step inside backward with step_in_backward), between marks
#: "<name>:before" and "<name>:after"; the rest is the model's
OPTIMIZER_SPANS = ("optimizer", "step", "zero_grad", "param_step")


def spans(p: Program) -> list[tuple[str, int, int]]:
    """(name, start, end) of each optimizer span of `p`, in order (positions: requests)."""
    out, open_ = [], {}
    for pos, mark in p.marks:
        name, _, when = mark.partition(":")
        if name not in OPTIMIZER_SPANS:
            continue
        if when == "before":
            open_[name] = pos
        elif name in open_:
            out.append((name, open_.pop(name), pos))
    return sorted(out, key=lambda s: s[1])


def spliced(base: Program, steps: Program) -> Program | None:
    """`base` with its optimizers' requests replaced by those of `steps`: another run of the
    same model (same trainable parameters, same steps) with other optimizers, which may have
    made its gradients by hand instead of by backward (`measure(grads="by-hand")`). The model's
    requests (and their sizes: `base` may be a program `between` two batches) stay `base`'s;
    every span in OPTIMIZER_SPANS is `steps`' (their sizes do not depend on the batch).

    A free in an optimizer span of `steps` names its own span's mallocs or a gradient: a
    gradient is found by its place in `steps`' gradient tables and named by the same place in
    `base`'s. None where that cannot be done: other spans, other tables, a gradient `base`
    does not have or shares between parameters, a free of what neither side made (the
    batch, a parameter), or a model request of `base` that frees what its optimizers made."""
    bs, ss = spans(base), spans(steps)
    if [s[0] for s in bs] != [s[0] for s in ss]:
        return None
    grad = _same_gradients(steps.grads, base.grads)
    if grad is None:
        return None
    end = next((pos for pos, name in base.marks if name == "end"), len(base))

    def base_name(ref: int) -> tuple | None:
        return None if _inside(bs, ref) else ("b", ref)

    def steps_name(ref: int) -> tuple | None:
        if _inside(ss, ref):
            return ("s", ref)
        return ("b", grad[ref]) if grad.get(ref, -1) >= 0 else None

    def teardown(ev: tuple) -> bool:  # base's optimizers' state freed after the run: theirs, not steps'
        return ev[0] == "req" and ev[1] >= end and base.ops[ev[1]] == FREE and base_name(base.refs[ev[1]]) is None

    out = _Events(base.batch)
    parts = iter(_optimizer_parts(_stream(steps), spans_only=True))
    if not _substitute(out, base, _stream(base), "b", base_name, parts, steps, "s", steps_name, teardown):
        return None
    return out.program()


def _inside(sp: list[tuple[str, int, int]], i: int) -> bool:
    return any(a <= i < b for _, a, b in sp)


def _same_gradients(ours: tuple, theirs: tuple) -> dict[int, int] | None:
    """Each gradient malloc of our gradient tables -> the same parameter's in theirs (-1:
    none there); None when the tables do not match (another count, other parameters) or
    theirs hold one storage for two parameters' gradients (one free, where ours make two)."""
    if len(ours) != len(theirs):
        return None
    out: dict[int, int] = {}
    for (_, a), (_, b) in zip(ours, theirs):
        kept = [g for g in b if g >= 0]
        if len(a) != len(b) or len(set(kept)) != len(kept):
            return None
        for x, y in zip(a, b):
            if x >= 0:
                out.setdefault(x, y)
    return out


class _Events:
    """A log being written from other programs' requests (`Program.of` makes the result, at
    `batch`): each malloc keyed by (side, position), a free by the key `name` gives its malloc."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.log: list[tuple] = []

    def request(self, p: Program, side: str, i: int, name: Callable[[int], tuple | None]) -> bool:
        """Write p's request i; False (nothing written) where a free's malloc has no name."""
        op, ref = p.ops[i], p.refs[i]
        if op == MALLOC:
            self.log.append(("malloc", (side, i), p.sizes[i]))
        elif op == FREE:
            key = name(ref)
            if key is None:
                return False
            self.log.append(("free", key))
        elif op == STAGE:
            self.log.append(("stage", p.stages[ref]))
        else:
            self.log.append(("empty_cache",))
        return True

    def program(self) -> Program:
        return Program.of(self.batch, self.log)


def repeated(p: Program) -> Program | None:
    """The program of a run whose last step made its gradients by hand (`measure(grads=
    "last-by-hand")`: no forward, no backward) with that step's model side made again: every
    request of the step before outside its optimizers' spans (forward, backward, its loss
    freed), the last step's optimizers' requests in their places, its gradients the copies of
    the step before's. A run's steps make the same requests once the first has made what
    persists: the step before's mallocs still live at the run's end, other than gradients
    (each thread's cuBLAS workspaces, lazily built buffers), are not made again.

    Up to the run's "end" mark (its teardown left out). None where that cannot be done: fewer
    than two steps, other optimizer spans or gradient tables in the two, a model request of
    the step before that frees what came before it, or a free of what the copy does not make."""
    stream = _stream(p)
    at = [k for k, ev in enumerate(stream) if ev[0] == "mark" and ev[1].startswith("train_step:")]
    if len(at) < 4 or not any(name == "end" for _, name in p.marks):
        return None
    real, hand = stream[at[-4]:at[-3] + 1], stream[at[-2]:at[-1] + 1]
    real_tables, hand_tables = ([ev[1] for ev in part if ev[0] == "grads"] for part in (real, hand))
    if len(real_tables) != 1 or len(hand_tables) != 1 or _span_names(real) != _span_names(hand):
        return None
    grad = _same_gradients(((0, hand_tables[0]),), ((0, real_tables[0]),))
    if grad is None:
        return None
    u0 = next((ev[1] for ev in stream[at[-2]:] if ev[0] == "req"), len(p))  # the last step's first request
    end = next(pos for pos, name in p.marks if name == "end")
    freed = {r for o, r in zip(p.ops[:end], p.refs[:end]) if o == FREE}
    made = {ev[1] for ev in real if ev[0] == "req"}
    persists = {i for i in made if p.ops[i] == MALLOC and i not in freed} - set(real_tables[0])
    hand_made = {ev[1] for ev in _optimizer_parts(hand) if ev[0] == "req"}

    def copy_name(ref: int) -> tuple | None:  # the step before's model side, made again
        return ("c", ref) if ref in made and ref not in persists else None

    def hand_name(ref: int) -> tuple | None:  # the last step's optimizers: theirs, or the copies' gradients
        if ref in hand_made or ref < u0:
            return ("h", ref)
        return ("c", grad[ref]) if grad.get(ref, -1) >= 0 else None

    def persisting(ev: tuple) -> bool:  # made once, by the first step
        return ev[0] == "req" and p.ops[ev[1]] == MALLOC and ev[1] in persists

    out = _Events(p.batch)
    for ev in stream[:at[-2] + 1]:
        if not _write(out, p, ev, "h", lambda r: ("h", r)):
            return None
    parts = iter(_optimizer_parts(hand, spans_only=True))
    if not _substitute(out, p, real[1:-1], "c", copy_name, parts, p, "h", hand_name, persisting):
        return None
    out.log += [("mark", "train_step:after"), ("mark", "end")]
    return out.program()


def _stream(p: Program) -> list[tuple]:
    """`p` in its log's order: ("req", i), ("mark", name), ("grads", table) (a table's
    entries are malloc positions, -1 none)."""
    at: dict[int, list[tuple]] = {}
    for pos, table in p.grads:
        at.setdefault(pos, []).append(("grads", table))
    for pos, name in p.marks:
        at.setdefault(pos, []).append(("mark", name))
    out: list[tuple] = []
    for i in range(len(p) + 1):
        out += at.get(i, [])
        if i < len(p):
            out.append(("req", i))
    return out


def _span_names(part: list[tuple]) -> list[str]:
    return [ev[1] for ev in part if _is_span_mark(ev, "")]


def _optimizer_parts(part: list[tuple], spans_only: bool = False) -> list:
    """The events of `part` inside its optimizer spans (marks included): one flat list, or
    (`spans_only`) one list per span."""
    out: list[list[tuple]] = []
    current: list[tuple] | None = None
    for ev in part:
        if _is_span_mark(ev, ":before"):
            current = [ev]
        elif current is not None:
            current.append(ev)
            if _is_span_mark(ev, ":after"):
                out.append(current)
                current = None
    return out if spans_only else [ev for span in out for ev in span]


def _is_span_mark(ev: tuple, when: str) -> bool:
    return ev[0] == "mark" and ev[1].endswith(when) and ev[1].split(":")[0] in OPTIMIZER_SPANS


def _substitute(out: "_Events", p: Program, part: list[tuple], side: str, name: Callable[[int], tuple | None],
                spans_in: Iterator[list[tuple]], q: Program, q_side: str, q_name: Callable[[int], tuple | None],
                skip: Callable[[tuple], bool]) -> bool:
    """Write `part` (events of `_stream(p)`) into `out`, each of its optimizer spans replaced
    by the next of `spans_in` (events of `_stream(q)`, marks included), events `skip` says
    so left out. False where a free's malloc has no name on its side."""
    inside = False
    for ev in part:
        if _is_span_mark(ev, ":before"):
            inside = True
            if not all(_write(out, q, qev, q_side, q_name) for qev in next(spans_in)):
                return False
        elif inside:
            inside = not _is_span_mark(ev, ":after")
        elif not skip(ev) and not _write(out, p, ev, side, name):
            return False
    return True


def _write(out: "_Events", p: Program, ev: tuple, side: str, name: Callable[[int], tuple | None]) -> bool:
    """One event of `_stream(p)` into `out`, its requests keyed on `side`."""
    if ev[0] == "req":
        return out.request(p, side, ev[1], name)
    if ev[0] == "grads":
        out.log.append(("grads", tuple((side, x) if x >= 0 else None for x in ev[1])))
    else:
        out.log.append(ev)
    return True
