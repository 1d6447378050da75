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
