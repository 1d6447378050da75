"""`multiopt` / `python -m multiopt`: train, measure, run, report, gate.

Each subcommand parses its arguments here and calls one function of the module that owns
the work. Any UsageError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but bad arguments exit 2 with one line (argparse prints usage + message)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="multiopt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model on synthetic data, printing loss and memory per step")
    t.add_argument("--rules", required=True, help='e.g. "layer1=sgd(lr=0.01); layer2=adam(lr=1e-3)"')
    t.add_argument("--model", default="simple", help="simple | mlp")
    t.add_argument("--width", type=int, default=64)
    t.add_argument("--depth", type=int, default=2)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_train)
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train_cli

    return train_cli(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"multiopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"multiopt {args.command}: interrupted", file=sys.stderr)
        return 130
