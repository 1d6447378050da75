"""plan's answer beside the usual rules of thumb, for the 7B and 1B Llama shapes.

Run:  python bench/plan_compare.py [--shape llama-1b|llama-2-7b|all] [--no-plan]

For each shape, in one run: its parameter count; the 16-bytes-per-parameter rule (fp32 weights,
grads and Adam's two moments); accelerate's `estimate-memory` "Training using Adam" for float32
(its `estimate_training_usage` on its `calculate_maximum_sizes` of the same meta model: 4x the
model's bytes); DeepSpeed's `estimate_zero2_model_states_mem_needs_all_cold` on one GPU without
offload (printed by DeepSpeed; the bytes from the function it calls); and multiopt's fake-probe
peak for AdamW float32 at batch 1 (target cuda: peak reserved + context), then `multiopt plan`'s
answer at the budget. A package that is not installed (or does not import) is reported missing:
nothing is computed in its place.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
#: shape -> (budget, plan axes)
SHAPES: dict[str, tuple[str, list[str]]] = {
    "llama-1b": ("24GiB", ["--combos", "adamw", "--dtype", "float32,bfloat16", "--lora", "none,8",
                           "--checkpointing", "1", "--step-in-backward", "0"]),
    "llama-2-7b": ("80GiB", ["--combos", "adamw", "--dtype", "float32,bfloat16", "--lora", "none,8",
                             "--checkpointing", "1", "--step-in-backward", "0"]),
}


def rule16(params: int) -> int:
    """The rule of thumb: 4 B weights + 4 B grads + 8 B Adam moments per parameter."""
    return 16 * params


def accelerate_adam(model) -> int | None:
    """accelerate estimate-memory's "Training using Adam" for float32 (max of its phases), on
    this meta model. None when accelerate is not installed. Its command module imports timm
    where timm is installed; a timm that cannot import (no torchvision) is treated as absent."""
    if importlib.util.find_spec("accelerate") is None:
        return None
    import accelerate.utils as au

    try:
        importlib.import_module("timm")
    except Exception:
        au.is_timm_available = lambda: False  # accelerate's own check says yes; the import says no
    from accelerate.commands.estimate import estimate_training_usage

    total, _ = au.calculate_maximum_sizes(model)
    return int(max(estimate_training_usage(total, "float32").values()))


def deepspeed_zero2(params: int) -> tuple[int, str] | None:
    """DeepSpeed ZeRO-2 model states on 1 GPU without offload: (bytes per GPU, the table that
    `estimate_zero2_model_states_mem_needs_all_cold` printed). None without deepspeed."""
    if importlib.util.find_spec("deepspeed") is None:
        return None
    try:
        from deepspeed.runtime.zero import stage_1_and_2 as z2
    except Exception:
        return None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        z2.estimate_zero2_model_states_mem_needs_all_cold(total_params=params, num_gpus_per_node=1, num_nodes=1)
    _, gpu = z2.estimate_zero2_model_states_mem_needs(params, 1, 1, cpu_offload=False)
    return int(gpu), out.getvalue()


def meta_model(path: Path):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def multiopt(args: list[str]) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "multiopt", *args, "--json"], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if p.returncode not in (0, 1):
        raise SystemExit(f"multiopt {args[0]}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def compare(shape: str, with_plan: bool = True) -> dict:
    path = FIXTURES / shape
    model = meta_model(path)
    params = sum(p.numel() for p in model.parameters())
    ds = deepspeed_zero2(params)
    row = {"shape": shape, "params": params, "rule16": rule16(params), "accelerate_adam_fp32": accelerate_adam(model),
           "deepspeed_zero2": ds[0] if ds else None}
    if not with_plan:
        return row
    budget, axes = SHAPES[shape]
    est, _ = multiopt(["estimate", "--model", f"hf:{path}", "--batch", "1", "--rules", "rest=adamw(lr=0.001)"])
    row["multiopt_b1_adamw_fp32"] = (est.get("peak_reserved") or est.get("peak_total"), est.get("status"))
    plan, wall = multiopt(["plan", "--budget", budget, "--model", f"hf:{path}", *axes])
    row["budget"], row["plan_s"] = budget, round(wall, 1)
    row["plan"] = [(r["candidate"], r["batch"], r["confirmed"], r.get("used"), r["why"]) for r in plan["rows"]]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="all", help=f"one of {', '.join(SHAPES)}, or all")
    ap.add_argument("--no-plan", action="store_true", help="the formulas only (no fake runs)")
    args = ap.parse_args()
    for shape in (SHAPES if args.shape == "all" else [args.shape]):
        print(json.dumps(compare(shape, not args.no_plan)), flush=True)


if __name__ == "__main__":
    main()
