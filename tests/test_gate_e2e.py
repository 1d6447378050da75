"""The gate against real runs: the committed baseline, an injected regression, time noise."""

import os
import subprocess
import sys

import pytest

from multiopt.gate import run_gate
from tests.conftest import ROOT, run_quick

BASELINE = ROOT / "reports" / "baselines" / "cpu-quick.jsonl"


def _gate(*args):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run([sys.executable, "-m", "multiopt", "gate", *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)


def test_a_fresh_quick_run_passes_the_memory_gate_against_the_committed_baseline(quick_run):
    p = _gate("--baseline", BASELINE, "--current", quick_run[0], "--only", "memory")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS" in p.stdout


def test_amsgrad_on_one_combo_fails_the_gate_naming_config_and_metric(tmp_path):
    out = tmp_path / "ams"
    proc, _ = run_quick(out, "--widths", "64", "--batches", "16", "--combos", "sgd",
                        "--rules", "adam::rest=adam(lr=0.001, amsgrad=True)", "--no-report")
    assert proc.returncode == 0, proc.stderr
    p = _gate("--baseline", BASELINE, "--current", out, "--only", "memory")
    assert p.returncode == 1, p.stdout
    lines = [l for l in p.stdout.splitlines() if "opt_state_bytes" in l and "REGRESSION" in l]
    assert len(lines) == 1 and lines[0].startswith("| adam"), p.stdout
    assert "width=64" in lines[0] and "batch=16" in lines[0]
    assert "amsgrad=True" in p.stdout  # the rule change is noted
    # sgd at the same size is unchanged: no verdict line for it
    assert not any(l.startswith("| sgd,") and "REGRESSION" in l for l in p.stdout.splitlines())


def test_two_runs_on_the_same_machine_do_not_fail_each_other_on_time(quick_run, tmp_path):
    for attempt in range(2):  # real timings: retried once
        out = tmp_path / f"again{attempt}"
        proc, _ = run_quick(out, "--no-report")
        assert proc.returncode == 0, proc.stderr
        code = run_gate(quick_run[0], out, only="time", stdout=open(os.devnull, "w"), environ={})
        if code == 0:
            return
    pytest.fail("two quick runs on one machine failed each other's time gate twice")
