"""`multiopt fit`: the largest batch/width that fits a budget, found on the fake probe, holds
on the tracked probe under the same limit; the search is exact; bad input is one line, exit 2."""

from __future__ import annotations

import random

import pytest

from multiopt import cli
from multiopt.run.fit import _interpolate, fit
from multiopt.run.plan import boundary
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.run.presets import combos
from multiopt.units import parse_bytes

BUDGET = "2MiB"
WIDTH, BATCH, DEPTH = 64, 16, 3


@pytest.fixture(scope="module")
def answers():
    return fit(combos(["adam", "sgd+adam"]), parse_bytes(BUDGET), width=WIDTH, batch=BATCH, model="mlp", depth=DEPTH)


def _tracked(answer, n):
    fixed = dict([answer.fixed]) if answer.fixed else {}
    config = Config(model="mlp", depth=DEPTH, combo=answer.combo, rules=answer.rules, **fixed, **{answer.axis: n})
    return measure(config, Protocol(probe="tracked", warmup=3, steps=2, limit_bytes=parse_bytes(BUDGET)))


def test_reported_batch_and_width_fit_on_the_tracked_probe_and_the_next_ones_do_not(answers):
    assert [(a.combo, a.axis) for a in answers] == [("adam", "batch"), ("adam", "width"),
                                                   ("sgd+adam", "batch"), ("sgd+adam", "width")]
    for a in answers:
        assert a.error is None and not a.capped and a.value > 1, a
        assert a.record.status == "ok" and a.record.peak_total <= parse_bytes(BUDGET)
        assert a.over == a.value + 1 and a.over_peak > parse_bytes(BUDGET)
        fits = _tracked(a, a.value)
        assert fits.status == "ok", (a.combo, a.axis, a.value, fits.error)
        # the fake estimate is the tracked measurement, to the byte
        assert fits.peak_total == a.record.peak_total
        over = _tracked(a, a.value + 1)
        assert over.status == "oom", (a.combo, a.axis, a.value + 1, over.status)
        assert "out of memory" in over.error
    # SGD on layer1 holds no state there: more fits than with Adam everywhere
    by = {(a.combo, a.axis): a.value for a in answers}
    assert by[("sgd+adam", "batch")] > by[("adam", "batch")]
    assert by[("sgd+adam", "width")] > by[("adam", "width")]


def _brute(f, budget, cap):
    n = 0
    while n < cap and f(n + 1) <= budget:
        n += 1
    return n


def test_search_is_exact_on_stepped_curves():
    rng = random.Random(7)
    for _ in range(300):
        a, b, c = rng.randint(0, 10**6), rng.randint(0, 5000), rng.choice([0, 0, rng.randint(1, 50)])
        budget = rng.randint(10**5, 3 * 10**6)
        cap = rng.choice([300, 5000])

        def f(n, a=a, b=b, c=c):
            return -(-(a + b * n + c * n * n) // 512) * 512

        want = _brute(f, budget, cap)
        got, capped = _interpolate(f, budget, cap)
        assert got == want and capped == (want == cap and f(cap) <= budget), (a, b, c, budget, cap, got, want)
        for guess in (1, want, want + 1, rng.randint(1, cap)):
            assert boundary(lambda n: f(n) <= budget, guess, cap) == (want, want == cap), (guess, want)
    # a curve that does not grow: the search stops at the cap and says so
    assert _interpolate(lambda n: 1000, 5000, 1 << 20) == (1 << 20, True)
    assert _interpolate(lambda n: 6000, 5000, 1 << 20) == (0, False)


def test_cli_prints_one_table_per_combo(capsys):
    rc = cli.main(["fit", "--budget", BUDGET, "--width", str(WIDTH), "--batch", str(BATCH), "--depth", str(DEPTH), "--target", "cpu",
                   "--rules", "split::layer1=sgd(lr=0.01); rest=adam"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "# What fits in 2.00 MiB (2,097,152 bytes)" in out
    assert "## split: `layer1=sgd(lr=0.01); rest=adam`" in out
    assert "| largest batch at width 64" in out and "| largest width at batch 16" in out
    assert out.count("\n|--") == 1  # one table (github format)


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "2 parsecs"], "cannot read '2 parsecs' as a size"),
    (["--budget", "0"], "at least 1 byte"),
    (["--budget", "1GiB", "--width", "0"], "width, batch and depth must be >= 1"),
    (["--budget", "1GiB", "--combos", "nope"], "unknown combo 'nope'"),
    (["--budget", "1GiB", "--rules", "rest=asgd"], "fake probe cannot run"),
    (["--width", "64"], "required: --budget"),
    (["--budget", "1GiB", "--jobs", "0"], "--jobs 0: give 1 or more"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    try:
        rc = cli.main(["fit", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_target_cuda_answer_holds_on_the_tracked_probe_under_the_same_allocator_limit():
    """fit --target cuda searches on predicted peak *reserved* (fake probe, allocator model
    capped at budget - context, cached blocks released and retried before an OOM, as CUDA
    does). The tracked probe with the same target and limit must agree at the boundary:
    the answer runs, one more does not."""
    budget, context, width = 100 << 20, 4 << 20, 256
    (name, rules), = combos(["adam"])
    config = Config(model="mlp", width=width, depth=DEPTH, batch=1, combo=name, rules=rules, target="cuda")
    from multiopt.run.fit import largest

    a = largest(config, "batch", budget, context=context)
    assert a.error is None and not a.capped and a.value > 1, a
    assert a.record.peak_reserved + context <= budget < a.over_peak + context

    def tracked(batch: int):
        c = Config(model="mlp", width=width, depth=DEPTH, batch=batch, combo=name, rules=rules, target="cuda")
        return measure(c, Protocol(probe="tracked", steps=0, limit_bytes=budget - context))

    fits, over = tracked(a.value), tracked(a.value + 1)
    assert fits.status == "ok" and fits.peak_reserved == a.record.peak_reserved, fits.error
    assert over.status == "oom" and "out of memory" in over.error
