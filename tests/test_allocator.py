"""The caching-allocator model against the rules of c10/cuda/CUDACachingAllocator.cpp.

Each expected number is worked out from the C++ (round_size, get_allocation_size,
get_free_block, should_split, try_merge_blocks, alloc_block, release_*), not from the model.
"""

from __future__ import annotations

import random

import pytest

from multiopt.errors import UsageError
from multiopt.instrument.allocator import (
    ALLOC_MODEL,
    AllocatorOOM,
    CachingAllocator,
    UnknownKeyError,
    get_allocation_size,
    replay,
    round_size,
    roundup_power2_next_division,
)
from multiopt.instrument.allocator_config import AllocatorConfig

KiB = 1 << 10
MiB = 1 << 20


def addr(a: CachingAllocator, key) -> int:
    for seg in a.snapshot()["segments"]:
        for b in seg["blocks"]:
            if b["key"] == key:
                return b["address"]
    raise AssertionError(f"{key!r} not allocated")


def free_blocks(a: CachingAllocator) -> list[int]:
    return [b["size"] for s in a.snapshot()["segments"] for b in s["blocks"] if not b["allocated"]]


# --------------------------------------------------------------------------- sizes


def test_round_size_and_allocation_size():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert get_allocation_size(MiB) == 2 * MiB  # small pool: kSmallBuffer
    assert get_allocation_size(MiB + 512) == 20 * MiB  # < kMinLargeAlloc: kLargeBuffer
    assert get_allocation_size(10 * MiB - 512) == 20 * MiB
    assert get_allocation_size(10 * MiB) == 10 * MiB  # >= kMinLargeAlloc: kRoundLarge multiples
    assert get_allocation_size(12_288_000) == 12_582_912


def test_h200_unsplit_tail_counts_as_allocated():
    """12,288,000 B: a fresh 12,582,912 B segment; the 294,912 B tail is <= kSmallSize, so the
    large pool does not split and memory_allocated grows by the whole block."""
    a = CachingAllocator()
    assert a.malloc("t", 12_288_000) == 12_582_912
    assert (a.allocated, a.requested, a.reserved) == (12_582_912, 12_288_000, 12_582_912)
    a.free("t")
    assert (a.allocated, a.requested, a.reserved) == (0, 0, 12_582_912)


def test_small_tensors_pack_into_one_2mib_segment():
    a = CachingAllocator()
    for i in range(4096):
        assert a.malloc(i, 512) == 512
    assert (a.allocated, a.reserved) == (2 * MiB, 2 * MiB)
    assert len(a.snapshot()["segments"]) == 1
    a.malloc("one more", 1)  # the first segment is full: a second kSmallBuffer
    assert a.reserved == 4 * MiB and a.allocated == 2 * MiB + 512


def test_small_pool_splits_down_to_512_bytes():
    a = CachingAllocator()
    a.malloc("x", MiB)  # 1 MiB: small pool, 2 MiB segment
    a.malloc("y", MiB - 512)  # leaves exactly 512 B: split (remaining >= kMinBlockSize)
    assert a.allocated == 2 * MiB - 512 and free_blocks(a) == [512]


def test_large_request_splits_a_20mib_segment_and_reuses_the_rest():
    a = CachingAllocator()
    assert a.malloc("a", 1536 * KiB) == 1536 * KiB  # split: 18.5 MiB remaining > kSmallSize
    assert a.reserved == 20 * MiB and free_blocks(a) == [18 * MiB + 512 * KiB]
    assert a.malloc("b", 5 * MiB) == 5 * MiB  # served from the 18.5 MiB block
    assert a.reserved == 20 * MiB and a.num_device_alloc == 1
    assert a.allocated == 6 * MiB + 512 * KiB and free_blocks(a) == [13 * MiB + 512 * KiB]


def test_large_split_needs_more_than_1mib_remaining():
    a = CachingAllocator()
    assert a.malloc("x", 19 * MiB) == 20 * MiB  # 20 MiB segment, remaining == 1 MiB: no split
    assert a.allocated == 20 * MiB and free_blocks(a) == []
    b = CachingAllocator()
    assert b.malloc("x", 19 * MiB - 512) == 19 * MiB - 512  # remaining 1 MiB + 512: split
    assert free_blocks(b) == [MiB + 512]


