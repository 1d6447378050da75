"""The model zoo (transformer) and bringing your own model by import path."""

from __future__ import annotations

import json
import math
from collections import UserDict

import pytest
import torch
from torch import nn

from multiopt.train import models
from multiopt.errors import UsageError
from multiopt.instrument.protocol import Config, Protocol, measure, model_bytes, model_factory, validate
from multiopt.train.multi import MultiOptimizer
from multiopt.instrument.probes import make_probe, round_alloc
from multiopt.run.presets import COMBOS, preset_configs

LM_RULES = "*emb*=adamw(lr=3e-4); @matrix=muon(lr=0.02); rest=adamw(lr=3e-4)"


# --- transformer ------------------------------------------------------------------------


def test_builtins_still_resolve():
    assert isinstance(models.build("simple"), models.SimpleNet)
    mlp = models.build("mlp", 8, 2)
    assert isinstance(mlp, models.MLP) and mlp.layer2.weight.shape == (8, 8)
    x, y = models.make_batch(mlp, 3)
    assert x.shape == (3, 8) and y.shape == (3, 8)
    assert "transformer" in models.MODELS


def test_transformer_shape_and_parameter_count():
    w, d, v, s = 128, 3, models.VOCAB, models.SEQ_LEN
    model = models.build("transformer", w, d)
    per_block = 2 * (2 * w) + 4 * (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    assert sum(p.numel() for p in model.parameters()) == v * w + s * w + d * per_block + 2 * w
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if n.startswith("layer")][0].startswith("layer1.")
    assert {n.split(".")[0] for n in names} == {"emb", "pos_emb", "layer1", "layer2", "layer3", "ln_f"}
    assert model.heads == 2 and models.heads_for(64) == 1 and models.heads_for(32) == 1
    assert models.heads_for(320) == 5 and models.heads_for(200) == 3 - 1  # 200 % 3 != 0 -> 2


def test_transformer_head_is_tied_and_counted_once():
    tied = models.Transformer(64, 1)
    assert tied.head is None
    assert [n for n, _ in tied.named_parameters()].count("emb.weight") == 1
    tokens, _ = tied.example_batch(2)
    h = tied.ln_f(tied.layer1(tied.emb(tokens) + tied.pos_emb))
    torch.testing.assert_close(tied(tokens), h @ tied.emb.weight.T)
    untied = models.Transformer(64, 1, tied=False)
    assert untied.head.weight.shape == (models.VOCAB, 64)
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + 64 * models.VOCAB


def test_transformer_batch_and_loss():
    spec = models.resolve("transformer")
    model = spec.build(64, 1).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x, y = spec.make_batch(model, 3, dtype=torch.bfloat16, generator=gen)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, models.SEQ_LEN)
    assert x.is_contiguous() and y.is_contiguous()
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the next tokens
    logits = model(x)
    assert logits.dtype == torch.bfloat16 and logits.shape == (3, models.SEQ_LEN, models.VOCAB)
    loss = spec.loss_fn(logits.float(), y)
    assert abs(loss.item() - math.log(models.VOCAB)) < 0.1  # N(0, 0.02) init: near-uniform


