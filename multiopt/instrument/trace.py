"""Allocator traces captured on a GPU, replayed through the allocator model.

A trace is what `torch.cuda.memory._record_memory_history()` records and
`torch.cuda.memory._snapshot()` returns under ``device_traces``: every action of the caching
allocator, in order (``TraceEntry`` in ``c10/cuda/CUDACachingAllocator.h``): ``alloc`` (the
block's address, the requested size), ``free_requested`` / ``free_completed``,
``segment_alloc`` / ``segment_free`` (a cudaMalloc / cudaFree, the segment's size),
``segment_map`` / ``segment_unmap`` (pages of an expandable segment), ``oom``. `trim` keeps
(action, address, size) and drops the stack frames, so a fixture stays small.

`check` replays a trace through `CachingAllocator`, each new segment placed at the address
the trace gives it, and compares after every event:

- reserved: the trace's running sum of segment (and mapped page) sizes;
- for every ``alloc``, the address of the block the model picked. The same segments at the
  same addresses and the same address for every block means the same best-fit and split
  decisions, so the same block sizes: ``allocated`` counts block sizes;
- at the end, the blocks of the trace's final snapshot (``segments``): every allocated
  block's address and size, so the sizes themselves (unsplit tails included) are checked.

Assumed, as the capture (bench/cuda_traces.py) records them: one stream (the protocol's
default stream), so a ``free_requested`` is followed by its ``free_completed``, where the
model frees; no memory limit, so a segment is only ever freed by ``empty_cache()`` (a run of
``segment_free`` events is replayed as one call), never by a malloc retrying after a failed
cudaMalloc; an ``oom`` event is reported as a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UsageError
from .allocator import AllocatorOOM, CachingAllocator, UnknownKeyError
from .allocator_config import AllocatorConfig

FORMAT = "multiopt.cuda-trace/1"
ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free",
           "segment_map", "segment_unmap", "oom", "snapshot", "user_defined")
_MAX_SHOWN = 20


@dataclass(frozen=True)
class Event:
    """One allocator action: what `trim` keeps of a TraceEntry."""

    action: str
    addr: int
    size: int


@dataclass(frozen=True)
class Mismatch:
    """Where the model and the trace part: the event's index (-1: the final snapshot)."""

    index: int
    event: Event | None
    what: str

    def __str__(self) -> str:
        where = "final snapshot" if self.event is None else \
            f"event {self.index} ({self.event.action} {self.event.size:,} B at {self.event.addr:#x})"
        return f"{where}: {self.what}"


@dataclass(frozen=True)
class Check:
    """The outcome of replaying one trace: empty `mismatches` means exact."""

    events: int
    allocs: int
    peak_reserved: int
    mismatches: tuple[Mismatch, ...] = field(default=())

    @property
    def exact(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        head = (f"{self.events:,} events, {self.allocs:,} allocations, peak reserved {self.peak_reserved:,} B: "
                + ("exact" if self.exact else f"{len(self.mismatches)} mismatches"))
        return "\n".join([head, *(f"  {m}" for m in self.mismatches[:_MAX_SHOWN])])


def trim(snapshot: Mapping[str, Any], device: int = 0) -> tuple[list[Event], list[dict[str, Any]]]:
    """A `torch.cuda.memory._snapshot()` dict -> (its trace for `device`, its segments), frames
    dropped: each segment as {address, total_size, segment_type, blocks: [[address, size, state]]}."""
    traces = snapshot.get("device_traces")
    if not isinstance(traces, list) or device >= len(traces):
        raise UsageError(f"snapshot has no trace for device {device}: record it with "
                         "torch.cuda.memory._record_memory_history() before the run")
    events = [Event(str(e["action"]), int(e.get("addr", 0)), int(e.get("size", 0))) for e in traces[device]]
    segments = [{"address": int(s["address"]), "total_size": int(s["total_size"]),
                 "segment_type": s.get("segment_type", ""),
                 "blocks": _blocks(s)}
                for s in snapshot.get("segments", ()) if int(s.get("device", device)) == device]
    return events, segments


def _blocks(segment: Mapping[str, Any]) -> list[list[Any]]:
    out, addr = [], int(segment["address"])
    for b in segment.get("blocks", ()):
        a = int(b.get("address", addr))  # older snapshots leave block addresses implicit
        out.append([a, int(b["size"]), str(b["state"])])
        addr = a + int(b["size"])
    return out


def events_from(rows: Iterable[Sequence[Any]], where: str = "trace") -> list[Event]:
    """Events from a fixture's ``[[action, addr, size], ...]``; UsageError names a bad row."""
    out = []
    for i, row in enumerate(rows):
        if (not isinstance(row, (list, tuple)) or len(row) != 3 or row[0] not in ACTIONS
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[1:])):
            raise UsageError(f"{where}: event {i} is {row!r}, expected [action, address, size] with an action "
                             f"of {', '.join(ACTIONS)} and non-negative integers")
        out.append(Event(row[0], row[1], row[2]))
    return out


