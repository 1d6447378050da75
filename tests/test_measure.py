"""The protocol end to end: exact state on both CPU probes, probe agreement, failures."""


import pytest

from multiopt.instrument.protocol import Config, Protocol, measure, validate
from multiopt.errors import UsageError
from multiopt.instrument.probes import round_alloc

from .support import needs_cuda

# Every registered optimizer with each option that changes its state.
STATE_CASES = [
    "rest=sgd(lr=0.01)",
    "rest=sgd(lr=0.01, momentum=0.9)",
    "rest=sgd(lr=0.01, momentum=0.9, nesterov=True)",
    "rest=adam",
    "rest=adam(amsgrad=True)",
    "rest=adamw",
    "rest=adamw(amsgrad=True)",
    "rest=adamax",
    "rest=nadam",
    "rest=radam",
    "rest=adagrad",
    "rest=adadelta",
    "rest=rmsprop",
    "rest=rmsprop(momentum=0.9)",
    "rest=rmsprop(centered=True, momentum=0.5)",
    "rest=rprop",
    "rest=asgd",
    "rest=adafactor",
    "@matrix=muon(lr=0.02); rest=adamw",
]


def _m(rules, probe, **kw):
    cfg = Config(width=kw.pop("width", 32), depth=3, batch=kw.pop("batch", 8), rules=rules, combo="t", **kw)
    return measure(cfg, Protocol(probe=probe, warmup=2, steps=2))


HOST_READERS = ("rest=asgd", "rest=adafactor")


@pytest.mark.parametrize("probe", ["tracked", "fake"])
@pytest.mark.parametrize("rules", STATE_CASES)
def test_measured_state_equals_the_algorithm_on_both_cpu_probes(rules, probe):
    if probe == "fake" and rules in HOST_READERS:
        # these read values on the host every step: refused up front, an error record if run anyway
        with pytest.raises(UsageError, match="fake probe cannot run"):
            validate(Config(rules=rules), Protocol(probe="fake"))
        r = _m(rules, probe)
        assert r.status == "error" and "reads tensor values" in r.error
        return
    r = _m(rules, probe)
    assert r.status == "ok", r.error
    assert r.opt_state_bytes == r.opt_state_expected
    for o in r.by_optimizer():
        assert o["state_bytes"] == o["expected"], o


@pytest.mark.parametrize("rules", ["rest=adam", "@matrix=muon(lr=0.02); rest=adamw", "rest=sgd(momentum=0.9)"])
def test_bfloat16_state_follows_the_parameter_dtype(rules):
    r = _m(rules, "tracked", dtype="bfloat16")
    f = _m(rules, "tracked")
    assert r.status == f.status == "ok"
    assert r.opt_state_bytes == r.opt_state_expected
    assert r.param_bytes < f.param_bytes
    # per-element state halves; scalars (step) stay float32
    assert r.opt_state_bytes - r.opt_state_scalar_bytes == (f.opt_state_bytes - f.opt_state_scalar_bytes) // 2


def test_adam_numbers_by_hand():
    """MLP width 32 depth 3: 3 x (32*32 + 32) = 3168 params, 6 tensors."""
    r = _m("rest=adam", "tracked")
    assert r.n_params == 3168
    assert r.param_bytes == 3 * (round_alloc(32 * 32 * 4) + round_alloc(32 * 4))
    assert r.grad_bytes == r.param_bytes
    assert r.opt_state_bytes == 2 * 3168 * 4 + 6 * 4  # m, v per element; one float32 step per tensor
    assert r.opt_state_alloc_bytes == 2 * r.param_bytes + 6 * 512
    # at the start of a step only params, state and the batch (x, y: 8 x 32 float32 each) live
    assert r.mem_step_start == r.param_bytes + r.opt_state_alloc_bytes + 2 * round_alloc(8 * 32 * 4)
    # backward adds exactly the gradients
    assert r.mem_after_backward - r.mem_after_forward <= r.grad_bytes
    assert r.mem_after_step == r.mem_after_backward  # Adam updates in place
    assert r.mem_after_zero_grad == r.mem_step_start + 512  # grads freed; the returned loss lives on
    assert r.peak_total == max(r.peak_forward, r.peak_backward, r.peak_step, r.peak_zero_grad)


PHASE_FIELDS = [
    "param_bytes", "grad_bytes", "opt_state_bytes", "opt_state_alloc_bytes", "mem_step_start",
    "mem_after_zero_grad", "peak_zero_grad", "mem_after_forward", "peak_forward", "mem_after_backward",
    "peak_backward", "mem_after_step", "peak_step", "step_temp_bytes", "peak_total", "optimizers",
]

