"""Replay 1,000,000 synthetic malloc/free events on the caching-allocator model; print events/s.

    python bench/allocator_replay.py [--events N] [--seed S] [--expandable] [--repeat R]

The events imitate training steps: a forward pass allocates activations (many small tensors,
some 1-10 MiB, a few > 10 MiB) and frees most of them in reverse order (LIFO) during the
backward pass, with gradients and optimizer temporaries interleaved; a few tensors (weights,
optimizer state) live across steps. Sizes jitter from step to step so that best fit,
splitting and merging all happen. Only the replay is timed (generating events is not).
Target: 1M events in under 2 s on a 2-core CI machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/allocator_replay.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiopt.instrument.allocator import AllocatorConfig, CachingAllocator  # noqa: E402

MiB = 1 << 20


def _size(rng: random.Random) -> int:
    """A tensor size: 70% small (<= 1 MiB), 22% 1-10 MiB, 8% 10-64 MiB."""
    u = rng.random()
    if u < 0.70:
        return rng.choice((4, 64, 512, 2048, 4096, 65536, 262144, 1 << 20)) * rng.randint(1, 4) // 4 or 4
    if u < 0.92:
        return rng.randint(MiB + 1, 10 * MiB)
    return rng.randint(10 * MiB, 64 * MiB)


def make_events(n: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """``n`` events (``("malloc", key, nbytes)`` / ``("free", key, 0)``) of LIFO-ish steps."""
    rng = random.Random(seed)
    events: list[tuple[str, int, int]] = []
    key = 0
    persistent = []
    for _ in range(40):  # weights and optimizer state, allocated once
        key += 1
        events.append(("malloc", key, _size(rng)))
        persistent.append(key)
    shapes = [_size(rng) for _ in range(300)]  # a "model": the same shapes every step
    while len(events) < n:
        stack = []
        for s in shapes:  # forward: activations
            key += 1
            nbytes = max(1, s + rng.randint(-s // 16, s // 16))  # batch jitter
            events.append(("malloc", key, nbytes))
            stack.append(key)
            if rng.random() < 0.3:  # a temporary freed at once
                key += 1
                events.append(("malloc", key, _size(rng)))
                events.append(("free", key, 0))
        while stack:  # backward: LIFO frees, with gradients coming and going
            events.append(("free", stack.pop(), 0))
            if rng.random() < 0.2:
                key += 1
                events.append(("malloc", key, _size(rng)))
                events.append(("free", key, 0))
    del events[n:]
    # free whatever is still live so the trace is balanced
    live: set[int] = set()
    for op, k, _ in events:
        if op == "malloc":
            live.add(k)
        else:
            live.discard(k)
    events.extend(("free", k, 0) for k in sorted(live))
    return events


def run(events: list[tuple[str, int, int]], config: AllocatorConfig) -> tuple[float, CachingAllocator]:
    """Replay ``events``; returns (seconds, allocator)."""
    a = CachingAllocator(config)
    malloc, free = a.malloc, a.free
    t0 = time.perf_counter()
    for op, k, nbytes in events:
        if op == "malloc":
            malloc(k, nbytes)
        else:
            free(k)
    return time.perf_counter() - t0, a


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expandable", action="store_true", help="expandable_segments:True")
    ap.add_argument("--repeat", type=int, default=3, help="best of R replays")
    args = ap.parse_args(argv)
    config = AllocatorConfig(expandable_segments=args.expandable)
    t0 = time.perf_counter()
    events = make_events(args.events, args.seed)
    gen = time.perf_counter() - t0
    best, a = min((run(events, config) for _ in range(args.repeat)), key=lambda r: r[0])
    n = len(events)
    print(f"events: {n} ({sum(e[0] == 'malloc' for e in events)} malloc), generated in {gen:.2f} s")
    print(f"config: {'expandable_segments:True' if args.expandable else 'default'}")
    print(f"replay: {best:.3f} s (best of {args.repeat}), {n / best:,.0f} events/s")
    print(f"peak allocated {a.peak_allocated / MiB:.1f} MiB, peak requested {a.peak_requested / MiB:.1f} MiB, "
          f"peak reserved {a.peak_reserved / MiB:.1f} MiB, segments allocated {a.num_device_alloc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
