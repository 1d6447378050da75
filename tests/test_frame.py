"""frame.load / by_optimizer against the hand-built fixtures (see tests/fixtures/make_fixtures.py)."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from multiopt.analyze import frame
from multiopt.errors import UsageError
from multiopt.record import FIELDS, MEMORY_COLUMNS

from .support import FIXTURES as FIX

RUN = FIX / "run_small"
BENCH = FIX / "bench_small.json"


def r512(n: int) -> int:
    return -(-n // 512) * 512


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return frame.load(RUN)


def row(df: pd.DataFrame, combo: str, width: int, batch: int, impl: str = "default", zero_grad_at: str = "end") -> pd.Series:
    m = df[(df.combo == combo) & (df.width == width) & (df.batch == batch) & (df.impl == impl) & (df.zero_grad_at == zero_grad_at)]
    assert len(m) == 1, (combo, width, batch, impl, zero_grad_at)
    return m.iloc[0]


def test_columns_and_types(df):
    assert len(df) == 21
    assert list(df.columns[: len(FIELDS)]) == list(FIELDS)
    assert "source" in df.columns
    for c in frame.DERIVED_COLUMNS:
        assert c in df.columns
    # no None anywhere in these ints -> they stay int64
    for c in ("width", "batch", "depth", "seed", "n_params", "param_bytes", "steps_timed"):
        assert df[c].dtype == "int64", c
    # failed records leave None -> float with NaN
    assert df["opt_state_bytes"].dtype == "float64"
    assert df["step_ms_median"].dtype == "float64"
    assert df.attrs["env"][0]["torch"] == "2.13.0+cpu"
    assert df.attrs["env"][0]["source"].endswith("results.jsonl")


def test_int_stays_int_when_all_ok(tmp_path):
    lines = [l for l in (RUN / "results.jsonl").read_text().splitlines() if '"status": "ok"' in l]
    p = tmp_path / "ok.jsonl"
    p.write_text("\n".join(lines) + "\n")
    d = frame.load(p)
    written = json.loads(lines[0]).keys()  # a column added since the fixture was written stays None
    assert written & set(MEMORY_COLUMNS)
    for c in MEMORY_COLUMNS:
        assert d[c].dtype == ("int64" if c in written else "float64"), c
    assert d.attrs["env"] == [{"source": str(p)}]


def test_state_bytes_per_param_and_ratio(df):
    w = 64
    n = 2 * (w * w + w)
    P = 2 * (r512(4 * w * w) + r512(4 * w))
    adam = row(df, "adam", w, 8)
    assert adam.n_params == n == 8320
    assert adam.opt_state_bytes == 8 * n + 4 * 4  # exp_avg + exp_avg_sq + 4 float32 step scalars
    assert adam.state_bytes_per_param == 8.0
    assert adam.state_weight_ratio == (8 * n + 16) / P
    assert row(df, "sgd", w, 8).state_bytes_per_param == 0.0
    assert row(df, "sgd+adam", w, 8).state_bytes_per_param == 4.0  # half the params on adam
    mu = row(df, "muon+adamw", w, 8)
    # muon: 4 B per matrix element; adamw: 8 B per bias element (+ scalars, excluded)
    assert mu.state_bytes_per_param == (4 * 2 * w * w + 8 * 2 * w) / n


def test_sgd_twin_overheads(df):
    adam, sgd = row(df, "adam", 128, 8), row(df, "sgd", 128, 8)
    assert adam.state_overhead_vs_sgd == adam.opt_state_bytes - sgd.opt_state_bytes == 264208
    assert adam.peak_overhead_vs_sgd == adam.peak_total - sgd.peak_total == 669696 - 289280
    assert adam.peak_ratio_vs_sgd == 669696 / 289280
    assert sgd.peak_ratio_vs_sgd == 1.0 and sgd.peak_overhead_vs_sgd == 0.0
    # twin must match every config column but combo/rules: zero_grad_at=start has its own sgd twin
    st = row(df, "sgd+adam", 64, 8, zero_grad_at="start")
    assert st.peak_overhead_vs_sgd == st.peak_total - row(df, "sgd", 64, 8, zero_grad_at="start").peak_total
    # no sgd twin for impl=foreach -> NaN
    fe = row(df, "adam", 64, 8, impl="foreach")
    assert math.isnan(fe.state_overhead_vs_sgd) and math.isnan(fe.peak_ratio_vs_sgd)
    # failed record -> NaN
    assert math.isnan(row(df, "adam", 128, 32).peak_overhead_vs_sgd)


def test_phase_deltas_end(df):
    r = row(df, "adam", 64, 8)  # zero_grad_at=end: forward, backward, step, zero_grad
    A = r512(4 * 8 * 64)
    act = 2 * A + 512
    assert r.activation_bytes == r.delta_forward == act == r.mem_after_forward - r.mem_step_start
    assert r.transient_forward == 3 * A + 512
    assert r.delta_backward == r.mem_after_backward - r.mem_after_forward == r.grad_bytes - act
    assert r.transient_backward == r.peak_backward - r.mem_after_forward == r.grad_bytes + 2 * A
    assert r.delta_step == 0
    assert r.transient_step == r.step_temp_bytes == 2 * r512(4 * 64 * 64)
    assert r.delta_zero_grad == -r.grad_bytes
    assert r.transient_zero_grad == 0


def test_phase_deltas_start(df):
    r = row(df, "sgd+adam", 64, 8, zero_grad_at="start")  # zero_grad, forward, backward, step
    A = r512(4 * 8 * 64)
    assert r.delta_zero_grad == -r.grad_bytes
    assert r.transient_zero_grad == 0
    assert r.delta_forward == r.activation_bytes == 2 * A + 512
    assert r.transient_forward == 3 * A + 512
    assert r.delta_backward == r.grad_bytes - (2 * A + 512)
    assert r.transient_step == r.step_temp_bytes


def test_peak_breakdown(df):
    step_peak = row(df, "adam", 128, 8)
    assert step_peak.peak_phase == "step"
    assert step_peak.peak_params == step_peak.param_bytes
    assert step_peak.peak_grads == step_peak.grad_bytes
    assert step_peak.peak_state == step_peak.opt_state_alloc_bytes
    assert step_peak.peak_activations == 0
    # at a step peak the rest is the step temporaries plus the batch (inputs + targets)
    assert step_peak.peak_temporaries == step_peak.step_temp_bytes + 2 * r512(4 * 8 * 128)
    bwd = row(df, "sgd", 64, 32)
    assert bwd.peak_phase == "backward"
    assert bwd.peak_activations == bwd.activation_bytes
    ok = df[df.status == "ok"]
    parts = ok[list(frame.PEAK_PARTS)].sum(axis=1)
    assert (parts == ok.peak_total).all()
    assert df.loc[df.status != "ok", "peak_phase"].isna().all()


def test_by_optimizer(df):
    opt = frame.by_optimizer(df)
    # failed records contribute nothing; two-optimizer combos two rows
    r = row(df, "muon+adamw", 64, 8)
    sub = opt[opt.record == r.name]
    assert list(sub["name"]) == ["@matrix=muon", "rest=adamw"]
    assert list(sub["n_params"]) == [2 * 64 * 64, 2 * 64]
    assert sub["n_params"].sum() == r.n_params
    assert sub["state_bytes"].sum() == r.opt_state_bytes
    assert list(sub["state_bytes_per_param"]) == [4.0, 8.0]
    assert list(sub["state_scalar_bytes"]) == [0, 8]
    assert list(sub["n_param_tensors"]) == [2, 2] and list(sub["n_tensors"]) == [2, 6]
    assert list(sub["opt_impl"]) == ["forloop", "forloop"]  # resolved impl; "impl" stays the record's
    assert list(sub["impl"]) == ["default", "default"]
    assert set(opt["record"]) == set(df.index[df.status == "ok"])
    assert (opt["combo"] == df.loc[opt["record"], "combo"].to_numpy()).all()


def test_benchmark_json_matches_jsonl(df):
    b = frame.load(BENCH)
    assert len(b) == 4
    for _, br in b.iterrows():
        jr = row(df, br.combo, br.width, br.batch)
        for c in MEMORY_COLUMNS:  # both None where the fixtures predate the column
            assert br[c] == jr[c] or (pd.isna(br[c]) and pd.isna(jr[c])), c
        # times come from stats (seconds -> ms), not from extra_info (None there)
        for c in ("step_ms_median", "step_ms_iqr", "step_ms_min", "step_ms_mean"):
            assert br[c] == pytest.approx(jr[c], rel=1e-12), c
        assert br.steps_timed == 20
        assert br.state_bytes_per_param == jr.state_bytes_per_param
        assert br.peak_overhead_vs_sgd == jr.peak_overhead_vs_sgd
    env = b.attrs["env"][0]
    assert env["cpu"].startswith("Fixture CPU") and env["git_sha"].startswith("0123")


def test_benchmark_failed_record_keeps_no_time(tmp_path):
    doc = json.loads(BENCH.read_text())
    doc["benchmarks"][0]["extra_info"].update(status="oom", error="out of memory")
    p = tmp_path / "b.json"
    p.write_text(json.dumps(doc))
    b = frame.load(p)
    assert math.isnan(b.loc[b.status == "oom", "step_ms_median"].iloc[0])
    assert (b.loc[b.status == "ok", "steps_timed"] == 20).all()


def test_jsonl_named_json(tmp_path):
    p = tmp_path / "results.json"
    p.write_text((RUN / "results.jsonl").read_text())
    assert len(frame.load(p)) == 21


def test_several_sources(tmp_path, df):
    both = frame.load(RUN, BENCH)
    assert len(both) == 25
    assert [e["source"] for e in both.attrs["env"]] == [str(RUN / "results.jsonl"), str(BENCH)]
    # the twin is looked up within a source
    assert (both.iloc[:21]["peak_overhead_vs_sgd"].fillna(-1).to_numpy() == df["peak_overhead_vs_sgd"].fillna(-1).to_numpy()).all()


# --------------------------------------------------------------------------- bad input


def _msg(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing(tmp_path):
    with pytest.raises(UsageError) as e:
        frame.load(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in _msg(e)
    with pytest.raises(UsageError) as e:
        frame.load(tmp_path)  # a directory without results.jsonl
    assert str(tmp_path) in _msg(e) and "results.jsonl" in _msg(e)
    with pytest.raises(UsageError):
        frame.load()


def test_empty(tmp_path):
    for name in ("empty.jsonl", "empty.json"):
        p = tmp_path / name
        p.write_text("")
        with pytest.raises(UsageError) as e:
            frame.load(p)
        assert name in _msg(e) and "no records" in _msg(e)
    d = tmp_path / "run"
    d.mkdir()
    (d / "results.jsonl").write_text("\n")
    with pytest.raises(UsageError) as e:
        frame.load(d)
    assert "results.jsonl" in _msg(e)
    p = tmp_path / "nobench.json"
    p.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(UsageError) as e:
        frame.load(p)
    assert "nobench.json" in _msg(e)


def test_corrupt(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = (RUN / "results.jsonl").read_text().splitlines()[0]
    p.write_text("{not json\n" + good + "\n")
    with pytest.raises(UsageError) as e:
        frame.load(p)
    assert "bad.jsonl:1" in _msg(e)
    q = tmp_path / "bad.json"
    q.write_text('{"benchmarks": [')
    with pytest.raises(UsageError) as e:
        frame.load(q)
    assert "bad.json" in _msg(e) and "not valid JSON" in _msg(e)
    d = tmp_path / "run"
    d.mkdir()
    (d / "results.jsonl").write_text(good + "\n")
    (d / "env.json").write_text("{oops")
    with pytest.raises(UsageError) as e:
        frame.load(d)
    assert "env.json" in _msg(e)


def test_torn_last_line_is_skipped(tmp_path):
    lines = (RUN / "results.jsonl").read_text().splitlines()
    p = tmp_path / "torn.jsonl"
    p.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    assert len(frame.load(p)) == 3


def _refused(path, text: str) -> str:
    """Write `text` to `path` and load it: the UsageError's message, which names the file."""
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        frame.load(path)
    assert path.name in _msg(e)
    return _msg(e)


