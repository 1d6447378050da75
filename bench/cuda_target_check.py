"""Does target cuda predict the H200? Replays the committed H200 records on the tracked probe.

Run:  python bench/cuda_target_check.py [--preset quick|default|all] [--max-width N]

Every config of reports/gpu-h200/{quick,default}/results.jsonl (schema v1, torch 2.11 on an
H200, cuda probe) is measured on the tracked probe with target cuda, memory only (steps=0),
and compared with its record: the allocated columns (`mem_*`, `peak_*`, exact) and
`peak_reserved` / `reserved_after_step` (read, as those records were, after the finite-parameter
check: `Protocol(reserved_after_check=True)`). Prints one row per config and a summary; exit 1
when an allocated column differs or peak_reserved is off by more than 1%.
tests/test_cuda_target.py runs the quick preset's width-64 configs through `check`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from multiopt.instrument.protocol import Protocol, measure
from multiopt.record import Config, Record

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("quick", "default")
ALLOCATED = ("mem_base", "mem_step_start", "mem_after_zero_grad", "peak_zero_grad", "mem_after_forward",
             "peak_forward", "mem_after_backward", "peak_backward", "mem_after_step", "peak_step", "peak_total")
RESERVED = ("reserved_after_step", "peak_reserved")


def h200_records(preset: str) -> list[Record]:
    path = ROOT / "reports" / "gpu-h200" / preset / "results.jsonl"
    return [Record.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def check(ref: Record, probe: str = "tracked") -> dict[str, Any]:
    """Measure `ref`'s config on `probe` (tracked or fake), target cuda (allocator options from
    the environment, default workspaces); returns the differences (predicted - H200) per column."""
    config = Config(**{**ref.config().__dict__, "device": "cpu", "target": "cuda"})
    # The H200 records (schema v1) read reserved after the finite-parameter check.
    rec = measure(config, Protocol(probe=probe, steps=0, reserved_after_check=True))
    if rec.status != "ok":
        return {"label": config.label(), "error": rec.error}
    diff = {c: getattr(rec, c) - getattr(ref, c) for c in ALLOCATED + RESERVED}
    return {"label": config.label(), "diff": diff, "peak_reserved": ref.peak_reserved,
            "predicted_reserved": rec.peak_reserved, "alloc_model": rec.alloc_model, "target": rec.target}


def _row(r: dict[str, Any], seconds: float) -> str:
    if "error" in r:
        return f"| {r['label']} | error: {r['error']} | | | |"
    d = r["diff"]
    bad = [c for c in ALLOCATED if d[c]]
    rel = d["peak_reserved"] / r["peak_reserved"]
    return (f"| {r['label']} | {', '.join(f'{c} {d[c]:+d}' for c in bad) or 'exact'} | "
            f"{r['peak_reserved']} | {d['peak_reserved']:+d} ({rel:+.3%}) | {seconds:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=(*PRESETS, "all"), default="all")
    ap.add_argument("--max-width", type=int, default=None, help="skip configs wider than this")
    ap.add_argument("--probe", choices=("tracked", "fake"), default="tracked",
                    help="fake: sizes only, the whole replay in seconds (tracked computes every step)")
    args = ap.parse_args(argv)
    refs = [r for p in (PRESETS if args.preset == "all" else (args.preset,)) for r in h200_records(p)
            if args.max_width is None or r.width <= args.max_width]
    print("| config | allocated columns off (bytes) | H200 peak_reserved | predicted - H200 | s |")
    print("|---|---|---:|---:|---:|")
    results, t_all = [], time.perf_counter()
    for ref in refs:
        t0 = time.perf_counter()
        r = check(ref, args.probe)
        results.append(r)
        print(_row(r, time.perf_counter() - t0), flush=True)
    ok = [r for r in results if "error" not in r]
    exact_alloc = sum(not any(r["diff"][c] for c in ALLOCATED) for r in ok)
    exact_res = sum(r["diff"]["peak_reserved"] == 0 for r in ok)
    worst = max((abs(r["diff"]["peak_reserved"]) / r["peak_reserved"] for r in ok), default=0.0)
    print(f"\n{len(results)} configs in {time.perf_counter() - t_all:.0f} s: allocated columns exact on "
          f"{exact_alloc}, peak_reserved exact on {exact_res}, worst peak_reserved error {worst:.3%}, "
          f"errors {len(results) - len(ok)}")
    return 0 if exact_alloc == len(results) and worst <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
