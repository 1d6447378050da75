"""Warm-up steps and steadiness: the fake probe's default of one warm-up step, and the flag a
record gets when its measured step did not end where it started (`Record.step_growth`)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from multiopt.analyze.card import record_text
from multiopt.analyze.report import write_report
from multiopt.instrument.protocol import Config, Protocol, default_warmup, measure
from multiopt.kinds import Probe
from multiopt.record import ROLE, Record, Role
from multiopt.store import append_jsonl
from multiopt.units import round_alloc

from .support import ROOT, mlp, run_multiopt

LATE = "rest=tests.support:LateStateSGD(lr=0.1)"
LLAMA = f"hf:{ROOT / 'tests' / 'fixtures' / 'hf' / 'llama'}"


def _memory(r: Record) -> dict:
    """Every memory, byte and work field, the reserved reads and the per-optimizer rows."""
    names = [f.name for f in fields(Record) if f.metadata.get(ROLE) in (Role.MEMORY, Role.BYTES, Role.WORK)]
    return {**{n: getattr(r, n) for n in names}, "reserved": (r.reserved_after_step, r.peak_reserved),
            "optimizers": r.by_optimizer(), "work": [w for w in r.work]}


def test_default_warmup_is_one_on_fake_three_on_real_tensors() -> None:
    assert default_warmup(Probe.FAKE) == 1 and default_warmup(Probe.TRACKED) == 3 == default_warmup(Probe.CUDA)
    assert Protocol(probe=Probe.FAKE).warmup == 1 and Protocol().warmup == 3
    assert Protocol(probe=Probe.FAKE, warmup=4).warmup == 4 and Protocol(probe=Probe.FAKE, warmup=0).warmup == 0
    # and each record keeps the warm-up it was measured after
    config = Config(model="mlp", width=16, depth=2, batch=2, combo="sgd", rules="rest=sgd(lr=0.1)")
    assert measure(config, Protocol(probe=Probe.FAKE, steps=0)).warmup_steps == 1
    assert measure(config, Protocol(probe=Probe.TRACKED, steps=0)).warmup_steps == 3


@pytest.mark.parametrize("config", [
    Config(model="mlp", width=32, depth=2, batch=4, combo="adamw", rules="rest=adamw", target="cuda"),
    Config(model="mlp", width=32, depth=2, batch=4, combo="x", rules="rest=adam", amp="fp16", zero_grad_at="start"),
    Config(model=LLAMA, batch=2, combo="x", rules="@2d=muon; rest=adamw", target="cuda", checkpointing=1),
], ids=["mlp-adamw-cuda", "mlp-adam-fp16-start", "llama-muon-checkpointing-cuda"])
def test_fake_one_warmup_step_measures_what_three_do(config: Config) -> None:
    one = measure(config, Protocol(probe=Probe.FAKE, steps=0))
    three = measure(config, Protocol(probe=Probe.FAKE, steps=0, warmup=3))
    assert one.status == three.status == "ok", (one.error, three.error)
    assert _memory(one) == _memory(three)
    assert one.step_growth == 0 == three.step_growth and one.mem_step_end == one.mem_step_start


@pytest.mark.parametrize("probe", [Probe.FAKE, Probe.TRACKED])
def test_state_made_late_is_flagged_not_trusted(probe: str) -> None:
    config = Config(model="mlp", width=32, depth=2, batch=4, combo="late", rules=LATE)
    early = measure(config, Protocol(probe=probe, steps=0, warmup=1))
    settled = measure(config, Protocol(probe=probe, steps=0, warmup=2))
    assert early.status == settled.status == "ok", (early.error, settled.error)
    # the second step makes one buffer per parameter: the measured step grows by exactly those
    # (each rounded to 512, as the probes count an allocation); one step earlier, no state at all
    buffers = sum(round_alloc(p.numel() * 4) for p in mlp(32, 2).parameters())
    assert early.opt_state_alloc_bytes == 0 and settled.opt_state_alloc_bytes == buffers
    assert early.step_growth == buffers
    assert settled.step_growth == 0
    assert "NOT STEADY" in record_text(early) and f"({buffers:,} B) more allocated" in record_text(early)
    assert "NOT STEADY" not in record_text(settled)


def test_report_flags_the_unsteady_config_only(tmp_path) -> None:
    base = dict(model="mlp", width=32, depth=2, batch=4)
    late = measure(Config(**base, combo="late", rules=LATE), Protocol(probe=Probe.FAKE, steps=0))
    sgd = measure(Config(**base, combo="sgd", rules="rest=sgd(lr=0.1)"), Protocol(probe=Probe.FAKE, steps=0))
    assert late.step_growth > 0 and sgd.step_growth == 0
    append_jsonl(tmp_path / "run" / "results.jsonl", [late, sgd])
    report = write_report(tmp_path / "run").read_text()
    section = report[report.index("## Flagged: not steady"):].split("\n## ")[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]  # past the header
    assert rows == ["late"]


def test_estimate_card_says_not_steady() -> None:
    p = run_multiopt("estimate", "--model", "mlp", "--width", "32", "--depth", "2", "--batch", "4", "--rules", LATE)
    assert p.returncode == 0, p.stderr
    assert "NOT STEADY" in p.stdout and "--warmup N, more than this run's 1" in p.stdout
    p = run_multiopt("estimate", "--model", "mlp", "--width", "32", "--depth", "2", "--batch", "4", "--rules", LATE,
                     "--warmup", "2")
    assert p.returncode == 0 and "NOT STEADY" not in p.stdout, p.stderr


def test_fit_and_plan_say_when_their_measured_step_was_not_steady() -> None:
    from multiopt.run import plan as planning
    from multiopt.run.fit import largest, render

    config = Config(model="mlp", width=32, depth=2, batch=1, combo="late", rules=LATE)
    answer = largest(config, "batch", 1 << 20)
    assert answer.value > 0 and answer.record.step_growth > 0
    assert "NOT STEADY: the measured step of late" in render([answer], 1 << 20, model="mlp", depth=2, dtype="float32")
    p = planning.plan(config, [], 1 << 20)
    assert p.fitting and all(r.record is None or r.record.step_growth > 0 for r in p.fitting)
    assert "NOT STEADY" in planning.render(p)
    settled = planning.plan(config, [], 1 << 20, warmup=2)
    assert settled.fitting and "NOT STEADY" not in planning.render(settled)
