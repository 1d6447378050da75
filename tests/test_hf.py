"""Hugging Face conventions (issue 12): dict batches as keywords, `out.loss` as the loss,
tuple outputs' logits, a transformers GPT-2 built from its config as a factory through
measure, run, profile and train, and optimizers with a train/eval mode (schedulefree)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import multiopt
from multiopt.cli import main
from multiopt.errors import UsageError
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.store import read_jsonl
from multiopt.train import models
from multiopt.train.multi import MultiOptimizer
from multiopt.train.trainer import Trainer, forward_loss
from multiopt.units import round_alloc

GPT2 = "tests.hfmodels:gpt2"
# wte first: it is 2-D, and @2d would give the embedding to Muon. wpe (2-D too) is left to
# Muon on purpose: Muon takes it; putting it on AdamW is a choice, not a requirement.
RULES = "*wte*=adamw(lr=0.001); @2d=muon(lr=0.02); rest=adamw(lr=0.001)"


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("tests.hfmodels", reason="needs transformers (the test extra)")


def _expected_state(model: nn.Module) -> dict[str, int]:
    """The rules' state, by hand: AdamW two float32 moments and a float32 step per tensor,
    Muon one float32 momentum buffer, over the parameters each rule claims."""
    named = dict(model.named_parameters())
    wte = [p for n, p in named.items() if "wte" in n]
    muon = [p for n, p in named.items() if "wte" not in n and p.ndim == 2]
    rest = [p for n, p in named.items() if "wte" not in n and p.ndim != 2]
    adamw = lambda ps: sum(2 * 4 * p.numel() + 4 for p in ps)  # noqa: E731
    return {"*wte*=adamw": adamw(wte), "@2d=muon": sum(4 * p.numel() for p in muon), "rest=adamw": adamw(rest)}


# --- the conventions, on plain modules -------------------------------------------------------


class _Pair(nn.Module):
    """Returns (logits, extra), or a dict with `loss` when given labels, as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.lin(x)
        if labels is None:
            return logits, logits.detach() * 0
        return {"loss": (logits - labels).pow(2).mean(), "logits": logits}


def test_forward_loss_follows_hf_conventions():
    torch.manual_seed(0)
    model, x, y = _Pair(), torch.randn(4, 3), torch.randn(4, 2)
    mse = lambda out, target: (out - target).pow(2).mean()  # noqa: E731
    want = mse(model.lin(x), y)
    assert torch.equal(forward_loss(model, lambda out, t: mse(out[0], t), (x, y)), want)  # the tuple, unchanged
    assert torch.equal(forward_loss(model, None, {"x": x, "labels": y}), want)  # mapping: keywords, .loss
    # a loss_fn gets the output unchanged, the labels taken out of the keywords (transformers'
    # compute_loss_func convention): the model, called without labels, returns its tuple
    assert torch.equal(forward_loss(model, lambda out, labels: mse(out[0], labels), {"x": x, "labels": y}), want)
    with pytest.raises(UsageError, match="without a loss and no loss_fn"):
        forward_loss(model, None, {"x": x})


def test_sizes_a_factory_does_not_take_are_recorded_as_0_and_buffers_apart():
    spec = models.resolve("tests.usermodels_bn:factory")
    assert spec.takes == ("width",) and spec.sizes(8, 3) == (8, 0)
    assert models.resolve("mlp").sizes(64, 3) == (64, 3)  # the zoo keeps its keys
    config = Config(model="tests.usermodels_bn:factory", width=8, depth=3, batch=4, rules="rest=adam")
    rec = measure(config, Protocol(steps=0, warmup=1))
    assert rec.status == "ok", rec.error
    assert (rec.width, rec.depth) == (8, 0)
    # Linear(8, 8), BatchNorm1d(8) (weight, bias), Linear(8, 1): six storages under 512 B;
    # buffers: running mean and var (8 floats) and num_batches_tracked (int64): three
    assert rec.param_bytes == 6 * round_alloc(4) and rec.buffer_bytes == 3 * round_alloc(8)
    fake = measure(config, Protocol(probe="fake", steps=0, warmup=1))
    assert (fake.param_bytes, fake.buffer_bytes) == (rec.param_bytes, rec.buffer_bytes)


