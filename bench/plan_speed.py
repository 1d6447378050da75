"""How fast `multiopt plan` answers, from a fresh process, and where its time goes.

Run:  python bench/plan_speed.py [--shape transformer-4096x8] [--target cuda] [--confirm frontier]

Each shape runs `python -m multiopt plan ... --json` in a fresh process (imports, the model
built once on meta, every fake run) and prints the wall time, the fake runs and their seconds,
and the candidates per run. Shapes: our transformer at a large width
(candidates: 6 combos x step_in_backward 0,1 x dtype float32,bfloat16), and the 1B and 7B Llama
`hf:` shapes (candidates: 4 combos x checkpointing 0,1 x LoRA none,8,64). The 1-minute load
average before and after each run is printed: this machine is shared.
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

AXES = ["--combos", "adamw,adafactor,muon+adamw,sgd-momentum,sgd,adam", "--step-in-backward", "0,1",
        "--dtype", "float32,bfloat16"]
#: the hf: shapes' 24 candidates: 4 combos x checkpointing 0,1 x LoRA none, 8, 64
HF_AXES = ["--combos", "adamw,adafactor,muon+adamw,sgd-momentum", "--checkpointing", "0,1", "--lora", "none,8,64",
           "--step-in-backward", "0"]
_HF = "hf:tests/fixtures/hf"
#: name -> (model flags, budget, candidate axes)
SHAPES: dict[str, tuple[list[str], str, list[str]]] = {
    "transformer-4096x8": (["--model", "transformer", "--width", "4096", "--depth", "8"], "24GiB", AXES),
    "transformer-2048x8": (["--model", "transformer", "--width", "2048", "--depth", "8"], "24GiB", AXES),
    "transformer-1024x4": (["--model", "transformer", "--width", "1024", "--depth", "4"], "8GiB", AXES),
    # TinyLlama-1.1B's and Llama-2-7B's published shapes (tests/fixtures/hf), seq 512
    "llama-1b": (["--model", f"{_HF}/llama-1b"], "24GiB", HF_AXES),
    "llama-2-7b": (["--model", f"{_HF}/llama-2-7b"], "80GiB", HF_AXES),
    "llama-2-7b-24": (["--model", f"{_HF}/llama-2-7b"], "24GiB", HF_AXES),
    # the default axes (combos, step_in_backward 0,1) with checkpointing 0,1: 16 candidates,
    # 20 where torchao's 8-bit AdamW is installed; step_in_backward 1 runs whole programs of its own
    "llama-1b-default": (["--model", f"{_HF}/llama-1b"], "24GiB", ["--checkpointing", "0,1"]),
}


def run(shape: str, target: str, confirm: str) -> dict:
    flags, budget, axes = SHAPES[shape]
    argv = [sys.executable, "-m", "multiopt", "plan", "--budget", budget, *flags, *axes, "--target", target,
            "--confirm", confirm, "--json"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if p.returncode not in (0, 1):
        raise SystemExit(f"{shape}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    data = json.loads(p.stdout)
    rows = data["rows"]
    return {"shape": shape, "target": target, "confirm": confirm, "candidates": len(rows),
            "fit": sum(1 for r in rows if r["batch"] and not r["why"]), "frontier": sum(r["frontier"] for r in rows),
            "wall_s": round(wall, 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2), "fake_runs": data["fake_runs"], "fake_s": data["fake_seconds"],
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
