import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_cli():
    """Run `python -m multiopt ARGS` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    def run(*args, cwd=None, env=None, timeout=300):
        e = dict(os.environ)
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
        if env:
            e.update(env)
        return subprocess.run(
            [sys.executable, "-m", "multiopt", *map(str, args)],
            capture_output=True, text=True, cwd=cwd or ROOT, env=e, timeout=timeout,
        )

    return run


@pytest.fixture(scope="session", autouse=True)
def _frozen_gc():
    """Everything imported so far (torch: ~1M objects) lives for the whole session; freezing
    it makes the protocol's gc.collect() scan only what a test created, as in a sweep worker."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def run_quick(out: Path, *extra: str):
    """`multiopt run --preset quick` into OUT; returns (CompletedProcess, seconds)."""
    import subprocess
    import time

    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "multiopt", "run", "--preset", "quick", "--out", str(out), "--no-progress", *extra],
        capture_output=True, text=True, env=e, cwd=ROOT, timeout=600,
    )
    return proc, time.monotonic() - t0


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One run of the quick preset (with its report), shared by every test that reads it."""
    out = tmp_path_factory.mktemp("quick") / "run"
    proc, elapsed = run_quick(out)
    assert proc.returncode == 0, proc.stderr
    return out, elapsed, proc
