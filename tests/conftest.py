"""Fixtures shared by the test files; the plain helpers they use are in support.py."""

import gc

import pytest

from .support import run_multiopt, run_quick


@pytest.fixture
def run_cli():
    """Run `python -m multiopt ARGS` in a subprocess; returns CompletedProcess (text)."""
    return run_multiopt


@pytest.fixture(scope="session", autouse=True)
def _frozen_gc():
    """Everything imported so far (torch: ~1M objects) lives for the whole session; freezing
    it makes the protocol's gc.collect() scan only what a test created, as in a sweep worker."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One run of the quick preset (with its report), shared by every test that reads it:
    (run directory, CompletedProcess)."""
    out = tmp_path_factory.mktemp("quick") / "run"
    proc = run_quick(out)
    assert proc.returncode == 0, proc.stderr
    return out, proc
