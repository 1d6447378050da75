"""The gate against real runs: the committed baseline, an injected regression, time noise."""

import subprocess
import sys

import pytest

from .support import ROOT, run_quick, subprocess_env

BASELINE = ROOT / "reports" / "baselines" / "cpu-quick.jsonl"


def _gate(*args):
    return subprocess.run([sys.executable, "-m", "multiopt", "gate", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(drop=["GITHUB_STEP_SUMMARY"]), cwd=ROOT, timeout=120)


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_a_fresh_quick_run_passes_the_memory_gate_against_the_committed_baseline(quick_run):
    p = _gate("--baseline", BASELINE, "--current", quick_run[0], "--only", "memory")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS" in p.stdout


def test_amsgrad_on_one_combo_fails_the_gate_naming_config_and_metric(tmp_path):
    out = tmp_path / "ams"
    proc = run_quick(out, "--widths", "64", "--batches", "16", "--combos", "sgd",
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


def _spread(result) -> tuple[float, int, int]:
    """How far the two runs' step times scatter: p95/p5 - 1 of new/old over every compared
    config, and how many configs moved each way. A tool that inflates times shifts them all
    alike (small scatter); a host whose speed drifts scatters them."""
    import statistics

    ratios = sorted(v.new / v.old for v in result.verdicts if v.metric == "step_ms_median" and v.old)
    cuts = statistics.quantiles(ratios, n=20, method="inclusive")
    return cuts[-1] / cuts[0] - 1, len(result.regressions), len(result.improvements)


@pytest.mark.slow  # two timed quick sweeps (~40 s): a measurement of the host
@pytest.mark.host
def test_two_runs_on_the_same_machine_do_not_fail_each_other_on_time(quick_run, tmp_path):
    """The acceptance as written: two runs of the quick preset, the default time tolerance,
    retried once. A time gate can only be as steady as the machine under it: when both tries
    fail, the runs' own scatter decides. Times that scatter by more than the tolerance are
    the host (this shared 2-vCPU VM: one config in six identical fresh
    workers spanned 46-100%, back to back for 12 s it drifted 30-80% for a second at a
    time) and the test skips with the number; a uniform shift, or a steady host, fails."""
    from multiopt.analyze.gate import compare
    from multiopt.store import read_records

    base = quick_run[0]
    for attempt in range(2):
        out = tmp_path / f"again{attempt}"
        proc = run_quick(out, "--no-report")
        assert proc.returncode == 0, proc.stderr
        result = compare(read_records(base), read_records(out), only="time")
        if result.exit_code == 0:
            assert result.unchanged, "nothing was compared"
            return
    spread, up, down = _spread(result)
    if spread > 0.10:
        pytest.skip(f"host noise: step times of identical runs scatter {spread:.0%} (p95/p5), "
                    f"{up} slower and {down} faster beyond the 10% tolerance")
    pytest.fail(f"two quick runs failed each other's time gate twice: {up} slower, {down} faster, "
                f"scatter {spread:.0%}")