def check(events: Sequence[Event], config: AllocatorConfig = AllocatorConfig(),
          segments: Sequence[Mapping[str, Any]] | None = None) -> Check:
    """Replay `events` through the allocator model (see the module doc); `segments`: the
    trace's final snapshot, whose allocated blocks must be the model's at the end."""
    model = CachingAllocator(config)
    reserved = 0
    pending_release = False  # segments freed outside a malloc: empty_cache() was called
    bad: list[Mismatch] = []
    allocs = peak = 0
    for i, ev in enumerate(events):
        act = ev.action
        if act in ("segment_free", "segment_unmap"):
            reserved -= ev.size
            pending_release = True
            continue
        if pending_release:  # a run of segment frees is one empty_cache() (see the module doc)
            model.empty_cache()
            pending_release = False
        if act in ("segment_alloc", "segment_map"):
            reserved += ev.size
            peak = max(peak, reserved)
            model.next_segment_at(ev.addr)  # the malloc that follows creates (or maps) it here
            continue
        if act == "alloc":
            allocs += 1
            try:
                model.malloc(ev.addr, ev.size)
            except (AllocatorOOM, UsageError) as e:
                bad.append(Mismatch(i, ev, f"the model refused it: {e}"))
                continue
            got = model.address_of(ev.addr)
            if got is not None and got != ev.addr:
                bad.append(Mismatch(i, ev, f"the model placed it at {got:#x}"))
        elif act == "free_completed":
            try:
                model.free(ev.addr)
            except UnknownKeyError:
                bad.append(Mismatch(i, ev, "frees a block the trace never allocated (record from the process start)"))
        elif act == "oom":
            bad.append(Mismatch(i, ev, "the device ran out of memory; replay traces recorded without a limit"))
        else:
            continue  # free_requested (its free_completed follows), snapshot, user_defined
        if model.reserved != reserved:
            bad.append(Mismatch(i, ev, f"reserved {model.reserved:,} B, the trace {reserved:,} B"))
    if pending_release:
        model.empty_cache()
    if model.reserved != reserved:
        bad.append(Mismatch(len(events), None, f"reserved {model.reserved:,} B at the end, the trace {reserved:,} B"))
    if segments is not None:
        bad += _final_blocks(model, segments)
    return Check(len(events), allocs, peak, tuple(bad))


def _final_blocks(model: CachingAllocator, segments: Sequence[Mapping[str, Any]]) -> list[Mismatch]:
    """The allocated blocks (address, size) of the trace's final snapshot against the model's."""
    want = sorted((b[0], b[1]) for s in segments for b in s["blocks"] if b[2] == "active_allocated")
    have = sorted((b["address"], b["size"]) for s in model.snapshot()["segments"] for b in s["blocks"]
                  if b["allocated"])
    if want == have:
        return []
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    show = "; ".join([*(f"trace has {s:,} B at {a:#x}" for a, s in missing[:5]),
                      *(f"model has {s:,} B at {a:#x}" for a, s in extra[:5])])
    return [Mismatch(-1, None, f"{len(missing)} allocated blocks differ: {show}")]


def fixture(events: Sequence[Event], segments: Sequence[Mapping[str, Any]], **meta: Any) -> dict[str, Any]:
    """A trace as a JSON-ready fixture (``tests/fixtures/cuda-traces``): `meta` holds the
    config, the allocator options, torch's version and the device."""
    return {"format": FORMAT, **meta, "events": [[e.action, e.addr, e.size] for e in events],
            "segments": list(segments)}


def from_fixture(doc: Mapping[str, Any], where: str = "trace") -> tuple[list[Event], list[dict[str, Any]], AllocatorConfig]:
    """(events, final segments, allocator options) of a fixture written by `fixture`."""
    if doc.get("format") != FORMAT:
        raise UsageError(f"{where}: format {doc.get('format')!r}, expected {FORMAT!r}; is this a multiopt trace?")
    config = AllocatorConfig.parse(doc.get("alloc_conf") or "", source=f"{where}: alloc_conf")
    return events_from(doc.get("events", ()), where), list(doc.get("segments", ())), config