def test_free_merges_neighbours_so_their_sum_is_reused():
    a = CachingAllocator()
    for k in "abc":
        a.malloc(k, 5 * MiB)  # one 20 MiB segment: a b c + 5 MiB free
    start = addr(a, "a")
    a.free("a")
    a.free("b")  # merges with a
    assert sorted(free_blocks(a)) == [5 * MiB, 10 * MiB]
    assert a.malloc("ab", 10 * MiB) == 10 * MiB
    assert a.reserved == 20 * MiB and addr(a, "ab") == start
    a.free("ab")
    a.free("c")  # merges with both neighbours: the whole segment again
    assert free_blocks(a) == [20 * MiB]
    a.empty_cache()
    assert a.reserved == 0


def test_free_merges_mapped_neighbours_only():
    """Expandable segments: a freed block merges with its free mapped neighbour, never with the
    unmapped address space after it (that stays unmapped, outside reserved), and the next
    larger request maps pages onto the merged block, in place."""
    a = CachingAllocator(AllocatorConfig(expandable_segments=True))
    a.malloc("x", 3 * MiB)  # maps one 20 MiB page: x, then 17 MiB free, then unmapped space
    at = addr(a, "x")
    a.free("x")
    segments = a.snapshot()["segments"]
    assert a.reserved == 20 * MiB
    assert [[(b["size"], b["allocated"]) for b in s["blocks"]] for s in segments] == [[(20 * MiB, False)]]
    a.malloc("y", 30 * MiB)  # one more page after the merged block
    assert addr(a, "y") == at and a.reserved == 40 * MiB


def test_best_fit_by_size_then_address():
    a = CachingAllocator()
    a.malloc("A", 12 * MiB)  # segments of 12, 14, 12 MiB in address order
    a.malloc("B", 14 * MiB)
    a.malloc("C", 12 * MiB)
    where = {k: addr(a, k) for k in "ABC"}
    for k in "ABC":
        a.free(k)
    assert a.malloc(1, 11 * MiB) == 12 * MiB and addr(a, 1) == where["A"]  # smallest, lowest address
    assert a.malloc(2, 11 * MiB) == 12 * MiB and addr(a, 2) == where["C"]  # same size, next address
    assert a.malloc(3, 11 * MiB) == 11 * MiB and addr(a, 3) == where["B"]  # 14 MiB, 3 MiB split off
    assert a.reserved == 38 * MiB


def test_max_split_size_oversize_blocks():
    # Default: an 81 MiB request splits a cached 100 MiB block (19 MiB > kSmallSize remain).
    a = CachingAllocator()
    a.malloc("big", 100 * MiB)
    a.free("big")
    assert a.malloc("x", 81 * MiB) == 81 * MiB
    # max_split_size 40 MiB: the 100 MiB block is oversize, never split; 81 MiB is within
    # max_non_split_rounding_size (20 MiB) of it: 100 < 81 + 20.
    cfg = AllocatorConfig(max_split_size=40 * MiB)
    a = CachingAllocator(cfg)
    a.malloc("big", 100 * MiB)
    a.free("big")
    assert a.malloc("small", 2 * MiB) == 2 * MiB  # below max_split_size: not the oversize block
    assert a.reserved == 120 * MiB  # a new 20 MiB segment
    assert a.malloc("x", 81 * MiB) == 100 * MiB and a.reserved == 120 * MiB
    a.free("x")
    assert a.malloc("y", 80 * MiB) == 80 * MiB  # 100 >= 80 + 20: refused, a new 80 MiB segment
    assert a.reserved == 200 * MiB


def test_should_split_tests_the_request_not_the_block():
    """should_split: ``size < max_split_size && remaining > kSmallSize``. A fresh 20 MiB segment
    is oversize with max_split_size 20 MiB, yet a 2 MiB request splits it; once merged back it is
    an oversize free block that get_free_block refuses to the next 2 MiB request."""
    a = CachingAllocator(AllocatorConfig(max_split_size=20 * MiB))
    assert a.malloc("x", 2 * MiB) == 2 * MiB and free_blocks(a) == [18 * MiB]
    a.free("x")
    assert free_blocks(a) == [20 * MiB]
    assert a.malloc("y", 2 * MiB) == 2 * MiB and a.reserved == 40 * MiB


