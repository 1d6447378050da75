"""Allocator traces replayed through the allocator model (multiopt/instrument/trace.py).

The hand-written traces below are what CUDACachingAllocator.cpp would record for each
sequence (each expected address and size derived from its rules in the comments); the
captured ones (tests/fixtures/cuda-traces, written by bench/cuda_traces.py on a GPU) are what
a device did record, replayed event by event.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multiopt.errors import UsageError
from multiopt.instrument.allocator_config import AllocatorConfig
from multiopt.instrument.trace import Event, check, fixture, from_fixture, trim

from .support import FIXTURES, load_bench

MiB = 1 << 20
A, B = 0x7F00_0000_0000, 0x7E00_0000_0000  # device pointers; B below A, as cudaMalloc may hand out
CAPTURED = sorted((FIXTURES / "cuda-traces").glob("*.json"))


def ev(action: str, addr: int = 0, size: int = 0) -> Event:
    return Event(action, addr, size)


def seg(address: int, total: int, *blocks: tuple[int, int, str]) -> dict:
    return {"address": address, "total_size": total, "segment_type": "large", "blocks": [list(b) for b in blocks]}


def test_a_large_tensor_keeps_the_unsplit_tail_of_its_segment() -> None:
    # 12,288,000 B (3000 x 1024 fp32): > 10 MiB, so the segment is rounded up to 2 MiB:
    # 12,582,912 B; the 294,912 B left is <= 1 MiB, so the block is not split (should_split).
    trace = [ev("segment_alloc", A, 12_582_912), ev("alloc", A, 12_288_000)]
    final = [seg(A, 12_582_912, (A, 12_582_912, "active_allocated"))]
    result = check(trace, segments=final)
    assert result.exact, result.summary()
    assert (result.allocs, result.peak_reserved) == (1, 12_582_912)
    split = [seg(A, 12_582_912, (A, 12_288_000, "active_allocated"), (A + 12_288_000, 294_912, "inactive"))]
    bad = check(trace, segments=split)
    assert not bad.exact and "trace has 12,288,000 B" in str(bad.mismatches[0])


def test_small_requests_share_a_2_mib_segment_at_512_byte_steps() -> None:
    trace = [ev("segment_alloc", A, 2 * MiB), ev("alloc", A, 1000), ev("alloc", A + 1024, 1000),
             ev("free_requested", A, 1000), ev("free_completed", A, 1000)]
    assert check(trace).exact
    moved = [*trace[:2], ev("alloc", A + 4096, 1000)]
    bad = check(moved)
    assert [m.index for m in bad.mismatches] == [2]
    assert "placed it at" in bad.mismatches[0].what and f"{A + 1024:#x}" in bad.mismatches[0].what


def test_a_segment_the_trace_lacks_is_a_reserved_mismatch() -> None:
    bad = check([ev("alloc", A, 5 * MiB)])  # 1-10 MiB: the model would cudaMalloc 20 MiB
    assert any("reserved 20,971,520 B, the trace 0 B" in m.what for m in bad.mismatches)


def test_equal_free_blocks_go_to_the_lower_address_the_device_gave() -> None:
    # Two 16 MiB tensors (> 10 MiB: segments of exactly 16 MiB), the second segment at a lower
    # address; both freed; a third 16 MiB request takes the best fit by (size, address): B.
    trace = [ev("segment_alloc", A, 16 * MiB), ev("alloc", A, 16 * MiB),
             ev("segment_alloc", B, 16 * MiB), ev("alloc", B, 16 * MiB),
             ev("free_completed", A, 16 * MiB), ev("free_completed", B, 16 * MiB)]
    assert check([*trace, ev("alloc", B, 16 * MiB)]).exact
    wrong = check([*trace, ev("alloc", A, 16 * MiB)])
    assert [m.index for m in wrong.mismatches] == [6] and f"{B:#x}" in wrong.mismatches[0].what


def test_empty_cache_releases_every_whole_free_segment() -> None:
    trace = [ev("segment_alloc", A, 20 * MiB), ev("alloc", A, 4 * MiB), ev("alloc", A + 4 * MiB, 4 * MiB),
             ev("segment_alloc", B, 2 * MiB), ev("alloc", B, 512),
             ev("free_completed", A, 4 * MiB), ev("free_completed", A + 4 * MiB, 4 * MiB),
             ev("segment_free", A, 20 * MiB),  # empty_cache(): the small segment is still in use
             ev("segment_alloc", A, 20 * MiB), ev("alloc", A, 4 * MiB)]
    result = check(trace, segments=[seg(B, 2 * MiB, (B, 512, "active_allocated"), (B + 512, 2 * MiB - 512, "inactive")),
                                    seg(A, 20 * MiB, (A, 4 * MiB, "active_allocated"), (A + 4 * MiB, 16 * MiB, "inactive"))])
    assert result.exact, result.summary()
    kept = check([*trace[:7], ev("alloc", A, 4 * MiB)])  # no empty_cache: the cached block serves it
    assert kept.exact, kept.summary()


def test_expandable_segments_map_pages_as_they_grow() -> None:
    # expandable_segments:True: one virtual segment per pool, mapped in 20 MiB pages (large)
    # on demand; a 30 MiB request maps two pages, a further 8 MiB fits the 10 MiB left.
    conf = AllocatorConfig.parse("expandable_segments:True")
    trace = [ev("segment_map", A, 40 * MiB), ev("alloc", A, 30 * MiB), ev("alloc", A + 30 * MiB, 8 * MiB)]
    result = check(trace, conf)
    assert result.exact, result.summary()
    assert not check(trace).exact  # the same trace is not what the default allocator does


def test_trim_drops_frames_and_keeps_the_blocks() -> None:
    snapshot = {
        "segments": [{"device": 0, "address": A, "total_size": 2 * MiB, "stream": 0, "segment_type": "small",
                      "allocated_size": 512, "active_size": 512,
                      "blocks": [{"address": A, "size": 512, "requested_size": 4, "state": "active_allocated",
                                  "frames": [{"filename": "x.py", "line": 1, "name": "f"}]},
                                 {"address": A + 512, "size": 2 * MiB - 512, "requested_size": 0, "state": "inactive",
                                  "frames": []}]}],
        "device_traces": [[{"action": "segment_alloc", "addr": A, "size": 2 * MiB, "stream": 0, "frames": []},
                           {"action": "alloc", "addr": A, "size": 4, "stream": 0, "frames": [{"filename": "x.py"}]}]],
    }
    events, segments = trim(snapshot)
    assert events == [Event("segment_alloc", A, 2 * MiB), Event("alloc", A, 4)]
    assert segments[0]["blocks"] == [[A, 512, "active_allocated"], [A + 512, 2 * MiB - 512, "inactive"]]
    doc = json.loads(json.dumps(fixture(events, segments, alloc_conf="", torch="x")))
    again, segs, conf = from_fixture(doc)
    assert again == events and segs == segments and conf == AllocatorConfig()
    assert check(again, conf, segs).exact
    with pytest.raises(UsageError, match="no trace for device 0"):
        trim({"segments": []})


@pytest.mark.parametrize("doc,match", [
    ({"format": "other"}, "expected 'multiopt.cuda-trace/1'"),
    ({"format": "multiopt.cuda-trace/1", "events": [["alloc", 1]]}, "event 0 is"),
    ({"format": "multiopt.cuda-trace/1", "events": [["segment_alloc", 1, 2], ["malloc", 1, 2]]}, "event 1 is"),
    ({"format": "multiopt.cuda-trace/1", "events": [["alloc", 1, -4]]}, "non-negative"),
    ({"format": "multiopt.cuda-trace/1", "alloc_conf": "max_split_size_mb:x", "events": []}, "max_split_size_mb"),
])
def test_a_bad_fixture_is_one_usage_error_naming_the_problem(doc: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        from_fixture(doc, "t.json")


@pytest.mark.skipif(not CAPTURED, reason="no captured traces yet: run bench/cuda_traces.py on a GPU")
@pytest.mark.parametrize("path", CAPTURED, ids=[p.stem for p in CAPTURED])
def test_a_captured_trace_replays_exactly(path: Path) -> None:
    """Every event of a trace a GPU recorded: reserved after each, each block's address, and
    the final blocks' sizes; then the allocated bytes the cuda probe's record read."""
    doc = json.loads(path.read_text())
    events, segments, conf = from_fixture(doc, path.name)
    result = check(events, conf, segments)
    print(path.stem, result.summary())
    assert result.exact, result.summary()


def _bench_module():
    return load_bench("cuda_traces")


def test_the_capture_script_lists_valid_configs_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    """Its configs are validated (model, rules, allocator options) before GPU time is spent."""
    mod = _bench_module()
    assert mod.main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(mod.CONFIGS) and any("expandable_segments:True" in line for line in lines)
    assert mod.main(["--only", "nope"]) == 2


@pytest.mark.parametrize("answer", [0, 1, 7, 100, 101, 4000, 5000])
@pytest.mark.parametrize("guess", [1, 99, 100, 4000])
def test_the_fit_check_finds_the_real_largest_batch_from_any_guess(answer: int, guess: int) -> None:
    mod = _bench_module()
    found, calls = mod.search_largest(lambda n: n <= answer, guess)
    assert found == answer
    assert calls <= 2 * (abs(answer - guess).bit_length() + 2) + 2
    if answer == guess and answer > 0:
        assert calls == 2  # a right prediction: it runs, one more does not
