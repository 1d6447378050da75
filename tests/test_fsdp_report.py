"""FSDP records in the report and the gate (issue 23): the per-rank tables and breakdown plot show
each rank's measured numbers, and the gate compares per rank, naming the rank that grew.

Records from the fake probe: our MLP at width 9 (dim 0 of 9 rows: 5 on rank 0, 4 on rank 1, so
the ranks differ), `fsdp 2`, one warm-up step, AdamW and Muon (two optimizers on each rank)."""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout

import pytest

from multiopt.analyze import frame, gate, plot, report
from multiopt.analyze.ranks import rank_groups, ranks_text
from multiopt.cli import main
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.kinds import Phase, Probe, Status
from multiopt.record import PHASES, RANK_FSDP_COLUMNS, Record, phase_order
from multiopt.store import append_jsonl
from multiopt.units import fmt_bytes

from .test_report import PNG_MAGIC, section, table

TITLE = "FSDP: memory per rank"


@pytest.fixture(scope="module")
def rec() -> Record:
    config = Config(model="mlp", width=9, depth=2, batch=2, combo="muon+adamw", rules="@2d=muon; rest=adamw", fsdp=2)
    r = measure(config, Protocol(probe=Probe.FAKE, steps=0, warmup=1))
    assert r.status == Status.OK, r.error
    return r


def _b(v) -> str:
    return "-" if v is None else fmt_bytes(float(v))


def _peak_phase(row) -> str:
    return max(PHASES, key=lambda p: getattr(row, f"peak_{p}"))


def test_the_table_shows_each_ranks_own_numbers(rec):
    md = report.render(frame.records_to_frame([rec]))
    held = table(md, TITLE, 0)
    assert [r["ranks"] for r in held] == ["0", "1"]  # rank 1 holds fewer rows: its own row
    assert rec.ranks_state[0].state_bytes > rec.ranks_state[1].state_bytes
    for cells, row in zip(held, rec.ranks_state):
        assert (cells["series"], cells["width"], cells["batch"]) == ("muon+adamw", "9", "2")
        assert cells["sharded params"] == _b(row.param_bytes) and cells["sharded grads"] == _b(row.grad_bytes)
        assert cells["optimizer state"] == ", ".join(f"{o.name} {_b(o.state_bytes)}" for o in row.by_optimizer)
        assert len(row.by_optimizer) == 2
        assert (cells["step start"], cells["peak"]) == (_b(row.mem_step_start), _b(row.peak_total))
        assert cells["peak phase"] == _peak_phase(row)
    phases = table(md, TITLE, 1)
    order = phase_order(rec.zero_grad_at)
    assert [(r["ranks"], r["phase"]) for r in phases] == [(str(k), p) for k in (0, 1) for p in order]
    for cells in phases:
        row, p = rec.ranks_state[int(cells["ranks"])], cells["phase"]
        assert cells["peak"] == _b(getattr(row, f"peak_{p}"))
        if p in (Phase.FORWARD, Phase.BACKWARD):
            assert cells["unsharded params"] == _b(getattr(row, f"unsharded_{p}")) != "-"
            assert cells["all-gather staging"] == _b(getattr(row, f"all_gather_{p}")) != "-"
        else:
            assert cells["unsharded params"] == cells["all-gather staging"] == "-"
        want = _b(row.reduce_scatter_backward) if p == Phase.BACKWARD else "-"
        assert cells["reduce-scatter inputs"] == want


def test_ranks_with_equal_numbers_share_a_row(rec):
    """Rank 1 carrying rank 0's numbers (as the fake probe's `same_as` copies do): one row."""
    first = rec.ranks_state[0]
    copied = dataclasses.replace(rec, ranks_state=(first, dataclasses.replace(first, rank=1, same_as=0)))
    held = table(report.render(frame.records_to_frame([copied])), TITLE, 0)
    assert [r["ranks"] for r in held] == ["0-1"]
    assert ranks_text((0, 2, 3, 4, 7)) == "0, 2-4, 7"
    assert [g.ranks for g in rank_groups([{"rank": 0, "a": 1}, {"rank": 1, "a": 2}, {"rank": 2, "a": 1}])] == \
        [(0, 2), (1,)]


