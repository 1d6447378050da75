"""The pytest-benchmark suite (bench/) records what `multiopt run` records.

Runs `pytest bench --benchmark-only --benchmark-json X` and `multiopt run` on the same few
quick-preset configs, in subprocesses (in parallel), and checks that `frame.load(X)` gives
the run's memory numbers to the byte, that the JSON's step times are real, and that an
untimed config (fake probe) still reaches the JSON as a record without times.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from multiopt.analyze import frame
from multiopt.record import CONFIG_COLUMNS, FIELDS, MEMORY_COLUMNS, TIME_COLUMNS
from multiopt.run.presets import PRESETS, preset_configs

from .support import ROOT, load_bench, subprocess_env

# Quick-preset configs both sides run: two widths, one and several optimizers, a
# matrix-only optimizer, and the fused implementation (only at w256 b64 in the preset).
COMBOS = "adam,sgd+adam,muon+adamw"
WIDTHS, BATCHES, IMPLS = "64,256", "64", "default,fused"
EXPECTED = {  # (combo, width, impl) the bench selects from the quick preset
    *((c, w, "default") for c in COMBOS.split(",") for w in (64, 256)),
    ("adam", 256, "fused"),
}
ROUNDS = 3
FAKE_COMBOS = "adam,sgd+adam"


def _env() -> dict[str, str]:
    # one thread each: four processes share the CPU, and OpenMP spin-waits when they contend
    return subprocess_env(drop=["MULTIOPT_PRESET", "MULTIOPT_PROBE"], OMP_NUM_THREADS="1")


def _bench_cmd(json_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--benchmark-json", str(json_path), "-q",
            "-p", "no:cacheprovider", "-rs", *args]


def _run_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "multiopt", "run", "--preset", "quick", "--no-report", "--no-progress",
            "--out", str(out), "--steps", "1", *args]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bench_suite")
    paths = {"bench": tmp / "bench.json", "run": tmp / "run", "fake_bench": tmp / "fake.json"}
    filters = ["--multiopt-filter", f"combo={COMBOS}", "--multiopt-filter", f"width={WIDTHS}",
               "--multiopt-filter", f"batch={BATCHES}", "--multiopt-filter", f"impl={IMPLS}"]
    fake_filters = ["--multiopt-filter", f"combo={FAKE_COMBOS}", "--multiopt-filter", "width=64",
                    "--multiopt-filter", "batch=64", "--multiopt-filter", "impl=default"]
    cmds = {
        "bench": _bench_cmd(paths["bench"], *filters, "--multiopt-rounds", str(ROUNDS), "--multiopt-warmup-rounds", "1"),
        "run": _run_cmd(paths["run"], "--widths", WIDTHS, "--batches", BATCHES, "--combos", COMBOS, "--impls", IMPLS),
        "fake_bench": _bench_cmd(paths["fake_bench"], "--multiopt-probe", "fake", *fake_filters),
    }
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in cmds.items()}
    failed = []
    for k, p in procs.items():
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        if p.returncode != 0:
            failed.append(f"{' '.join(cmds[k])} -> exit {p.returncode}\n{out[-4000:]}")
        paths[f"{k}_log"] = out  # type: ignore[assignment]
    assert not failed, "\n\n".join(failed)
    return paths


def _by_key(df) -> dict[tuple, dict]:
    rows = {}
    for row in df.to_dict("records"):
        key = tuple(row[c] for c in CONFIG_COLUMNS)
        assert key not in rows, f"two records for {key}"
        rows[key] = row
    return rows


def _memory(row: dict) -> dict:
    mem = {c: row[c] for c in MEMORY_COLUMNS}
    mem["optimizers"] = row["optimizers"]
    mem["status"] = row["status"]
    return mem


def _assert_same_memory(bench: dict[tuple, dict], run: dict[tuple, dict]) -> None:
    missing = sorted(set(bench) - set(run))
    assert not missing, f"configs the bench recorded but `multiopt run` did not: {missing}"
    diffs = []
    for key, row in bench.items():
        b, r = _memory(row), _memory(run[key])
        for col in b:
            if b[col] != r[col]:
                diffs.append(f"{dict(zip(CONFIG_COLUMNS, key))['combo']} {key}: {col} bench={b[col]!r} run={r[col]!r}")
    assert not diffs, "memory differs between pytest bench and multiopt run:\n" + "\n".join(diffs)


@pytest.mark.slow  # runs pytest-benchmark and a sweep in subprocesses: .ci/run's `pytest -m slow`
def test_bench_memory_matches_multiopt_run_to_the_byte(outputs):
    bench = _by_key(frame.load(outputs["bench"]))
    run = _by_key(frame.load(outputs["run"]))
    assert {(r["combo"], r["width"], r["impl"]) for r in bench.values()} == EXPECTED
    assert all(r["status"] == "ok" and r["probe"] == "tracked" for r in bench.values())
    _assert_same_memory(bench, run)


@pytest.mark.slow  # runs pytest-benchmark and a sweep in subprocesses: .ci/run's `pytest -m slow`
def test_bench_times_come_from_pytest_benchmark(outputs):
    df = frame.load(outputs["bench"])
    assert len(df) == len(EXPECTED)
    for c in ("step_ms_median", "step_ms_min", "step_ms_mean"):
        assert (df[c] > 0).all(), (c, df[c].tolist())
    assert (df["step_ms_iqr"] >= 0).all()
    assert (df["steps_timed"] == ROUNDS).all()
    doc = json.loads(outputs["bench"].read_text())
    for b in doc["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        assert set(FIELDS) <= set(info), set(FIELDS) - set(info)  # every record field
        assert stats["rounds"] == ROUNDS and stats["iterations"] == 1
        # extra_info's own time fields agree with the stats frame.load reads
        assert math.isclose(info["step_ms_median"], stats["median"] * 1e3)
        assert info["steps_timed"] == ROUNDS
        assert b["params"]["multiopt_config"]["combo"] == info["combo"]
        assert b["name"].startswith(f"test_step[{info['combo']}-w{info['width']}-b{info['batch']}-")


@pytest.mark.slow  # runs pytest-benchmark and a sweep in subprocesses: .ci/run's `pytest -m slow`
def test_bench_machine_info_has_torch_and_gpu_facts(outputs):
    doc = json.loads(outputs["bench"].read_text())
    info = doc["machine_info"]["multiopt"]
    import torch

    assert info["torch"] == torch.__version__
    for key in ("cuda", "device_name", "gpu_count", "git_sha", "probe", "preset"):
        assert key in info
    assert info["probe"] == "tracked" and info["preset"] == "quick" and info["gpu_count"] == 0


@pytest.mark.slow  # runs pytest-benchmark and a sweep in subprocesses: .ci/run's `pytest -m slow`
def test_fake_probe_records_memory_without_times(outputs):
    from multiopt.instrument.protocol import Protocol, measure

    bench_df = frame.load(outputs["fake_bench"])
    bench = _by_key(bench_df)
    assert sorted(r["combo"] for r in bench.values()) == sorted(FAKE_COMBOS.split(","))
    assert all(r["probe"] == "fake" and r["status"] == "ok" for r in bench.values())
    # what `multiopt run --probe fake` records for them: measure() with the fake probe
    # (milliseconds, so in this process rather than another subprocess)
    configs = [c for c in preset_configs("quick") if c.combo in FAKE_COMBOS.split(",")
               and (c.width, c.batch, c.impl) == (64, 64, "default")]
    run = _by_key(frame.records_to_frame([measure(c, Protocol(probe="fake", steps=0)).to_dict() for c in configs]))
    _assert_same_memory(bench, run)
    for c in TIME_COLUMNS:
        if c != "steps_timed":  # a count: 0 steps timed
            assert bench_df[c].isna().all(), c
    assert (bench_df["steps_timed"] == 0).all()
    doc = json.loads(outputs["fake_bench"].read_text())
    assert all(b["stats"] is None for b in doc["benchmarks"])  # record-only entries
    assert doc["machine_info"]["multiopt"]["probe"] == "fake"  # written by the conftest itself
    assert "not timed: the fake probe" in outputs["fake_bench_log"]


def _bench_conftest():
    return load_bench("conftest")


def test_bench_ids_are_unique_and_readable():
    conftest = _bench_conftest()
    for name in PRESETS:
        configs = preset_configs(name)
        ids = [conftest.config_id(c) for c in configs]
        assert len(set(ids)) == len(ids), name
    c = preset_configs("quick")[0]
    assert conftest.config_id(c) == f"{c.combo}-w{c.width}-b{c.batch}-d{c.depth}-{c.impl}"