def test_max_non_split_rounding_size_configurable():
    cfg = AllocatorConfig.parse("max_split_size_mb:20,max_non_split_rounding_mb:64")
    a = CachingAllocator(cfg)
    a.malloc("big", 100 * MiB)
    a.free("big")
    assert a.malloc("x", 40 * MiB) == 100 * MiB  # 100 < 40 + 64
    assert a.reserved == 100 * MiB


def test_empty_cache_releases_only_whole_free_segments():
    a = CachingAllocator()
    a.malloc("keep", 1536 * KiB)  # 20 MiB segment, partly used
    a.malloc("gone", 20 * MiB)  # too big for the 18.5 MiB free block: its own segment
    a.malloc("s1", 4 * KiB)  # small pool: 2 MiB segment
    a.malloc("s2", 4 * KiB)
    a.free("gone")
    a.free("s1")
    a.free("s2")
    assert a.reserved == 42 * MiB
    a.empty_cache()
    assert a.reserved == 20 * MiB and a.allocated == 1536 * KiB
    assert [s["size"] for s in a.snapshot()["segments"]] == [20 * MiB]


# --------------------------------------------------------------------------- roundup_power2_divisions


def test_roundup_power2_formula():
    assert roundup_power2_next_division(1200, 4) == 1280  # the example in the C++ comment
    assert roundup_power2_next_division(4 * MiB, 4) == 4 * MiB  # powers of 2 stay
    assert roundup_power2_next_division(1_258_291, 4) == 1_310_720  # 1 MiB + 4 steps of 256 KiB
    assert roundup_power2_next_division(5_000_000, 8) == 5_242_880  # 4 MiB + steps of 512 KiB
    assert roundup_power2_next_division(3 * MiB + 1, 2) == 4 * MiB


def test_round_size_with_divisions():
    cfg = AllocatorConfig(roundup_power2_divisions=4)
    # round_size applies divisions only above kMinBlockSize * divisions (2048 here)
    assert round_size(1200, cfg) == 1536
    assert round_size(3000, cfg) == 3072  # 2048 + steps of 512
    assert round_size(1_258_291, cfg) == 1_310_720
    assert round_size(1_258_291, AllocatorConfig(roundup_power2_divisions=1)) == 1_258_496  # 1: plain 512
    a = CachingAllocator(cfg)
    assert a.malloc("x", 1_258_291) == 1_310_720  # 18.75 MiB remain: split
    assert a.requested == 1_258_291


def test_round_size_per_interval_divisions():
    cfg = AllocatorConfig.parse("roundup_power2_divisions:[1:2,4:4,>:8]")
    assert cfg.roundup_power2_divisions == (2, 0, 4) + (8,) * 13
    assert round_size(512 * KiB + 1, cfg) == 768 * KiB  # below 1 MiB: the first interval (2)
    assert round_size(3 * MiB + 1, cfg) == 3 * MiB + 512  # [2 MiB, 4 MiB): 0, plain rounding
    assert round_size(5 * MiB + 1, cfg) == 6 * MiB  # [4 MiB, 8 MiB): 4 divisions
    assert round_size(9 * MiB, cfg) == 9 * MiB  # [8 MiB, ...): 8 divisions of 1 MiB
    assert round_size(9 * MiB + 1, cfg) == 10 * MiB


# --------------------------------------------------------------------------- expandable segments


