"""The sweep: presets, isolation, results that are never lost, and the quick preset's numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from multiopt.analyze import frame
from multiopt.instrument.protocol import Protocol
from multiopt.record import config_key
from multiopt.store import read_jsonl
from multiopt.run.presets import COMBOS, PRESETS, preset_configs, user_combo
from multiopt.errors import UsageError

from .support import ROOT, subprocess_env


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_quick_preset_writes_one_record_per_config(quick_run):
    """(How long it takes is bench/wall_times.py's question: the issue's budget is 60 s.)"""
    out, proc = quick_run
    rows = read_jsonl(out / "results.jsonl")
    configs = preset_configs("quick")
    assert len(rows) == len(configs)
    assert {config_key(r) for r in rows} == {c.record_key("tracked") for c in configs}
    assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.status != "ok"]
    env = json.loads((out / "env.json").read_text())
    assert env["probe"] == "tracked" and env["preset"] == "quick" and env["torch"]
    assert (out / "report.md").exists()


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_quick_preset_state_bytes_per_parameter(quick_run):
    df = frame.load(quick_run[0])
    per = df.groupby("combo")["state_bytes_per_param"].agg(["min", "max"])
    assert per.loc["sgd"].tolist() == [0, 0]
    assert per.loc["sgd-momentum"].tolist() == [4, 4]
    assert per.loc["adam"].tolist() == [8, 8]
    assert per.loc["adamw"].tolist() == [8, 8]
    muon = frame.by_optimizer(df[df.combo == "muon+adamw"])
    muon = muon[muon.optimizer == "muon"]
    assert len(muon) > 0
    assert (muon.state_bytes / muon.n_params).eq(4).all()


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_quick_preset_foreach_adam_peaks_above_fused(quick_run):
    df = frame.load(quick_run[0])
    adam = df[(df.combo == "adam") & (df.width == 256) & (df.batch == 64)].set_index("impl")
    assert adam.loc["foreach", "peak_step"] > adam.loc["fused", "peak_step"]
    assert adam.loc["foreach", "step_temp_bytes"] > adam.loc["fused", "step_temp_bytes"]


def _run(out, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "multiopt", "run", "--out", str(out), "--no-progress", "--no-report", *args],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=timeout,
    )


SMALL = ["--preset", "quick", "--widths", "32,48,64", "--batches", "8,16", "--combos", "sgd,adam"]


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_sigkill_halfway_then_resume_gives_exactly_one_record_per_config(tmp_path):
    out = tmp_path / "run"
    results = out / "results.jsonl"
    n = 3 * 2 * 2
    proc = subprocess.Popen(
        [sys.executable, "-m", "multiopt", "run", "--out", str(out), "--no-progress", "--no-report", *SMALL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(), cwd=ROOT, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_bytes().splitlines()) >= n // 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # parent, forkserver and worker, mid-sweep
    proc.wait()
    before = read_jsonl(results)
    assert 0 < len(before) < n
    # a torn last line, as a kill during a write would leave, is never accepted
    with open(results, "a") as f:
        f.write('{"schema": "multiopt.record/1", "probe": "tra')
    assert len(read_jsonl(results)) == len(before)
    refused = _run(out, *SMALL)
    assert refused.returncode == 2 and "--resume" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    done = _run(out, *SMALL, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resuming: {len(before)} of {n}" in done.stdout
    rows = read_jsonl(results)
    keys = [config_key(r) for r in rows]
    assert len(rows) == n and len(set(keys)) == n
    # the records written before the kill are kept as they were
    assert rows[: len(before)] == before


def test_oom_and_divergence_are_recorded_and_the_sweep_completes(tmp_path):
    out = tmp_path / "run"
    p = _run(out, "--preset", "quick", "--widths", "64", "--batches", "8", "--combos", "sgd,adam",
             "--rules", "boom::rest=sgd(lr=1e9)", "--limit", "120KiB")
    assert p.returncode == 0, p.stderr
    rows = {r.combo: r for r in read_jsonl(out / "results.jsonl")}
    assert rows["sgd"].status == "ok"          # params + batch fit in 120 KiB
    assert rows["adam"].status == "oom"        # Adam's state does not
    assert rows["boom"].status == "diverged"
    assert "oom" in p.stdout and "diverged" in p.stdout


def test_worker_crash_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from multiopt.instrument.protocol import Config
    from multiopt.run.launch import Isolated

    launcher = Isolated(Protocol(steps=1), timeout=60, progress=False)
    crash = Config(width=16, combo="crash", rules="rest=tests.crashing:Crash")
    fine = Config(width=16, combo="sgd", rules=COMBOS["sgd"])
    recs = launcher.run([crash, fine], tmp_path / "r.jsonl")
    assert [r.status for r in recs] == ["error", "ok"]
    assert "worker died" in recs[0].error
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 2


def test_per_config_timeout(tmp_path):
    from multiopt.instrument.protocol import Config
    from multiopt.run.launch import Isolated

    launcher = Isolated(Protocol(steps=1), timeout=3, progress=False)
    recs = launcher.run([Config(width=16, combo="slow", rules="rest=tests.crashing:Slow")], tmp_path / "r.jsonl")
    assert recs[0].status == "error" and "timed out after 3 s" in recs[0].error


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_no_isolate_gives_the_same_memory_numbers(tmp_path):
    a = _run(tmp_path / "a", "--preset", "quick", "--widths", "32", "--batches", "8", "--combos", "sgd+adam,muon+adamw")
    b = _run(tmp_path / "b", "--preset", "quick", "--widths", "32", "--batches", "8", "--combos", "sgd+adam,muon+adamw",
             "--no-isolate")
    assert a.returncode == b.returncode == 0
    fa, fb = frame.load(tmp_path / "a"), frame.load(tmp_path / "b")
    cols = ["combo", "param_bytes", "opt_state_bytes", "peak_forward", "peak_backward", "peak_step", "peak_total"]
    assert fa[cols].equals(fb[cols])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--combos", "sgd,adamm"], "unknown combo 'adamm'"),
        (["--rules", "x::layer1=sgdd"], "unknown optimizer 'sgdd'"),
        (["--rules", "layer1=sgd(momentum=0.9, lr=0.1"], "unbalanced"),
        (["--widths", "a,b"], "--widths takes integers"),
        (["--probe", "cuda"], "needs a CUDA GPU"),
        (["--preset", "nope"], "invalid choice"),
        (["--rules", "layer1=sgd"], "no rule claims parameters"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    p = _run(tmp_path / "x", *args)
    assert p.returncode == 2
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_user_rules_are_named_without_colliding():
    assert user_combo("split::layer1=sgd; rest=adam") == ("split", "layer1=sgd; rest=adam")
    assert user_combo("layer1=sgd; rest=adam")[0] == "sgd+adam*"  # a preset already has that name
    assert user_combo("layer1=sgd; rest=pkg.mod:Lion")[0] == "sgd+lion"
    with pytest.raises(UsageError):
        user_combo("split::")


def test_presets_cover_the_documented_combos():
    assert set(COMBOS) == {"sgd", "sgd-momentum", "adam", "adamw", "adagrad", "rmsprop", "adafactor",
                           "muon+adamw", "sgd+adam", "adam+sgd"}
    assert PRESETS["wide"]["probe"] == "fake"
    assert max(c.width for c in preset_configs("wide")) == 16384
    # every documented combo, plus the transformer's embedding-aware Muon split
    assert {c.combo for c in preset_configs("quick")} == set(COMBOS) | {"muon+adamw-emb"}


def test_a_size_the_factory_does_not_take_is_one_config_and_resume_finds_it(tmp_path):
    """tests.usermodels_bn:factory takes width only: depths 2 and 3 are one config (depth 0),
    and a resumed sweep finds every record instead of measuring again."""
    from multiopt.instrument.protocol import Protocol
    from multiopt.run.presets import Grid
    from multiopt.run.sweep import sweep

    grid = Grid(models=("tests.usermodels_bn:factory",), widths=(8, 16), depths=(2, 3), batches=(4,),
                combos=(("sgd", COMBOS["sgd"]),))
    configs = grid.configs()
    assert [(c.width, c.depth) for c in configs] == [(8, 0), (16, 0)]
    protocol = Protocol(probe="tracked", steps=0, warmup=1)
    first = sweep(configs, tmp_path, protocol, isolate=False, progress=False)
    assert [(r.width, r.depth, r.status) for r in first.records] == [(8, 0, "ok"), (16, 0, "ok")]
    again = sweep(configs, tmp_path, protocol, resume=True, isolate=False, progress=False)
    assert again.records == () and again.already == 2
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 2
