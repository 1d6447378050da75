"""A pure-Python model of PyTorch's CUDA caching allocator (the "native" backend).

It answers "what would ``torch.cuda.memory_allocated()`` / ``memory_reserved()`` /
``memory_stats()["requested_bytes.all.current"]`` say after this sequence of tensor
allocations and frees?" without a GPU, fast enough to replay millions of events.

Modelled, rule by rule after ``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``),
with the options of `AllocatorConfig` (allocator_config.py, parsed as torch parses them):

- ``round_size``: requests rounded up to 512 B (kMinBlockSize), or to a power-of-2 division
  with ``roundup_power2_divisions`` (``roundup_power2_next_division``);
- ``get_pool`` / ``get_allocation_size``: small pool (<= 1 MiB, kSmallSize) in 2 MiB segments
  (kSmallBuffer); large pool in 20 MiB segments (kLargeBuffer) below 10 MiB (kMinLargeAlloc),
  else segments rounded up to 2 MiB (kRoundLarge);
- ``get_free_block``: best fit by (size, address) with the ``max_split_size`` /
  ``max_non_split_rounding_size`` rules; ``should_split``; ``alloc_found_block``;
- ``free_block`` / ``try_merge_blocks``: coalescing with free neighbours of the same segment;
- ``alloc_block`` with a byte limit (``set_per_process_memory_fraction``), then
  ``release_available_cached_blocks`` (oversize blocks), then ``release_cached_blocks``
  (= ``empty_cache``), then an out-of-memory error;
- ``expandable_segments:True``: ``ExpandableSegment`` / ``find_expandable_block`` /
  ``map_block`` / ``unmap_block``: one growing virtual segment per pool, mapped in 2 MiB
  (small) or 20 MiB (large) pages; reserved counts mapped pages only;
- stats: allocated (block sizes, as ``allocated_bytes``), requested (``requested_bytes``),
  reserved (``reserved_bytes``), each with its peak; ``reset_peak`` as ``resetPeakStats``.

Not modelled (documented simplifications):

- streams: the real allocator keys every pool by stream (``BlockComparatorSize`` compares the
  stream first); this model has the default stream only. ``recordStream`` / cross-stream
  events (``insert_events``, ``process_events``) are therefore absent: a free is immediate;
- CUDA graph private pools (``graph_pools``, ``beginAllocateToPool``), IPC sharing, peer
  access, ``backend:cudaMallocAsync`` (rejected by `CachingAllocator`), free-memory callbacks
  (``trigger_free_memory_callbacks``);
- ``garbage_collection_threshold`` is parsed and validated but not applied
  (``garbage_collect_cached_blocks`` depends on per-block reuse ages; a replay with a limit and
  that option set may keep more cache than torch would);
- device OOM other than the limit: without a ``limit`` every cudaMalloc succeeds. The limit is
  checked as ``alloc_block`` does: reserved + the segment size about to be requested;
- addresses are synthetic (a bump allocator, segments never overlap); they only break ties
  between free blocks of equal size, as real cudaMalloc addresses do. A replay of a real
  trace (`instrument/trace.py`) places each segment at the trace's address instead.

The per-event cost is a few dict/bisect operations on sorted lists of ``size << 52 | address``
ints (one per pool), so that ``bench/allocator_replay.py`` replays 1M events in about a second.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Hashable, Iterable, Sequence
from operator import attrgetter
from typing import Any

from ..errors import UsageError
from .allocator_config import (  # noqa: F401 - AllocatorConfig and kLargeBuffer are this model's too
    AllocatorConfig,
    kLargeBuffer,
    kRoundUpPowerOfTwoIntervals,
    kRoundUpPowerOfTwoStartLog2,
)

ALLOC_MODEL = "cuda-caching/torch-2.13"
"""The allocator rules this module models (recorded in records as ``alloc_model``)."""

# c10/cuda/CUDACachingAllocator.cpp constants (kLargeBuffer, which the options are checked
# against, is allocator_config's).
kMinBlockSize = 512  # all sizes are rounded to at least 512 bytes
kSmallSize = 1048576  # largest "small" allocation is 1 MiB
kSmallBuffer = 2097152  # "small" allocations are packed in 2 MiB blocks
kMinLargeAlloc = 10485760  # allocations between 1 and 10 MiB may use kLargeBuffer
kRoundLarge = 2097152  # round up large allocations to 2 MiB

_INF = 1 << 62  # max_split_size unset: SIZE_MAX in C++
_SHIFT = 52  # free-list key = size << _SHIFT | address; addresses stay below 4 PiB
_MASK = (1 << _SHIFT) - 1
_ADDR_BASE = 1 << 32  # first synthetic address (non-zero, like a device pointer)
_DEFAULT_VIRTUAL = 1 << 40  # expandable-segment address space when no limit is known


# --------------------------------------------------------------------------- rounding


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: round ``size`` up to the next of ``divisions`` equal
    steps between the powers of 2 around it (1200 with 4 divisions -> 1280)."""
    if size & (size - 1) == 0:
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    step = power2_floor >> (divisions.bit_length() - 1)
    if step == 0:
        return power2_floor << 1
    floor = size & ~(step - 1)
    return size if floor == size else floor + step