AGREE_CASES = [
    dict(width=16, batch=4, rules="rest=sgd(lr=0.01)"),
    dict(width=64, batch=32, rules="rest=sgd(lr=0.01, momentum=0.9)"),
    dict(width=32, batch=8, rules="rest=adam", impl="forloop"),
    dict(width=32, batch=8, rules="rest=adam", impl="foreach"),
    dict(width=32, batch=8, rules="rest=adam", impl="fused"),
    dict(width=48, batch=16, rules="rest=adamw", impl="foreach"),
    dict(width=64, batch=8, rules="layer1=sgd(lr=0.01); rest=adam"),
    dict(width=64, batch=8, rules="layer1=adam; rest=sgd(lr=0.01)", impl="foreach"),
    dict(width=32, batch=16, rules="@matrix=muon(lr=0.02); rest=adamw"),
    dict(width=32, batch=4, rules="rest=adagrad", impl="fused"),
    dict(width=40, batch=8, rules="rest=rmsprop(centered=True)"),
    dict(width=32, batch=8, rules="rest=nadam"),
    dict(width=32, batch=8, rules="rest=adam", zero_grad_at="start"),
    dict(width=32, batch=8, rules="rest=sgd(momentum=0.9)", dtype="bfloat16", impl="foreach"),
    # fp16 AMP: on fake tensors the GradScaler steps without reading its inf checks, as an
    # iteration without overflow does on real ones
    dict(width=32, batch=8, rules="rest=adam", amp="fp16"),
    dict(width=64, batch=8, rules="layer1=sgd(lr=0.01, momentum=0.9); rest=adam", amp="fp16", impl="fused"),
    dict(width=64, batch=16, rules="rest=adamw", amp="fp16", target="cuda"),
]


