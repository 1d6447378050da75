"""What many test files share: where things are, how a subprocess finds this checkout,
the CUDA skip, tiny models and the one `multiopt` subprocess call.

Plain functions and constants (fixtures live in conftest.py and use these). Import it as
`from .support import ROOT, subprocess_env, ...`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

import pytest
import torch
from torch import nn

from multiopt.train.models import MLP

ROOT = Path(__file__).resolve().parents[1]
"""The checkout under test (its `multiopt` is the one imported, here and in subprocesses)."""
FIXTURES = ROOT / "tests" / "fixtures"
BENCH = ROOT / "bench"
REPORTS = ROOT / "reports"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
"""Skip unless torch sees a CUDA GPU (pair it with `@pytest.mark.cuda` to select such tests)."""


def subprocess_env(*, drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child that must import this checkout's `multiopt`:
    ROOT first on PYTHONPATH, the names in `drop` removed, then `extra` set."""
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_multiopt(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m multiopt ARGS` in a child process (text output captured); `env` adds to
    `subprocess_env()`."""
    return subprocess.run([sys.executable, "-m", "multiopt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=subprocess_env(**(env or {})), timeout=timeout)


def run_quick(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`multiopt run --preset quick` into OUT (no progress bar). The timeout only catches a
    hang: about 15 s on a quiet 2-core machine, it took over 600 s under a load of 11."""
    return run_multiopt("run", "--preset", "quick", "--out", out, "--no-progress", *extra, timeout=3600)


def load_bench(name: str) -> ModuleType:
    """A script of bench/ (not a package) imported as a module, for the tests that check it."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return mod


def mlp(width: int = 16, depth: int = 2, *, seed: int | None = 0) -> nn.Module:
    """The zoo's MLP (`layer1..layerN`, Linear(width, width) with ReLU between), seeded: what
    `Config(model="mlp")` measures, small."""
    if seed is not None:
        torch.manual_seed(seed)
    return MLP(width, depth)


def sequential(*sizes: int, act: type[nn.Module] = nn.ReLU, dtype: torch.dtype = torch.float32,
               device: str = "cpu", seed: int | None = 0) -> nn.Sequential:
    """Linear(sizes[0], sizes[1]), act, Linear(sizes[1], sizes[2]), ...: a model whose layers
    a test indexes (`model[2]`), in `dtype` on `device`."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


class LateStateSGD(torch.optim.Optimizer):
    """SGD whose momentum buffers are made at its second step, not its first: one warm-up step
    leaves the measured step making state (`Record.step_growth`), two do not. For the tests of
    steadiness; by import path in rules: `rest=tests.support:LateStateSGD(lr=0.1)`."""

    def __init__(self, params, lr: float = 0.1) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["steps"] = state.get("steps", 0) + 1
                if state["steps"] < 2:
                    p.add_(p.grad, alpha=-group["lr"])
                    continue
                if "buf" not in state:
                    state["buf"] = torch.zeros_like(p)
                state["buf"].mul_(0.9).add_(p.grad)
                p.add_(state["buf"], alpha=-group["lr"])