def round_size(size: int, config: AllocatorConfig = AllocatorConfig()) -> int:
    """``round_size``: the bytes a request of ``size`` occupies before any splitting."""
    if size < kMinBlockSize:
        return kMinBlockSize
    index = min(max(size.bit_length() - 1 - kRoundUpPowerOfTwoStartLog2, 0), kRoundUpPowerOfTwoIntervals - 1)
    divisions = config.roundup_power2_divisions[index]  # type: ignore[index]
    if divisions > 1 and size > kMinBlockSize * divisions:
        return roundup_power2_next_division(size, divisions)
    return kMinBlockSize * ((size + kMinBlockSize - 1) // kMinBlockSize)


def get_allocation_size(size: int) -> int:
    """``get_allocation_size``: the segment cudaMalloc'd for a rounded ``size`` that no cached
    block can serve."""
    if size <= kSmallSize:
        return kSmallBuffer
    if size < kMinLargeAlloc:
        return kLargeBuffer
    return kRoundLarge * ((size + kRoundLarge - 1) // kRoundLarge)


# --------------------------------------------------------------------------- errors


class AllocatorOOM(MemoryError):
    """The modelled allocator could not serve a request within its ``limit``, even after
    releasing every cached segment (the point where torch raises
    ``torch.OutOfMemoryError``). A `MemoryError`, since running out of memory is what it
    means; note that torch's own error is a `RuntimeError`, so code catching one does not
    catch the other.

    Attributes: ``nbytes`` (the request), ``size`` (rounded), ``alloc_size`` (the segment
    it needed), ``allocated``, ``reserved``, ``limit`` (bytes, at the time of the error).
    """

    def __init__(self, nbytes: int, size: int, alloc_size: int, allocated: int, reserved: int,
                 limit: int | None) -> None:
        self.nbytes, self.size, self.alloc_size = nbytes, size, alloc_size
        self.allocated, self.reserved, self.limit = allocated, reserved, limit
        super().__init__(
            f"modelled CUDA out of memory: tried to allocate {alloc_size} bytes (request {nbytes}, "
            f"rounded {size}) with a limit of {limit} bytes; {allocated} bytes allocated, "
            f"{reserved - allocated} reserved but unallocated. Raise the limit or lower the peak.")


class UnknownKeyError(KeyError):
    """`CachingAllocator.free` of a key that is not allocated (never was, or freed twice)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- the model


class _Block:
    """``Block``: a range of one segment, free (in its pool's free list) or allocated.
    ``prev``/``next`` link the blocks of a segment in address order; ``seg`` is the
    `_ExpandableSegment` or None for a cudaMalloc'd segment; ``mapped`` is False only for the
    unmapped address space of an expandable segment."""

    __slots__ = ("addr", "size", "req", "prev", "next", "allocated", "small", "seg", "mapped")

    def __init__(self, addr: int, size: int, small: bool, seg: _ExpandableSegment | None = None) -> None:
        self.addr = addr
        self.size = size
        self.req = 0
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.allocated = False
        self.small = small
        self.seg = seg
        self.mapped = True


class _ExpandableSegment:
    """``ExpandableSegment``: a reserved virtual range mapped page by page."""

    __slots__ = ("base", "page", "vsize")

    def __init__(self, base: int, page: int, vsize: int) -> None:
        self.base, self.page, self.vsize = base, page, vsize


class CachingAllocator:
    """One device's caching allocator, default stream only (see the module docstring).

    ``malloc(key, nbytes)`` / ``free(key)`` take the caller's handle for a tensor's storage
    (any hashable). ``limit``: the bytes the allocator may reserve (as
    ``torch.cuda.set_per_process_memory_fraction(f)`` sets ``f * total``); None = unbounded.
    Byte counters (``allocated``, ``requested``, ``reserved`` and their ``peak_*``) match
    ``torch.cuda.memory_stats()``'s ``allocated_bytes``, ``requested_bytes`` and
    ``reserved_bytes`` ``.all.current`` / ``.all.peak``.
    """

    def __init__(self, config: AllocatorConfig = AllocatorConfig(), limit: int | None = None) -> None:
        if config.backend != "native":
            raise UsageError(f"allocator model: backend:{config.backend} is not modelled, only the native "
                             "caching allocator; drop the backend option")
        if limit is not None and limit < 0:
            raise UsageError(f"allocator model: limit must be >= 0 bytes or None, got {limit}")
        self.config = config
        self.limit = limit
        self._mss = config.max_split_size if config.max_split_size is not None else _INF
        self._mnsr = config.max_non_split_rounding_size
        self._rp2 = config.roundup_power2_divisions if any(config.roundup_power2_divisions) else None  # type: ignore[arg-type]
        self._exp = config.expandable_segments
        # Per pool: sorted free-list keys (size << _SHIFT | addr) = the ordering of
        # BlockComparatorSize, and the free blocks by address.
        self._small_free: list[int] = []
        self._large_free: list[int] = []
        self._small_map: dict[int, _Block] = {}
        self._large_map: dict[int, _Block] = {}
        self._unmapped: dict[int, _Block] = {}  # BlockPool::unmapped of both pools, by address
        self._live: dict[Hashable, _Block | None] = {}  # key -> block (None: a 0-byte tensor)
        self._next_addr = _ADDR_BASE
        self._placed: int | None = None  # next_segment_at
        self._allocated = self._requested = self._reserved = 0
        self._peak_allocated = self._peak_requested = self._peak_reserved = 0
        self.num_device_alloc = 0  # cudaMalloc / map calls, as stats.num_device_alloc
        self.num_device_free = 0
        self.num_alloc_retries = 0
        self.num_ooms = 0

    # ----------------------------------------------------------------------- stats

    # Read-only views of the counters the hot path updates in place (plain attributes there:
    # a property per update would cost the replay a third of its speed).
    allocated = property(attrgetter("_allocated"), doc="Bytes of allocated blocks (``memory_allocated()``): block sizes, not requests.")
    requested = property(attrgetter("_requested"), doc="Bytes requested by live allocations (``requested_bytes.all.current``).")
    reserved = property(attrgetter("_reserved"), doc="Bytes of segments held from the device (``memory_reserved()``).")
    peak_allocated = property(attrgetter("_peak_allocated"), doc="Highest `allocated` since the last reset_peak().")
    peak_requested = property(attrgetter("_peak_requested"), doc="Highest `requested` since the last reset_peak().")
    peak_reserved = property(attrgetter("_peak_reserved"), doc="Highest `reserved` since the last reset_peak().")

    def reset_peak(self) -> None:
        """``resetPeakStats``: every peak becomes its current value."""
        self._peak_allocated = self._allocated
        self._peak_requested = self._requested
        self._peak_reserved = self._reserved

    def stats(self) -> dict[str, int]:
        return {"allocated": self._allocated, "requested": self._requested, "reserved": self._reserved,
                "peak_allocated": self._peak_allocated, "peak_requested": self._peak_requested,
                "peak_reserved": self._peak_reserved, "num_device_alloc": self.num_device_alloc,
                "num_device_free": self.num_device_free, "num_alloc_retries": self.num_alloc_retries,
                "num_ooms": self.num_ooms}

    # ----------------------------------------------------------------------- malloc / free

    def malloc(self, key: Hashable, nbytes: int) -> int:
        """Allocate ``nbytes`` for ``key`` (``DeviceCachingAllocator::malloc``); returns the size
        of the block it occupies (what ``allocated`` grew by). Raises `AllocatorOOM` past the
        limit, `UsageError` for a negative size or a key that is still allocated."""
        live = self._live
        if key in live:
            raise UsageError(f"allocator model: malloc of key {key!r}, which is still allocated; "
                             "free it first or use a fresh key")
        if nbytes <= 0:
            if nbytes == 0:  # allocate() hands out nullptr for 0 bytes without calling malloc
                live[key] = None
                return 0
            raise UsageError(f"allocator model: malloc of {nbytes} bytes for key {key!r}; sizes must be >= 0")
        # round_size
        if self._rp2 is None or nbytes <= kMinBlockSize:
            size = ((nbytes + 511) >> 9) << 9
        else:
            size = round_size(nbytes, self.config)
        small = size <= kSmallSize  # get_pool
        if small:
            free, fmap = self._small_free, self._small_map
        else:
            free, fmap = self._large_free, self._large_map
        mss = self._mss
        # get_free_block: lower_bound on (size, address)
        blk = None
        i = bisect_left(free, size << _SHIFT)
        if i < len(free):
            k = free[i]
            if self._exp:
                i = self._expandable_best_fit(free, fmap, i)
                k = free[i]
            bsize = k >> _SHIFT
            # Oversize blocks (>= max_split_size) never serve a request below max_split_size,
            # and serve a larger one only within max_non_split_rounding_size of it.
            if (bsize < mss) if size < mss else (bsize < size + self._mnsr):
                del free[i]
                blk = fmap.pop(k & _MASK)
        if blk is None:
            blk = self._alloc_new(nbytes, size, small)
        # should_split / alloc_found_block
        rem = blk.size - size
        if rem and ((rem >= kMinBlockSize) if (small or self._exp) else (size < mss and rem > kSmallSize)):
            blk = self._split(blk, size, small, free, fmap)
        blk.allocated = True
        blk.req = nbytes
        live[key] = blk
        a = self._allocated + blk.size
        self._allocated = a
        if a > self._peak_allocated:
            self._peak_allocated = a
        r = self._requested + nbytes
        self._requested = r
        if r > self._peak_requested:
            self._peak_requested = r
        return blk.size

    @staticmethod
    def _split(blk: "_Block", size: int, small: bool, free: list, fmap: dict) -> "_Block":
        """`alloc_found_block`'s split: the first `size` bytes become the allocated block, the
        remainder stays in the pool as a free block (its neighbour in the segment's list)."""
        b = _Block(blk.addr, size, small, blk.seg)
        p = blk.prev
        b.prev = p
        if p is not None:
            p.next = b
        b.next = blk
        blk.prev = b
        blk.addr += size
        blk.size = blk.size - size
        insort(free, (blk.size << _SHIFT) | blk.addr)
        fmap[blk.addr] = blk
        return b

    def free(self, key: Hashable) -> None:
        """Free ``key``'s block (``free`` -> ``free_block``): it returns to its pool, merged with
        free neighbours of its segment (``try_merge_blocks``). Raises `UnknownKeyError`."""
        try:
            blk = self._live.pop(key)
        except KeyError:
            raise UnknownKeyError(f"allocator model: free of key {key!r}, which is not allocated "
                                  "(never allocated, or freed twice)") from None
        if blk is None:
            return
        self._allocated -= blk.size
        self._requested -= blk.req
        blk.allocated = False
        self._file(blk)

    def stage(self, buf: int, sem: int, source: Any = None) -> None:
        """A CUDA reduction's scratch (probes/reduce.py): a staging buffer of `buf` bytes, then
        semaphores of `sem`, both freed in reverse order before the kernel's op returns; no
        allocation when `buf` is 0. `source`: what sized them (a LoggedAllocator logs it in
        their place, so a program at another batch can size them again)."""
        if buf:
            # the base methods: a logged allocator logs the stage, not its parts
            CachingAllocator.malloc(self, ("stage", "buffer"), buf)
            CachingAllocator.malloc(self, ("stage", "semaphores"), sem)
            CachingAllocator.free(self, ("stage", "semaphores"))
            CachingAllocator.free(self, ("stage", "buffer"))

    def empty_cache(self) -> None:
        """``emptyCache`` -> ``release_cached_blocks``: cudaFree every cached segment that is one
        whole free block; with expandable segments, unmap every fully free page."""
        self._release_cached_blocks()

    def address_of(self, key: Hashable) -> int | None:
        """The address of ``key``'s block (None for a 0-byte allocation)."""
        blk = self._live[key]
        return None if blk is None else blk.addr

    def next_segment_at(self, addr: int) -> None:
        """Place the next segment this model creates at ``addr`` (a real trace's cudaMalloc
        address), so ties between equal free blocks break as they did on the device."""
        if not 0 < addr <= _MASK:
            raise UsageError(f"allocator model: segment address {addr} is outside (0, 2**{_SHIFT})")
        self._placed = addr

    def _segment_addr(self, size: int, align: int) -> int:
        """Where a new segment of `size` bytes goes: the placed address if one was given (as
        is), else the next synthetic one (aligned to `align`)."""
        addr, self._placed = self._placed, None
        if addr is None:
            addr = -(-self._next_addr // align) * align
        self._next_addr = max(self._next_addr, addr + size)
        return addr

    def size_of(self, key: Hashable) -> int:
        """The block size ``key`` occupies (0 for a 0-byte allocation)."""
        blk = self._live[key]
        return 0 if blk is None else blk.size

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    # ----------------------------------------------------------------------- internals

    def _pool(self, small: bool) -> tuple[list[int], dict[int, _Block]]:
        return (self._small_free, self._small_map) if small else (self._large_free, self._large_map)

    def _insert_free(self, b: _Block) -> None:
        free, fmap = self._pool(b.small)
        insort(free, (b.size << _SHIFT) | b.addr)
        fmap[b.addr] = b

    def _remove_free(self, b: _Block) -> None:
        free, fmap = self._pool(b.small)
        del free[bisect_left(free, (b.size << _SHIFT) | b.addr)]
        del fmap[b.addr]

    def _alloc_new(self, nbytes: int, size: int, small: bool) -> _Block:
        """The ``malloc`` path when no cached block fits: ``alloc_block``, else
        ``release_available_cached_blocks`` + ``alloc_block``, else ``release_cached_blocks`` +
        ``alloc_block``, else out of memory. Returns a free block of >= size, out of any pool."""
        alloc_size = get_allocation_size(size)
        blk = self._alloc_block(size, alloc_size, small)
        if blk is None and self._release_available_cached_blocks(size, small):
            blk = self._alloc_block(size, alloc_size, small)
        if blk is None:
            self._release_cached_blocks()
            self.num_alloc_retries += 1
            blk = self._alloc_block(size, alloc_size, small)
        if blk is None:
            self.num_ooms += 1
            raise AllocatorOOM(nbytes, size, alloc_size, self._allocated, self._reserved, self.limit)
        return blk

    def _grow_reserved(self, nbytes: int) -> None:
        r = self._reserved + nbytes
        self._reserved = r
        if r > self._peak_reserved:
            self._peak_reserved = r
        self.num_device_alloc += 1

    def _alloc_block(self, size: int, alloc_size: int, small: bool) -> _Block | None:
        """``alloc_block``: fails when reserved + alloc_size would pass the limit (the
        ``set_fraction`` check, made before the expandable-segment branch, with alloc_size
        there too); else a new segment, or more mapped pages of an expandable one."""
        if self.limit is not None and self._reserved + alloc_size > self.limit:
            return None
        if self._exp:
            return self._try_allocate_expandable_block(size, small)
        addr = self._segment_addr(alloc_size, 1)
        self._grow_reserved(alloc_size)
        return _Block(addr, alloc_size, small)

    def _release_block(self, b: _Block) -> None:
        """``release_block``: cudaFree a whole cached segment."""
        self._remove_free(b)
        self._reserved -= b.size
        self.num_device_free += 1

    def _release_available_cached_blocks(self, size: int, small: bool) -> bool:
        """``release_available_cached_blocks``: with max_split_size set, cudaFree the smallest
        oversize cached block that covers the request, else the largest oversize ones until
        their total covers it. Expandable segments are left to ``release_cached_blocks`` (the
        C++ asserts they never get here)."""
        if self._mss == _INF or self._exp:
            return False
        free, fmap = self._pool(small)
        key_size = max(size, self._mss)
        i = bisect_left(free, key_size << _SHIFT)
        if i < len(free):
            self._release_block(fmap[free[i] & _MASK])
            return True
        if i == 0:
            return False
        released = 0
        i -= 1
        while released < key_size and i >= 0 and (free[i] >> _SHIFT) >= self._mss:
            b = fmap[free[i] & _MASK]
            released += b.size
            self._release_block(b)
            i -= 1
        return released >= key_size

    def _release_cached_blocks(self) -> None:
        """``release_cached_blocks`` -> ``release_blocks`` for the large then the small pool."""
        for small in (False, True):
            free, fmap = self._pool(small)
            to_unmap = []
            for k in list(free):
                b = fmap[k & _MASK]
                if b.seg is not None:
                    to_unmap.append(b)
                elif b.prev is None and b.next is None:
                    self._release_block(b)
            for b in to_unmap:
                self._unmap_block(b)
                if b.prev is None and b.next is None and not b.mapped:  # release_expandable_segment
                    del self._unmapped[b.addr]

    # ----------------------------------------------------------------------- expandable segments

    def _expandable_best_fit(self, free: list[int], fmap: dict[int, _Block], i: int) -> int:
        """``get_free_block`` with expandable segments: a block followed by unmapped space counts
        as the size it can grow to, so move on while the next block can grow less."""
        def esize(b: _Block) -> int:
            n = b.next
            return b.size + (n.size if n is not None and not n.mapped else 0)

        cur = esize(fmap[free[i] & _MASK])
        while i + 1 < len(free):
            nxt = esize(fmap[free[i + 1] & _MASK])
            if nxt >= cur:
                break
            i, cur = i + 1, nxt
        return i

    def _file(self, blk: _Block) -> None:
        """A block that just became free (``free_block``), mapped (``map_block``) or unmapped
        (``unmap_block``): ``try_merge_blocks`` with both neighbours (each free neighbour in the
        same mapped state is absorbed, taken off its free list or the unmapped ranges), then
        the block goes on its pool's free list, or among the unmapped ranges. One call per
        free on the replay's hot path, so the two sides are written out."""
        mapped = blk.mapped
        free, fmap = (self._small_free, self._small_map) if blk.small else (self._large_free, self._large_map)
        p = blk.prev
        if p is not None and not p.allocated and p.mapped == mapped:  # [p blk] -> blk takes p's address
            if mapped:
                del free[bisect_left(free, (p.size << _SHIFT) | p.addr)]
                del fmap[p.addr]
            else:
                del self._unmapped[p.addr]
            blk.addr = p.addr
            blk.size += p.size
            p = p.prev
            blk.prev = p
            if p is not None:
                p.next = blk
        n = blk.next
        if n is not None and not n.allocated and n.mapped == mapped:  # [blk n]
            if mapped:
                del free[bisect_left(free, (n.size << _SHIFT) | n.addr)]
                del fmap[n.addr]
            else:
                del self._unmapped[n.addr]
            blk.size += n.size
            n = n.next
            blk.next = n
            if n is not None:
                n.prev = blk
        if mapped:
            insort(free, (blk.size << _SHIFT) | blk.addr)
            fmap[blk.addr] = blk
        else:
            self._unmapped[blk.addr] = blk

    def _find_expandable_block(self, size: int, small: bool) -> _Block:
        """``find_expandable_block``: the lowest-address run of free/unmapped space of >= size in
        this pool's expandable segments, else a new segment (all unmapped)."""
        def allocatable(b: _Block | None) -> bool:
            return b is not None and not b.allocated

        for addr in sorted(self._unmapped):
            c = self._unmapped[addr]
            if c.small != small:
                continue
            if allocatable(c.prev):
                c = c.prev  # type: ignore[assignment]
            b: _Block | None = c
            got = 0
            while got < size and allocatable(b):
                got += b.size  # type: ignore[union-attr]
                b = b.next  # type: ignore[union-attr]
            if got >= size:
                return c
        page = kSmallBuffer if small else kLargeBuffer
        # Address space for 1 1/8 of the device: here of the limit, when there is one.
        total = self.limit if self.limit else _DEFAULT_VIRTUAL
        vsize = -(-(total + total // 8) // page) * page
        base = self._segment_addr(vsize, page)
        es = _ExpandableSegment(base, page, vsize)
        c = _Block(base, vsize, small, es)
        c.mapped = False
        self._unmapped[base] = c
        return c

    def _map_block(self, b: _Block, size: int) -> None:
        """``map_block`` / ``ExpandableSegment::map``: map whole pages covering ``size`` bytes
        at the start of unmapped block ``b``; the rest stays unmapped; merge with free
        neighbours; reserved grows by the pages mapped."""
        page = b.seg.page  # type: ignore[union-attr]
        mapped = -(-size // page) * page
        del self._unmapped[b.addr]
        b.mapped = True
        if mapped < b.size:
            r = _Block(b.addr + mapped, b.size - mapped, b.small, b.seg)
            r.mapped = False
            r.prev, r.next = b, b.next
            if b.next is not None:
                b.next.prev = r
            b.next = r
            self._unmapped[r.addr] = r
            b.size = mapped
        self._file(b)
        self._grow_reserved(mapped)

    def _try_allocate_expandable_block(self, size: int, small: bool) -> _Block:
        """``try_allocate_expandable_block``: map just enough pages after the candidate."""
        c = self._find_expandable_block(size, small)
        if not c.mapped:
            self._map_block(c, min(c.size, size))
        while c.size < size:
            n = c.next
            self._map_block(n, min(size - c.size, n.size))  # type: ignore[union-attr, arg-type]
            c = n  # type: ignore[assignment]
        self._remove_free(c)
        return c

    def _unmap_block(self, b: _Block) -> None:
        """``unmap_block``: unmap the whole pages inside free block ``b``; the partial pages at
        either end stay mapped as free blocks; reserved drops by the pages unmapped."""
        es = b.seg
        page, base = es.page, es.base  # type: ignore[union-attr]
        begin = -(-(b.addr - base) // page)
        end = (b.addr + b.size - base) // page
        if begin >= end:
            return
        self._remove_free(b)
        lo, hi = base + begin * page, base + end * page
        if lo > b.addr:
            f = _Block(b.addr, lo - b.addr, b.small, es)
            f.prev, f.next = b.prev, b
            if b.prev is not None:
                b.prev.next = f
            b.prev = f
            self._insert_free(f)
        if b.addr + b.size > hi:
            f = _Block(hi, b.addr + b.size - hi, b.small, es)
            f.prev, f.next = b, b.next
            if b.next is not None:
                b.next.prev = f
            b.next = f
            self._insert_free(f)
        b.addr, b.size, b.mapped = lo, hi - lo, False
        self._file(b)
        self._reserved -= hi - lo
        self.num_device_free += 1

    # ----------------------------------------------------------------------- snapshot

    def snapshot(self) -> dict[str, Any]:
        """Segments and their blocks in address order, as ``snapshot()`` (an expandable segment
        is reported as one segment per mapped range), plus the stats. For debugging and tests;
        walks every block."""
        keys = {id(b): k for k, b in self._live.items() if b is not None}
        blocks = sorted([b for b in self._live.values() if b is not None]
                        + list(self._small_map.values()) + list(self._large_map.values()),
                        key=lambda b: b.addr)
        segments: list[dict[str, Any]] = []
        for b in blocks:
            if b.prev is None or not b.prev.mapped:
                segments.append({"address": b.addr, "size": 0, "pool": "small" if b.small else "large",
                                 "expandable": b.seg is not None, "allocated_size": 0,
                                 "requested_size": 0, "blocks": []})
            seg = segments[-1]
            seg["size"] += b.size
            if b.allocated:
                seg["allocated_size"] += b.size
                seg["requested_size"] += b.req
            seg["blocks"].append({"address": b.addr, "size": b.size, "allocated": b.allocated,
                                  "requested": b.req if b.allocated else 0,
                                  "key": keys.get(id(b)) if b.allocated else None})
        return {"alloc_model": ALLOC_MODEL, "segments": segments, **self.stats()}


class LoggedAllocator(CachingAllocator):
    """A `CachingAllocator` that also keeps every request it is given, in order, in ``log``:
    ``("malloc", key, nbytes)``, ``("free", key)``, ``("empty_cache",)`` (`replay`'s events),
    ``("stage", source)`` (a reduction's scratch, as what sizes it); a request that
    runs out of memory is logged too, as the one that failed.

    The requests are the program's, not the allocator's decisions: the same program under
    another limit makes the same requests up to its first out-of-memory error, so a log
    answers for every limit without running the program again (instrument/program.py)."""

    def __init__(self, log: list, config: AllocatorConfig = AllocatorConfig(), limit: int | None = None) -> None:
        super().__init__(config, limit)
        self.log = log

    def malloc(self, key: Hashable, nbytes: int) -> int:
        self.log.append(("malloc", key, nbytes))
        return super().malloc(key, nbytes)

    def free(self, key: Hashable) -> None:
        self.log.append(("free", key))
        super().free(key)

    def empty_cache(self) -> None:
        self.log.append(("empty_cache",))
        super().empty_cache()

    def stage(self, buf: int, sem: int, source: Any = None) -> None:
        self.log.append(("stage", source))
        super().stage(buf, sem, source)


def replay(events: Iterable[Sequence[Any]], config: AllocatorConfig = AllocatorConfig(),
           limit: int | None = None) -> list[tuple[int, int]]:
    """Replay ``("malloc", key, nbytes)`` / ``("free", key[, ...])`` / ``("empty_cache", ...)``
    events on a fresh `CachingAllocator`; returns (allocated, reserved) after each event.
    Raises `AllocatorOOM` at the first event that does not fit the limit."""
    a = CachingAllocator(config, limit)
    malloc, free = a.malloc, a.free
    out: list[tuple[int, int]] = []
    append = out.append
    for ev in events:
        op = ev[0]
        if op == "malloc":
            malloc(ev[1], ev[2])
        elif op == "free":
            free(ev[1])
        elif op == "empty_cache":
            a.empty_cache()
        else:
            raise UsageError(f"allocator replay: unknown event {op!r}; events are malloc, free, empty_cache")
        append((a._allocated, a._reserved))
    return out
