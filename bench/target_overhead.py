"""What target cuda (the allocator model, workspaces, reduction staging) adds to a tracked step.

Run:  python bench/target_overhead.py [--widths 64,256,1024] [--rounds 9]

One training step (3 Linear layers, batch 64, foreach Adam, one thread) under the tracked
probe with target cpu and with target cuda, the same program on both (impl fixed, so CUDA's
foreach default does not change the kernels); rounds interleaved, the thread's CPU time per
step (one thread, so other jobs on a shared host do not count), compared as ratios of the
medians and of the minima (the least disturbed round: the work itself).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multiopt.instrument.probes import TrackedProbe
from multiopt.train.multi import MultiOptimizer


def step_seconds(target: str, width: int, steps: int = 30) -> float:
    torch.manual_seed(0)
    with TrackedProbe(target=target):
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(3)])
        opt = MultiOptimizer.from_spec(model, "rest=adam(lr=0.001)", impl="foreach", target=target)
        x = torch.randn(64, width)

        def step() -> None:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        for _ in range(3):
            step()
        t0 = time.thread_time()  # CPU time of this thread: other jobs on the host do not count
        for _ in range(steps):
            step()
        return (time.thread_time() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256,1024")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for width in (int(w) for w in args.widths.split(",")):
        res: dict[str, list[float]] = {"cpu": [], "cuda": []}
        for _ in range(args.rounds):
            for target in res:
                res[target].append(step_seconds(target, width))
        cpu, cuda = (statistics.median(res[t]) for t in ("cpu", "cuda"))
        least = min(res["cuda"]) / min(res["cpu"])  # the least disturbed round of each: the work itself
        print(f"width {width}: tracked step {cpu * 1e3:.3f} ms (target cpu), {cuda * 1e3:.3f} ms (target cuda), "
              f"ratio of medians {cuda / cpu:.3f}, of minima {least:.3f}", flush=True)


if __name__ == "__main__":
    main()
