"""A run's allocator program (instrument/program.py): replayed under a limit it ends as the
limited run does, request for request; between two batches of one program it is the program
a run at a third batch makes; and a plan built on it confirms what it predicted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from multiopt.instrument.allocator import AllocatorConfig, LoggedAllocator
from multiopt.instrument.program import EMPTY_CACHE, FREE, MALLOC, Program, between, repeated, spans, spliced
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.record import BYTE_COLUMNS, WORK_COLUMNS
from multiopt.run import plan as planning
from multiopt.units import parse_bytes

from .support import FIXTURES

LLAMA = Config(model=f"hf:{FIXTURES / 'hf' / 'llama'}", batch=2, rules="rest=adamw", target="cuda", seq=32)
MLP = Config(model="mlp", width=256, depth=3, batch=8, rules="rest=adamw", target="cuda")


def _run(config: Config, probe: str = "fake", limit: int | None = None, grads: str = "backward") -> tuple[object, list]:
    log: list = []
    record = measure(config, Protocol(probe=probe, steps=0, limit_bytes=limit), requests=log, grads=grads)
    return record, log


def _until_end(p: Program) -> tuple:
    """A program up to its run's "end" mark (after it: the teardown's frees), with its marks."""
    end = next(pos for pos, name in p.marks if name == "end")
    return p.ops[:end], p.refs[:end], p.sizes[:end], p.stages, p.marks, p.grads


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


@pytest.mark.parametrize("config", [LLAMA, replace(LLAMA, amp="bf16", checkpointing=1)], ids=["llama", "bf16-ckpt"])
def test_one_config_makes_one_program(config):
    """bf16 autocast under checkpointing frees its cast cache in an order that follows storage
    addresses (another each run): a program keeps each burst of frees in its mallocs' order."""
    first, second = Program.of(2, _run(config)[1]), Program.of(2, _run(config)[1])
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
    more does not); so is a member whose state is far from the first's (the first's programs
    with its own optimizers' requests spliced in, from one run of their side alone). A
    member predicted with its state swapped by formula that misses (here SGD's step makes
    fewer temporaries than AdamW's) gets programs of its own, instead of a search doubling
    away from the prediction (30 runs for this plan)."""
    base = Config(model="mlp", width=1024, depth=3, batch=1, rules="rest=adamw", target="cuda")
    axes = [planning.combo_axis(planning.preset_combos(["adamw", "sgd-momentum"])),
            planning.field_axis("dtype", "--dtype", ("float32", "bfloat16"))]
    budget = parse_bytes("160MiB")
    runner = planning.Runner(budget)
    p = planning.plan(base, axes, budget, confirm="all", runner=runner)
    assert len(p.fitting) == 4 and runner.replays > 0
    # one class per dtype (AdamW first). SGD's state is AdamW's less one parameter-sized buffer:
    # 12 MiB in float32, more than 5% of the budget (spliced programs), 6 MiB in bfloat16 (shared)
    assert [r.shared for r in p.rows] == [False, False, False, True]
    assert [r.basis.startswith("its allocator program") for r in p.rows] == [True, True, False, False]
    assert "spliced in" in p.rows[2].basis and runner.step_runs >= 1
    for row in p.fitting:
        assert row.confirmed and row.batch > 3 and row.record.status == "ok"
        if not row.shared:
            assert row.predicted == row.batch, row.label
    missed = [r for r in p.fitting if r.predicted != r.batch]
    assert missed and all(r.shared for r in missed)
    # a program's replay models the limited allocator: its rows' misses are their own (only the
    # approximations a class shares, state swapped by formula or phase peaks, move each other)
    assert all(r.bias == 0 for r in p.rows if not r.approximate)
    # the plan says how far its predictions were from their confirmations, by what they came from
    said = planning.checks(p)
    assert "from its allocator program between batches 2 and 3: 2 of 2 exact;" in said
    assert "from its class's allocator program, its own optimizers' requests spliced in: 1 of 1 exact;" in said
    worst = max(abs(r.batch - r.predicted) for r in missed)
    assert f"0 of 1 exact; 1 off, by up to {worst:,}." in said
    assert said in planning.render(p)
    assert runner.runs < 20
    # the class programs' runs and the spliced member's are partial, and the plan says how many
    assert p.partial == runner.step_runs + runner.once_runs >= 3
    assert f"{p.runs} fake runs ({p.partial} of them partial" in planning.render(p)
    assert planning.as_dict(p)["fake_runs_partial"] == p.partial


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


@pytest.mark.parametrize("probe,config", [("fake", LLAMA), ("tracked", replace(LLAMA, checkpointing=1)),
                                          ("fake", MLP), ("tracked", MLP)],
                         ids=["llama-fake", "llama-ckpt-tracked", "mlp-fake", "mlp-tracked"])
def test_another_members_optimizers_spliced_in_make_the_program_its_own_run_makes(probe, config):
    """A member of the class (same model, other optimizers): the first member's programs with
    the member's optimizers' requests spliced in (from a run of their side alone: gradients
    made by hand, no forward or backward) are the programs the member's own runs make, request
    for request, at batch 2 and between batches 2 and 3 at 7. Muon's step makes the cuBLAS
    workspaces' first matmul unless the model's forward has (the hand-made step does one)."""
    first = {n: Program.of(n, _run(replace(config, batch=n), probe)[1]) for n in (2, 3)}
    names = [s[0] for s in spans(first[2])]  # the warm-up steps (the probe's number), the instrumented one
    assert names[0] == "optimizer" and names[1:] == ["step", "zero_grad"] * first[2].grads.__len__()
    assert len(first[2].grads) >= 2  # the gradient table before each step
    for rules in ("rest=sgd(lr=0.1)", "rest=sgd(lr=0.1,momentum=0.9)", "@2d=muon(lr=0.02); rest=adamw",
                  "rest=adam(foreach=False)"):
        member = replace(config, rules=rules)
        record, log = _run(member, probe, grads="by-hand")
        assert record.status == "ok", record.error
        steps = Program.of(2, log)
        assert not any(name.startswith("forward") for _, name in steps.marks)  # the optimizers' side alone
        for n in (2, 7):
            own = Program.of(n, _run(replace(member, batch=n), probe)[1])
            base = first[n] if n in first else between(first[2], first[3], n)
            made = spliced(base, steps)
            assert made is not None and _until_end(made) == _until_end(own), (rules, n)
            assert made.replay(AllocatorConfig()).peak_reserved == own.replay(AllocatorConfig()).peak_reserved


def test_a_splice_that_cannot_be_made_is_refused():
    """Other trainable parameters (LoRA freezes the base: other gradient tables), or a model
    request that frees what the base's optimizers made, give no program, never a wrong one."""
    plain = Program.of(2, _run(LLAMA)[1])
    lora = Program.of(2, _run(replace(LLAMA, lora="r=8"), grads="by-hand")[1])
    assert spliced(plain, lora) is None
    # the same run with its gradient tables cut: its optimizers' frees of gradients name nothing
    steps = Program.of(2, _run(replace(LLAMA, rules="rest=sgd(lr=0.1)"), grads="by-hand")[1])
    assert spliced(plain, steps) is not None
    assert spliced(plain, replace(steps, grads=tuple((pos, (-1,) * len(t)) for pos, t in steps.grads))) is None


def test_the_optimizers_side_alone_needs_a_log_and_a_backward_free_trainer():
    record = measure(MLP, Protocol(probe="fake", steps=0), grads="by-hand")  # no requests: nothing to keep
    assert record.status == "error" and "give `requests`" in record.error
    record = measure(MLP, Protocol(probe="fake", steps=0), requests=[], grads="by hand")
    assert record.status == "error" and "give one of backward, by-hand, last-by-hand" in record.error
    record, _ = _run(replace(MLP, step_in_backward=1), grads="by-hand")
    assert record.status == "error" and "step_in_backward" in record.error


def _until_last_step(p: Program) -> tuple:
    """A program up to its last step's end (a tracked run checks its parameters after), the
    stages its requests there name, its marks and gradient tables there."""
    end = [pos for pos, name in p.marks if name == "train_step:after"][-1]
    named = sorted({p.refs[i] for i in range(end) if p.ops[i] == 3})
    return (p.ops[:end], p.refs[:end], p.sizes[:end], [p.stages[i] for i in named],
            [m for m in p.marks if m[0] <= end and m[1] != "end"], p.grads)


@pytest.mark.parametrize("probe,config", [
    ("fake", LLAMA), ("fake", replace(LLAMA, checkpointing=1, lora="r=8", rules="rest=adamw")),
    ("fake", replace(LLAMA, rules="@2d=muon(lr=0.02); rest=adamw", amp="bf16")),
    ("tracked", replace(MLP, zero_grad_at="start")), ("tracked", replace(LLAMA, checkpointing=1)),
    ("fake", replace(LLAMA, step_in_backward=1, checkpointing=1, amp="bf16")),
    ("tracked", replace(MLP, step_in_backward=1, rules="@2d=muon(lr=0.02); rest=adamw"))],
    ids=["llama", "llama-ckpt-lora", "llama-muon-bf16", "mlp-zero-grad-at-start-tracked", "llama-ckpt-tracked",
         "llama-step-in-backward-ckpt-bf16", "mlp-step-in-backward-muon-tracked"])
def test_a_step_made_again_from_the_one_before_is_the_step_a_run_makes(probe, config):
    """A run whose last step makes its gradients by hand, with that step's model side made
    again from the step before's (`repeated`), is the run's program, request for request: the
    first step makes what persists (cuBLAS workspaces), later steps the same requests. With
    step_in_backward each parameter's step is a span of its own, made by hand in the order
    the backward before stepped them."""
    full = Program.of(config.batch, _run(config, probe)[1])
    record, log = _run(config, probe, grads="last-by-hand")
    assert record.status == "ok", record.error
    half = Program.of(config.batch, log)
    assert len(half) < len(full)  # one forward and backward fewer
    made = repeated(half)
    assert made is not None and _until_last_step(made) == _until_last_step(full)


def test_a_step_is_not_made_again_without_two_steps():
    log: list = []
    a = LoggedAllocator(log)
    a.malloc(1, 512)
    log.append(("mark", "end"))
    assert repeated(Program.of(2, log)) is None
    # the same run with its gradient tables cut: the last step's frees of gradients name nothing
    half = Program.of(2, _run(MLP, grads="last-by-hand")[1])
    assert repeated(half) is not None
    assert repeated(replace(half, grads=tuple((pos, (-1,) * len(t)) for pos, t in half.grads))) is None


def test_the_optimizers_requests_do_not_depend_on_checkpointing():
    """What lets a plan take one step-only run for both checkpointing values (`_step_key`):
    the requests of a plain model's optimizers, spliced into a checkpointed class's programs,
    are the checkpointed member's own."""
    member = replace(LLAMA, checkpointing=1, rules="rest=sgd(lr=0.1,momentum=0.9)")
    first = Program.of(2, _run(replace(member, rules="rest=adamw"))[1])
    plain_steps = Program.of(2, _run(replace(member, checkpointing=0), grads="by-hand")[1])
    own = Program.of(2, _run(member)[1])
    made = spliced(first, plain_steps)
    assert made is not None and _until_end(made) == _until_end(own)
    assert planning._step_key(member) == planning._step_key(replace(member, checkpointing=0, batch=9))


def test_two_formula_candidates_with_one_twin_are_each_predicted_for_their_own_room():
    """Adafactor and ASGD read tensor values: each runs as the same SGD twin with its own state
    by formula held aside, so they share the twin's programs but not the room they are searched
    under. Each is predicted for its own room, and its confirmation agrees (the second used to
    be given the first's answer)."""
    base = Config(model="mlp", width=1024, depth=3, batch=1, rules="rest=adamw", target="cuda")
    axes = [planning.combo_axis([("adamw", "rest=adamw"), ("adafactor", "rest=adafactor"), ("asgd", "rest=asgd")])]
    budget = parse_bytes("160MiB")
    p = planning.plan(base, axes, budget, confirm="all")
    adafactor, asgd = p.rows[1], p.rows[2]
    assert adafactor.formula and asgd.formula and adafactor.formula.twin_rules == asgd.formula.twin_rules
    assert asgd.formula.state > adafactor.formula.state
    assert adafactor.confirmed and asgd.confirmed and asgd.batch < adafactor.batch
    assert (adafactor.predicted, asgd.predicted) == (adafactor.batch, asgd.batch)


def test_what_a_confirmed_row_uses_is_its_runs_peak_reserved_not_its_last_phases():
    """At its boundary a run under the budget fills it: the allocator releases cached blocks and
    retries, so reserved memory drops, and a record's peak reserved (since its last phase began,
    as CUDA's max_memory_reserved after the probe's per-phase resets) can be below an earlier
    phase's allocated peak. What the row uses is the whole run's peak reserved, from its program
    replayed under the limit: never past the budget, never below the allocated peak."""
    base = Config(model="mlp", width=512, depth=3, batch=1, rules="rest=adamw", target="cuda")
    axes = [planning.combo_axis(planning.preset_combos(["adamw", "sgd-momentum"]))]
    budget = parse_bytes("512MiB")
    p = planning.plan(base, axes, budget, confirm="all")
    assert len(p.fitting) == 2
    for row in p.fitting:
        parts = planning.split(row.record, 0, formula_state=0, reserved=row.reserved)
        assert parts["allocator slack"] >= 0 and planning.used(row) <= budget
        assert row.reserved >= max(planning.metric(row.record), row.record.peak_total)
    assert any(row.reserved > planning.metric(row.record) for row in p.fitting)  # what the record alone missed
