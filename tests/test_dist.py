"""torchrun: a sweep sharded over 2 ranks (gloo, CPU) records exactly what one process does,
once per config; ZeRO halves each rank's Adam state (give or take one tensor); resume keeps
what a killed sharded sweep wrote; old records without the new config columns still load."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from multiopt.analyze import frame
from multiopt.env import rank_env
from multiopt.run.launch import merge_zero
from multiopt.errors import UsageError
from multiopt.instrument.protocol import Config, Protocol, measure, validate
from multiopt.record import CONFIG_COLUMNS, MEMORY_COLUMNS, Record, config_key
from multiopt.store import append_jsonl, read_jsonl
from multiopt.run.presets import COMBOS
from multiopt.run.sweep import shard, sweep

from .support import FIXTURES as FIX, ROOT, subprocess_env


def _rows(path) -> list[dict]:
    """The records of a results file as stored rows (dicts)."""
    return [r.to_dict() for r in read_jsonl(path)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = subprocess_env(drop=["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "multiopt", "run", "--preset", "quick", "--out", str(out), "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def _configs(combos, widths, batches, zeros=(0,), ranks=2):
    return [Config(model="mlp", width=w, depth=3, batch=b, combo=c, rules=COMBOS[c], zero=z, ranks=ranks if z else 1)
            for w in widths for b in batches for c in combos for z in zeros]


# --- sharded sweep ----------------------------------------------------------------------

SHARDED = dict(combos=("sgd", "adam", "sgd+adam", "muon+adamw"), widths=(64,), batches=(16, 64))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "run"
    proc = _torchrun(out, "--widths", "64", "--combos", ",".join(SHARDED["combos"]), "--steps", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_torchrun_two_ranks_record_every_config_once_with_single_process_numbers(sharded):
    out, proc = sharded
    rows = _rows(out / "results.jsonl")
    configs = _configs(**SHARDED)
    assert len(configs) == 8
    keys = [config_key(r) for r in rows]
    # exactly one record per config, in config order
    assert keys == [c.record_key("tracked") for c in configs]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert len({r["run_id"] for r in rows}) == 1
    # one process, same protocol: the memory columns agree to the byte for every config
    for row, config in zip(rows, configs):
        one = measure(config, Protocol(probe="tracked", steps=0)).to_dict()
        diff = {c: (row[c], one[c]) for c in MEMORY_COLUMNS if row[c] != one[c]}
        assert not diff, (config.label(), diff)
        assert row["optimizers"] == one["optimizers"]
        assert row["zero"] == 0 and row["ranks"] == 1 and row["ranks_state"] == []
    # one results file, one report, env says how it ran; the per-rank shards are merged away
    assert (out / "report.md").exists()
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 2 and env["probe"] == "tracked"
    assert not (out / "ranks").exists()
    assert "8 configs on 2 ranks" in proc.stdout
    assert proc.stdout.count("report:") == 1  # rank 0 only


# --- ZeRO + resume --------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """adam and sgd+adam at width 256, zero 0 and 1, resumed from a shard a killed sweep left."""
    out = tmp_path_factory.mktemp("zero") / "run"
    planted = measure(_configs(("adam",), (256,), (16,))[0], Protocol(probe="tracked", steps=0), run_id="planted")
    append_jsonl(out / "ranks" / "rank1.jsonl", [planted])
    proc = _torchrun(out, "--widths", "256", "--batches", "16", "--combos", "adam,sgd+adam", "--zero", "0,1",
                     "--steps", "2", "--resume", "--no-report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, planted


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_resume_keeps_what_a_killed_sharded_sweep_wrote(zero_run):
    out, proc, planted = zero_run
    rows = _rows(out / "results.jsonl")
    configs = _configs(("adam", "sgd+adam"), (256,), (16,), zeros=(0, 1))
    assert [config_key(r) for r in rows] == [c.record_key("tracked") for c in configs]
    assert rows[0]["run_id"] == "planted" and rows[0] == json.loads(json.dumps(planted.to_dict()))
    assert "resuming: 1 of 4 configs" in proc.stdout
    assert not (out / "ranks").exists()


def _largest_state(row) -> int:
    """The state of the largest parameter tensor Adam holds: m and v, 4 bytes each."""
    from multiopt.train import models

    model = models.build("mlp", row["width"], row["depth"])
    return max(p.numel() for p in model.parameters()) * 8 + 4


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_zero_halves_each_ranks_adam_state_give_or_take_one_tensor(zero_run):
    rows = {(r["combo"], r["zero"]): r for r in _rows(zero_run[0] / "results.jsonl")}
    for combo in ("adam", "sgd+adam"):
        plain, zero = rows[(combo, 0)], rows[(combo, 1)]
        assert zero["status"] == "ok", zero["error"]
        assert zero["ranks"] == 2 and plain["ranks"] == 1
        by_rank = zero["ranks_state"]
        assert [r["rank"] for r in by_rank] == [0, 1]
        # the ranks hold disjoint partitions: together exactly the unsharded state
        assert zero["opt_state_unsharded"] == plain["opt_state_bytes"] == sum(r["state_bytes"] for r in by_rank)
        assert zero["opt_state_bytes"] == by_rank[0]["state_bytes"]  # the record's own numbers are rank 0's
        plain_adam = next(o for o in plain["optimizers"] if o["optimizer"] == "adam")
        slack = _largest_state(plain)
        for r in by_rank:
            adam = next(o for o in r["by_optimizer"] if o["optimizer"] == "adam")
            assert 0 < adam["state_bytes"] < plain_adam["state_bytes"]
            assert abs(adam["state_bytes"] - plain_adam["state_bytes"] / 2) <= slack, (combo, r)
            assert r["expected"] == r["state_bytes"]  # each rank's partition, by the registry's formula
        # every parameter is on exactly one rank
        assert sum(r["n_params"] for r in by_rank) == plain["n_params"]
        # sharding the state lowers rank 0's peak
        assert zero["peak_total"] < plain["peak_total"]


# --- pieces, in process -----------------------------------------------------------------


def test_shard_deals_config_i_to_rank_i_mod_world():
    assert shard(list(range(7)), 0, 3) == [0, 3, 6]
    assert shard(list(range(7)), 2, 3) == [2, 5]
    assert rank_env({}) is None
    assert rank_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_rank == 1
    with pytest.raises(UsageError):
        rank_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_merge_zero_names_the_rank_that_failed_first():
    ok = Record(combo="adam", zero=1, ranks=2, opt_state_bytes=10, status="ok",
                optimizers=tuple([{"name": "rest=adam", "optimizer": "adam", "n_params": 3,
                                                    "n_param_tensors": 1, "state_bytes": 10}]))
    oom = Record(combo="adam", zero=1, ranks=2, status="oom", error="probe out of memory")
    err = Record(combo="adam", zero=1, ranks=2, status="error", error="RuntimeError: Connection closed by peer")
    both = merge_zero([ok, ok])
    assert both.status == "ok" and both.opt_state_unsharded == 20 and len(both.by_rank()) == 2
    assert both.by_rank()[1]["by_optimizer"][0]["state_bytes"] == 10
    m = merge_zero([err, oom])
    assert m.status == "oom" and m.error == "rank 1: probe out of memory" and m.opt_state_unsharded is None
    assert merge_zero([ok, err]).error.startswith("rank 1: RuntimeError")


def test_zero_config_is_refused_outside_torchrun_and_on_the_fake_probe(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    c = _configs(("adam",), (64,), (16,), zeros=(1,))[0]
    with pytest.raises(UsageError, match="launch with torchrun"):
        validate(c)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(c)
    with pytest.raises(UsageError, match="not fake"):
        validate(c, Protocol(probe="fake"))
    with pytest.raises(UsageError, match="for 4 ranks"):
        validate(Config(zero=1, ranks=4))
    with pytest.raises(UsageError, match="zero must be 0 or 1"):
        validate(Config(zero=2))


def _resumed_after_a_killed_shard(tmp_path, *, rank: int, index: int):
    """A sharded sweep killed after rank `rank` wrote config `index` (run_id "old"): a new sweep
    into the directory is refused without --resume, and resumes with it. (configs, protocol)."""
    configs = _configs(("sgd", "adam"), (64,), (16,))
    protocol = Protocol(probe="tracked", steps=0)
    append_jsonl(tmp_path / "ranks" / f"rank{rank}.jsonl", [measure(configs[index], protocol, run_id="old")])
    with pytest.raises(UsageError, match="ranks already holds results of a sharded sweep; pass --resume"):
        sweep(configs, tmp_path, protocol, isolate=False, progress=False)
    assert sweep(configs, tmp_path, protocol, resume=True, isolate=False, progress=False) is not None
    return configs, protocol


def test_sharded_sweep_refuses_a_directory_with_results_unless_resuming(tmp_path, monkeypatch):
    """World size 1, in process: the same code path as torchrun's rank 0."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    configs, protocol = _resumed_after_a_killed_shard(tmp_path, rank=3, index=0)
    rows = _rows(tmp_path / "results.jsonl")
    assert [r["combo"] for r in rows] == ["sgd", "adam"] and rows[0]["run_id"] == "old"
    assert not (tmp_path / "ranks").exists()
    with pytest.raises(UsageError, match="results.jsonl already holds results"):
        sweep(configs, tmp_path, protocol, isolate=False, progress=False)