def test_expandable_segments_reserve_pages_not_segments():
    cfg = AllocatorConfig(expandable_segments=True)
    a = CachingAllocator(cfg)
    a.malloc("t", 12_288_000)  # one 20 MiB page; remaining >= 512 splits (should_split)
    assert (a.allocated, a.reserved) == (12_288_000, 20 * MiB)
    a.malloc("u", 8 * MiB)  # fits the 8,683,520 B free rest of the page
    assert a.reserved == 20 * MiB and a.allocated == 12_288_000 + 8 * MiB
    a.malloc("v", 30 * MiB)  # the 294,912 B free tail + whole pages for the rest: 2 more pages
    assert a.reserved == 60 * MiB and a.allocated == 12_288_000 + 38 * MiB
    assert len(a.snapshot()["segments"]) == 1 and a.snapshot()["segments"][0]["expandable"]
    a.malloc("s", 512)  # small pool: its own segment, 2 MiB pages
    assert a.reserved == 62 * MiB
    # Same trace without expandable segments: 12, 20 and 30 MiB segments and a 2 MiB one.
    b = CachingAllocator()
    for k, n in (("t", 12_288_000), ("u", 8 * MiB), ("v", 30 * MiB), ("s", 512)):
        b.malloc(k, n)
    assert b.reserved == 64 * MiB and b.allocated == 12_582_912 + 38 * MiB + 512


def test_expandable_segments_unmap_free_pages():
    a = CachingAllocator(AllocatorConfig(expandable_segments=True))
    a.malloc("a", 1536 * KiB)
    a.malloc("b", 30 * MiB)  # pages 0 and 1 mapped
    assert a.reserved == 40 * MiB
    a.free("b")
    a.empty_cache()  # page 1 is wholly free: unmapped; page 0 holds "a"
    assert a.reserved == 20 * MiB and a.allocated == 1536 * KiB
    a.malloc("c", 10 * MiB)  # fits in page 0's free 18.5 MiB: no mapping
    assert a.reserved == 20 * MiB
    a.free("a")
    a.free("c")
    a.empty_cache()
    assert a.reserved == 0 and a.snapshot()["segments"] == []
    a.malloc("d", 3 * MiB)  # a fresh segment
    assert a.reserved == 20 * MiB


# --------------------------------------------------------------------------- limit and OOM


def test_limit_releases_cache_then_raises_oom():
    a = CachingAllocator(limit=40 * MiB)
    a.malloc("x", 12 * MiB)
    a.free("x")  # cached 12 MiB segment
    a.malloc("y", 30 * MiB)  # 12 + 30 > 40: release_cached_blocks, then retry
    assert a.reserved == 30 * MiB and a.num_alloc_retries == 1
    with pytest.raises(AllocatorOOM) as e:
        a.malloc("z", 12 * MiB)  # 30 + 12 > 40 with nothing cached
    err = e.value
    assert isinstance(err, MemoryError)
    assert (err.nbytes, err.alloc_size, err.allocated, err.reserved, err.limit) == (
        12 * MiB, 12 * MiB, 30 * MiB, 30 * MiB, 40 * MiB)
    assert "z" not in a and a.allocated == 30 * MiB and a.num_ooms == 1
    a.free("y")
    a.malloc("z", 12 * MiB)  # from the cached 30 MiB block, split: 18 MiB > kSmallSize remain
    assert a.reserved == 30 * MiB and a.allocated == 12 * MiB


def test_limit_releases_oversize_blocks_first():
    cfg = AllocatorConfig(max_split_size=20 * MiB)
    a = CachingAllocator(cfg, limit=63 * MiB)
    a.malloc("big", 50 * MiB)
    a.malloc("s", MiB)  # small pool, 2 MiB segment
    a.free("big")
    a.free("s")
    a.malloc("x", 12 * MiB)  # 52 + 12 > 63: release_available_cached_blocks frees the 50 MiB one
    assert a.reserved == 14 * MiB  # the small segment is still cached
    assert a.num_alloc_retries == 0


def test_limit_counts_the_whole_segment():
    a = CachingAllocator(limit=20 * MiB - 1)
    with pytest.raises(AllocatorOOM):
        a.malloc("x", 2 * MiB)  # needs a 20 MiB segment (kLargeBuffer)
    assert a.malloc("y", MiB) == MiB  # small pool: a 2 MiB segment fits


# --------------------------------------------------------------------------- stats and keys