def test_the_breakdown_plot_equals_the_table_and_is_linked(rec, tmp_path):
    df = frame.records_to_frame([rec])
    p = plot.figures(df)["rank_breakdown"]
    held = table(report.render(df), TITLE, 0)
    for cells, row in zip(held, rec.ranks_state):
        bar = p.data[plot.rank_bar_label("muon+adamw", 9, 2, cells["ranks"])]
        stacked = {k: v for k, v in bar.items() if k in ("sharded params", "sharded grads", "rest of the peak")
                   or k.startswith("state: ")}
        assert sum(stacked.values()) == bar[plot.RANK_PEAK] == row.peak_total  # the parts are the whole peak
        assert (bar["sharded params"], bar["sharded grads"]) == (row.param_bytes, row.grad_bytes)
        assert {k: v for k, v in stacked.items() if k.startswith("state: ")} == {
            f"state: {o.name}": o.state_bytes for o in row.by_optimizer}
        assert bar["unsharded params"] == max(row.unsharded_forward, row.unsharded_backward)
        assert bar["reduce-scatter inputs"] == row.reduce_scatter_backward
        assert fmt_bytes(bar[plot.RANK_PEAK]) == cells["peak"]
    append_jsonl(tmp_path / "run" / "results.jsonl", [rec])
    out = report.write_report([tmp_path / "run"], tmp_path / "r.md")
    assert "![memory per rank](r_rank_breakdown.png)" in section(out.read_text(), TITLE)
    assert (tmp_path / "r_rank_breakdown.png").read_bytes().startswith(PNG_MAGIC)


# --- the gate, per rank -------------------------------------------------------------------------


def _grown(rec: Record, rank: int, by: int) -> Record:
    """`rec` with one rank's optimizer state `by` bytes larger (its first optimizer's)."""
    rows = list(rec.ranks_state)
    row = rows[rank]
    opts = (dataclasses.replace(row.by_optimizer[0], state_bytes=row.by_optimizer[0].state_bytes + by),
            *row.by_optimizer[1:])
    rows[rank] = dataclasses.replace(row, state_bytes=row.state_bytes + by, by_optimizer=opts)
    return dataclasses.replace(rec, ranks_state=tuple(rows))


def test_the_gate_compares_every_rank_exactly(rec):
    res = gate.compare([rec], [rec])
    assert res.passed
    metrics = {v.metric for v in res.unchanged}
    for rank in (0, 1):
        for m in ("state_bytes", "peak_total", *RANK_FSDP_COLUMNS):
            assert f"rank {rank}: {m}" in metrics
        assert {f"rank {rank}: state[{o.name}]" for o in rec.ranks_state[rank].by_optimizer} <= metrics
    assert "memory (per rank too): 0 on tracked/fake" in res.settings


def test_one_ranks_state_grows_and_the_gate_fails_naming_that_rank(rec, tmp_path):
    grown = _grown(rec, 1, 8)
    assert grown.config() == rec.config() and grown.opt_state_bytes == rec.opt_state_bytes  # rank 0's: unchanged
    res = gate.compare([rec], [grown])
    assert not res.passed
    name = rec.ranks_state[1].by_optimizer[0].name
    assert {v.metric for v in res.regressions} == {"rank 1: state_bytes", f"rank 1: state[{name}]"}
    assert all(v.new - v.old == 8 for v in res.regressions)
    # the record's own memory alone (rank 0's) cannot see it
    alone = gate.ToleranceCheck("memory", gate.MEMORY_METRICS, gate.BYTES)
    assert gate.compare([rec], [grown], using=(alone,)).passed
    # from the CLI: exit 1, the rank in the table
    base, cur = tmp_path / "base.jsonl", tmp_path / "cur" / "results.jsonl"
    append_jsonl(base, [rec])
    append_jsonl(cur, [grown])
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["gate", "--baseline", str(base), "--current", str(cur), "--only", "memory"])
    assert code == 1
    assert "| rank 1: state_bytes |" in out.getvalue() and "rank 0: state_bytes |" not in out.getvalue()


def test_a_rank_missing_now_is_a_regression(rec):
    res = gate.compare([rec], [dataclasses.replace(rec, ranks_state=rec.ranks_state[:1])])
    assert not res.passed and {v.metric.split(":")[0] for v in res.regressions} == {"rank 1"}
    assert all(v.missing for v in res.regressions)
