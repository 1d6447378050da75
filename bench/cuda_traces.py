"""On a GPU: capture the caching allocator's own trace for configs that exercise its rules,
and check `fit --target cuda` against what really runs under a memory limit.

Run (repository root, torch with CUDA):
    python bench/cuda_traces.py [--out tests/fixtures/cuda-traces] [--only NAME,...] [--no-fit]

Traces. Each config of CONFIGS runs in a fresh process (a fresh allocator, its own
PYTORCH_CUDA_ALLOC_CONF): `torch.cuda.memory._record_memory_history()` (no stack frames),
the measurement protocol on the cuda probe (memory only), then `_snapshot()`, trimmed to
(action, address, size) per event plus the final segments, written with the cuda probe's
record as OUT/NAME.json. tests/test_trace.py replays every such file through the allocator
model on any CPU; this script replays each right away too and prints the outcome.

Fit. For three combos at width 4096, depth 4: the largest batch `fit` predicts for a 20 GiB
budget on the fake probe with target cuda (context 0: `set_per_process_memory_fraction`
caps the caching allocator, not the CUDA context), against the largest batch that runs
(status ok) on the cuda probe with `limit_bytes` = 20 GiB, each batch in a fresh process.
The real answer is searched from the prediction outwards, so a right prediction costs two
runs (the prediction runs, one more does not).

Without a GPU the script says so and exits 2. `--list` prints the configs (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from multiopt.errors import UsageError  # noqa: E402
from multiopt.record import Config  # noqa: E402

GiB = 1 << 30

# name -> (config fields, PYTORCH_CUDA_ALLOC_CONF): each chosen for a rule of the allocator.
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    # 1536^2 fp32 = 9 MiB weights: 1-10 MiB requests served from 20 MiB segments, split
    "mlp-1536-adam": (dict(width=1536, batch=64, combo="adam"), ""),
    # 3000^2 fp32 = 36,000,000 B: > 10 MiB, rounded to 2 MiB (36,700,160 B), tail <= 1 MiB unsplit
    "mlp-3000-adam": (dict(width=3000, batch=64, combo="adam"), ""),
    "mlp-3000-sgd-momentum": (dict(width=3000, batch=256, combo="sgd-momentum"), ""),
    # bf16 weights and fp16 autocast (casts of every weight each forward)
    "mlp-2048-adamw-bf16": (dict(width=2048, batch=128, combo="adamw", dtype="bfloat16"), ""),
    "mlp-2048-adam-fp16amp": (dict(width=2048, batch=128, combo="adam", amp="fp16"), ""),
    # the transformer: attention, layer norms, embeddings
    "transformer-512-adamw": (dict(model="transformer", width=512, depth=2, batch=16, combo="adamw"), ""),
    # Muon's Newton-Schulz temporaries next to AdamW
    "mlp-2048-muon-adamw": (dict(width=2048, batch=64, combo="muon+adamw"), ""),
    # allocator options
    "mlp-3000-adam-expandable": (dict(width=3000, batch=64, combo="adam"), "expandable_segments:True"),
    "mlp-3000-adam-maxsplit": (dict(width=3000, batch=64, combo="adam"), "max_split_size_mb:20"),
    "mlp-1536-adam-pow2": (dict(width=1536, batch=64, combo="adam"), "roundup_power2_divisions:4"),
}
FIT_COMBOS = ("adam", "sgd", "muon+adamw")
FIT_BUDGET = 20 * GiB


def config_of(name: str, device: str = "cuda") -> Config:
    """CONFIGS[name] as a Config (mlp, depth 3, float32 unless given)."""
    from multiopt.run.presets import combos

    fields, _ = CONFIGS[name]
    fields = {"model": "mlp", "depth": 3, **fields}
    combo, rules = combos([fields.pop("combo")])[0]
    return Config(**fields, combo=combo, rules=rules, device=device, target="cuda")


# --------------------------------------------------------------------------- child processes


def capture(name: str, out: Path) -> None:
    """In a fresh process: record, measure, snapshot, write OUT/NAME.json."""
    import torch

    from multiopt.instrument.protocol import Protocol, measure
    from multiopt.instrument.trace import fixture, trim
    from multiopt.store import dumps

    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=4_000_000)
    config = config_of(name)
    record = measure(config, Protocol(probe="cuda", steps=0))
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events, segments = trim(snapshot, torch.cuda.current_device())
    doc = fixture(events, segments, name=name, alloc_conf=CONFIGS[name][1], torch=torch.__version__,
                  device_name=torch.cuda.get_device_name(), config=asdict(config),
                  record=json.loads(dumps(record)))
    (out / f"{name}.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")


def runs_under_limit(combo: str, batch: int) -> None:
    """In a fresh process: exit 0 when the config runs under the 20 GiB limit, 3 when not."""
    from multiopt.instrument.protocol import Protocol, measure
    from multiopt.run.presets import combos

    name, rules = combos([combo])[0]
    config = Config(model="mlp", width=4096, depth=4, batch=batch, combo=name, rules=rules, device="cuda", target="cuda")
    record = measure(config, Protocol(probe="cuda", steps=0, limit_bytes=FIT_BUDGET))
    print(f"{combo} batch {batch}: {record.status} peak_reserved {record.peak_reserved}", flush=True)
    sys.exit(0 if record.status == "ok" else 3)


# --------------------------------------------------------------------------- the parent


def _child(args: list[str], alloc_conf: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    if alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)


def traces(names: list[str], out: Path) -> int:
    from multiopt.instrument.trace import check, from_fixture

    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for name in names:
        t0 = time.perf_counter()
        p = _child(["--capture", name, "--out", str(out)], CONFIGS[name][1])
        if p.returncode != 0:
            bad += 1
            print(f"{name}: capture failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        path = out / f"{name}.json"
        events, segments, conf = from_fixture(json.loads(path.read_text()), path.name)
        result = check(events, conf, segments)
        bad += not result.exact
        print(f"{name} ({time.perf_counter() - t0:.1f} s, {path.stat().st_size:,} B): {result.summary()}", flush=True)
    return bad


def fit_check() -> list[dict[str, Any]]:
    from multiopt.run.fit import largest
    from multiopt.run.presets import combos

    rows = []
    for combo in FIT_COMBOS:
        name, rules = combos([combo])[0]
        config = Config(model="mlp", width=4096, depth=4, batch=1, combo=name, rules=rules, target="cuda")
        predicted = largest(config, "batch", FIT_BUDGET, context=0).value
        real, runs = _real_largest(combo, predicted)
        rows.append({"combo": combo, "predicted": predicted, "real": real, "runs": runs,
                     "off_by": predicted - real})
        print(f"fit {combo}: predicted batch {predicted}, real {real} ({runs} GPU runs)", flush=True)
    return rows


def _real_largest(combo: str, guess: int) -> tuple[int, int]:
    """The largest batch of `combo` that runs under the limit (GPU runs), from `guess` outwards."""
    return search_largest(lambda batch: _child(["--run", combo, str(batch)]).returncode == 0, guess)


def search_largest(ok: Callable[[int], bool], guess: int) -> tuple[int, int]:
    """(largest n >= 1 with ok(n), or 0; calls of ok) for an `ok` true up to some n and false
    after: from `guess`, steps doubling outwards until the answer is bracketed, then bisection."""
    calls = 0

    def test(n: int) -> bool:
        nonlocal calls
        calls += 1
        return ok(n)

    guess = max(guess, 1)
    lo, hi = (guess, None) if test(guess) else (None, guess)  # lo runs, hi does not
    step = 1
    while lo is None or hi is None:
        if lo is None:
            n = hi - step  # type: ignore[operator]
            if n < 1:
                lo = 0
                break
        else:
            n = lo + step
        if test(n):
            lo = n
        else:
            hi = n
        step *= 2
    while hi - lo > 1:  # type: ignore[operator]
        mid = (lo + hi) // 2  # type: ignore[operator]
        if test(mid):
            lo = mid
        else:
            hi = mid
    return lo, calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "cuda-traces"))
    ap.add_argument("--only", help="comma-separated config names (default: all)")
    ap.add_argument("--no-fit", action="store_true", help="traces only")
    ap.add_argument("--list", action="store_true", help="print the configs and exit (no GPU needed)")
    ap.add_argument("--capture", help=argparse.SUPPRESS)
    ap.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = list(CONFIGS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"cuda_traces: unknown config {', '.join(unknown)}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.list:
        from multiopt.instrument.allocator import AllocatorConfig
        from multiopt.instrument.protocol import Protocol, validate

        for n in names:
            config = config_of(n, "cpu")
            validate(config, Protocol(probe="tracked", steps=0))  # model, rules, sizes: before any GPU time
            AllocatorConfig.parse(CONFIGS[n][1])
            print(f"{n}: {config.label()}  {CONFIGS[n][1] or '(default allocator)'}")
        return 0
    if args.capture:
        capture(args.capture, Path(args.out))
        return 0
    if args.run:
        runs_under_limit(args.run[0], int(args.run[1]))
    import torch

    if not torch.cuda.is_available():
        print("cuda_traces: needs a CUDA GPU, and torch sees none (--list works anywhere)", file=sys.stderr)
        return 2
    bad = traces(names, Path(args.out))
    if not args.no_fit:
        rows = fit_check()
        Path(args.out, "fit-check.json").write_text(json.dumps(rows, indent=1) + "\n")
        bad += sum(abs(r["off_by"]) > 1 for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"cuda_traces: {e}", file=sys.stderr)
        sys.exit(2)