def test_peaks_and_reset_peak():
    a = CachingAllocator()
    a.malloc("x", 3 * MiB)
    a.malloc("y", 100)
    a.free("x")
    assert (a.peak_allocated, a.peak_requested, a.peak_reserved) == (3 * MiB + 512, 3 * MiB + 100, 22 * MiB)
    a.reset_peak()
    assert (a.peak_allocated, a.peak_requested, a.peak_reserved) == (512, 100, 22 * MiB)
    a.empty_cache()
    assert a.reserved == 2 * MiB and a.peak_reserved == 22 * MiB
    a.reset_peak()
    assert a.peak_reserved == 2 * MiB


def test_keys():
    a = CachingAllocator()
    a.malloc("x", 10)
    with pytest.raises(UsageError, match="still allocated"):
        a.malloc("x", 10)
    a.free("x")
    with pytest.raises(UnknownKeyError, match="freed twice") as e:
        a.free("x")
    assert isinstance(e.value, KeyError) and str(e.value).startswith("allocator model: free of key 'x'")
    assert a.malloc("empty", 0) == 0 and a.allocated == 0 and a.reserved == 2 * MiB
    a.free("empty")
    with pytest.raises(UsageError, match="-1 bytes"):
        a.malloc("neg", -1)


def test_replay_and_model_version():
    out = replay([("malloc", 1, 12_288_000), ("malloc", 2, 100), ("free", 1), ("empty_cache",)])
    assert out == [(12_582_912, 12_582_912), (12_582_912 + 512, 12_582_912 + 2 * MiB),
                   (512, 12_582_912 + 2 * MiB), (512, 2 * MiB)]
    assert ALLOC_MODEL.startswith("cuda-caching/torch-")
    with pytest.raises(UsageError, match="unknown event 'alloc'"):
        replay([("alloc", 1, 1)])


@pytest.mark.parametrize("cfg", [AllocatorConfig(), AllocatorConfig(max_split_size=20 * MiB),
                                 AllocatorConfig(expandable_segments=True),
                                 AllocatorConfig(roundup_power2_divisions=4)],
                         ids=["default", "max_split", "expandable", "roundup4"])
def test_invariants_on_a_random_trace(cfg):
    """After each step: segments tile the reserved bytes, allocated blocks sum to allocated, no
    two free blocks of a segment are adjacent (merged), the free lists stay sorted."""
    rng = random.Random(1)
    a = CachingAllocator(cfg, limit=600 * MiB)
    live: list[int] = []
    for step in range(3000):
        if live and rng.random() < 0.48:
            a.free(live.pop(rng.randrange(len(live)) if rng.random() < 0.3 else -1))
        else:
            n = rng.choice((rng.randint(1, 4096), rng.randint(1, MiB), rng.randint(MiB, 12 * MiB),
                            rng.randint(10 * MiB, 40 * MiB)))
            try:
                a.malloc(step, n)
                live.append(step)
            except AllocatorOOM:
                pass
        if rng.random() < 0.01:
            a.empty_cache()
        if step % 60 == 0 or step == 2999:
            snap = a.snapshot()
            assert sum(s["size"] for s in snap["segments"]) == a.reserved <= 600 * MiB
            assert sum(b["size"] for s in snap["segments"] for b in s["blocks"] if b["allocated"]) == a.allocated
            assert sum(b["requested"] for s in snap["segments"] for b in s["blocks"]) == a.requested
            for s in snap["segments"]:
                flags = [b["allocated"] for b in s["blocks"]]
                assert not any(x is False and y is False for x, y in zip(flags, flags[1:]))
                for b, c in zip(s["blocks"], s["blocks"][1:]):
                    assert b["address"] + b["size"] == c["address"]
            assert a._small_free == sorted(a._small_free) and a._large_free == sorted(a._large_free)
            assert a.peak_allocated >= a.allocated and a.peak_reserved >= a.reserved
    for k in live:
        a.free(k)
    a.empty_cache()
    assert (a.allocated, a.requested, a.reserved) == (0, 0, 0)


# --------------------------------------------------------------------------- config parsing


