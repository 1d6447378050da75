"""report.render / write_report / plots and `multiopt report`, on the hand-built fixtures."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from multiopt.analyze.frame import series_labels
from multiopt.analyze import frame, plot, report, select
from multiopt.cli import main
from multiopt.units import fmt_bytes, fmt_ms

from .support import FIXTURES as FIX, REPORTS, load_bench

RUN = FIX / "run_small"
BENCH = FIX / "bench_small.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return frame.load(RUN)


@pytest.fixture(scope="module")
def md(df) -> str:
    return report.render(df)


def section(md: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", md, flags=re.M | re.S)
    assert m, f"no section {title!r}"
    return m.group(1)


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def table(md: str, title: str, n: int = 0) -> list[dict[str, str]]:
    """The n-th table of a section (tables are separated by any non-table line)."""
    blocks = re.findall(r"((?:^\|.*\n?)+)", section(md, title), flags=re.M)
    assert len(blocks) > n, f"no table {n} in {title!r}"
    lines = blocks[n].splitlines()
    assert len(lines) >= 2, f"no table in {title!r}"
    head = _cells(lines[0])
    assert set(lines[1].replace("|", "").replace(":", "").replace("-", "").strip()) == set()
    rows = [dict(zip(head, _cells(l))) for l in lines[2:]]
    assert all(len(_cells(l)) == len(head) for l in lines[2:])
    return rows


def pick(rows, **kv) -> dict[str, str]:
    got = [r for r in rows if all(r[k] == str(v) for k, v in kv.items())]
    assert len(got) == 1, (kv, got)
    return got[0]


def rec(df, combo, width, batch, impl="default", zero_grad_at="end") -> pd.Series:
    m = df[(df.combo == combo) & (df.width == width) & (df.batch == batch) & (df.impl == impl) & (df.zero_grad_at == zero_grad_at)]
    assert len(m) == 1
    return m.iloc[0]


def test_header(md):
    head = md.split("\n## ", 1)[0]
    assert head.startswith("# multiopt report")
    for want in ("2026-11-26T01:00:00+00:00", "2.13.0+cpu", "Fixture CPU @ 3.00GHz", "0123456789abcdef",
                 "tracked", "small", "21 (19 ok, 1 oom, 1 diverged)", "none (CPU)"):
        assert want in head, want


def test_state_table(df, md):
    rows = table(md, "Optimizer state")
    adam = pick(rows, combo="adam")
    assert (adam["width"], adam["B/param"], adam["state/weights"]) == ("128", "8.00", "2.00x")
    assert adam["vs SGD"] == "+" + fmt_bytes(8 * 33024 + 16) == "+258.02 KiB"
    assert pick(rows, combo="sgd")["vs SGD"] == "0 B"
    assert [r["combo"] for r in rows] == ["sgd", "adam", "sgd+adam", "muon+adamw"]  # usual variants only
    for r in rows:
        got = rec(df, r["combo"], 128, 8)
        assert r["state"] == fmt_bytes(got.opt_state_bytes) and r["B/param"] == f"{got.state_bytes_per_param:.2f}"


def test_peak_table(df, md):
    rows = table(md, "Peak memory")
    adam = pick(rows, combo="adam")  # adam at w=128 b=32 went oom: its largest ok config is b=8
    assert (adam["width"], adam["batch"], adam["peak"]) == ("128", "8", fmt_bytes(669696))
    assert adam["peak"] == "654.00 KiB"
    assert adam["vs SGD"] == f"+{fmt_bytes(669696 - 289280)} (2.32x)"
    for r in rows:
        got = rec(df, r["combo"], int(r["width"]), int(r["batch"]))
        assert r["peak"] == fmt_bytes(got.peak_total) and r["peak phase"] == got.peak_phase
    assert "reserved" not in rows[0]  # the tracked probe without a cuda target reserves nothing


def test_step_time_table(df, md):
    rows = table(md, "Step time")
    assert pick(rows, combo="adam")["w=128"] == "oom"
    assert pick(rows, combo="sgd+adam")["w=64"] == "diverged"
    for r in rows:
        for w in (64, 128):
            got = df[(df.combo == r["combo"]) & (df.width == w) & (df.batch == int(r["batch"])) & (df.impl == "default")
                     & (df.zero_grad_at == "end")].iloc[0]
            assert r[f"w={w}"] == (fmt_ms(got.step_ms_median) if got.status == "ok" else got.status)


def test_summary_sentences(md):
    text = section(md, "Summary")
    assert "Largest state overhead: **adam** (mlp, width 128) keeps 258.02 KiB of optimizer state, 2.00x its weights" in text
    assert "Cheapest per parameter besides plain SGD: **sgd+adam** (mlp) at 4.00 B/param." in text
    assert "Biggest peak change vs SGD: **muon+adamw** (mlp, width 128, batch 32) +386.50 KiB (2.09x)" in text


def test_per_optimizer(md):
    rows = table(md, "Per optimizer")
    mu = pick(rows, combo="muon+adamw", width=64, rule="@matrix=muon")
    assert (mu["optimizer"], mu["impl"], mu["params (share)"]) == ("muon", "forloop", "8,192 (98.5%)")
    assert (mu["param tensors"], mu["state tensors"]) == ("2", "2")
    assert mu["state"] == fmt_bytes(4 * 8192) and mu["B/param"] == "4.00"
    aw = pick(rows, combo="muon+adamw", width=64, rule="rest=adamw")
    assert aw["state"] == fmt_bytes(8 * 128 + 8) and aw["state allocated"] == fmt_bytes(2 * (2 * 512 + 512))
    assert (aw["param tensors"], aw["state tensors"]) == ("2", "6")  # exp_avg, exp_avg_sq, step per bias
    sa = pick(rows, combo="sgd+adam", width=128, rule="layer1=sgd")
    assert (sa["params (share)"], sa["state"]) == ("16,512 (50.0%)", "0 B")


def test_phase_table(df, md):
    peaks, after = table(md, "Phases", 0), table(md, "Phases", 1)
    r = rec(df, "muon+adamw", 128, 32)
    cell, left = pick(peaks, combo="muon+adamw", width=128, batch=32), pick(after, combo="muon+adamw", width=128, batch=32)
    for p in ("zero_grad", "forward", "backward", "step"):
        assert left[f"{p} allocated"] == fmt_bytes(r[f"mem_after_{p}"])
        assert cell[f"{p} peak"] == fmt_bytes(r[f"peak_{p}"])
    assert cell["activations"] == fmt_bytes(r.activation_bytes)
    assert cell["peak phase"] == "step"
    assert "zero_grad_at=start: zero_grad, forward, backward, step" in section(md, "Phases")
    assert len(peaks) == len(after) == 19  # 2 widths x 2 batches per series: all shown


def test_batch_scaling(df, md):
    rows = table(md, "Batch scaling")
    s = pick(rows, combo="sgd", width=128)
    assert s["peak b=8"] == fmt_bytes(rec(df, "sgd", 128, 8).peak_total)
    assert s["peak b=32"] == fmt_bytes(rec(df, "sgd", 128, 32).peak_total)
    assert s["activations b=32"] == fmt_bytes(rec(df, "sgd", 128, 32).activation_bytes)
    # adam w=128 b=32 went oom and sgd+adam w=64 b=32 diverged: one batch only, no row
    assert not [r for r in rows if (r["combo"], r["width"]) in (("adam", "128"), ("sgd+adam", "64"))]


def test_expected_vs_measured(df, md):
    rows = table(md, "Expected vs measured state")
    assert rows and all(r["check"] == report.CHECK for r in rows)
    # a state that differs from the formula shows the difference in bytes, and who
    bad = df.copy()
    i = rec(df, "sgd+adam", 64, 8).name
    per = [dict(o) for o in bad.at[i, "optimizers"]]
    per[1]["state_bytes"] += 1024
    bad.at[i, "optimizers"] = per
    bad.at[i, "opt_state_bytes"] += 1024
    out = table(report.render(bad), "Expected vs measured state")
    cell = pick(out, combo="sgd+adam", width=64)
    assert cell["check"] == "+1024 B (rest=adam +1024 B)"
    assert cell["measured (B)"] == f"{33288 + 1024:,}"


def test_implementations(df, md):
    rows = table(md, "Implementations")
    assert [r["impl"] for r in rows] == ["default", "forloop", "foreach", "fused"]
    fe = pick(rows, impl="foreach")
    r = rec(df, "adam", 64, 8, impl="foreach")
    assert fe["step temp (largest optimizer)"] == fmt_bytes(r.step_temp_bytes)
    assert fe["step transient"] == fmt_bytes(r.transient_step)
    assert fe["step peak"] == fmt_bytes(r.peak_step)
    assert pick(rows, impl="fused")["step temp (largest optimizer)"] == "0 B"


def test_no_impl_section_with_one_impl(df):
    md = report.render(frame.records_to_frame(df[df.impl == "default"][list(frame.FIELDS) + ["source"]].to_dict("records")))
    assert "## Implementations" not in md


def test_failures_listed(md):
    rows = table(md, "Failures")
    assert len(rows) == 2
    assert pick(rows, status="oom")["message"].startswith("tracked probe: out of memory")
    assert pick(rows, status="diverged")["message"] == "loss is nan at warm-up step 2"


def test_message_with_pipe_and_newline_keeps_the_table(df):
    bad = df.copy()
    i = rec(df, "adam", 128, 32).name
    bad.at[i, "error"] = "RuntimeError: a | b\nsecond line"
    rows = table(report.render(bad), "Failures")
    assert pick(rows, status="oom")["message"] == "RuntimeError: a | b second line"


def test_zero_ok_records_one_line(tmp_path):
    lines = [l for l in (RUN / "results.jsonl").read_text().splitlines() if '"status": "ok"' not in l]
    p = tmp_path / "failed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    d = frame.load(p)
    md = report.render(d)
    hits = [l for l in md.splitlines() if l.startswith("No ok records")]
    assert hits == ["No ok records: all 2 configs failed (1 diverged, 1 oom); nothing to tabulate."]
    assert "## Optimizer state" not in md and "## Failures (2)" in md
    out = report.write_report([p], tmp_path / "r" / "failed.md")
    assert "No ok records" in out.read_text() and not list(out.parent.glob("*.png"))


def test_render_is_pure_and_plain_markdown(df, md):
    assert report.render(df) == md
    assert not re.search(r"<\s*[a-zA-Z]", md), "no HTML"
    assert "![" not in md  # no plots given, no links
    linked = report.render(df, {"peak_vs_batch": "x/peak.png"})
    assert "![peak memory vs batch](x/peak.png)" in section(linked, "Peak memory")


def test_write_report_plots(tmp_path, df):
    out = report.write_report([RUN], tmp_path / "reports" / "small.md")
    assert out == tmp_path / "reports" / "small.md"
    md = out.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"small_{n}.png" for n in plot.PLOTS)
    for link in links:
        assert not Path(link).is_absolute()
        png = out.parent / link
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, link
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert list(csv["peak_total"].fillna(-1)) == list(df["peak_total"].fillna(-1))
    assert "(small.csv)" in md


def test_peak_vs_batch_plot_equals_table(df, md):
    p = plot.figures(df)["peak_vs_batch"]
    rows = table(md, "Batch scaling")
    for combo, width in (("sgd", 64), ("adam", 64), ("muon+adamw", 128), ("sgd+adam", 128)):
        xs, ys = p.data[f"width={width} / {combo}"]
        assert xs == (8.0, 32.0)
        assert ys == tuple(float(rec(df, combo, width, b).peak_total) for b in (8, 32))
        cell = pick(rows, combo=combo, width=width)
        assert [cell["peak b=8"], cell["peak b=32"]] == [fmt_bytes(y) for y in ys]


def test_state_plot_equals_table(df, md):
    p = plot.figures(df)["state_per_param"]
    rows = table(md, "Optimizer state")
    assert set(p.data) == {f"mlp / {r['combo']}" for r in rows}
    for r in rows:
        got = rec(df, r["combo"], int(r["width"]), 8)
        assert p.data[f"mlp / {r['combo']}"] == got.state_bytes_per_param
        assert r["B/param"] == f"{p.data['mlp / ' + r['combo']]:.2f}"


def test_step_time_plot_equals_table(df, md):
    p = plot.figures(df)["step_time_vs_width"]
    cell = pick(table(md, "Step time"), combo="muon+adamw")
    xs, ys = p.data[f"batch={cell['batch']} / muon+adamw"]
    assert xs == (64.0, 128.0)
    assert [cell["w=64"], cell["w=128"]] == [fmt_ms(y) for y in ys]
    assert ys == (rec(df, "muon+adamw", 64, 32).step_ms_median, rec(df, "muon+adamw", 128, 32).step_ms_median)


def test_breakdown_plot_equals_table(df, md):
    p = plot.figures(df)["peak_breakdown"]
    rows = table(md, "What the peak is made of")
    # the table: one row per series (combo + distinguishing columns), at its largest ok config
    ok = df[df.status == "ok"]
    assert len(rows) == series_labels(df).loc[ok.index].nunique() == 9
    for r in rows:
        same = ok[series_labels(df).loc[ok.index] == r["combo"]]
        widest = same[same.width == same.width.max()]
        assert (int(r["width"]), int(r["batch"])) == (widest.width.max(), widest.batch.max())
    # the plot: the usual variants' bars, each equal to its table row
    assert sorted(p.data) == sorted(plot.breakdown_bar_label(c, 128, 8 if c == "adam" else 32)
                                    for c in ("sgd", "adam", "sgd+adam", "muon+adamw"))
    cols = {"peak_params": "params", "peak_grads": "grads", "peak_state": "state",
            "peak_activations": "activations", "peak_temporaries": "temporaries"}
    for r in rows:
        bar = p.data.get(plot.breakdown_bar_label(r["combo"], r["width"], r["batch"]))
        if bar is None:
            continue
        assert {cols[k]: fmt_bytes(v) for k, v in bar.items()} == {v: r[v] for v in cols.values()}
        assert fmt_bytes(sum(bar.values())) == r["peak"]
    adam = p.data[plot.breakdown_bar_label("adam", 128, 8)]
    assert sum(adam.values()) == rec(df, "adam", 128, 8).peak_total


def test_report_from_benchmark_json(tmp_path):
    out = report.write_report(BENCH, tmp_path / "b.md")
    rows = table(out.read_text(), "Optimizer state")
    assert [r["combo"] for r in rows] == ["sgd", "adam", "sgd+adam", "muon+adamw"]
    assert "One batch size only (8)" in out.read_text()


def test_cli_report(tmp_path, capsys):
    out = tmp_path / "reports" / "cli.md"
    assert main(["report", str(RUN), "-o", str(out)]) == 0
    assert out.is_file() and "## Optimizer state" in out.read_text()
    assert str(out) in capsys.readouterr().out
    assert report.default_output(RUN) == RUN / "report.md"
    assert report.default_output(BENCH) == FIX / "report.md"


def test_cli_report_missing_file_exits_2(run_cli, tmp_path):
    missing = tmp_path / "nope" / "results.jsonl"
    res = run_cli("report", missing)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and err[0].startswith("multiopt report: error:")
    assert res.stdout == ""


# --------------------------------------------------------------------------- bounded, at a glance

DEFAULT_CPU = REPORTS / "default-cpu"


def _all_tables(md: str) -> list[list[str]]:
    return [b.splitlines() for b in re.findall(r"((?:^\|.*\n?)+)", md, flags=re.M)]


def _check_figures(figs) -> None:
    for name, p in figs.items():
        axes = p.figure.axes
        assert 1 <= len(axes) <= 12, name
        for ax in axes:
            lines = ax.get_lines()
            assert len(lines) + len(ax.containers) <= 12, name
            colours = [l.get_color() for l in lines]
            assert len(colours) == len(set(colours)), f"{name}: a colour repeats"
            bars = max((len(c.patches) for c in ax.containers), default=0)
            assert bars <= select.MAX_BARS, name


@pytest.fixture(scope="module")
def default_cpu():
    d = frame.load(DEFAULT_CPU)
    return d, report.render(d)


def test_default_report_tables_fit_a_screen(default_cpu):
    d, md = default_cpu
    tables = _all_tables(md)
    assert len(tables) >= 10
    for t in tables:
        assert len(_cells(t[0])) <= 12, t[0]
        assert len(t) - 2 <= select.MAX_ROWS
    # the summary tables hold each model's usual variants, one row per (model, combo)
    rows = table(md, "Optimizer state")
    assert {(r["model"], r["combo"]) for r in rows} == {
        (m, c) for m, c in zip(d.model, d.combo) if not (m == "mlp" and c == "muon+adamw-emb")}
    for r in rows:
        same = d[(d.model == r["model"]) & (d.combo == r["combo"]) & (d.impl == "default") & (d.dtype == "float32")
                 & (d.zero_grad_at == "end")]
        assert int(r["width"]) == same.width.max()


def test_default_plots_are_bounded(default_cpu):
    d, _md = default_cpu
    _check_figures(plot.figures(d))


def test_many_distinct_configs_stay_bounded():
    """600 records, every one a distinct width, batch and seed (bench/report_scale.py's data)."""
    mod = load_bench("report_scale")
    d = frame.records_to_frame(mod.synthetic(600))
    md = report.render(d)
    for t in _all_tables(md):
        assert len(_cells(t[0])) <= 12 and len(t) - 2 <= select.MAX_ROWS
    assert "rows; the rest are in the CSV." in md
    _check_figures(plot.figures(d))
    # the summary still reads the records: each combo's largest ok width
    rows = table(md, "Optimizer state")
    for r in rows[:3]:
        same = d[(d.model == r["model"]) & (d.combo == r["combo"]) & (d.status == "ok")]
        assert int(r["width"]) == same[(same.impl == "default") & (same.dtype == "float32")
                                       & (same.zero_grad_at == "end")].width.max()


def test_reserved_and_slack_shown(df):
    d = df.copy()
    d["peak_reserved"] = d["peak_total"] + 2048.0
    md = report.render(d)
    r = pick(table(md, "Peak memory"), combo="adam")
    assert (r["reserved"], r["slack"]) == (fmt_bytes(669696 + 2048), fmt_bytes(2048))
    bar = plot.figures(d)["peak_breakdown"].data[plot.breakdown_bar_label("adam", 128, 8)]
    assert bar[plot.SLACK] == 2048.0 and sum(bar.values()) == 669696 + 2048


def test_report_with_baseline(tmp_path):
    base = tmp_path / "base.jsonl"
    lines = (RUN / "results.jsonl").read_text().splitlines()
    rows = [json.loads(l) for l in lines]
    for r in rows:
        if r["combo"] == "adam" and r["width"] == 64 and r["batch"] == 8 and r["impl"] == "default":
            r["peak_total"] -= 1024  # the current run is 1 KiB worse here
    base.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.md"
    assert main(["report", str(RUN), "-o", str(out), "--baseline", str(base)]) == 0
    md = out.read_text()
    assert f"Gate against `{base}`: **FAIL: 1 regression**" in section(md, "Summary")
    assert "## Gate: FAIL: 1 regression" in md
    assert "| peak_total |" in section(md, "Gate: FAIL")


@pytest.mark.parametrize("twin", [dict(zero=1), dict(ranks=2), dict(target="cuda")], ids=["zero", "ranks", "target"])
def test_configs_differing_only_in_a_config_column_are_distinct_series(twin):
    """Issue 19: a ZeRO or cuda-target record used to share its twin's series label ("adam")
    and the "largest config per series" kept one of them. Every config column tells series
    apart, so the twin has its own label and shows in the report's tables."""
    from multiopt.store import read_jsonl

    plain = next(r for r in read_jsonl(RUN / "results.jsonl") if r.combo == "adam" and r.status == "ok")
    recs = [plain, dataclasses.replace(plain, batch=2 * plain.batch), dataclasses.replace(plain, **twin)]
    d = frame.records_to_frame(recs)
    labels = list(series_labels(d))
    (col, value), = twin.items()
    assert labels == ["adam", "adam", f"adam ({col}={value})"]
    md = report.render(d)
    assert [r["series"] for r in table(md, "Variants")] == [labels[2]]
    assert {(r["combo"], r["batch"]) for r in table(md, "Phases")} == {
        ("adam", str(plain.batch)), ("adam", str(2 * plain.batch)), (labels[2], str(plain.batch))}
    state = table(md, "Optimizer state")
    assert [r["combo"] for r in state] == ["adam"]
