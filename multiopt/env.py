"""Facts about where this process runs: torch, CUDA, device, CPU, git sha, and its place in a
torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def git_sha(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True)
    return sha + ("-dirty" if dirty.stdout.strip() else "")


def collect(device: str = "cpu", probe: str | None = None, preset: str | None = None,
            threads: int | None = None) -> dict[str, Any]:
    """The env.json of a run; `threads` is what the configs ran with, when the run set it."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device": device,
        "device_name": device_name(device),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "probe": probe,
        "preset": preset,
    }


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_env(environ: Any = None) -> RankEnv | None:
    """The launch this process is part of (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), or None."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError(
            f"RANK={environ.get('RANK')!r}, WORLD_SIZE={environ.get('WORLD_SIZE')!r}, "
            f"LOCAL_RANK={environ.get('LOCAL_RANK')!r} are not integers; launch with torchrun"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}; launch with torchrun")
    return RankEnv(rank, world, local)


def world_size() -> int:
    """Ranks of the current launch (1 outside torchrun)."""
    env = rank_env()
    return env.world_size if env else 1