def test_muon_routing_on_the_transformer_by_hand():
    model = models.build("transformer", 128, 2)
    opt = MultiOptimizer.from_spec(model, LM_RULES)
    got = opt.assignment()
    params = dict(model.named_parameters())
    # By hand: the embeddings (the head is tied to emb.weight, one parameter) ...
    emb = {"emb.weight", "pos_emb"}
    # ... every other matrix: the four attention projections and both MLP matrices per block ...
    matrices = {f"layer{i}.{m}.weight" for i in (1, 2)
                for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2")}
    # ... and the rest: LayerNorm weights and every bias.
    rest = {f"layer{i}.{ln}.{k}" for i in (1, 2) for ln in ("ln1", "ln2") for k in ("weight", "bias")}
    rest |= {f"layer{i}.{m}.bias" for i in (1, 2)
             for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2")}
    rest |= {"ln_f.weight", "ln_f.bias"}
    assert set(got["*emb*=adamw"]) == emb
    assert set(got["@matrix=muon"]) == matrices
    assert set(got["rest=adamw"]) == rest
    assert emb | matrices | rest == set(params)  # nothing unrouted, nothing twice
    assert sum(map(len, got.values())) == len(params)
    # The same, by kind: Muon has every 2-D parameter but the embeddings, and only those.
    assert matrices == {n for n, p in params.items() if p.ndim == 2} - emb
    assert all(params[n].ndim == 1 for n in rest)
    assert isinstance(opt["@matrix=muon"], torch.optim.Muon)
    assert isinstance(opt["*emb*=adamw"], torch.optim.AdamW) and isinstance(opt["rest=adamw"], torch.optim.AdamW)


def test_muon_given_a_vector_names_it():
    model = models.build("transformer", 64, 1)
    with pytest.raises(UsageError, match=r"claims layer1\.ln1\.weight of shape \(64,\)"):
        MultiOptimizer.from_spec(model, "layer1=muon; rest=adamw")
    with pytest.raises(UsageError, match=r"claims ln_f\.weight of shape \(64,\); rule 'rest=adamw' would take it"):
        validate(Config(model="transformer", width=64, depth=1, rules="ln_f=muon; rest=adamw"))


def test_transformer_measured_state_equals_expected_and_fake_equals_tracked():
    config = Config(model="transformer", width=64, depth=1, batch=2, combo="muon+adamw-emb", rules=LM_RULES)
    tracked = measure(config, Protocol(probe="tracked", warmup=1, steps=1))
    fake = measure(config, Protocol(probe="fake", warmup=1, steps=0))
    assert tracked.status == fake.status == "ok", (tracked.error, fake.error)
    assert tracked.opt_state_bytes == tracked.opt_state_expected
    for o in tracked.by_optimizer():
        assert o["state_bytes"] == o["expected"], o["name"]
    for k in ("param_bytes", "grad_bytes", "opt_state_bytes", "peak_forward", "peak_backward", "peak_step", "peak_total"):
        assert getattr(tracked, k) == getattr(fake, k), k


def test_presets_include_the_transformer():
    for preset in ("quick", "default"):
        lm = [c for c in preset_configs(preset) if c.model == "transformer"]
        assert lm and {c.combo for c in lm} >= {"adam", "muon+adamw-emb", "sgd+adam"}
        for c in lm:
            validate(c)  # rules route on the transformer (meta device, no compute)


# --- your own model -----------------------------------------------------------------------


def test_user_model_by_import_path():
    spec = models.resolve("tests.usermodels:factory")
    assert spec is models.resolve(" tests.usermodels:factory ".strip())
    from tests import usermodels

    assert spec.name == "tests.usermodels:factory" and spec.loss_fn is usermodels.loss_fn
    model = spec.build(8, 3)  # `colour` is never passed
    assert isinstance(model, usermodels.TinyClassifier) and len(model.layer2) == 3
    x, y = spec.make_batch(model.to(torch.bfloat16), 4, dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16 and y.dtype == torch.int64  # floats cast, integers kept
    assert models.build("tests.usermodels:width_only", 8, 5).layer2[0].out_features == 8  # no depth passed
    assert isinstance(models.build("tests.usermodels:TinyClassifier", 8, 1), nn.Module)  # a class is a factory


def test_user_model_measures_like_a_builtin():
    rec = measure(Config(model="tests.usermodels:factory", width=16, depth=2, batch=8, combo="sgd+adam",
                         rules=COMBOS["sgd+adam"]), Protocol(probe="tracked", warmup=2, steps=2))
    assert rec.status == "ok", rec.error
    model = models.build("tests.usermodels:factory", 16, 2)
    assert rec.n_params == sum(p.numel() for p in model.parameters())
    assert rec.param_bytes == rec.grad_bytes == sum(round_alloc(p.numel() * 4) for p in model.parameters())
    assert rec.opt_state_bytes == rec.opt_state_expected > 0
    assert rec.peak_total >= rec.param_bytes + rec.grad_bytes + rec.opt_state_bytes
    assert rec.step_ms_median > 0


def test_user_model_whose_output_is_the_loss():
    spec = models.resolve("tests.usermodels_selfloss:factory")
    assert spec.loss_fn is None
    gen = torch.Generator().manual_seed(0)
    assert spec.make_batch(spec.build(4, 9), 3, generator=gen).shape == (3, 8)
    rec = measure(Config(model="tests.usermodels_selfloss:factory", width=8, batch=4),
                  Protocol(probe="tracked", warmup=1, steps=1))
    assert rec.status == "ok", rec.error


@pytest.mark.parametrize("path, message", [
    ("nosuch.mod:f", r"model 'nosuch.mod:f': cannot import 'nosuch.mod': ModuleNotFoundError"),
    ("tests.usermodels_broken:f", r"model 'tests.usermodels_broken:f': cannot import .*broken on purpose$"),
    ("tests.usermodels:nope", r"model 'tests.usermodels:nope': module 'tests.usermodels' has no attribute 'nope'"),
    ("tests.usermodels:NOT_CALLABLE", r"model 'tests.usermodels:NOT_CALLABLE': .*not callable"),
    ("tests.usermodels:needs_classes", r"model 'tests.usermodels:needs_classes': .*requires 'classes'"),
    ("tests.usermodels:not_a_module", r"model 'tests.usermodels:not_a_module': the factory returned a builtins.dict, not a torch.nn.Module"),
    ("tests.usermodels:", r"pkg.module:factory"),
    ("nosuch", r"unknown model 'nosuch'.*pkg.module:factory"),
])
def test_bad_model_paths_are_one_line_usage_errors(path, message):
    with pytest.raises(UsageError, match=message) as e:
        models.build(path, 8, 2)
    assert "\n" not in str(e.value)


def test_a_model_without_batches_is_an_error_record():
    rec = measure(Config(model="tests.usermodels_selfloss:NoBatch"), Protocol(probe="tracked", warmup=1, steps=1))
    assert rec.status == "error"
    assert "tests.usermodels_selfloss:NoBatch" in rec.error and "example_batch" in rec.error


def test_cli_bad_model_path_exits_2_with_one_line(run_cli):
    r = run_cli("measure", "--model", "nosuch.mod:f", "--probe", "tracked")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuch.mod:f" in lines[0], r.stderr


def test_user_model_sweeps_reports_and_gates(run_cli, tmp_path):
    out = tmp_path / "run"
    r = run_cli("run", "--preset", "quick", "--models", "tests.usermodels:factory", "--widths", "16",
                "--batches", "8", "--depths", "2", "--combos", "sgd,adam,sgd+adam", "--probe", "tracked",
                "--steps", "2", "--warmup", "1", "--no-report", "--no-progress", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["combo"] for row in rows] == ["sgd", "adam", "sgd+adam"]
    model = models.build("tests.usermodels:factory", 16, 2)
    params = sum(round_alloc(p.numel() * 4) for p in model.parameters())
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["model"] == "tests.usermodels:factory"
        assert row["param_bytes"] == params and row["opt_state_bytes"] == row["opt_state_expected"]
        assert row["peak_total"] > params and row["step_ms_median"] > 0
    assert rows[0]["opt_state_bytes"] == 0 < rows[2]["opt_state_bytes"] < rows[1]["opt_state_bytes"]
    from multiopt.analyze import gate, report

    path = report.write_report([out], tmp_path / "report.md")
    assert "sgd+adam" in path.read_text()
    assert "tests.usermodels:factory" in (tmp_path / "report.csv").read_text()
    assert gate.run_gate(str(out / "results.jsonl"), [str(out)], summary=str(tmp_path / "summary.md")) == 0


@pytest.mark.parametrize("probe_name", ["tracked", "fake"])
def test_parameters_and_buffers_are_all_the_model_allocates(probe_name):
    """param_bytes + buffer_bytes is what building the model allocated, on either CPU probe."""
    probe = make_probe(probe_name)
    with probe:
        base = probe.allocated()
        model = probe.build_model(model_factory(Config(model="tests.usermodels_bn:factory", width=8)))
        params, buffers = model_bytes(model)
        assert probe.allocated() - base == params + buffers
    # weight and bias of Linear(8, 8), BatchNorm1d(8), Linear(8, 1): six blocks; running
    # mean, running var, num_batches_tracked: three
    assert (params, buffers) == (6 * round_alloc(1), 3 * round_alloc(1))


def test_a_mapping_batch_becomes_a_dict_on_the_device_in_the_dtype():
    batch = UserDict(  # transformers' BatchEncoding is a UserDict
        {"input_ids": torch.arange(3), "scale": torch.ones(2, dtype=torch.float64)})
    placed = models._place(batch, torch.device("cpu"), torch.bfloat16)
    assert type(placed) is dict and placed["input_ids"].dtype == torch.int64
    assert placed["scale"].dtype == torch.bfloat16
