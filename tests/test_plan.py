"""`multiopt plan`: every candidate's largest batch, found on the fake probe, holds on the
tracked probe with the budget as its memory limit (batch runs, batch + 1 does not); formula-
sized optimizers carry their formula's state; refused candidates say why; bad input is one
line and exit 2."""

from __future__ import annotations

import json
from dataclasses import replace
import shlex

import pytest

from multiopt import cli
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.run import plan as planning
from multiopt.run.fit import fit
from multiopt.units import parse_bytes

BUDGET = "3MiB"
BASE = Config(model="mlp", width=64, depth=3, target="cpu")


@pytest.fixture(scope="module")
def answer():
    axes = [planning.combo_axis(planning.preset_combos(["adamw", "sgd-momentum", "adafactor"])),
            planning.field_axis("step_in_backward", "--step-in-backward", (0, 1))]
    return planning.plan(BASE, axes, parse_bytes(BUDGET), confirm="all")


def _measure_argv(command: str) -> list[str]:
    """The row's `multiopt estimate ...` as a tracked measurement under the budget."""
    argv = shlex.split(command)
    assert argv[:2] == ["multiopt", "estimate"]
    return ["measure", *argv[2:], "--probe", "tracked", "--steps", "0", "--limit", BUDGET, "--json"]


def _batch(argv: list[str], batch: int) -> list[str]:
    i = argv.index("--batch")
    return [*argv[:i + 1], str(batch), *argv[i + 2:]]


def test_every_planned_batch_runs_on_the_tracked_probe_under_the_budget_and_one_more_does_not(answer, capsys):
    fitting = answer.fitting
    assert len(fitting) == 6 and not answer.refused
    for row in fitting:
        assert row.confirmed and row.batch > 1 and row.record.status == "ok"
        if row.formula is not None:
            continue  # adafactor reads tensor values: the fake probe sized its twin (below)
        argv = _measure_argv(planning.reproduce(answer, row))
        assert cli.main(argv) == 0, row.label
        record = json.loads(capsys.readouterr().out)
        assert record["status"] == "ok" and record["peak_total"] <= parse_bytes(BUDGET)
        assert record["peak_total"] == row.record.peak_total  # the fake estimate, to the byte
        assert record["step_in_backward"] == row.config.step_in_backward
        assert cli.main(_batch(argv, row.batch + 1)) == 1, row.label
        over = json.loads(capsys.readouterr().out)
        assert over["status"] == "oom" and "out of memory" in over["error"]
    # the frontier is the largest batch (no time model), every frontier row confirmed
    best = max(r.batch for r in fitting)
    assert {r.label for r in fitting if r.frontier} == {r.label for r in fitting if r.batch == best}


def test_formula_sized_optimizer_holds_its_state_formula_and_says_so(answer):
    """Adafactor cannot step fake tensors: its twin (SGD, no state) ran with the formula's
    state held against the budget; the formula equals what Adafactor really allocates."""
    rows = [r for r in answer.fitting if r.values["combo"] == "adafactor"]
    assert len(rows) == 2
    for row in rows:
        assert row.formula is not None and "state by formula" in row.formula.why
        assert "rest=sgd(lr=0.01)" == row.formula.twin_rules
        real = measure(row.config, Protocol(probe="tracked", steps=0))
        assert real.status == "ok" and real.opt_state_alloc_bytes == row.formula.state
        assert planning.used(row) == row.record.peak_total + row.formula.state <= parse_bytes(BUDGET)


def test_step_in_backward_is_an_axis_and_fp16_with_it_is_refused_with_why():
    axes = [planning.combo_axis(planning.preset_combos(["sgd-momentum"])), planning.amp_axis("fp16"),
            planning.field_axis("step_in_backward", "--step-in-backward", (0, 1))]
    p = planning.plan(BASE, axes, parse_bytes(BUDGET), confirm="all")
    (ok,), (refused,) = p.fitting, p.refused
    assert ok.config.step_in_backward == 0 and ok.batch > 1
    assert refused.values["step_in_backward"] == "1" and "GradScaler" in refused.why


def test_target_cuda_boundary_holds_on_the_tracked_probe_under_the_allocator_limit():
    budget, context = 100 << 20, 4 << 20
    axes = [planning.combo_axis(planning.preset_combos(["adamw"]))]
    p = planning.plan(Config(model="mlp", width=256, depth=3, target="cuda"), axes, budget, context=context)
    (row,) = p.fitting
    assert row.confirmed and planning.used(row, context) <= budget
    split = planning.split(row.record, context)
    assert sum(split.values()) == planning.used(row, context) and split["CUDA context"] == context

    def tracked(batch: int):
        return measure(Config(model="mlp", width=256, depth=3, batch=batch, combo="adamw", rules=row.config.rules,
                              target="cuda"), Protocol(probe="tracked", steps=0, limit_bytes=budget - context))

    fits, over = tracked(row.batch), tracked(row.batch + 1)
    assert fits.status == "ok" and fits.peak_reserved == row.record.peak_reserved
    assert over.status == "oom"


