"""How far `multiopt estimate --model hf:<Llama-2-7B config>` is from its floor (issue 20).

The floor: a fresh Python that imports transformers and builds the same model on the meta
device (what any tool must do before it can say anything about the model). The command: a
fresh `multiopt estimate --model hf:tests/fixtures/hf/llama-2-7b --batch 1 --seq 512
--rules "rest=adamw" --json`, whose record must hold parameters of 26,953,662,464 B (fp32).
Both run alternately, `--repeat` times each, in this one run; wall time and the child's CPU
time (user + sys, steadier on a shared machine) are reported as medians, and their ratio.

    python bench/hf_estimate.py [--repeat 3] [--warmup N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "fixtures" / "hf" / "llama-2-7b"
PARAM_BYTES = 26_953_662_464  # 6,738,415,616 parameters x 4 B

FLOOR = f"""
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained({str(CONFIG)!r})
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
assert sum(p.numel() for p in model.parameters()) * 4 == {PARAM_BYTES}
"""


def _timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its stdout) for one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])}... failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=None, help="pass --warmup N to estimate (default: its own)")
    args = ap.parse_args()
    estimate = [sys.executable, "-m", "multiopt", "estimate", "--model", f"hf:{CONFIG}", "--batch", "1",
                "--seq", "512", "--rules", "rest=adamw", "--json"]
    if args.warmup is not None:
        estimate += ["--warmup", str(args.warmup)]
    floor, cmd = [], []
    for _ in range(args.repeat):
        floor.append(_timed([sys.executable, "-c", FLOOR])[:2])
        wall, cpu, out = _timed(estimate)
        row = json.loads(out)
        if row["status"] != "ok" or row["param_bytes"] != PARAM_BYTES:
            sys.exit(f"estimate: status {row['status']} ({row.get('error')}), param_bytes {row['param_bytes']:,}")
        cmd.append((wall, cpu))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.repeat} runs each, medians")
    print(f"param_bytes {row['param_bytes']:,} (fp32); peak_total {row['peak_total']:,}; "
          f"peak_reserved {row['peak_reserved']:,} (target {row['target']}); warmup {args.warmup or 'default'}")
    print("| | wall s | CPU s |\n|---|---:|---:|")
    print(f"| floor: import transformers + build on meta | {med(floor, 0):.2f} | {med(floor, 1):.2f} |")
    print(f"| multiopt estimate | {med(cmd, 0):.2f} | {med(cmd, 1):.2f} |")
    print(f"| ratio | {med(cmd, 0) / med(floor, 0):.2f}x | {med(cmd, 1) / med(floor, 1):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
