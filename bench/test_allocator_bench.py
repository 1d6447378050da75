"""pytest-benchmark of the caching-allocator model (multiopt.instrument.allocator).

Opt-in: run this file by name,

    pytest bench/test_allocator_bench.py --benchmark-only [--benchmark-json alloc.json]

A plain ``pytest bench --benchmark-only`` skips it, because that suite's JSON is a set of
multiopt records (``multiopt.frame.load``, ``multiopt gate``), and an entry without a
record's fields would break them (see conftest.py and tests/test_bench_suite.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from multiopt.instrument.allocator import ALLOC_MODEL, AllocatorConfig, CachingAllocator

import allocator_replay  # bench/ is on sys.path (rootdir-relative import, as pytest inserts it)

EVENTS = 200_000


@pytest.fixture(autouse=True)
def _only_when_named(request: pytest.FixtureRequest) -> None:
    here = Path(__file__).resolve()
    named = any(Path(str(a).split("::")[0]).resolve() == here for a in request.config.args)
    if not named:
        pytest.skip("allocator model benchmark: run `pytest bench/test_allocator_bench.py --benchmark-only`")


@pytest.fixture(scope="module")
def events() -> list[tuple[str, int, int]]:
    return allocator_replay.make_events(EVENTS, seed=0)


@pytest.mark.parametrize("expandable", [False, True], ids=["default", "expandable"])
def test_allocator_replay(benchmark, events, expandable):
    config = AllocatorConfig(expandable_segments=expandable)

    def replay() -> CachingAllocator:
        return allocator_replay.run(events, config)[1]

    a = benchmark.pedantic(replay, rounds=5, iterations=1, warmup_rounds=1)
    assert a.allocated == 0 and a.requested == 0  # the trace is balanced
    benchmark.extra_info.update({"alloc_model": ALLOC_MODEL, "events": len(events),
                                 "peak_allocated": a.peak_allocated, "peak_reserved": a.peak_reserved})
    if benchmark.stats is not None:  # None under --benchmark-disable
        per_s = len(events) / benchmark.stats.stats.min
        benchmark.extra_info["events_per_s"] = per_s
