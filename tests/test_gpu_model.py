"""The GPU time model (instrument/gpu.py): the spec table, the two-clock replay, and the
--gpu flag's refusals. Its accuracy is a benchmark (bench/gpu_time_model.py), not a test."""

from __future__ import annotations

import pytest

from multiopt.errors import UsageError
from multiopt.instrument.gpu import CHECKED, GPUS, MODEL, TimeModel, check_gpu, check_text, predict
from multiopt.instrument.protocol import Config, Protocol, measure, measure_work
from multiopt.instrument.work import OpWork, Work
from multiopt.run.presets import COMBOS
from multiopt.train.spec import canonical


def _op(phase="forward", flops=0, read=0, written=0, kernels=1, dtype="float32", sync=False, owner=None):
    return OpWork(phase, "aten::x", flops, read, written, kernels, dtype, owner, sync=sync)


def test_every_gpu_cites_its_figures():
    assert set(GPUS) == {"h100", "h200", "a100", "l4", "rtx4090"}
    for spec in GPUS.values():
        assert spec.sources and "nvidia" in spec.sources[0].lower() and "http" in spec.sources[0]
        assert all(k in " ".join(spec.sources) for k in ("FP32", "SMs"))
        assert spec.bandwidth > 0 and spec.sms > 0
        assert spec.peak("bfloat16") > spec.peak("float32") > spec.peak("float64")
    assert GPUS["h200"].bandwidth > GPUS["h100"].bandwidth > GPUS["a100"].bandwidth > GPUS["l4"].bandwidth


def test_a_host_bound_stream_costs_its_dispatch_whatever_the_gpu():
    ops = tuple(_op(read=4096, written=4096) for _ in range(20))
    m = TimeModel()
    h100, l4 = predict(Work(ops, "cuda"), "h100", m), predict(Work(ops, "cuda"), "l4", m)
    # the host's dispatch, then the last kernel it launched (each ran while the host went on)
    last = {g: m.kernel_us(0, 8192, "float32", GPUS[g]) for g in ("h100", "l4")}
    assert h100.step_ms == pytest.approx((m.step_us + 20 * m.op_us + last["h100"]) / 1e3)
    assert l4.step_ms == pytest.approx((m.step_us + 20 * m.op_us + last["l4"]) / 1e3)
    assert l4.step_ms - h100.step_ms < 0.01 * h100.step_ms
    assert h100.device_ms < h100.step_ms


def test_a_device_bound_kernel_runs_at_the_roofline():
    m = TimeModel()
    flops = 1e12  # a second of float32 on no GPU: the device clock wins
    w = Work((_op(flops=flops, dtype="float32"),), "cuda")
    for name in ("h100", "a100"):
        p = predict(w, name, m)
        kernel = m.floor_us / 1e3 + 1e3 * flops / (m.flops_eff * GPUS[name].peak("float32"))
        assert p.step_ms == pytest.approx(m.step_us / 1e3 + m.op_us / 1e3 + kernel)
    assert predict(w, "a100").step_ms > predict(w, "h100").step_ms
    # bf16 runs on tensor cores: the same FLOPs take far less
    assert predict(Work((_op(flops=flops, dtype="bfloat16"),), "cuda"), "h100").step_ms < predict(w, "h100").step_ms / 5
    # bytes: bandwidth-bound
    nbytes = 1e11
    p = predict(Work((_op(read=nbytes),), "cuda"), "h200", m)
    assert p.device_ms == pytest.approx(m.floor_us / 1e3 + 1e3 * nbytes / (m.bytes_eff * GPUS["h200"].bandwidth))


def test_a_sync_waits_for_the_device_and_phases_sum_to_the_step():
    m = TimeModel()
    big = _op(phase="forward", flops=1e12)
    host_only = [_op(phase="backward") for _ in range(5)]
    free = predict(Work((big, *host_only), "cuda"), "h100", m)
    synced = predict(Work((big, _op(phase="backward", kernels=0, sync=True), *host_only), "cuda"), "h100", m)
    # without the sync the host's five ops overlap the big kernel; after it they follow it
    assert synced.step_ms > free.step_ms + 4 * m.op_us / 1e3
    for p in (free, synced):
        assert sum(p.phase_ms.values()) == pytest.approx(p.step_ms)
        assert set(p.phase_ms) == {"forward", "backward"}


