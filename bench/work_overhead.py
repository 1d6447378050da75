"""What the work counter costs: the tracked probe's instrumented step with and without it.

    python bench/work_overhead.py [--preset quick] [--reps 7]

For every config of the preset (target cuda, tracked probe): build the model, optimizers and
batch under the probe, warm up, then time `reps` steps with the counter on and `reps` with
it off, interleaved (on, off, on, off, ...), in one process: thread CPU time, so other jobs
on a shared host count less. Prints per config the ratio of the medians (with / without),
and the whole measure() of the preset with count_work on and off (wall time, one run each).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from multiopt.instrument.probes import make_probe  # noqa: E402
from multiopt.instrument.protocol import Protocol, measure, model_factory, probe_target, training  # noqa: E402
from multiopt.instrument.work import counting_work  # noqa: E402
from multiopt.run.presets import preset_configs  # noqa: E402


def step_ratio(config, reps: int) -> tuple[float, float, float]:
    torch.manual_seed(config.seed)
    probe = make_probe("tracked", target=config.target)
    with probe:
        model = probe.build_model(model_factory(config))
        _, trainer, batch = training(config, model, probe.device)
        for _ in range(2):
            trainer.train_step(batch)
        on, off = [], []
        for _ in range(reps):
            with counting_work(probe, trainer, probe_target(probe)):
                t = time.thread_time()
                trainer.train_step(batch)
                on.append(time.thread_time() - t)
            t = time.thread_time()
            trainer.train_step(batch)
            off.append(time.thread_time() - t)
    a, b = statistics.median(on), statistics.median(off)
    return a * 1e3, b * 1e3, a / b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    configs = [dataclasses.replace(c, target="cuda") for c in preset_configs(args.preset)]
    ratios = []
    print("| config | step with counter ms | without ms | ratio |\n|---|---:|---:|---:|")
    for c in configs:
        on, off, r = step_ratio(c, args.reps)
        ratios.append(r)
        print(f"| {c.label()} | {on:.2f} | {off:.2f} | {r:.2f} |", flush=True)
    print(f"\ninstrumented step (tracked probe, target cuda): counter on / off, median over {len(ratios)} "
          f"configs {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x")
    whole = {}
    for flag in (True, False):
        t = time.perf_counter()
        for c in configs:
            measure(c, Protocol(probe="tracked", steps=0, count_work=flag))
        whole[flag] = time.perf_counter() - t
    print(f"whole measure() of the preset, memory only (steps 0): counter on {whole[True]:.1f} s, off "
          f"{whole[False]:.1f} s, ratio {whole[True] / whole[False]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
