"""step_in_backward: each parameter's optimizer steps in its post-accumulate-grad hook.

The same training as a step after backward (several optimizers, each stepping only its own
parameters); tracked == fake to the byte; gradients gone after backward while the optimizer
state is unchanged; fp16's GradScaler, clipping and accumulation refused in one line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from multiopt import cli
from multiopt.errors import UsageError
from multiopt.instrument.protocol import Config, Protocol, measure, validate
from multiopt.record import MEMORY_COLUMNS
from multiopt.run.presets import COMBOS
from multiopt.train import models
from multiopt.train.multi import MultiOptimizer
from multiopt.train.trainer import Trainer


def _trained(model_name: str, rules: str, sib: bool, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    spec = models.resolve(model_name)
    model = spec.build(32, 2)
    trainer = Trainer(model, spec.loss_fn, MultiOptimizer.from_spec(model, rules), step_in_backward=sib)
    batch = spec.make_batch(model, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        trainer.train_step(batch)
    assert all(p.grad is None for p in model.parameters())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
@pytest.mark.parametrize("combo", ["adamw", "muon+adamw", "sgd+adam"])
def test_same_training_as_a_step_after_backward(model_name, combo):
    """Each child optimizer steps only the parameter whose gradient just completed, with the
    same update it would make in one step over all of them (tied head included)."""
    plain, sib = _trained(model_name, COMBOS[combo], False), _trained(model_name, COMBOS[combo], True)
    start = {n: p.detach() for n, p in models.resolve(model_name).build(32, 2).named_parameters()}
    for name in plain:
        torch.testing.assert_close(sib[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n in plain if not torch.equal(plain[n], start[n])]
    assert len(moved) > len(plain) // 2  # the comparison is not between two untrained models


@pytest.mark.parametrize("model_name, combo, target", [("mlp", "adam", "cpu"), ("mlp", "muon+adamw", "cuda"),
                                                       ("transformer", "sgd+adam", "cpu"),
                                                       ("transformer", "muon+adamw", "cuda")])
def test_tracked_equals_fake_and_gradients_are_consumed_state_unchanged(model_name, combo, target):
    config = Config(model=model_name, width=64, depth=3, batch=4, combo=combo, rules=COMBOS[combo], target=target)
    columns = (*MEMORY_COLUMNS, "peak_reserved", "reserved_after_step")
    out = {}
    for sib in (0, 1):
        for probe in ("tracked", "fake"):
            r = measure(replace(config, step_in_backward=sib), Protocol(probe=probe, steps=0))
            assert r.status == "ok", r.error
            out[sib, probe] = r
        tracked, fake = out[sib, "tracked"], out[sib, "fake"]
        assert {c: getattr(tracked, c) for c in columns} == {c: getattr(fake, c) for c in columns}
        assert [o.state_bytes for o in tracked.optimizers] == [o.state_bytes for o in fake.optimizers]
    plain, sib = out[0, "tracked"], out[1, "tracked"]
    assert sib.step_in_backward == 1 and plain.step_in_backward == 0
    # optimizer state: the same bytes, per optimizer, walked and expected
    assert [(o.name, o.state_bytes, o.expected) for o in sib.optimizers] == \
        [(o.name, o.state_bytes, o.expected) for o in plain.optimizers]
    assert sib.opt_state_bytes == plain.opt_state_bytes == plain.opt_state_expected
    # every gradient was consumed inside backward: after it, exactly the gradients are gone
    assert plain.grad_bytes > 0 and sib.grad_bytes == 0
    assert plain.mem_after_backward - sib.mem_after_backward == plain.grad_bytes
    # the step phase no longer holds every gradient with the optimizer's temporaries
    assert sib.peak_step < plain.peak_step
    assert sib.peak_total <= plain.peak_total


def test_fp16_grad_scaler_clipping_and_accumulation_are_refused_in_one_line():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="GradScaler"):
        Trainer(model, None, opt, amp="fp16", step_in_backward=True)
    with pytest.raises(UsageError, match="cannot clip"):
        Trainer(model, None, opt, clip_norm=1.0, step_in_backward=True)
    with pytest.raises(UsageError, match="grad_accum=2"):
        Trainer(model, None, opt, grad_accum=2, step_in_backward=True)
    bf16 = Trainer(model, lambda out: out.float().pow(2).mean(), opt, amp="bf16", step_in_backward=True)
    bf16.train_step(torch.randn(2, 4))  # bf16 autocast has no scaler: allowed
    config = Config(amp="fp16", step_in_backward=1)
    with pytest.raises(UsageError, match="GradScaler"):
        validate(config, Protocol(probe="fake"))
    with pytest.raises(UsageError, match="must be 0 or 1"):
        validate(Config(step_in_backward=2), Protocol(probe="fake"))


def test_cli_flag_and_its_refusal(capsys):
    rc = cli.main(["estimate", "--model", "mlp", "--width", "64", "--batch", "4", "--combo", "adam",
                   "--step-in-backward", "1", "--json", "--target", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and '"step_in_backward": 1' in out and '"grad_bytes": 0' in out
    rc = cli.main(["estimate", "--amp", "fp16", "--step-in-backward", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "GradScaler" in err and len(err.strip().splitlines()) == 1