def test_parse_config():
    cfg = AllocatorConfig.parse("max_split_size_mb:128, roundup_power2_divisions:4,expandable_segments:True")
    assert cfg.max_split_size == 128 * MiB and cfg.expandable_segments
    assert cfg.roundup_power2_divisions == (4,) * 16
    assert AllocatorConfig.parse("") == AllocatorConfig()
    assert AllocatorConfig.parse("backend:native") == AllocatorConfig()
    cfg = AllocatorConfig.parse("garbage_collection_threshold:0.6,max_non_split_rounding_mb:32,"
                                "release_lock_on_cudamalloc:True,pinned_num_register_threads:8,"
                                "per_process_memory_fraction:0.5")
    assert cfg.garbage_collection_threshold == 0.6 and cfg.max_non_split_rounding_size == 32 * MiB
    assert cfg.per_process_memory_fraction == 0.5
    assert AllocatorConfig.parse("max_split_size_mb:20").max_split_size == 20 * MiB  # >= 20 is allowed
    assert AllocatorConfig.parse("roundup_power2_divisions:[>:8]").roundup_power2_divisions == (0,) + (8,) * 15
    assert AllocatorConfig.parse("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]").roundup_power2_divisions == (
        (1,) * 9 + (2, 4) + (8,) * 5)


@pytest.mark.parametrize("text, words", [
    ("max_split_size_mb:abc", ["max_split_size_mb", "integer >= 20", "'abc'"]),
    ("max_split_size_mb:19", ["max_split_size_mb", "'19'"]),
    ("max_split_size_mb", ["max_split_size_mb", "no value"]),
    ("max_non_split_rounding_mb:1", ["max_non_split_rounding_mb", "'1'"]),
    ("roundup_power2_divisions:3", ["roundup_power2_divisions", "power of 2", "'3'"]),
    ("roundup_power2_divisions:0", ["roundup_power2_divisions", "power of 2", "'0'"]),
    ("roundup_power2_divisions:[3:4]", ["roundup_power2_divisions", "'3'"]),
    ("roundup_power2_divisions:[1:3]", ["roundup_power2_divisions", "'3'"]),
    ("roundup_power2_divisions:[1:4", ["roundup_power2_divisions"]),
    ("expandable_segments:yes", ["expandable_segments", "True or False", "'yes'"]),
    ("garbage_collection_threshold:1.5", ["garbage_collection_threshold", "(0.0, 1.0)", "'1.5'"]),
    ("garbage_collection_threshold:x", ["garbage_collection_threshold", "'x'"]),
    ("per_process_memory_fraction:2", ["per_process_memory_fraction", "'2'"]),
    ("backend:jemalloc", ["backend", "'jemalloc'"]),
    ("max_split_sizes_mb:128", ["unknown option", "'max_split_sizes_mb'"]),
    ("expandable_segments:True;max_split_size_mb:128", ["expandable_segments", "True;max_split_size_mb"]),
    ("expandable_segments:True max_split_size_mb:128", ["expandable_segments"]),
])
def test_parse_errors_are_one_line(text, words):
    with pytest.raises(UsageError) as e:
        AllocatorConfig.parse(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("PYTORCH_CUDA_ALLOC_CONF: ")
    for w in words:
        assert w in msg, (w, msg)


def test_from_env():
    assert AllocatorConfig.from_env({}) == AllocatorConfig()
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert AllocatorConfig.from_env(env).expandable_segments
    env["PYTORCH_ALLOC_CONF"] = "max_split_size_mb:64"  # the new name wins
    cfg = AllocatorConfig.from_env(env)
    assert cfg.max_split_size == 64 * MiB and not cfg.expandable_segments
    with pytest.raises(UsageError, match="^PYTORCH_ALLOC_CONF: max_split_size_mb"):
        AllocatorConfig.from_env({"PYTORCH_ALLOC_CONF": "max_split_size_mb:1"})


def test_config_values_checked_and_async_backend_refused():
    with pytest.raises(UsageError, match="max_split_size"):
        AllocatorConfig(max_split_size=MiB)
    with pytest.raises(UsageError, match="roundup_power2_divisions"):
        AllocatorConfig(roundup_power2_divisions=3)
    cfg = AllocatorConfig.parse("backend:cudaMallocAsync")
    with pytest.raises(UsageError, match="cudaMallocAsync is not modelled"):
        CachingAllocator(cfg)
