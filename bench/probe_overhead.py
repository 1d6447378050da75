"""How much does tracking cost? Tracked-probe step time over untracked step time.

Run:  python bench/probe_overhead.py [--rounds N] [--threads T]

The step is the suite's two-optimizer case by hand: an MLP (depth 3, batch 64), SGD with
momentum on the first layer and Adam on the rest, zero_grad(set_to_none=True), MSE loss.
Each width is timed untracked, under the tracked probe, and under torch's own MemTracker
(the reference point), interleaved round by round so machine drift hits all three alike;
a mode's time is the median over rounds of the mean step time in that round.

It then times the fake probe estimating one step of an MLP width 16384, depth 8, batch 512
with Adam (forward, backward, step), from creating the probe to the last number, in a
fresh interpreter so first-use imports are included (the way a CLI user meets it).

Targets: tracked overhead <= 3x at width 64 and <= 1.1x at width 1024; fake < 2 s.
The "empty mode" column is a TorchDispatchMode that only forwards each op: the floor any
dispatch-mode tracker pays (Python dispatch), so tracked minus empty is the bookkeeping.
Not a pytest test on purpose: timing on shared CI machines is not a pass/fail signal.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiopt.instrument.probes import make_probe  # noqa: E402

TARGETS = {64: 3.0, 1024: 1.1}
DEPTH, BATCH = 3, 64


def mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_step(width: int) -> tuple[Callable[[], None], list]:
    torch.manual_seed(0)
    model = mlp(width, DEPTH)
    first = list(model[0].parameters())
    rest = [p for m in list(model)[1:] for p in m.parameters()]
    sgd = torch.optim.SGD(first, lr=1e-3, momentum=0.9)
    adam = torch.optim.Adam(rest, lr=1e-4)
    x, y = torch.randn(BATCH, width), torch.randn(BATCH, width)

    def step() -> None:
        sgd.zero_grad(set_to_none=True)
        adam.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        sgd.step()
        adam.step()

    for _ in range(3):  # optimizer state exists before anyone measures
        step()
    return step, [model, sgd, adam, x, y]


def time_steps(step: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


class _EmptyMode(TorchDispatchMode):
    """The floor: a dispatch mode that only forwards each op. Whatever any dispatch-mode
    tracker costs, at least this much is Python dispatch itself, not bookkeeping."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # as the ledger: no per-call torch._disable_dynamo wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def bench_width(width: int, rounds: int, steps: int) -> dict[str, float]:
    from torch.distributed._tools.mem_tracker import MemTracker

    step, objs = make_step(width)
    probe = make_probe("tracked")
    probe.track(*objs)
    mt = MemTracker()
    mt.track_external(*objs[:3])

    def untracked(n: int) -> float:
        return time_steps(step, n)

    def tracked(n: int) -> float:
        with probe:
            return time_steps(step, n)

    def mt_step() -> None:
        mt.reset_mod_stats()  # MemTracker refuses a second iteration without it
        step()

    def memtracker(n: int) -> float:
        with mt:
            return time_steps(mt_step, n)

    def empty(n: int) -> float:
        with _EmptyMode():
            return time_steps(step, n)

    modes = {"untracked": untracked, "empty": empty, "tracked": tracked, "memtracker": memtracker}
    for fn in modes.values():
        fn(max(steps // 4, 2))  # warm-up: lazy inits, caches, first-op classification
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(rounds):
        for k, fn in modes.items():
            times[k].append(fn(steps))
    return {k: statistics.median(v) for k, v in times.items()}


FAKE_SNIPPET = r"""
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import torch
from torch import nn
from multiopt.instrument.probes import make_probe
t_import = time.perf_counter()
W, D, B = 16384, 8, 512
def mlp():
    layers = []
    for i in range(D):
        layers.append(nn.Linear(W, W))
        if i < D - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
def estimate():
    probe = make_probe("fake")
    with probe:
        model = probe.build_model(mlp)
        opt = torch.optim.Adam(model.parameters())
        x, y = torch.randn(B, W), torch.randn(B, W)
        phases = []
        probe.reset_peak()
        loss = nn.functional.mse_loss(model(x), y)
        phases.append(("forward", probe.allocated(), probe.peak()))
        probe.reset_peak()
        loss.backward()
        phases.append(("backward", probe.allocated(), probe.peak()))
        probe.reset_peak()
        opt.step()
        phases.append(("step", probe.allocated(), probe.peak()))
    return phases
phases = estimate()
t_cold = time.perf_counter()
assert estimate() == phases
t_warm = time.perf_counter()
print(f"{{t_import - t0:.3f}} {{t_cold - t_import:.3f}} {{t_warm - t_cold:.3f}}")
for name, a, p in phases:
    print(name, a, p)
"""


def bench_fake() -> tuple[float, float, float, list[tuple[str, int, int]]]:
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", FAKE_SNIPPET.format(root=root)],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    t_import, t_cold, t_warm = map(float, out[0].split())
    phases = [(n, int(a), int(p)) for n, a, p in (line.split() for line in out[1:] if line.strip())]
    return t_import, t_cold, t_warm, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, depth {DEPTH}, batch {BATCH}, "
          f"SGD(momentum) on layer 0 + Adam on the rest, {args.rounds} rounds\n")
    print("| width | untracked ms | empty mode (floor) | tracked ms | overhead | target | MemTracker ms | MemTracker overhead |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for width, steps in ((64, 200), (1024, 20)):
        r = bench_width(width, args.rounds, steps)
        base = r["untracked"]
        ov = r["tracked"] / base
        print(f"| {width} | {base * 1e3:.3f} | {r['empty'] * 1e3:.3f} ({r['empty'] / base:.2f}x) | "
              f"{r['tracked'] * 1e3:.3f} | {ov:.2f}x | "
              f"<= {TARGETS[width]}x {'ok' if ov <= TARGETS[width] else 'MISSED'} | "
              f"{r['memtracker'] * 1e3:.3f} | {r['memtracker'] / base:.2f}x |")
    t_import, t_cold, t_warm, phases = bench_fake()
    print(f"\nfake probe, MLP width 16384 depth 8 batch 512, Adam (probe + build + forward/backward/step):\n"
          f"  first estimate in a fresh process {t_cold:.3f} s ({'ok' if t_cold < 2 else 'MISSED'} < 2 s; "
          f"includes torch's lazy imports: FakeTensorMode, dynamo)\n"
          f"  a second estimate                 {t_warm:.3f} s ({'ok' if t_warm < 2 else 'MISSED'} < 2 s)\n"
          f"  (importing torch + multiopt before that: {t_import:.3f} s)")
    for name, a, p in phases:
        print(f"  {name:8s} allocated {a / 2**30:8.3f} GiB   peak {p / 2**30:8.3f} GiB")


if __name__ == "__main__":
    main()
