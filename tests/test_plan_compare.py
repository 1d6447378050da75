"""plan's answer beside accelerate's estimate-memory, DeepSpeed's ZeRO-2 model-states estimator
and the 16-bytes-per-parameter rule (bench/plan_compare.py prints the table for the 7B and 1B
Llama shapes; the README shows it). Cheap: the formulas on the shapes' parameter counts and on
a tiny Llama's meta model; plan itself on the tiny Llama. Each test skips without its package."""

from __future__ import annotations

import pytest

from multiopt.instrument.protocol import Config
from multiopt.run import plan as planning

from .support import FIXTURES, load_bench

compare = load_bench("plan_compare")
TINY = FIXTURES / "hf" / "llama"
#: the parameter counts the fixtures' comments state (their meta models, counted once)
SHAPES = {"llama-2-7b": 6_738_415_616, "llama-1b": 1_100_048_384}


def test_accelerate_says_four_times_the_fp32_model_which_is_the_16_byte_rule():
    pytest.importorskip("accelerate")
    model = compare.meta_model(TINY)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # RoPE's inv_freq: accelerate counts it
    assert buffers > 0 and compare.rule16(params) == 16 * params
    assert compare.accelerate_adam(model) == compare.rule16(params) + 4 * buffers


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_deepspeed_zero2_counts_20_bytes_per_parameter_on_one_gpu(shape):
    pytest.importorskip("deepspeed")
    params = SHAPES[shape]
    got = compare.deepspeed_zero2(params)
    assert got is not None
    gpu, printed = got
    assert gpu == 20 * params  # 2 B fp16 weights + 18 B (fp16 and fp32 grads, fp32 master, two moments)
    assert f"{gpu / 2**30:.2f}GB" in printed  # the table all_cold printed shows the same bytes


def test_plan_on_a_tiny_llama_holds_the_rules_model_states_plus_what_they_leave_out():
    """AdamW float32: the rules count weights + grads + two moments (16 B a parameter); plan's
    confirmed row holds exactly those (plus a 4-byte step per tensor, each allocation rounded)
    and adds activations and temporaries, which grow with the batch the rules do not see."""
    pytest.importorskip("accelerate")
    model = compare.meta_model(TINY)
    params = sum(p.numel() for p in model.parameters())
    rules16 = compare.accelerate_adam(model)
    base = Config(model=f"hf:{TINY}", seq=16, target="cpu")
    axes = [planning.combo_axis([("adamw", "rest=adamw(lr=0.001)")])]
    budget = rules16 + (2 << 20)
    p = planning.plan(base, axes, budget, confirm="all")
    (row,) = p.rows
    assert row.confirmed and row.why is None and row.batch >= 1
    r = row.record
    states = r.param_bytes + r.grad_bytes + r.opt_state_alloc_bytes
    tensors = len(list(model.parameters()))
    assert 16 * params <= states <= 16 * params + tensors * (3 * 512 + 512)
    split = planning.split(r, 0)
    assert split["activations"] + split["temporaries"] > 0 and planning.used(row) <= budget
    assert planning.used(row) > rules16  # the rule's number would not have fit this batch's peak
