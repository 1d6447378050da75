"""The gate's step-time verdict on constructed records: a slower median is a regression only
when the host's own noise (its calibration kernel's spread in both runs and its shift
between them) is inside the band and the change exceeds band + noise; otherwise inconclusive,
which passes and says how to confirm."""

from __future__ import annotations

import dataclasses
import io
import statistics

import pytest

from multiopt.analyze import gate
from multiopt.analyze.gate import INCONCLUSIVE, TimeCheck, host_noise, host_shift
from multiopt.record import KEY_COLUMNS, Record

KERNEL = "mm192x192+add_x4/1"


def _rec(combo: str, width: int, *, ms: float = 10.0, iqr: float = 0.1, calib: float = 0.5,
         spread: float | None = 0.02, kernel: str | None = KERNEL) -> Record:
    # calibration samples whose IQR / median is `spread` (None: not measured)
    samples = () if spread is None else tuple(calib * (1 + d * spread) for d in (-0.5, -0.5, 0.0, 0.5, 0.5))
    return Record(run_id="r", torch="2.13.0+cpu", device="cpu", device_name="AMD EPYC", probe="tracked",
                  model="mlp", width=width, batch=32, combo=combo, rules=f"rest={combo}", status="ok",
                  param_bytes=4096, peak_total=8192, step_ms_median=ms, step_ms_iqr=iqr, step_ms_min=ms * 0.9,
                  step_ms_mean=ms, steps_timed=30, step_ms_samples=(ms,) * 3,
                  host_calib=kernel if spread is not None else None, host_calib_ms=samples,
                  host_noise=spread if spread is not None else None)


def _runs(**over) -> list[Record]:
    return [_rec(c, w, **over) for c in ("sgd", "adam", "muon+adamw") for w in (64, 256)]


def _scale(records: list[Record], *, ms: float = 1.0, calib: float = 1.0, spread: float | None = None,
           only: tuple[str, int] | None = None) -> list[Record]:
    """The same runs with step times x `ms` (for `only` alone, when given) and the host's
    calibration x `calib` everywhere (its spread set to `spread`, when given)."""
    out = []
    for r in records:
        s = spread if spread is not None else r.host_noise
        med = statistics.median(r.host_calib_ms) * calib
        samples = tuple(med * (1 + d * s) for d in (-0.5, -0.5, 0.0, 0.5, 0.5))
        f = ms if only is None or (r.combo, r.width) == only else 1.0
        out.append(dataclasses.replace(r, step_ms_median=r.step_ms_median * f, host_calib_ms=samples, host_noise=s))
    return out


def _df(records) -> list[Record]:
    # through a stored row and back, as the gate reads them from files
    return [Record.from_dict(r.to_dict()) for r in records]


def _time(result) -> dict[tuple[str, int], gate.Verdict]:
    return {(v.key[KEY_COLUMNS.index("combo")], v.key[KEY_COLUMNS.index("width")]): v
            for v in result.verdicts if v.metric == "step_ms_median"}


def test_a_host_twice_as_slow_is_inconclusive_everywhere_never_a_regression():
    base = _runs()
    # a CPU-bound job on the same cores: the calibration kernel 2x slower, steps 1.8x to 3.7x
    busy = _scale(base, calib=2.0, spread=0.3)
    busy = [dataclasses.replace(r, step_ms_median=r.step_ms_median * f) for r, f in zip(busy, (1.8, 3.7, 2.0, 2.5, 1.9, 3.0))]
    res = gate.compare(_df(base), _df(busy))
    assert res.exit_code == 0 and not res.regressions
    verdicts = _time(res)
    assert {v.verdict for v in verdicts.values()} == {INCONCLUSIVE}
    assert all(v.noise == pytest.approx(1.0) for v in verdicts.values())  # the host's shift: +100%
    text = gate.render(res)
    assert "**REGRESSION**" not in text and "PASS" in text
    assert "inconclusive (host noise 100%)" in text
    assert "--threads 1" in text and "quiet host" in text


def test_on_a_quiet_host_one_config_half_again_slower_is_a_regression():
    base = _runs()
    cur = _scale(base, ms=1.5, calib=1.01, only=("adam", 256))
    res = gate.compare(_df(base), _df(cur))
    assert res.exit_code == 1
    [reg] = res.regressions
    assert (reg.config, reg.metric) == ("adam, width=256", "step_ms_median") and reg.change == pytest.approx(0.5)
    assert reg.noise == pytest.approx(0.02)  # the larger spread; the shift is 1%
    assert reg.allowed == pytest.approx(0.10)  # the band; the change had to pass it + the noise
    others = [v for k, v in _time(res).items() if k != ("adam", 256)]
    assert {v.verdict for v in others} == {gate.UNCHANGED}
    line = next(l for l in gate.render(res).splitlines() if "REGRESSION" in l and "|" in l)
    assert "adam, width=256" in line and "+50%" in line and "host noise 2.0%" in line


def test_noise_inside_the_band_but_as_large_as_the_change_is_inconclusive():
    base = _runs()
    # host 8% slower (inside the 10% band), a config 15% slower: beyond the band, not beyond band + noise
    cur = _scale(base, ms=1.15, calib=1.08, only=("sgd", 64))
    v = _time(gate.compare(_df(base), _df(cur)))[("sgd", 64)]
    assert v.verdict == INCONCLUSIVE and v.noise == pytest.approx(0.08)
    # the same 15% with a steady host is a regression
    cur = _scale(base, ms=1.15, calib=1.0, only=("sgd", 64))
    assert _time(gate.compare(_df(base), _df(cur)))[("sgd", 64)].verdict == gate.REGRESSION