def test_wrong_schema(tmp_path):
    rec = json.loads((RUN / "results.jsonl").read_text().splitlines()[0])
    assert "schema" in _refused(tmp_path / "old.jsonl", json.dumps(dict(rec, schema="multiopt.record/0")) + "\n")
    _refused(tmp_path / "other.jsonl", json.dumps({"hello": 1}) + "\n")
    assert "n_params" in _refused(tmp_path / "typed.jsonl", json.dumps(dict(rec, n_params="many")) + "\n")
    # pytest-benchmark JSON: not one / no extra_info / wrong schema in extra_info
    _refused(tmp_path / "notbench.json", json.dumps([1, 2]))
    doc = json.loads(BENCH.read_text())
    doc["benchmarks"][0]["extra_info"] = {}
    assert "extra_info" in _refused(tmp_path / "noextra.json", json.dumps(doc))
    doc = json.loads(BENCH.read_text())
    doc["benchmarks"][1]["extra_info"]["schema"] = "nope/9"
    assert "schema" in _refused(tmp_path / "schema.json", json.dumps(doc))


def test_run_dir_copy_reads_env(tmp_path):
    d = tmp_path / "myrun"
    shutil.copytree(RUN, d)
    df = frame.load(d)
    assert df.attrs["env"][0]["preset"] == "small"
    assert frame.load(d / "results.jsonl").attrs["env"][0]["preset"] == "small"


def test_series_labels(df):
    labels = frame.series_labels(df)
    assert labels[row(df, "adam", 64, 8).name] == "adam"
    assert labels[row(df, "adam", 64, 8, impl="fused").name] == "adam (impl=fused)"
    assert labels[row(df, "sgd", 64, 8, zero_grad_at="start").name] == "sgd (zero_grad_at=start)"