def test_records_written_before_zero_existed_load_as_zero_0_on_one_rank():
    rows = _rows(FIX / "run_small" / "results.jsonl")
    raw = (FIX / "run_small" / "results.jsonl").read_text().splitlines()[0]
    assert '"zero"' not in raw  # the fixture predates the column
    assert all(r["zero"] == 0 and r["ranks"] == 1 for r in rows)
    at = [CONFIG_COLUMNS.index("zero"), CONFIG_COLUMNS.index("ranks")]
    assert all([config_key(r)[i] for i in at] == [0, 1] for r in rows)
    assert config_key({"combo": "adam"}) == config_key({"combo": "adam", "zero": 0, "ranks": 1})
    df = frame.load(FIX / "run_small")
    assert df["zero"].tolist() == [0] * len(df) and df["ranks"].dtype == "int64"
    assert {"zero", "ranks"} <= set(CONFIG_COLUMNS)


def test_one_process_resume_folds_a_killed_sharded_sweeps_shards(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    _resumed_after_a_killed_shard(tmp_path, rank=1, index=1)
    rows = _rows(tmp_path / "results.jsonl")
    assert sorted((r["combo"], r["run_id"] == "old") for r in rows) == [("adam", True), ("sgd", False)]
    assert not (tmp_path / "ranks").exists()


@pytest.mark.slow  # whole sweeps in subprocesses: run by .ci/run's `pytest -m slow`, kept out of the README's 5 minutes
def test_report_shows_each_ranks_state_against_the_zero_model(zero_run):
    from multiopt.analyze import frame, report
    from multiopt.units import fmt_bytes

    df = frame.load(zero_run[0])
    md = report.render(df)
    section = md.split("## ZeRO: optimizer state per rank", 1)[1].split("\n## ", 1)[0]
    rows = [l for l in section.splitlines() if l.startswith("| adam") or l.startswith("| sgd+adam")]
    assert len(rows) == 2
    by = {(r["combo"], r["zero"]): r for r in _rows(zero_run[0] / "results.jsonl")}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        combo = cells[0]
        zero, plain = by[(combo, 1)], by[(combo, 0)]
        per = [r["state_bytes"] for r in zero["ranks_state"]]
        assert cells[3] == "2"
        assert cells[4] == fmt_bytes(plain["opt_state_bytes"])          # unsharded = the plain run's state
        assert cells[5] == " / ".join(fmt_bytes(x) for x in per)
        assert cells[6] == fmt_bytes(plain["opt_state_bytes"] / 2)
        assert float(cells[7]) == pytest.approx(max(per) / sum(per), abs=1e-3)
        assert cells[9] == fmt_bytes(plain["peak_total"]) and cells[10] == fmt_bytes(zero["peak_total"])
