"""Does the report scale? `multiopt report` and `multiopt gate` on 1k / 3k / 10k synthetic records.

Run:  python bench/report_scale.py [--sizes 1000,3000,10000] [--keep DIR]

The records are the real ones of reports/default-cpu/results.jsonl, cycled, each copy given
a distinct width, batch and seed (and its byte counts scaled with the width, so plots and
tables have varied numbers to draw): the worst case for a report that draws one panel or
series per distinct value. Each command runs in a fresh interpreter (subprocess), timed by
wall clock; its peak memory is ru_maxrss of RUSAGE_CHILDREN, read after it exits (each size
runs in its own child so the maximum is per command, not per session).

Targets (issue 15): each command under 10 s and under 1 GiB RSS at 10,000 records on the
2-core machine, and time growing at most linearly in records.
Not a pytest test on purpose: timing on a shared machine is not a pass/fail signal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "reports" / "default-cpu" / "results.jsonl"
BYTE_FIELDS = ("param_bytes", "grad_bytes", "opt_state_bytes", "opt_state_alloc_bytes", "opt_state_expected", "n_params")


def synthetic(n: int) -> list[dict]:
    """`n` records cycled from SOURCE, record i with width, batch and seed made distinct."""
    base = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    out = []
    for i in range(n):
        r = dict(base[i % len(base)])
        scale = 1 + (i // len(base))  # distinct widths: every copy of the source widens
        r["width"] = int(r["width"]) * scale + i % 7
        r["batch"] = int(r["batch"]) + i % 13
        r["seed"] = i
        for f in BYTE_FIELDS:
            if isinstance(r.get(f), int):
                r[f] = r[f] * scale
        out.append(r)
    return out


def _child(cmd: list[str]) -> tuple[float, float, int]:
    """(wall s, max RSS MiB, exit code) of `cmd` run in a grandchild; this child reports it."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "wall = time.perf_counter() - t\n"
        "kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps([wall, kib / 1024, rc]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, check=True)
    wall, mib, rc = json.loads(res.stdout)
    return wall, mib, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,3000,10000")
    ap.add_argument("--keep", default=None, help="write the runs here instead of a temporary directory")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report_scale_"))
    py = [sys.executable, "-m", "multiopt"]
    print("| records | report s | report MiB | gate s | gate MiB | exit codes |")
    print("|--:|--:|--:|--:|--:|---|")
    for n in sizes:
        run = root / f"n{n}"
        run.mkdir(parents=True, exist_ok=True)
        rows = synthetic(n)
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rw, rm, rrc = _child(py + ["report", str(run), "-o", str(run / "report.md")])
        # the gate against itself: every config compared, nothing missing (exit 0)
        gw, gm, grc = _child(py + ["gate", "--baseline", str(run / "results.jsonl"), "--current", str(run)])
        print(f"| {n:,} | {rw:.2f} | {rm:.0f} | {gw:.2f} | {gm:.0f} | report {rrc}, gate {grc} |", flush=True)
    print(f"\nruns in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
