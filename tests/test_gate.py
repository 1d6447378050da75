"""The regression gate: verdicts, exit codes, output, summary, baseline update."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from multiopt.analyze import gate
from multiopt.cli import main
from multiopt.errors import UsageError
from multiopt.record import Record
from multiopt.store import append_jsonl, read_jsonl

from .support import ROOT, subprocess_env

MiB = 1024 * 1024


def _rec(combo: str, width: int, batch: int, *, probe: str = "tracked", **over) -> Record:
    # Roughly an MLP of depth 2 in float32: params ~ 2*w^2, Adam-like state 2x params.
    n = 2 * width * width + 2 * width
    pbytes = 4 * n
    state = {"sgd+adam": pbytes, "adam": 2 * pbytes, "muon+adamw": int(1.5 * pbytes)}[combo]
    act = 4 * batch * width * 3
    r = Record(
        run_id="r1", created_at="2025-01-01T00:00:00Z", git_sha="abc123", torch="2.13.0+cpu",
        device="cpu", device_name="AMD EPYC 7763", probe=probe, model="mlp", width=width,
        depth=2, batch=batch, combo=combo, rules=f"rules-of-{combo}", n_params=n,
        param_bytes=pbytes, grad_bytes=pbytes, opt_state_bytes=state, opt_state_expected=state,
        mem_base=0, peak_forward=pbytes + act, peak_backward=2 * pbytes + act,
        peak_step=2 * pbytes + state + 512, peak_zero_grad=2 * pbytes + state,
        step_temp_bytes=512, peak_total=2 * pbytes + state + act,
        step_ms_median=4.0 + width / 100, step_ms_iqr=0.05, step_ms_min=3.9, step_ms_mean=4.1,
        steps_timed=20, status="ok",
    )
    return dataclasses.replace(r, **over)


def _configs() -> list[Record]:
    return [_rec(c, w, b) for c in ("sgd+adam", "adam", "muon+adamw") for w in (128, 256) for b in (32,)]


def _write(path: Path, records) -> Path:
    append_jsonl(path, records)
    return path


def _edit(records: list[Record], combo: str, width: int, **over) -> list[Record]:
    return [dataclasses.replace(r, **over) if (r.combo, r.width) == (combo, width) else r for r in records]


def _gate(tmp_path: Path, base, cur, *extra: str) -> tuple[int, str]:
    b = _write(tmp_path / "base.jsonl", base)
    c = _write(tmp_path / "cur" / "results.jsonl", cur)
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        code = main(["gate", "--baseline", str(b), "--current", str(c), *extra])
    return code, out.getvalue()


@pytest.fixture(autouse=True)
def _no_summary_env(monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def test_identical_runs_pass(tmp_path):
    code, out = _gate(tmp_path, _configs(), _configs())
    assert code == 0
    assert "PASS" in out and "0 regressions" in out


def test_one_byte_more_state_fails_and_names_config_and_metric(tmp_path):
    base = _configs()
    cur = _edit(base, "adam", 256, opt_state_bytes=base[3].opt_state_bytes + 1)
    code, out = _gate(tmp_path, base, cur)
    assert code == 1
    line = next(l for l in out.splitlines() if "REGRESSION" in l and "|" in l)
    assert "adam, width=256" in line and "opt_state_bytes" in line and "+1 B" in line
    assert "FAIL: 1 regression" in out


def test_mem_tol_absorbs_small_growth(tmp_path):
    base = _configs()
    cur = _edit(base, "adam", 256, peak_total=int(base[3].peak_total * 1.005))
    assert _gate(tmp_path, base, cur)[0] == 1
    code, _ = _gate(tmp_path / "2", base, cur, "--mem-tol", "1%")
    assert code == 0


def test_reserved_memory_is_gated_where_both_sides_have_it(tmp_path):
    """Reserved memory decides an OOM on CUDA: 2 MiB more predicted reserved (target cuda,
    fake probe, tolerance 0) fails; records without it (target cpu) are not listed for it."""
    base = [_rec("adam", 256, 32, probe="fake", target="cuda", peak_reserved=90 * MiB),
            _rec("adam", 128, 32, probe="fake")]
    cur = _edit(base, "adam", 256, peak_reserved=92 * MiB)
    code, out = _gate(tmp_path, base, cur)
    assert code == 1
    line = next(l for l in out.splitlines() if "REGRESSION" in l and "|" in l)
    assert "peak_reserved" in line and "width=256" in line
    assert "no value in baseline" not in out
    assert _gate(tmp_path / "2", base, base)[0] == 0


def test_cuda_probe_defaults_to_one_percent():
    base = [_rec("adam", 256, 32, probe="cuda", device="cuda")]
    cur = [dataclasses.replace(base[0], peak_total=int(base[0].peak_total * 1.005))]
    assert gate.compare(base, cur).exit_code == 0
    assert gate.compare(base, cur, mem_tol=0).exit_code == 1


def test_step_time_plus_50_percent_with_small_iqr_fails(tmp_path):
    base = _configs()
    cur = _edit(base, "sgd+adam", 128, step_ms_median=base[0].step_ms_median * 1.5)
    code, out = _gate(tmp_path, base, cur)
    assert code == 1
    line = next(l for l in out.splitlines() if "REGRESSION" in l and "|" in l)
    assert "step_ms_median" in line and "sgd+adam, width=128" in line and "+50%" in line


def test_noisy_baseline_does_not_fail_on_15_percent(tmp_path):
    base = _edit(_configs(), "sgd+adam", 128, step_ms_median=10.0, step_ms_iqr=1.0)  # 3 x IQR = 30%
    cur = _edit(base, "sgd+adam", 128, step_ms_median=11.5)
    code, out = _gate(tmp_path, base, cur)
    assert code == 0, out
    # the same +15% on a quiet baseline fails
    quiet = _edit(base, "sgd+adam", 128, step_ms_iqr=0.1)
    assert _gate(tmp_path / "q", quiet, cur)[0] == 1


def test_time_tol_accepts_percent_and_fraction(tmp_path):
    base = _configs()
    cur = _edit(base, "adam", 128, step_ms_median=base[2].step_ms_median * 1.15)
    assert _gate(tmp_path / "a", base, cur)[0] == 1
    assert _gate(tmp_path / "b", base, cur, "--time-tol", "20%")[0] == 0
    assert _gate(tmp_path / "c", base, cur, "--time-tol", "0.2")[0] == 0
    assert gate.parse_tolerance("10%") == pytest.approx(0.1)
    with pytest.raises(UsageError):
        gate.parse_tolerance("10")  # ambiguous: 10% or 1000%?


def test_improvement_passes_and_is_reported_before_unchanged(tmp_path):
    base = _configs()
    cur = _edit(base, "muon+adamw", 256, opt_state_bytes=base[5].opt_state_bytes // 2,
                step_ms_median=base[5].step_ms_median / 2)
    code, out = _gate(tmp_path, base, cur)
    assert code == 0
    rows = [l for l in out.splitlines() if l.startswith("| muon+adamw, width=256")]
    assert {"opt_state_bytes", "step_ms_median"} <= {r.split("|")[2].strip() for r in rows}
    assert all("improvement" in r for r in rows)
    assert "2 improvements" in out


def test_regressions_listed_worst_first():
    base = _configs()
    cur = _edit(base, "adam", 128, peak_total=base[2].peak_total + 1)
    cur = _edit(cur, "adam", 256, status="oom", error="CUDA out of memory")
    cur = _edit(cur, "sgd+adam", 256, peak_total=base[1].peak_total * 2,
                opt_state_bytes=base[1].opt_state_bytes // 2)
    res = gate.compare(base, cur)
    order = [(v.config, v.metric, v.verdict) for v in res.verdicts if v.verdict != "unchanged"]
    assert order == [
        ("adam, width=256", "status", "regression"),
        ("sgd+adam, width=256", "peak_total", "regression"),
        ("adam, width=128", "peak_total", "regression"),
        ("sgd+adam, width=256", "opt_state_bytes", "improvement"),
    ]
    text = gate.render(res)
    assert text.index("adam, width=256 | status") < text.index("improvement")
    assert "CUDA out of memory" in text


def test_failed_now_is_regression_and_recovered_is_improvement(tmp_path):
    base = _edit(_configs(), "adam", 128, status="oom", error="out of memory",
                 peak_total=None, step_ms_median=None, steps_timed=0)
    cur = _edit(_configs(), "adam", 256, status="diverged", error="loss is nan")
    code, out = _gate(tmp_path, base, cur)
    assert code == 1
    assert "| adam, width=256 | status | ok | diverged |" in out
    assert "| adam, width=128 | status | oom | ok |" in out


def test_config_missing_in_current_fails_and_new_config_passes(tmp_path):
    base = _configs()
    code, out = _gate(tmp_path, base, base[:-1])
    assert code == 1
    assert "Missing in current (1" in out and "muon+adamw, width=256" in out

    code, out = _gate(tmp_path / "2", base[:-1], base)
    assert code == 0
    assert "New in current (1" in out and "muon+adamw, width=256" in out


@pytest.mark.parametrize("over", [dict(step_ms_median=None, steps_timed=0), dict(step_ms_median=float("nan"))],
                         ids=["untimed", "nan"])
def test_a_step_time_missing_now_fails_unless_memory_alone_is_gated(tmp_path, over):
    base = _configs()
    cur = _edit(base, "adam", 256, **over)
    code, out = _gate(tmp_path, base, cur)
    assert code == 1
    line = next(l for l in out.splitlines() if "REGRESSION" in l and "|" in l)
    assert "adam, width=256" in line and "step_ms_median" in line
    assert _gate(tmp_path / "2", base, cur, "--only", "memory")[0] == 0
    elsewhere = [dataclasses.replace(r, device_name="Other CPU") for r in cur]  # another machine: not compared
    assert _gate(tmp_path / "3", base, elsewhere)[0] == 0


def test_different_device_name_time_not_compared_with_reason(tmp_path):
    base = _configs()
    cur = [dataclasses.replace(r, device_name="Intel Xeon 8375C", step_ms_median=r.step_ms_median * 3)
           for r in base]
    code, out = _gate(tmp_path, base, cur)
    assert code == 0, out
    assert "Not compared" in out
    assert "step_ms_median: device differs: 'AMD EPYC 7763' vs 'Intel Xeon 8375C'" in out

    cur = [dataclasses.replace(r, torch="2.14.0", step_ms_median=r.step_ms_median * 3) for r in base]
    code, out = _gate(tmp_path / "t", base, cur)
    assert code == 0 and "torch version differs" in out


def test_short_names_show_only_varying_columns():
    base = [_rec("adam", 256, b) for b in (16, 32)]
    res = gate.compare(base, base)
    assert {v.config for v in res.verdicts} == {"batch=16", "batch=32"}


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"schema": "multiopt.record/1", "probe": \n{{{ not json\n', "not valid JSON"),
        ("", "empty"),
        ('{"schema": "other.tool/7", "name": "x"}\n', "schema"),
        ('{"benchmarks": 3, "unrelated": true}\n', "base.jsonl"),
    ],
    ids=["corrupt", "empty", "wrong-schema", "no-schema"],
)
def test_bad_baseline_exits_2_with_one_line(tmp_path, capsys, content, needle):
    b = tmp_path / "base.jsonl"
    b.write_text(content)
    c = _write(tmp_path / "cur.jsonl", _configs())
    code = main(["gate", "--baseline", str(b), "--current", str(c)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "base.jsonl" in lines[0] and needle.lower() in lines[0].lower()
    assert "Traceback" not in captured.err


def test_missing_baseline_exits_2(tmp_path, capsys):
    c = _write(tmp_path / "cur.jsonl", _configs())
    assert main(["gate", "--baseline", str(tmp_path / "nope.jsonl"), "--current", str(c)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0]


@pytest.mark.parametrize("bad", ["corrupt", "wrong-schema"])
def test_subprocess_bad_input_is_one_line_on_stderr(tmp_path, bad):
    b = tmp_path / "base.jsonl"
    b.write_text("not json at all\n" if bad == "corrupt" else '{"schema": "multiopt.record/0"}\n')
    c = _write(tmp_path / "cur.jsonl", _configs())
    p = subprocess.run(
        [sys.executable, "-m", "multiopt", "gate", "--baseline", str(b), "--current", str(c)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=subprocess_env(GITHUB_STEP_SUMMARY=""),
    )
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "base.jsonl" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


def test_subprocess_regression_exits_1(tmp_path):
    base = _configs()
    b = _write(tmp_path / "base.jsonl", base)
    c = _write(tmp_path / "cur.jsonl", _edit(base, "adam", 128, grad_bytes=base[2].grad_bytes + 512))
    p = subprocess.run(
        [sys.executable, "-m", "multiopt", "gate", "--baseline", str(b), "--current", str(c)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=subprocess_env(GITHUB_STEP_SUMMARY=""),
    )
    assert p.returncode == 1, p.stderr
    assert "grad_bytes" in p.stdout and p.stderr == ""


def test_github_step_summary_gets_the_table(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base = _configs()
    code, out = _gate(tmp_path, base, _edit(base, "adam", 128, peak_step=base[2].peak_step + 4096))
    assert code == 1
    text = summary.read_text()
    assert text.startswith("# earlier step\n")  # appended, not overwritten
    assert "| config | metric | old | new | change | allowed | verdict |" in text
    assert "peak_step" in text and out.strip() in text


def test_summary_path_option(tmp_path):
    s = tmp_path / "s.md"
    code, _ = _gate(tmp_path, _configs(), _configs(), "--summary", str(s))
    assert code == 0 and "multiopt gate: PASS" in s.read_text()


def test_update_baseline_writes_current_records(tmp_path):
    base = _configs()
    cur = _edit(base, "adam", 128, opt_state_bytes=base[2].opt_state_bytes + 8)
    code, out = _gate(tmp_path, base, cur, "--update-baseline")
    assert code == 0
    assert "REGRESSION" in out and "baseline updated" in out
    written = read_jsonl(tmp_path / "base.jsonl")
    assert [r.to_dict() for r in written] == [r.to_dict() for r in cur]  # exact, ints stay ints
    # and now the gate passes against it
    assert _gate(tmp_path / "again", cur, cur)[0] == 0


def test_update_baseline_creates_a_missing_baseline(tmp_path):
    c = _write(tmp_path / "cur.jsonl", _configs())
    out = io.StringIO()
    target = tmp_path / "baselines" / "cpu-quick.jsonl"
    code = gate.run_gate(target, c, update_baseline=True, stdout=out, environ={})
    assert code == 0 and "new baseline" in out.getvalue()
    assert len(read_jsonl(target)) == len(_configs())


def test_duplicates_last_record_wins(tmp_path):
    base = _configs()
    stale = _edit(base, "adam", 128, opt_state_bytes=1)
    code, out = _gate(tmp_path, base, stale + base)
    assert code == 0
    assert "duplicate" in out


def test_gate_result_is_frozen():
    res = gate.compare(_configs(), _configs())
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.missing = ()  # type: ignore[misc]
    assert res.exit_code == 0 and not res.regressions and len(res.unchanged) > 0


def _bench_json(path: Path, records: list[Record], *, median_ms: dict[str, float] | None = None) -> Path:
    """A pytest-benchmark --benchmark-json file: Record in extra_info, times (seconds) in stats."""
    benches = []
    for r in records:
        name = f"test_step[{r.combo}-{r.width}-{r.batch}]"
        med = (median_ms or {}).get(r.combo, r.step_ms_median) / 1000
        benches.append({
            "group": None, "name": name, "fullname": f"bench/test_step.py::{name}",
            "params": None, "param": None, "extra_info": r.to_dict(), "options": {},
            "stats": {"min": med * 0.98, "max": med * 1.1, "mean": med * 1.01, "stddev": med * 0.01,
                      "rounds": 20, "median": med, "iqr": r.step_ms_iqr / 1000, "q1": med, "q3": med,
                      "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": med,
                      "hd15iqr": med, "ops": 1 / med, "total": 20 * med, "iterations": 1},
        })
    doc = {"machine_info": {"node": "gpu-runner-1"}, "commit_info": {"id": "abc123"},
           "benchmarks": benches, "datetime": "2025-01-01T00:00:00", "version": "5.1.0"}
    path.write_text(json.dumps(doc))
    return path


def test_current_from_pytest_benchmark_json(tmp_path):
    base = _configs()
    b = _write(tmp_path / "base.jsonl", base)
    ok = _bench_json(tmp_path / "ok.json", base)
    out = io.StringIO()
    assert gate.run_gate(b, ok, stdout=out, environ={}) == 0, out.getvalue()

    slow = _bench_json(tmp_path / "slow.json", base, median_ms={"adam": 20.0})
    out = io.StringIO()
    assert gate.run_gate(b, slow, stdout=out, environ={}) == 1
    regressed = {l.split("|")[1].strip() for l in out.getvalue().splitlines() if "REGRESSION" in l and "|" in l}
    assert regressed == {"adam, width=128", "adam, width=256"}

    # a bench.json can become the baseline: written as JSONL, times taken from the stats
    target = tmp_path / "gpu-quick.jsonl"
    assert gate.run_gate(target, slow, update_baseline=True, stdout=io.StringIO(), environ={}) == 0
    rows = read_jsonl(target)
    assert len(rows) == len(base) and {r.step_ms_median for r in rows if r.combo == "adam"} == {20.0}
    assert all(isinstance(r.opt_state_bytes, int) for r in rows)
    assert all(isinstance(r.step_ms_median, float) for r in rows)


@pytest.mark.parametrize("twin", [dict(target="cuda", probe="fake"), dict(zero=1, ranks=2)], ids=["target", "zero"])
def test_configs_differing_only_in_a_config_column_have_names_that_say_it(twin):
    """Every config column can name a config: two records that differ only in `target` (or
    in zero and ranks) are named by it, not numbered #1 and #2."""
    base = [_rec("adam", 256, 32, probe=twin.get("probe", "tracked"))]
    both = base + [dataclasses.replace(base[0], **twin)]
    res = gate.compare(both, both)
    names = {v.config for v in res.verdicts}
    assert len(names) == 2 and not any("#" in n for n in names), names
    col = next(c for c in twin if c != "probe")
    assert {n.split(f"{col}=")[1].split(",")[0] for n in names} == {str(getattr(r, col)) for r in both}


def test_a_metric_kind_is_one_check_object():
    """A new kind of metric is a check passed in `using`: here an exact one on n_params, its
    own kind for --only, its verdicts ordered with the others, and a missing value failing."""
    base = _configs()
    cur = _edit(base, "adam", 128, n_params=base[2].n_params + 1)
    count = gate.ToleranceCheck("params", ("n_params",), gate.Unit("params", lambda n: f"{n:,}"), tol=0.0)
    res = gate.compare(base, cur, using=(count,))
    assert [(v.config, v.metric, v.verdict) for v in res.regressions] == [("adam, width=128", "n_params", "regression")]
    assert res.settings == "params: 0%" and not any(v.metric == "peak_total" for v in res.verdicts)
    assert f"{base[2].n_params + 1:,}" in gate.render(res)
    both = gate.compare(base, cur, using=(*gate.checks(), count), only="params")
    assert {v.metric for v in both.verdicts} == {"n_params"} and "memory not compared (--only params)" in both.settings
    with pytest.raises(UsageError, match="--only takes 'memory', 'work', 'time'"):
        gate.compare(base, cur, only="bandwidth")
