"""How fast `multiopt plan` answers, from a fresh process, and where its time goes.

Run:  python bench/plan_speed.py [--shape transformer-4096x8] [--target cuda] [--confirm frontier]

Each shape runs `python -m multiopt plan ... --json` in a fresh process (imports, the model
built once on meta, every fake run) and prints the wall time, the fake runs and their seconds,
and the candidates per run. Shapes: our transformer at a large width (the 7B and 1B Llama
shapes plug in as `hf:` configs once `--model hf:PATH` lands: add them to SHAPES). The
candidates: the default combos x step_in_backward 0,1 x dtype float32,bfloat16 (>= 24 with
the 8-bit AdamW, else 16 + what `--combos` adds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (model flags, budget)
SHAPES: dict[str, tuple[list[str], str]] = {
    "transformer-4096x8": (["--model", "transformer", "--width", "4096", "--depth", "8"], "24GiB"),
    "transformer-2048x8": (["--model", "transformer", "--width", "2048", "--depth", "8"], "24GiB"),
    "transformer-1024x4": (["--model", "transformer", "--width", "1024", "--depth", "4"], "8GiB"),
}
AXES = ["--combos", "adamw,adafactor,muon+adamw,sgd-momentum,sgd,adam", "--step-in-backward", "0,1",
        "--dtype", "float32,bfloat16"]


def run(shape: str, target: str, confirm: str) -> dict:
    flags, budget = SHAPES[shape]
    argv = [sys.executable, "-m", "multiopt", "plan", "--budget", budget, *flags, *AXES, "--target", target,
            "--confirm", confirm, "--json"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if p.returncode not in (0, 1):
        raise SystemExit(f"{shape}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    data = json.loads(p.stdout)
    rows = data["rows"]
    return {"shape": shape, "target": target, "confirm": confirm, "candidates": len(rows),
            "fit": sum(1 for r in rows if r["batch"] and not r["why"]), "frontier": sum(r["frontier"] for r in rows),
            "wall_s": round(wall, 1), "fake_runs": data["fake_runs"], "fake_s": data["fake_seconds"],
            "best": [(r["candidate"], r["batch"]) for r in rows if r["frontier"]][:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="transformer-4096x8", help=f"one of {', '.join(SHAPES)}, or all")
    ap.add_argument("--target", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--confirm", default="frontier", choices=["frontier", "all"])
    args = ap.parse_args()
    for shape in (SHAPES if args.shape == "all" else [args.shape]):
        print(json.dumps(run(shape, args.target, args.confirm)), flush=True)


if __name__ == "__main__":
    main()
