"""The host's own noise as the time gate sees it: the calibration kernel of
`multiopt/instrument/timing.py`, timed as a config's timing phase times it, quiet and with a
CPU-bound job competing (`python -c 'while True: pass'`, started here and killed after).

Run:  python bench/host_noise.py [--windows 20] [--threads 1,2] [--hogs 0,1]

Per thread count and competitor count: `--windows` windows of 16 calibration samples (one
config's worth: 3 before, 10 between, 3 after), and over the windows the median of
`host_noise` (IQR / median within a window, as a record stores it), its 90th percentile, and
the calibration's median per sample in ms (its shift against the quiet row is what the gate
adds to the noise when it compares two runs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from multiopt.instrument.timing import Calibration, relative_iqr

SAMPLES = 16  # a quick-preset config: 30 step samples, HOST_EDGE 3 each side, 1 every 3 between


def window(cal: Calibration) -> tuple[float, float]:
    """(host_noise, median ms) of one config's calibration samples, with ~5 ms of other work
    between samples as the step blocks would put there."""
    xs = []
    for _ in range(SAMPLES):
        xs.append(cal.sample())
        t = time.perf_counter()
        while time.perf_counter() - t < 0.005:  # a step block's worth of the host's time
            pass
    return relative_iqr(xs) or 0.0, statistics.median(xs)


def row(threads: int, hogs: int, windows: int) -> str:
    torch.set_num_threads(threads)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        time.sleep(0.5 if hogs else 0)
        cal = Calibration("cpu")
        got = [window(cal) for _ in range(windows)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    noise = sorted(n for n, _ in got)
    med = statistics.median(m for _, m in got)
    p90 = noise[min(len(noise) - 1, int(0.9 * len(noise)))]
    return f"| {threads} | {hogs} | {statistics.median(noise):.1%} | {p90:.1%} | {med:.3f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--hogs", default="0,1")
    a = ap.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{Calibration.KERNEL}, {SAMPLES} samples a window, {a.windows} windows; load average {' '.join(load)}")
    print("| threads | competing jobs | host_noise median | p90 | calibration median (ms) |")
    print("|--:|--:|--:|--:|--:|")
    for threads in map(int, a.threads.split(",")):
        for hogs in map(int, a.hogs.split(",")):
            print(row(threads, hogs, a.windows), flush=True)


if __name__ == "__main__":
    main()
