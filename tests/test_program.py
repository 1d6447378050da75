"""A run's allocator program (instrument/program.py): replayed under a limit it ends as the
limited run does, request for request; between two batches of one program it is the program
a run at a third batch makes; and a plan built on it confirms what it predicted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from multiopt.instrument.allocator import AllocatorConfig, LoggedAllocator
from multiopt.instrument.program import EMPTY_CACHE, FREE, MALLOC, Program, between
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.record import BYTE_COLUMNS, WORK_COLUMNS
from multiopt.run import plan as planning
from multiopt.units import parse_bytes

from .support import FIXTURES

LLAMA = Config(model=f"hf:{FIXTURES / 'hf' / 'llama'}", batch=2, rules="rest=adamw", target="cuda", seq=32)
MLP = Config(model="mlp", width=256, depth=3, batch=8, rules="rest=adamw", target="cuda")


def _run(config: Config, probe: str = "fake", limit: int | None = None) -> tuple[object, list]:
    log: list = []
    record = measure(config, Protocol(probe=probe, steps=0, limit_bytes=limit), requests=log)
    return record, log


def test_a_log_names_requests_by_position_not_by_storage():
    log: list = []
    a = LoggedAllocator(log)
    a.malloc(101, 1000)
    a.malloc(102, 3 << 20)
    a.free(101)
    a.malloc(101, 24)  # the same key again (a storage id reused): a new malloc
    a.empty_cache()
    a.free(102)
    prog = Program.of(4, log)
    assert prog.ops == bytes([0, 0, 1, 0, 2, 1])
    assert prog.refs == (0, 1, 0, 3, 0, 1) and prog.sizes == (1000, 3 << 20, 0, 24, 0, 0)
    # the replay is the allocator's: the same stats as the logged one
    assert prog.replay(a.config).stats() == a.stats()


def test_one_config_makes_one_program():
    first, second = Program.of(2, _run(LLAMA)[1]), Program.of(2, _run(LLAMA)[1])
    assert len(first) > 1000 and first.same_program(second) and first.sizes == second.sizes


@pytest.mark.parametrize("probe", ["fake", "tracked"])
@pytest.mark.parametrize("config", [LLAMA, MLP], ids=["llama", "mlp"])
def test_replayed_under_a_limit_it_ends_as_the_limited_run(probe, config):
    """Limits from below the live peak (oom however the cache is used), through the band where
    reserved bytes exceed the limit but freeing cached blocks and retrying fits, to the peak."""
    free, log = _run(config, probe)
    assert free.status == "ok"
    prog = Program.of(config.batch, log)
    assert prog.replay(AllocatorConfig()).peak_reserved >= free.peak_reserved
    low, high = free.peak_total, free.peak_reserved
    assert low < high
    seen = set()
    for limit in (low - 1, low, (low + high) // 2, high - (1 << 20), high - 1, high):
        limited, limited_log = _run(config, probe, limit)
        assert prog.fits(AllocatorConfig(), limit) is (limited.status == "ok"), limit
        seen.add(limited.status)
        if limited.status == "ok":  # the same requests: the limit changes decisions, not the program
            assert Program.of(config.batch, limited_log).sizes == prog.sizes
        else:  # the same requests up to the one that failed; then only the unwinding's frees
            cut = Program.of(config.batch, limited_log)
            same = [(o, r, z) for o, r, z in zip(cut.ops, cut.refs, cut.sizes)]
            full = list(zip(prog.ops, prog.refs, prog.sizes))
            d = next(i for i, (x, y) in enumerate(zip(same, full)) if x != y)
            assert same[d - 1][0] == MALLOC and set(cut.ops[d:]) <= {FREE, EMPTY_CACHE}
    assert seen == {"ok", "oom"}


def test_between_two_batches_is_the_program_of_a_third():
    runs = {n: Program.of(n, _run(replace(MLP, batch=n))[1]) for n in (2, 3, 11)}
    predicted = between(runs[2], runs[3], 11)
    assert predicted is not None and predicted.same_program(runs[11]) and predicted.sizes == runs[11].sizes
    assert between(runs[3], runs[2], 11).sizes == runs[11].sizes  # either order
    assert between(runs[2], runs[2], 11) is None  # one batch says nothing about a slope


def test_two_programs_are_not_interpolated():
    one, two = (Program.of(n, _run(replace(LLAMA, batch=n))[1]) for n in (1, 2))
    # batch 1 squeezes its size-1 dimension: other ops, another program
    assert not one.same_program(two) and between(one, two, 5) is None


def test_a_plan_predicts_by_program_and_its_confirmation_agrees():
    """Target cuda: each class's first member is predicted by replaying its programs at
    batches 2 and 3 under the budget, and confirming finds exactly that batch (it fits, one
    more does not); so is a member whose state is far from the first's (its own programs). A
    member predicted with its state swapped by formula that misses (here SGD's step makes
    fewer temporaries than AdamW's) gets two runs of its own programs, instead of a search
    doubling away from the prediction (30 runs for this plan)."""
    base = Config(model="mlp", width=1024, depth=3, batch=1, rules="rest=adamw", target="cuda")
    axes = [planning.combo_axis(planning.preset_combos(["adamw", "sgd-momentum"])),
            planning.field_axis("dtype", "--dtype", ("float32", "bfloat16"))]
    budget = parse_bytes("160MiB")
    runner = planning.Runner(budget)
    p = planning.plan(base, axes, budget, confirm="all", runner=runner)
    assert len(p.fitting) == 4 and runner.replays > 0
    # one class per dtype (AdamW first). SGD's state is AdamW's less one parameter-sized buffer:
    # 12 MiB in float32, more than 5% of the budget (its own programs), 6 MiB in bfloat16 (shared)
    assert [r.shared for r in p.rows] == [False, False, False, True]
    assert [r.basis.startswith("its allocator program") for r in p.rows] == [True, True, True, False]
    for row in p.fitting:
        assert row.confirmed and row.batch > 3 and row.record.status == "ok"
        if not row.shared:
            assert row.predicted == row.batch, row.label
    missed = [r for r in p.fitting if r.predicted != r.batch]
    assert missed and all(r.shared for r in missed)
    # the plan says how far its predictions were from their confirmations, by what they came from
    said = planning.checks(p)
    assert "from its allocator program between batches 2 and 3: 3 of 3 exact;" in said
    worst = max(abs(r.batch - r.predicted) for r in missed)
    assert f"0 of 1 exact; 1 off, by up to {worst:,}." in said
    assert said in planning.render(p)
    assert runner.runs < 20


def test_runs_made_in_forked_workers_give_the_plan_one_process_gives():
    base = Config(model="mlp", width=512, depth=3, batch=1, rules="rest=adamw", target="cuda")
    axes = [planning.combo_axis(planning.preset_combos(["adamw", "sgd-momentum"])),
            planning.field_axis("dtype", "--dtype", ("float32", "bfloat16"))]
    budget = parse_bytes("100MiB")
    plans = {jobs: planning.plan(base, axes, budget, confirm="all", jobs=jobs) for jobs in (1, 2)}
    assert plans[1].runs == plans[2].runs
    assert planning.as_dict(plans[1])["rows"] == planning.as_dict(plans[2])["rows"]
    exact = (*BYTE_COLUMNS, *WORK_COLUMNS, "status", "batch", "combo", "dtype")  # not ids, dates, host times
    assert [[getattr(r.record, c) for c in exact] for r in plans[1].rows] == \
        [[getattr(r.record, c) for c in exact] for r in plans[2].rows]


def test_a_class_whose_batch_2_does_not_fit_is_predicted_to_fit_nothing_and_confirmed_at_batch_1():
    """Batch 1's program is not batch 2's (it is often another): below the programs' smaller
    batch nothing is predicted, and the plan confirms a row predicted to fit nothing with a run."""
    base = Config(model=f"hf:{FIXTURES / 'hf' / 'llama'}", batch=1, rules="rest=adamw", target="cuda", seq=128)
    one, two = (measure(replace(base, batch=n), Protocol(probe="fake", steps=0)) for n in (1, 2))
    budget = (one.peak_reserved + two.peak_total) // 2  # batch 1 fits; batch 2's live bytes alone do not
    assert one.peak_reserved < budget < two.peak_total
    p = planning.plan(base, [planning.combo_axis(planning.preset_combos(["adamw"]))], budget)
    row, = p.rows
    assert row.predicted == 0 and row.confirmed and row.batch == 1 and row.record.status == "ok"