def test_trainer_puts_schedulefree_children_in_train_mode():
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = MultiOptimizer.from_spec(model, "0=schedulefree:AdamWScheduleFree(lr=0.001); rest=sgd(lr=0.1)")
    sf = opt["0=schedulefree:AdamWScheduleFree"]
    assert isinstance(sf, schedulefree.AdamWScheduleFree) and not sf.param_groups[0]["train_mode"]
    trainer = Trainer(model, lambda out, y: (out - y).pow(2).mean(), opt)
    assert sf.param_groups[0]["train_mode"]
    trainer.train_step((torch.randn(3, 4), torch.randn(3, 1)))  # refuses to step in eval mode
    trainer.eval()
    assert not sf.param_groups[0]["train_mode"] and not model.training
    # and so the protocol: schedulefree keeps z (and AdamW's second moment) per parameter
    config = Config(model="tests.usermodels_bn:factory", width=8, batch=4,
                    rules="rest=schedulefree:AdamWScheduleFree(lr=0.001)")
    rec = measure(config, Protocol(steps=0, warmup=1))
    assert rec.status == "ok", rec.error
    n = rec.optimizers[0].n_params
    assert rec.optimizers[0].state_bytes - rec.optimizers[0].state_scalar_bytes == 2 * 4 * n


# --- a transformers GPT-2 built from its config ----------------------------------------------


@pytest.fixture(scope="module")
def gpt2_record(hf):
    config = Config(model=GPT2, width=32, depth=2, batch=2, combo="hf", rules=RULES)
    rec = measure(config, Protocol(steps=0, warmup=1))
    assert rec.status == "ok", rec.error
    return rec


def test_gpt2_measures_with_exact_state(hf, gpt2_record):
    rec, model = gpt2_record, hf.gpt2()
    assert (rec.width, rec.depth) == (0, 0)  # the factory takes neither
    assert rec.n_params == sum(p.numel() for p in model.parameters())  # lm_head is wte: counted once
    assert rec.param_bytes == sum(round_alloc(4 * p.numel()) for p in model.parameters())
    assert rec.buffer_bytes == 0
    want = _expected_state(model)
    got = {o.name: (o.state_bytes, o.expected) for o in rec.optimizers}
    assert got == {k: (v, v) for k, v in want.items()}


def test_gpt2_profiled_by_hand_matches_the_record(hf, gpt2_record):
    torch.manual_seed(0)
    model = hf.gpt2()
    optimizer = MultiOptimizer.from_spec(model, RULES)
    batch = hf.make_batch(model, 2, generator=torch.Generator().manual_seed(0))
    with multiopt.profile(model, optimizer, probe="tracked", track=batch.values()) as prof:
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    frame = prof.optimizer_frame().set_index("name")
    record = {o.name: o for o in gpt2_record.optimizers}
    for name, row in frame.iterrows():
        assert row["state_bytes"] == row["expected"] == record[name].state_bytes
        assert row["step_temp_bytes"] == record[name].step_temp_bytes  # step 2 is past the lazy state


def test_gpt2_runs_and_trains_from_the_cli(hf, gpt2_record, tmp_path, capsys):
    out = tmp_path / "run"
    # the fake probe (a third of the tracked probe's time here) sizes the same state
    rc = main(["run", "--models", GPT2, "--rules", f"hf::{RULES}", "--widths", "32", "--batches", "2", "--depths", "2",
               "--probe", "fake", "--steps", "0", "--warmup", "1", "--no-isolate", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (row,) = read_jsonl(out / "results.jsonl")
    assert row.status == "ok", row.error
    assert (row.width, row.depth, row.param_bytes) == (0, 0, gpt2_record.param_bytes)
    assert row.peak_total == gpt2_record.peak_total  # the fake probe agrees with tracked to the byte
    assert {o.name: o.state_bytes for o in row.optimizers} == {o.name: o.expected for o in gpt2_record.optimizers}
    capsys.readouterr()
    assert main(["train", "--model", GPT2, "--rules", RULES, "--steps", "1", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count(" loss ") == 1 and "@2d=muon" in text
