"""Benchmark (issue 23): a Llama-2-7B shape with --fsdp 8 on the fake probe, from a fresh process.
Goal: under 60 s, command included (torch's import and the fake process group's ranks).

    python bench/fsdp_7b.py [--fsdp 8] [--batch 1] [--rules "rest=adamw"]

Runs `multiopt estimate` in a child process, times it wall-clock, prints its card's per-rank
lines and the seconds."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsdp", default="8")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--rules", default="rest=adamw")
    ap.add_argument("--target", default="cpu")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "multiopt", "estimate", "--model", "bench.llama7b:llama", "--batch", args.batch,
           "--rules", args.rules, "--fsdp", args.fsdp, "--target", args.target, "--warmup", "1", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        return 1
    import json

    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    print(f"{rec['n_params']:,} parameters, fsdp {rec['fsdp']}, {rec['status']}")
    for row in rec["ranks_state"]:
        print(f"rank {row['rank']}: params {row['param_bytes'] / gib:.3f} GiB, grads {row['grad_bytes'] / gib:.3f} GiB, "
              f"state {row['state_bytes'] / gib:.3f} GiB, peak {row['peak_total'] / gib:.3f} GiB, "
              f"unsharded fwd {row['unsharded_forward'] / gib:.3f} GiB"
              + (f" (same as rank {row['same_as']})" if row.get("same_as") is not None else ""))
    print(f"fresh process, wall clock: {seconds:.1f} s (goal < 60 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