def test_each_optimizer_step_pays_its_python_once():
    m = TimeModel()
    one = predict(Work(tuple(_op(phase="step", owner="a") for _ in range(4)), "cuda"), "h200", m)
    two = predict(Work(tuple(_op(phase="step", owner=k) for k in "aabb"), "cuda"), "h200", m)
    assert two.step_ms - one.step_ms == pytest.approx(m.optimizer_us / 1e3)


def test_the_record_carries_the_prediction_and_what_it_was_checked_against():
    config = Config(combo="adam", rules=canonical(COMBOS["adam"]), width=64, depth=3, batch=16, target="cuda")
    record = measure(config, Protocol(probe="fake", steps=0, warmup=1, gpu="h200"))
    assert record.status == "ok", record.error
    assert record.gpu == "h200" and record.predicted_step_ms > 0
    assert record.predicted_check == CHECKED and "held out" in CHECKED and "%" in CHECKED
    phases = {w.phase: w.predicted_ms for w in record.work}
    assert sum(phases.values()) == pytest.approx(record.predicted_step_ms)
    # the same work priced on a slower GPU is never faster
    _, work = measure_work(config, Protocol(probe="fake", steps=0, warmup=1))
    assert predict(work, "l4").step_ms >= predict(work, "h200").step_ms
    assert MODEL == TimeModel()


def test_gpu_refusals_name_the_fix(run_cli):
    with pytest.raises(UsageError, match="unknown gpu"):
        check_gpu("v100", "cuda", "fake")
    with pytest.raises(UsageError, match="--target cuda"):
        check_gpu("h100", "cpu", "fake")
    with pytest.raises(UsageError, match="cuda probe"):
        check_gpu("h100", "cuda", "cuda")
    cpu_work = Work((_op(),), "cpu")
    with pytest.raises(UsageError, match="target cuda"):
        predict(cpu_work, "h100")
    r = run_cli("measure", "--probe", "fake", "--steps", "0", "--gpu", "h100")
    assert r.returncode == 2 and "--target cuda" in r.stderr and "Traceback" not in r.stderr


def test_estimate_prints_the_prediction(run_cli):
    r = run_cli("estimate", "--width", "64", "--batch", "16", "--gpu", "h100", "--json")
    assert r.returncode == 0, r.stderr
    import json

    row = json.loads(r.stdout)
    assert row["gpu"] == "h100" and row["predicted_step_ms"] > 0 and row["step_kernels"] > 0
    assert [w["phase"] for w in row["work"]] == ["forward", "backward", "step", "zero_grad"]
    assert sum(w["predicted_ms"] for w in row["work"]) == pytest.approx(row["predicted_step_ms"])


def test_profile_predicts_each_step_of_a_hand_written_loop():
    import torch

    import multiopt
    from multiopt.train.models import MLP

    torch.manual_seed(0)
    model = MLP(64, 3)
    opt = multiopt.MultiOptimizer.from_spec(model, "rest=adam(lr=1e-3)", target="cuda")
    x = torch.randn(16, 64)
    with pytest.raises(UsageError, match="--target cuda"):
        multiopt.profile(model, opt, probe="tracked", gpu="h100")
    with multiopt.profile(model, opt, probe="tracked", target="cuda", gpu="h100") as prof:
        for _ in range(3):
            torch.nn.functional.mse_loss(model(x), x).backward()
            opt.step()
            opt.zero_grad()
    first, *steady = prof.rows
    assert first["step_kernels"] > steady[0]["step_kernels"]  # the first step also creates Adam's state
    assert steady[0]["predicted_step_ms"] == steady[1]["predicted_step_ms"] > 0
    phases = sum(v for k, v in steady[0].items() if k.startswith("predicted_ms_"))
    assert phases == pytest.approx(steady[0]["predicted_step_ms"])
    # no H100 record checked the model: the record says so, and what the H200 showed
    assert steady[0]["gpu"] == "h100" and steady[0]["predicted_check"] == check_text("h100")
    assert check_text("h100").startswith("not checked on h100") and CHECKED in check_text("h100")