def test_a_wide_band_does_not_let_a_large_host_shift_through():
    """The issue's case: a baseline IQR of 40% makes a 120% band; the host 100% slower is inside
    it, and a step 150% slower is beyond the band, but not beyond band + noise."""
    base = [_rec("sgd", 64, ms=10.0, iqr=4.0)]
    cur = _scale(base, ms=2.5, calib=2.0)
    v = _time(gate.compare(_df(base), _df(cur)))[("sgd", 64)]
    assert v.verdict == INCONCLUSIVE and v.change == pytest.approx(1.5)


@pytest.mark.parametrize("side", ["baseline", "current"])
def test_a_noisy_run_on_either_side_is_inconclusive(side):
    base = _runs()
    loud = _scale(base, spread=0.4)
    b, c = (loud, _scale(base, ms=1.5, only=("adam", 64))) if side == "baseline" else (base, _scale(loud, ms=1.5, only=("adam", 64)))
    res = gate.compare(_df(b), _df(c))
    assert not res.regressions and res.exit_code == 0
    assert all(v.verdict == INCONCLUSIVE and v.noise == pytest.approx(0.4) for v in _time(res).values())


def test_improvements_follow_the_same_rule():
    base = _runs()
    quiet = _scale(base, ms=0.6, only=("adam", 64))
    assert _time(gate.compare(_df(base), _df(quiet)))[("adam", 64)].verdict == gate.IMPROVEMENT
    # the host itself 30% faster: the "improvement" is the host's
    fast_host = _scale(base, ms=0.6, calib=0.7, only=("adam", 64))
    assert _time(gate.compare(_df(base), _df(fast_host)))[("adam", 64)].verdict == INCONCLUSIVE


def test_records_without_the_calibration_keep_the_band_and_say_so():
    base = [_rec("sgd", 64, spread=None)]
    cur = [dataclasses.replace(base[0], step_ms_median=15.0)]
    [v] = gate.compare(_df(base), _df(cur)).regressions
    assert v.noise is None and "host noise not recorded" in v.detail
    # one side calibrated, the other not: the shift is unknown, so the same
    cal = [_rec("sgd", 64)]
    assert host_noise(base[0], cal[0]) is None
    # another calibration kernel: medians of different work are never compared
    other = _rec("sgd", 64, kernel="mm256/2")
    assert host_shift(cal[0], other) is None


def test_time_check_is_one_pure_check_object():
    b = _rec("sgd", 64, ms=10.0, calib=1.0, spread=0.05)
    c = _rec("sgd", 64, ms=10.5, calib=1.2, spread=0.03)
    [t] = TimeCheck(0.10, 3.0)(gate.Pair("sgd", b.key(), b, c))
    assert t.allowed == pytest.approx(0.10) and t.noise == pytest.approx(0.2) and t.verdict == INCONCLUSIVE
    assert host_shift(b, c) == pytest.approx(0.2)
    assert "host noise 20% > band" in t.detail
    # the band grows with the baseline's IQR (3 x 0.5 / 10 = 15%) and then holds the 12% shift
    b2 = dataclasses.replace(b, step_ms_iqr=0.5)
    c2 = _rec("sgd", 64, ms=13.0, calib=1.12, spread=0.03)
    [t2] = TimeCheck(0.10, 3.0)(gate.Pair("sgd", b.key(), b2, c2))
    assert t2.allowed == pytest.approx(0.15) and t2.noise == pytest.approx(0.12) and t2.verdict == gate.REGRESSION


def test_run_gate_exit_code_and_summary_for_inconclusive(tmp_path):
    from multiopt.store import append_jsonl

    base = _runs()
    busy = _scale(base, ms=2.0, calib=1.9)
    append_jsonl(tmp_path / "b.jsonl", base)
    append_jsonl(tmp_path / "c.jsonl", busy)
    out = io.StringIO()
    code = gate.run_gate(tmp_path / "b.jsonl", tmp_path / "c.jsonl", stdout=out, environ={},
                         summary=tmp_path / "summary.md")
    assert code == 0
    text = out.getvalue()
    assert "6 step times inconclusive" in text and "inconclusive (host noise 90%)" in text
    assert (tmp_path / "summary.md").read_text().strip() == text.strip()


@pytest.mark.parametrize("side", ["baseline", "current"])
def test_threads_waiting_for_a_cpu_make_a_steady_kernel_no_alibi(side):
    """The measured case (timing.py): one busy loop beside 2-thread steps slowed them 2-3x while
    the calibration kernel moved under 30%. Its steady kernel cannot vouch for the step; the
    scheduler's count of the threads' waiting for a CPU (host_wait) can, on either side."""
    base = _runs()
    cur = _scale(base, ms=2.5, calib=1.05, only=("adam", 64))
    quiet = _time(gate.compare(_df(base), _df(cur)))[("adam", 64)]
    assert quiet.verdict == gate.REGRESSION  # no wait recorded: the kernel alone, and it was steady
    waited = lambda rs, w: [dataclasses.replace(r, host_wait=w) for r in rs]  # noqa: E731
    b, c = (waited(base, 0.65), cur) if side == "baseline" else (base, waited(cur, 0.65))
    res = gate.compare(_df(b), _df(c))
    assert not res.regressions and res.exit_code == 0
    v = _time(res)[("adam", 64)]
    assert v.verdict == INCONCLUSIVE and "waited for a CPU 65% of the timed window" in gate.render(res)
    # a quiet scheduler's account (under WAIT_LIMIT) leaves the verdict to the band and the kernel
    assert _time(gate.compare(_df(waited(base, 0.001)), _df(waited(cur, 0.004))))[("adam", 64)].verdict == gate.REGRESSION
