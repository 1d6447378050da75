"""Work counters (instrument/work.py): FLOPs as FlopCounterMode counts them, bytes and
kernels from shapes, the same on the tracked and fake probes and from run to run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from multiopt.instrument.protocol import Config, Protocol, measure_work, model_factory, training
from multiopt.instrument.work import KERNEL_ARG_LIMITS, CHUNK, mta_launches
from multiopt.run.presets import COMBOS, preset_configs
from multiopt.train.spec import canonical


class ExtraPassSGD(torch.optim.SGD):
    """SGD whose step makes one more elementwise pass over every parameter."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1.0)
        return loss


def _config(combo: str = "adam", **kw) -> Config:
    rules = kw.pop("rules", COMBOS.get(combo, combo))
    return Config(combo=combo, rules=canonical(rules), **{"width": 64, "depth": 3, "batch": 16, **kw})


def _work(config: Config, probe: str = "fake"):
    record, work = measure_work(config, Protocol(probe=probe, steps=0, warmup=1))
    assert record.status == "ok", record.error
    return record, work


def _counters(record):
    return (record.step_flops, record.step_bytes, record.step_kernels,
            [(w.phase, w.flops, w.bytes, w.kernels) for w in record.work],
            [(o.name, o.work_flops, o.work_bytes, o.work_kernels) for o in record.optimizers])


# -- multi_tensor_apply, replayed (MultiTensorApply.cuh) -------------------------------------

def test_mta_one_launch_until_a_limit_fills():
    assert mta_launches([10] * 5, depth=1) == 1
    assert mta_launches([], depth=1) == 0
    assert mta_launches([0, 0], depth=2) == 0  # empty tensors are skipped
    small = KERNEL_ARG_LIMITS[False]
    # 4 KB argument build, depth 1: 110 tensors per launch
    assert mta_launches([1] * 110, depth=1, large_args=False) == 1
    assert mta_launches([1] * 111, depth=1, large_args=False) == 2
    # a scalar list has its own, smaller limit (96 at depth 1)
    assert mta_launches([1] * 97, depth=1, scalarlist=True, large_args=False) == 2
    assert mta_launches([1] * 97, depth=1, scalarlist=False, large_args=False) == 1
    # blocks: one per 65536-element chunk, 320 per launch; the tensor that overflows carries on
    assert mta_launches([CHUNK * 320], depth=1, large_args=False) == 1
    assert mta_launches([CHUNK * 321], depth=1, large_args=False) == 2
    assert mta_launches([CHUNK * 320 + 1], depth=3, large_args=False) == 2
    assert small["blocks"][0] == 320
    # the 32 KB build (CUDA >= 12.1): 770 tensors, 2240 blocks at depth 1; 210 tensors at depth 5
    assert mta_launches([1] * 770, depth=1) == 1
    assert mta_launches([1] * 771, depth=1) == 2
    assert mta_launches([1] * 211, depth=5) == 2
    assert mta_launches([CHUNK * 2241], depth=1) == 2


# -- acceptance: FLOPs as torch counts them ----------------------------------------------------

@pytest.mark.parametrize("combo,model,target", [("adam", "mlp", "cpu"), ("muon+adamw", "mlp", "cuda"),
                                                ("sgd+adam", "transformer", "cuda")])
def test_step_flops_equal_flop_counter_mode(combo, model, target):
    config = _config(combo, model=model, target=target, depth=2 if model == "transformer" else 3,
                     batch=8 if model == "transformer" else 16)
    record, _ = _work(config, "tracked")
    # the same step on plain tensors, under torch's own counter
    torch.manual_seed(config.seed)
    plain = model_factory(config)()
    _, trainer, batch = training(config, plain, "cpu")
    trainer.train_step(batch)  # state exists: the counted step is a steady one, as the protocol's
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    assert record.step_flops == counter.get_total_flops() > 0


# -- deterministic, and the same on both CPU probes ---------------------------------------------

@pytest.mark.parametrize("config", [
    _config("adam", target="cuda"), _config("muon+adamw", target="cuda"), _config("sgd+adam"),
    _config("adamw", impl="fused", target="cuda"), _config("sgd-momentum", impl="forloop", target="cuda"),
    _config("adam", model="transformer", depth=2, batch=8, target="cuda"),
], ids=lambda c: c.label())
def test_counters_equal_on_tracked_and_fake_and_across_runs(config):
    tracked, t_ops = _work(config, "tracked")
    fake, f_ops = _work(config, "fake")
    again, a_ops = _work(config, "fake")
    assert _counters(tracked) == _counters(fake) == _counters(again)
    assert t_ops.ops == f_ops.ops == a_ops.ops  # op by op


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_every_quick_preset_config_counts_the_same_on_both_probes_and_twice(target):
    for config in preset_configs("quick"):
        config = dataclasses.replace(config, target=target)
        tracked, _ = _work(config, "tracked")
        again, _ = _work(config, "tracked")
        assert _counters(tracked) == _counters(again), config.label()
        if "adafactor" in config.rules:
            continue  # the fake probe refuses Adafactor (it reads its step with .item())
        fake, _ = _work(config, "fake")
        assert _counters(tracked) == _counters(fake), config.label()


# -- what the counters count --------------------------------------------------------------------

