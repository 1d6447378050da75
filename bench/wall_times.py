"""Wall times a user waits for, against their targets (what the tests no longer assert).

Run:  python bench/wall_times.py [--rounds N] [--skip-quick]

- `multiopt run --preset quick` (isolated workers, report written), end to end: target 60 s
  (about 15 s on a quiet 2-core machine);
- `measure()` of a config larger than the machine on the fake probe (MLP width 16384,
  depth 8, batch 512, Adam: 2.1 G parameters), the first in a fresh interpreter (torch's
  lazy imports included, multiopt's import not) and a second in the same process: target 2 s. bench/probe_overhead.py times the fake probe alone on the same model.

Each is run in a fresh process, `--rounds` times (default 3); the table shows the median
and the spread. Not a pytest test on purpose: a shared machine's timing is no pass/fail
signal for the code (tests assert no wall time; see docs/DESIGN.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MEASURE_FAKE = """
import time
from multiopt.instrument.protocol import Config, Protocol, measure
for _ in range(2):  # the first includes torch's lazy imports (FakeTensorMode, Dynamo)
    t0 = time.perf_counter()
    r = measure(Config(width=16384, depth=8, batch=512, rules="rest=adam", combo="adam"), Protocol(probe="fake"))
    assert r.status == "ok", r.error
    print(time.perf_counter() - t0)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def quick_preset() -> float:
    """Seconds for `multiopt run --preset quick` into a fresh directory."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "multiopt", "run", "--preset", "quick", "--out", str(Path(d) / "run"),
                        "--no-progress"], env=_env(), cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - t0


def _measure_fake() -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _MEASURE_FAKE], env=_env(), cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    first, second = map(float, out.strip().splitlines()[-2:])
    return first, second


def measure_fake_first() -> float:
    """Seconds for the first fake-probe measure() of a 2.1 G-parameter MLP in a fresh
    interpreter (torch's lazy imports included, multiopt's import not)."""
    return _measure_fake()[0]


def measure_fake_again() -> float:
    """Seconds for a second such measure() in the same process."""
    return _measure_fake()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-quick", action="store_true", help="only the fake measure (the quick preset takes ~15 s+)")
    args = ap.parse_args(argv)
    cases = [("first measure(), fake probe, MLP w16384 d8 b512 Adam", measure_fake_first, 2.0),
             ("the same measure() again, same process", measure_fake_again, 2.0)]
    if not args.skip_quick:
        cases.append(("multiopt run --preset quick", quick_preset, 60.0))
    print("| what | median s | min .. max s | target s | |")
    print("|---|---:|---:|---:|---|")
    for name, fn, target in cases:
        times = [fn() for _ in range(args.rounds)]
        med = statistics.median(times)
        print(f"| {name} | {med:.2f} | {min(times):.2f} .. {max(times):.2f} | {target:g} | "
              f"{'ok' if med <= target else 'MISSED'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
