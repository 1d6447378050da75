"""Timing samples and the host-noise calibration: what a record keeps for the time gate, and
the step-time plots (log axis; predicted vs measured where predictions exist)."""

from __future__ import annotations

import json
import os
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from multiopt.analyze import frame, plot
from multiopt.errors import UsageError
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.instrument.timing import HOST_EDGE, HOST_EVERY, Calibration, Timing, relative_iqr, runqueue_ms, time_steps
from multiopt.record import Record, check_values
from multiopt.units import fmt_ms


class _Logged(Calibration):
    """The real calibration kernel, logging when it runs (to check where its samples fall)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        super().__init__("cpu")
        log.clear()  # the constructor's warm-up run is not a sample

    def _run(self) -> None:
        self.log.append("c")
        super()._run()


def test_calibration_samples_fall_before_between_and_after_the_step_samples():
    log: list[str] = []
    host = _Logged(log)
    t = time_steps(lambda: log.append("s"), steps=7, warmup=2, host=host)
    reps = Calibration.REPEATS
    # warm-up steps, then HOST_EDGE samples, the step samples with one sample after every
    # HOST_EVERY of them, then HOST_EDGE samples
    want = ["s"] * 2 + ["c"] * (reps * HOST_EDGE)
    for i in range(7):
        if i and i % HOST_EVERY == 0:
            want += ["c"] * reps
        want.append("s")
    want += ["c"] * (reps * HOST_EDGE)
    assert log == want
    assert len(t.host_ms) == 2 * HOST_EDGE + (7 - 1) // HOST_EVERY and len(t.times_ms) == 7
    assert all(x > 0 for x in t.host_ms)
    assert t.host_noise == relative_iqr(t.host_ms)


def test_time_steps_without_a_host_times_no_calibration():
    t = time_steps(lambda: None, steps=3, warmup=0)
    assert t.host_ms == () and t.host_noise is None and "host noise" not in str(t)


def test_calibration_is_fixed_work_on_the_same_values():
    a, b = Calibration("cpu"), Calibration("cpu")
    assert torch.equal(a._a, b._a) and a._a.shape == (Calibration.SIZE,) * 2
    assert float(a._a.max()) < 1 / Calibration.SIZE  # products stay bounded


def test_relative_iqr():
    assert relative_iqr([]) is None and relative_iqr([1.0]) is None
    assert relative_iqr([1.0, 1.0, 1.0, 1.0]) == 0.0
    # half the samples before a 2x slowdown, half after: the spread is the slowdown
    assert relative_iqr([1.0] * 4 + [2.0] * 4) == pytest.approx(1.0 / 1.5)
    # one outlier (a thread descheduled once) moves neither quartile
    assert relative_iqr([1.0] * 7 + [50.0]) == 0.0
    assert Timing((1.0, 2.0), host_ms=(1.0, 1.0, 1.0, 3.0)).host_noise == pytest.approx(0.5)


def test_measure_records_the_samples_and_the_host_noise():
    cfg = Config(width=16, depth=2, batch=4, combo="sgd", rules="rest=sgd(lr=0.01)")
    r = measure(cfg, Protocol(probe="tracked", steps=7, min_block_ms=0.0))
    assert r.status == "ok", r.error
    assert len(r.step_ms_samples) == 7 and r.steps_timed == 7
    assert r.step_ms_median == pytest.approx(statistics.median(r.step_ms_samples), abs=1e-5)
    assert r.host_calib == Calibration.KERNEL
    assert len(r.host_calib_ms) == 2 * HOST_EDGE + 2
    assert r.host_noise == pytest.approx(relative_iqr(r.host_calib_ms), abs=1e-3)
    assert (r.host_wait is not None and r.host_wait >= 0) == os.path.exists("/proc/self/task")
    # a memory-only measurement times nothing
    m = measure(cfg, Protocol(probe="tracked", steps=0))
    assert m.step_ms_samples == () and m.host_calib_ms == () and m.host_noise is None and m.host_calib is None
    assert m.host_wait is None


def test_the_samples_round_trip_through_a_record_row():
    r = Record(step_ms_samples=(1.5, 2.0), host_calib="k", host_calib_ms=(0.3, 0.4), host_noise=0.1)
    row = json.loads(json.dumps(r.to_dict()))
    assert row["step_ms_samples"] == [1.5, 2.0] and row["host_calib_ms"] == [0.3, 0.4]
    back = Record.from_dict(row)
    assert back == r and hash(back) == hash(r)
    # rows written before the fields existed read as "not measured"
    old = {k: v for k, v in row.items() if k not in ("step_ms_samples", "host_calib", "host_calib_ms", "host_noise")}
    o = Record.from_dict(old)
    assert o.step_ms_samples == () and o.host_calib_ms == () and o.host_noise is None


@pytest.mark.parametrize("field,value", [("step_ms_samples", [1.0, -2.0]), ("host_calib_ms", "1,2"),
                                         ("host_calib_ms", [True]), ("host_noise", -0.5), ("host_noise", "5%"),
                                         ("host_calib", 3)])
def test_check_values_refuses_bad_samples(field, value):
    row = {**Record().to_dict(), field: value}
    with pytest.raises(UsageError, match=field):
        check_values(row, "r.jsonl:1")


# --- plots ------------------------------------------------------------------------------------


def _rows(pred: dict | None = None) -> pd.DataFrame:
    recs = [Record(combo=c, rules=f"rest={c}", width=w, batch=16, device_name="cpu",
                   step_ms_median=(400.0 if c == "muon+adamw" else 1.0) * w / 64, step_ms_iqr=0.01, steps_timed=20)
            for c in ("sgd", "adam", "muon+adamw") for w in (64, 256)]
    df = frame.records_to_frame([r.to_dict() for r in recs])
    if pred is not None:
        df["predicted_step_ms"] = [pred.get((c, w)) for c, w in zip(df["combo"], df["width"])]
    return df


def test_step_time_plot_is_on_a_log_axis_with_ms_labels():
    p = plot.figures(_rows())["step_time_vs_width"]
    ax = p.figure.axes[0]
    assert ax.get_yscale() == "log"
    # a 400 ms Muon step and a 1 ms SGD step both drawn, neither flattened away
    assert p.data["batch=16 / sgd"][1] == (1.0, 4.0) and p.data["batch=16 / muon+adamw"][1] == (400.0, 1600.0)
    plot.FigureCanvasAgg(p.figure).draw()
    ticks = [(t.label1.get_text(), t.get_loc()) for t in ax.yaxis.get_major_ticks() if t.label1.get_text()]
    assert len(ticks) >= 3 and all(text == fmt_ms(loc) for text, loc in ticks), ticks


def test_predicted_vs_measured_only_where_predictions_exist():
    assert "predicted_vs_measured" not in plot.figures(_rows())
    assert "predicted_vs_measured" not in plot.figures(_rows({}))  # the column, every value missing
    pred = {("sgd", 64): 1.2, ("adam", 256): 3.0, ("muon+adamw", 64): 380.0}
    df = _rows(pred)
    p = plot.figures(df)["predicted_vs_measured"]
    # one point per config with both times, at (measured, predicted)
    assert p.data == {"sgd w=64 b=16": (1.0, 1.2), "adam w=256 b=16": (4.0, 3.0),
                      "muon+adamw w=64 b=16": (400.0, 380.0)}
    ax = p.figure.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    drawn = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, drawn.tolist())) == sorted(p.data.values())
    # a failed config's prediction is not a point
    failed = df.copy()
    failed.loc[(failed["combo"] == "sgd") & (failed["width"] == 64), "status"] = "oom"
    assert "sgd w=64 b=16" not in plot.figures(failed)["predicted_vs_measured"].data


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="the scheduler's per-thread account is Linux's")
def test_runqueue_wait_is_read_per_thread_and_recorded_as_a_share_of_the_window():
    first = runqueue_ms()
    assert first is not None and first >= 0.0
    assert runqueue_ms() >= first  # a running total: it never goes back while the threads live
    t = time_steps(lambda: sum(range(1000)), steps=4, warmup=0, host=Calibration("cpu"))
    assert t.host_wait is not None and 0.0 <= t.host_wait
    assert time_steps(lambda: None, steps=2, warmup=0).host_wait is None  # no host measured, no wait
