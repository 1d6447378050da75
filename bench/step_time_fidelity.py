"""Does the suite report the step time a user's own loop would see?

Run:  python bench/step_time_fidelity.py [--width 1024] [--batch 64] [--rounds 5] [--device cpu|cuda]

For one config (MLP depth 3, SGD on layer1 + Adam on the rest) it compares, in one process,
the `step_ms_median` of `measure()`'s record (Trainer, phase hooks removed, tracking paused)
with the median of a hand-written loop: two torch optimizers, zero_grad, forward, MSE,
backward, both steps. Rounds alternate between the two so machine drift hits both alike;
the result is the median of per-round ratios. Target: within 5%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiopt.train import models  # noqa: E402
from multiopt.instrument.protocol import Config, Protocol, measure  # noqa: E402
from multiopt.instrument.timing import time_steps  # noqa: E402

RULES = "layer1=sgd(lr=0.01); rest=adam(lr=0.001)"


def hand_written(width: int, batch: int, steps: int, device: str) -> float:
    torch.manual_seed(0)
    model = models.MLP(width, 3).to(device)
    x, y = models.make_batch(model, batch, device=device)
    sgd = torch.optim.SGD(model.layer1.parameters(), lr=0.01)
    adam = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("layer1.")], lr=1e-3)

    def step() -> None:
        sgd.zero_grad()
        adam.zero_grad()
        models.mse(model(x), y).backward()
        sgd.step()
        adam.step()

    for _ in range(3):
        step()
    return time_steps(step, steps=steps, warmup=1, device=device).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    probe = "cuda" if args.device == "cuda" else "tracked"
    config = Config(width=args.width, depth=3, batch=args.batch, combo="sgd+adam", rules=RULES, device=args.device)
    ratios, suite, hand = [], [], []
    for _ in range(args.rounds):
        r = measure(config, Protocol(probe=probe, steps=args.steps))
        assert r.status == "ok", r.error
        h = hand_written(args.width, args.batch, args.steps, args.device)
        suite.append(r.step_ms_median)
        hand.append(h)
        ratios.append(r.step_ms_median / h)
    ratio = statistics.median(ratios)
    print(f"{args.device} ({torch.get_num_threads()} threads) width {args.width} batch {args.batch}: "
          f"suite median {statistics.median(suite):.3f} ms, hand-written {statistics.median(hand):.3f} ms, "
          f"ratio {ratio:.3f} (per round: {', '.join(f'{x:.3f}' for x in ratios)}) -> "
          f"{'within' if abs(ratio - 1) <= 0.05 else 'OUTSIDE'} 5%")


if __name__ == "__main__":
    main()