@pytest.mark.parametrize("case", AGREE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_tracked_and_fake_agree_to_the_byte_on_every_phase(case):
    case = dict(case)
    rules = case.pop("rules")
    t = _m(rules, "tracked", **case)
    f = _m(rules, "fake", **case)
    assert t.status == f.status == "ok", (t.error, f.error)
    for field in [*PHASE_FIELDS, "reserved_after_step", "peak_reserved"]:  # reserved: target cuda only
        assert getattr(t, field) == getattr(f, field), field


def test_foreach_holds_step_temporaries_that_fused_does_not():
    by = {impl: _m("rest=adam", "tracked", width=64, impl=impl) for impl in ("forloop", "foreach", "fused")}
    assert by["foreach"].step_temp_bytes > by["forloop"].step_temp_bytes >= by["fused"].step_temp_bytes
    assert by["fused"].step_temp_bytes == 0
    assert {o["impl"] for o in by["fused"].by_optimizer()} == {"fused"}


def test_per_optimizer_step_temporaries_are_attributed():
    r = _m("layer1=sgd(lr=0.01); rest=adam", "tracked", width=64, impl="foreach")
    opts = {o["name"]: o for o in r.by_optimizer()}
    assert opts["layer1=sgd"]["state_bytes"] == 0
    assert opts["rest=adam"]["step_temp_bytes"] > 0
    assert max(o["step_temp_bytes"] for o in opts.values()) <= r.step_temp_bytes


def test_limit_bytes_becomes_oom_with_the_numbers_measured_so_far():
    ok = _m("rest=adam", "tracked", width=64)
    # enough for the model, not for Adam's state
    limit = ok.param_bytes + ok.opt_state_alloc_bytes // 2
    cfg = Config(width=64, depth=3, batch=8, rules="rest=adam", combo="adam")
    r = measure(cfg, Protocol(probe="tracked", warmup=2, steps=2, limit_bytes=limit))
    assert r.status == "oom"
    assert "out of memory" in r.error.lower()
    assert r.param_bytes == ok.param_bytes and r.n_params == ok.n_params
    assert r.peak_total is None
    # and the process goes on measuring
    assert _m("rest=sgd", "tracked").status == "ok"


def test_a_huge_learning_rate_is_recorded_as_diverged():
    r = _m("rest=sgd(lr=1e9)", "tracked")
    assert r.status == "diverged"
    assert "lower the learning rate" in r.error
    assert r.param_bytes is not None


def test_an_exception_inside_a_config_is_an_error_record():
    r = measure(Config(rules="layer9=adam; rest=sgd", combo="x", width=16), Protocol(steps=1))
    assert r.status == "error" and "layer9=adam" in r.error


def test_validate_rejects_bad_configs_before_any_compute():
    with pytest.raises(UsageError, match="layer9"):
        validate(Config(rules="layer9=adam; rest=sgd"))
    with pytest.raises(UsageError, match="unknown dtype"):
        validate(Config(dtype="float8"))
    with pytest.raises(UsageError, match="only takes 2-D"):
        validate(Config(rules="layer1=muon; rest=adam"))
    validate(Config(amp="fp16"), Protocol(probe="fake"))  # its scaler steps without reading inf checks


def test_fake_probe_estimates_a_config_larger_than_this_machine():
    """(How fast: bench/wall_times.py, target 2 s; a test asserts no wall time.)"""
    r = measure(Config(width=16384, depth=8, batch=512, rules="rest=adam", combo="adam"), Protocol(probe="fake"))
    assert r.status == "ok", r.error
    n = 8 * (16384 * 16384 + 16384)
    assert r.n_params == n
    assert r.opt_state_bytes == 2 * 4 * n + 16 * 4
    assert r.peak_total > 4 * 4 * n  # params + grads + m + v, at least


def test_timing_is_reported_on_computing_probes_only():
    t = _m("rest=sgd", "tracked")
    f = _m("rest=sgd", "fake")
    # 2 samples, each the mean of an equal block of steps
    assert t.steps_timed >= 2 and t.steps_timed % 2 == 0 and 0 < t.step_ms_min <= t.step_ms_median
    assert f.steps_timed == 0 and f.step_ms_median is None


def test_amp_configs_run():
    for amp in ("bf16", "fp16"):
        r = _m("layer1=sgd(lr=0.01); rest=adam", "tracked", amp=amp)
        assert r.status == "ok", r.error
        assert r.opt_state_bytes == r.opt_state_expected


@needs_cuda
@pytest.mark.parametrize("rules", ["rest=sgd(momentum=0.9)", "rest=adam", "rest=adam(fused=True)",
                                   "@matrix=muon(lr=0.02); rest=adamw", "layer1=sgd(lr=0.01); rest=adam"])
def test_cuda_record_matches_the_formula_and_the_tracked_probe(rules):
    cfg = Config(width=256, depth=3, batch=32, rules=rules, combo="t", device="cuda")
    r = measure(cfg, Protocol(probe="cuda", warmup=2, steps=3))
    t = measure(Config(width=256, depth=3, batch=32, rules=rules, combo="t"), Protocol(probe="tracked", warmup=2, steps=3))
    assert r.status == t.status == "ok", (r.error, t.error)
    assert r.opt_state_bytes == r.opt_state_expected == t.opt_state_bytes
    # built before any kernel ran: parameters are the same bytes on both
    assert r.param_bytes == t.param_bytes and r.n_params == t.n_params
    assert r.grad_bytes == t.grad_bytes
    assert r.step_ms_median > 0 and r.steps_timed >= 3 and r.steps_timed % 3 == 0  # 3 samples, equal blocks


def test_estimate_command_is_measure_on_the_fake_probe(run_cli):
    import json as _json

    est = run_cli("estimate", "--width", "64", "--batch", "8", "--combo", "sgd+adam", "--json")
    # estimate defaults to --target cuda; measure keeps CPU semantics unless asked
    meas = run_cli("measure", "--width", "64", "--batch", "8", "--combo", "sgd+adam", "--probe", "tracked",
                   "--target", "cuda", "--json")
    assert est.returncode == meas.returncode == 0, est.stderr + meas.stderr
    e, m = _json.loads(est.stdout), _json.loads(meas.stdout)
    assert e["probe"] == "fake" and e["steps_timed"] == 0
    for field in ("param_bytes", "opt_state_bytes", "peak_forward", "peak_backward", "peak_step", "peak_total"):
        assert e[field] == m[field], field
    bad = run_cli("estimate", "--combo", "adafactor")
    assert bad.returncode == 2 and "fake probe cannot run" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_the_printed_record_gives_every_byte_field_in_human_units_and_raw() -> None:
    """`measure`/`estimate` print a card: each byte field (reserved ones too) as '1.50 MiB'
    beside its exact count, so no number is left for the reader to convert."""
    from multiopt.analyze.card import record_text
    from multiopt.units import fmt_bytes

    record = measure(Config(width=64, depth=2, batch=8, combo="adam", rules="rest=adam(lr=0.001)", target="cuda"),
                     Protocol(probe="fake", steps=0))
    assert record.status == "ok" and record.reserved_after_step and record.peak_reserved
    lines = {line.split("|")[1].strip(): line for line in record_text(record).splitlines() if line.startswith("| ")}
    for field in ("reserved_after_step", "peak_reserved", "peak_total", "mem_after_step", "opt_state_bytes"):
        value = getattr(record, field)
        cells = [c.strip() for c in lines[field].split("|")[1:-1]]
        assert cells == [field, fmt_bytes(value), f"{value:,}"], lines[field]