def test_cli_json_and_report(tmp_path, capsys):
    rc = cli.main(["plan", "--budget", BUDGET, "--model", "mlp", "--width", "64", "--depth", "3", "--target", "cpu",
                   "--combos", "adamw,sgd-momentum", "--step-in-backward", "0", "--json", "--report", str(tmp_path)])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["budget"] == parse_bytes(BUDGET) and data["time"].startswith("no time model")
    front = [r for r in data["rows"] if r["frontier"]]
    assert front and all(r["confirmed"] and r["reproduce"].startswith("multiopt estimate") for r in front)
    assert set(front[0]["breakdown"]) == {"weights", "grads", "optimizer state", "activations", "temporaries",
                                          "workspaces", "allocator slack", "CUDA context"}
    assert sum(front[0]["breakdown"].values()) == front[0]["used"] <= data["budget"]
    assert (tmp_path / "plan.png").stat().st_size > 10_000 and "## Frontier" in (tmp_path / "plan.md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "64KiB", "--model", "mlp", "--width", "256"], "below the weights alone"),
    (["--budget", "1GiB", "--combos", "nope"], "unknown combo 'nope'"),
    (["--budget", "1GiB", "--dtype", "float8"], "--dtype: unknown value 'float8'"),
    (["--budget", "1GiB", "--step-in-backward", "0,2"], "--step-in-backward: unknown value 2"),
    (["--budget", "1GiB", "--model", "no_such_module_xyz:factory"], "cannot import"),
    (["--budget", "1GiB", "--model", "mlp", "--width", "0"], "width"),
    (["--budget", "1GiB", "--warmup", "0"], "at least 1 warm-up step"),
    (["--budget", "1GiB", "--jobs", "0"], "--jobs 0: give 1 or more"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    rc = cli.main(["plan", "--target", "cpu", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_fit_on_a_model_without_a_width_searches_only_the_batch(capsys):
    """issue 20: no 'width 1,048,576 (search cap)' for a factory that takes no width."""
    answers = fit(planning.preset_combos(["adamw"]), parse_bytes("8MiB"), width=1024, batch=4,
                  model="tests.hfmodels:gpt2", depth=4, target="cpu")
    (a,) = answers
    assert a.axis == "batch" and a.fixed is None and not a.capped and a.value > 1 and a.error is None
    assert cli.main(["fit", "--budget", "8MiB", "--model", "tests.hfmodels:gpt2", "--combos", "adamw",
                     "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| largest batch " in out and "width" not in out.split("## adamw")[1] and "search cap" not in out
    # nor a depth it does not take (its config's is its own)
    assert "tests.hfmodels:gpt2, float32;" in out and "depth" not in out.split("## adamw")[0]


def test_a_runner_reuses_every_measurement():
    runner = planning.Runner(parse_bytes(BUDGET))
    axes = [planning.combo_axis(planning.preset_combos(["adamw"]))]
    first = planning.plan(BASE, axes, parse_bytes(BUDGET), runner=runner)
    runs = runner.runs
    again = planning.plan(BASE, axes, parse_bytes(BUDGET), runner=runner)
    assert runner.runs == runs and again.fitting[0].batch == first.fitting[0].batch


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_a_run_that_never_reached_the_limit_answers_for_the_limited_run(target):
    """Runner.known_fit: an unlimited fake run whose metric stayed within a limit is the limited
    run (the same ops, the same bytes, nothing refused), and one whose live bytes alone went
    past it cannot fit; between the two (target cuda: live bytes under, reserved over, where a
    limited allocator frees its cache and retries) the run's allocator program replayed under
    the limit tells."""
    config = Config(model="mlp", width=128, depth=3, batch=8, combo="adamw", rules="rest=adamw", target=target)
    runner = planning.Runner(1 << 40)
    free = runner.run(config, None)
    assert free.status == "ok" and runner.runs == 1
    high, low = planning.metric(free), free.peak_total
    assert runner.known_fit(config, high) is True and runner.known_fit(config, low - 1) is False
    limited = measure(config, Protocol(probe="fake", steps=0, limit_bytes=high))  # what the shortcut stands for
    same = ("peak_total", "peak_reserved", "reserved_after_step", "mem_step_start", "mem_step_end",
            *(f"peak_{p}" for p in ("zero_grad", "forward", "backward", "step")))
    assert limited.status == "ok" and all(getattr(limited, f) == getattr(free, f) for f in same)
    assert runner.run(config, high) is free and runner.runs == 1  # reused, not run again
    assert measure(config, Protocol(probe="fake", steps=0, limit_bytes=low - 1)).status == "oom"
    if target == "cuda" and low < high:
        # between the two the allocator program answers, as the limited run does
        # (tests/test_program.py); target cpu keeps no program: only a run can tell
        for limit in (low, (low + high) // 2, high - 1):
            limited = measure(config, Protocol(probe="fake", steps=0, limit_bytes=limit))
            assert runner.known_fit(config, limit) is (limited.status == "ok")
    assert runner.known_fit(replace(config, batch=9), high) is None  # nothing run at batch 9