def test_phases_and_optimizers_sum_to_the_step():
    record, work = _work(_config("sgd+adam", target="cuda"))
    assert sum(w.flops for w in record.work) == record.step_flops
    assert sum(w.bytes for w in record.work) == record.step_bytes
    assert sum(w.kernels for w in record.work) == record.step_kernels
    step = next(w for w in record.work if w.phase == "step")
    assert sum(o.work_bytes for o in record.optimizers) == step.bytes
    assert sum(o.work_kernels for o in record.optimizers) == step.kernels
    assert all(o.work_kernels > 0 for o in record.optimizers)
    # forward of an MLP: one addmm per layer, 2 * batch * width^2 FLOPs each
    fwd = next(w for w in record.work if w.phase == "forward")
    assert fwd.flops == 3 * 2 * 16 * 64 * 64


def test_one_more_elementwise_pass_in_the_step_is_counted_exactly():
    base = _config("sgd", rules="rest=sgd(lr=0.01)", target="cuda")
    extra = dataclasses.replace(base, rules=canonical(f"rest={__name__}:ExtraPassSGD(lr=0.01)"))
    b, _ = _work(base, "tracked")
    e, _ = _work(extra, "tracked")
    n_tensors = b.optimizers[0].n_param_tensors
    param_bytes = sum(4 * (64 * 64 + 64) for _ in range(3))
    assert e.step_flops == b.step_flops
    assert e.step_kernels - b.step_kernels == n_tensors  # one mul_ per parameter
    assert e.step_bytes - b.step_bytes == 2 * param_bytes  # each read and written once
    before = {w.phase: w for w in b.work}
    after = {w.phase: w for w in e.work}
    assert {p for p in before if before[p] != after[p]} == {"step"}
    assert e.optimizers[0].work_kernels - b.optimizers[0].work_kernels == n_tensors


def test_target_cuda_follows_cudas_kernels():
    # foreach Adam: one launch per foreach op over the device lists; the step counters live
    # on the host under CUDA, so their increment launches nothing
    _, foreach = _work(_config("adam", target="cuda"))
    steps = [o for o in foreach.ops if o.phase == "step" and o.op.startswith("aten::_foreach")]
    assert [o.kernels for o in steps if not o.host] == [1] * len([o for o in steps if not o.host])
    assert any(o.host and o.op == "aten::_foreach_add_" for o in steps)
    # fused: the whole update in one launch, plus the on-device step increment
    _, fused = _work(_config("adam", impl="fused", target="cuda"))
    kernels = [(o.op, o.kernels) for o in fused.ops if o.phase == "step" and o.kernels]
    assert kernels == [("aten::_foreach_add_", 1), ("aten::_fused_adam_", 1)]
    # forloop: one launch per op per parameter, many more than foreach
    _, forloop = _work(_config("adam", impl="forloop", target="cuda"))
    count = lambda w: sum(o.kernels for o in w.ops if o.phase == "step")  # noqa: E731
    assert count(forloop) > 4 * count(foreach) > 4 * count(fused)
    # target cpu: a foreach op is the CPU's per-tensor loop
    _, cpu = _work(_config("adam", impl="foreach"))
    lerp = next(o for o in cpu.ops if o.op == "aten::_foreach_lerp_")
    assert lerp.kernels == lerp.tensors == 6


def test_views_move_nothing_and_broadcasts_are_read_once():
    _, work = _work(_config("sgd", target="cuda"))
    views = [o for o in work.ops if o.op in ("aten::t", "aten::view", "aten::expand")]
    assert views and all(o.kernels == 0 and o.bytes == 0 for o in views)
    # addmm reads the bias (64 floats, broadcast over the batch) once: x, W, b -> out
    addmm = next(o for o in work.ops if o.op == "aten::addmm")
    assert addmm.read == 4 * (16 * 64 + 64 * 64 + 64) and addmm.written == 4 * 16 * 64


def test_cuda_probe_counts_nothing_and_counting_can_be_off():
    record, work = measure_work(_config("sgd"), Protocol(probe="tracked", steps=0, warmup=1, count_work=False))
    assert work is None and record.step_flops is None and record.work == ()


# -- the gate: work is compared exactly, naming phase and optimizer ---------------------------

def test_gate_fails_on_one_more_pass_naming_phase_and_optimizer(monkeypatch):
    from multiopt.analyze import gate

    config = _config("sgd+adam", target="cuda")
    baseline, _ = _work(config, "tracked")
    # the same config, but SGD's step now makes one more elementwise pass over its parameters
    original = torch.optim.SGD.step

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = original(self, closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1.0)
        return loss

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    current, _ = _work(config, "tracked")
    monkeypatch.undo()
    res = gate.compare([baseline], [current], only="memory,work")
    bad = {v.metric: v for v in res.regressions}
    assert res.exit_code == 1
    assert set(bad) == {"work:step:bytes", "work:step:kernels", "work:step[layer1=sgd]:bytes",
                        "work:step[layer1=sgd]:kernels"}
    assert "optimizer layer1=sgd (sgd)" in bad["work:step[layer1=sgd]:kernels"].detail
    assert bad["work:step:kernels"].new - bad["work:step:kernels"].old == 2  # weight and bias of layer1
    assert "work:step[layer1=sgd]:kernels" in gate.render(res)
    # unchanged work passes at tolerance 0; a record without counters now is a regression
    same = gate.compare([baseline], [baseline], only="work")
    assert same.exit_code == 0 and same.unchanged
    gone = gate.compare([baseline], [dataclasses.replace(baseline, work=())], only="work")
    assert gone.exit_code == 1 and all(v.missing for v in gone.regressions)
