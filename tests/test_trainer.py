import math

import pytest
import torch
import torch.nn.functional as F

from multiopt.errors import UsageError
from multiopt.train.models import MLP, SimpleNet
from multiopt.train.multi import MultiOptimizer
from multiopt.train.trainer import Trainer

RULES = "layer1=sgd(lr=0.01); layer2=adam(lr=1e-3)"


def _batches(n, size, features=10, out=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=g), torch.randn(size, out, generator=g)) for _ in range(n)]


def _model(seed=0):
    torch.manual_seed(seed)
    return SimpleNet()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_bit_identical_to_the_hand_written_two_optimizer_loop():
    data = _batches(10, 16)
    ref = _model()
    sgd = torch.optim.SGD(ref.layer1.parameters(), lr=0.01)
    adam = torch.optim.Adam(ref.layer2.parameters(), lr=1e-3)
    for x, y in data:
        sgd.zero_grad()
        adam.zero_grad()
        F.mse_loss(ref(x), y).backward()
        sgd.step()
        adam.step()

    model = _model()
    trainer = Trainer(model, F.mse_loss, MultiOptimizer.from_spec(model, RULES))
    for batch in data:
        trainer.train_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert not torch.equal(_params(_model())[0], _params(model)[0])  # it did train


def test_a_list_of_optimizers_is_wrapped():
    model = _model()
    t = Trainer(model, F.mse_loss, [torch.optim.SGD(model.layer1.parameters()), torch.optim.Adam(model.layer2.parameters())])
    assert isinstance(t.optimizer, MultiOptimizer) and len(t.children) == 2


def test_one_steplr_changes_every_childs_lr():
    model = _model()
    mo = MultiOptimizer.from_spec(model, RULES)
    sched = torch.optim.lr_scheduler.StepLR(mo, step_size=2, gamma=0.1)
    t = Trainer(model, F.mse_loss, mo, schedulers=[sched])
    for b in _batches(2, 4):
        t.train_step(b)
    assert [g["lr"] for g in mo.param_groups] == pytest.approx([0.001, 1e-4])


def _checkpoint_setup(seed):
    model = _model(seed)
    mo = MultiOptimizer.from_spec(model, "layer1=sgd(lr=0.01, momentum=0.9); layer2=adam(lr=1e-3)")
    sched = torch.optim.lr_scheduler.StepLR(mo, step_size=2, gamma=0.5)
    return Trainer(model, F.mse_loss, mo, schedulers=[sched])


def test_save_load_resumes_bit_identically(tmp_path):
    data = _batches(5, 8)
    full = _checkpoint_setup(0)
    for b in data:
        full.train_step(b)

    first = _checkpoint_setup(0)
    for b in data[:3]:
        first.train_step(b)
    first.save(tmp_path / "ckpt.pt")
    resumed = _checkpoint_setup(seed=123)  # different init: everything must come from the file
    resumed.load(tmp_path / "ckpt.pt")
    for b in data[3:]:
        resumed.train_step(b)

    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))
    for key, opt in full.optimizer.optimizers.items():
        other = resumed.optimizer.optimizers[key]
        assert other.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for p, q in zip(full.model.parameters(), resumed.model.parameters()):
            if p in opt.state:
                for name, v in opt.state[p].items():
                    assert torch.equal(torch.as_tensor(v), torch.as_tensor(other.state[q][name])), (key, name)
    with pytest.raises(UsageError, match="no such checkpoint"):
        resumed.load(tmp_path / "missing.pt")


def test_grad_accum_4_at_batch_8_equals_accum_1_at_batch_32():
    data = _batches(3, 32)
    big = Trainer(m1 := _model(), F.mse_loss, MultiOptimizer.from_spec(m1, RULES))
    acc = Trainer(m2 := _model(), F.mse_loss, MultiOptimizer.from_spec(m2, RULES), grad_accum=4)
    for x, y in data:
        big.train_step((x, y))
        for i in range(4):
            acc.train_step((x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]))
    assert acc.steps == big.steps == 3
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fp16_one_scaler_skips_the_overflowing_optimizer_and_unscales_the_other_right():
    model = _model()
    # layer2 first: its optimizer overflows and steps (is skipped) before layer1's; if update()
    # ran after each optimizer, layer1 would be unscaled by the already halved scale.
    mo = MultiOptimizer.from_spec(model, "layer2=sgd(lr=0.1); layer1=sgd(lr=0.1)")
    t = Trainer(model, F.mse_loss, mo, amp="fp16")
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _batches(1, 8)[0]
    t.train_step((x, y))  # one clean iteration first
    scale = t.scaler.get_scale()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}
    model.layer1.weight.register_hook(lambda g: seen.setdefault("layer1.weight", g.detach().clone()))
    h = model.layer2.weight.register_hook(lambda g: g * float("inf"))
    t.train_step((x, y))
    h.remove()
    # layer2 skipped entirely
    assert torch.equal(model.layer2.weight, before["layer2.weight"])
    assert torch.equal(model.layer2.bias, before["layer2.bias"])
    # layer1 stepped with the gradient unscaled by this iteration's scale
    inv = torch.tensor(scale, dtype=torch.float64).reciprocal().float()
    expected = before["layer1.weight"].add(seen["layer1.weight"] * inv, alpha=-0.1)
    assert torch.equal(model.layer1.weight, expected)
    # update() ran once: the scale backed off exactly once
    assert t.scaler.get_scale() == scale * 0.5


def test_fp16_with_clipping_unscales_every_optimizer_before_clipping():
    model = _model()
    t = Trainer(model, F.mse_loss, MultiOptimizer.from_spec(model, RULES), amp="fp16", clip_norm=1e-3)
    for b in _batches(3, 8):
        loss = t.train_step(b)
        assert math.isfinite(loss.item())
    # gradients clipped to a tiny norm: SGD's update on layer1 is at most lr * clip_norm
    p0 = _params(_model())[0]
    assert (model.layer1.weight - p0).norm() <= 3 * 0.01 * 1e-3 + 1e-7


def test_bf16_autocast_runs_on_cpu():
    model = _model()
    t = Trainer(model, F.mse_loss, MultiOptimizer.from_spec(model, RULES), amp="bf16")
    seen = []
    t.register_phase_hook(lambda phase, when: seen.append((phase, when)))
    loss = t.train_step(_batches(1, 8)[0])
    assert loss.dtype == torch.float32 or loss.dtype == torch.bfloat16
    assert seen == [
        ("forward", "before"), ("forward", "after"),
        ("backward", "before"), ("backward", "after"),
        ("step", "before"), ("step", "after"),
        ("zero_grad", "before"), ("zero_grad", "after"),
    ]


def test_zero_grad_at_start_keeps_grads_until_the_next_iteration():
    model = _model()
    t = Trainer(model, F.mse_loss, MultiOptimizer.from_spec(model, RULES), zero_grad_at="start")
    order = []
    t.register_phase_hook(lambda phase, when: when == "before" and order.append(phase))
    t.train_step(_batches(1, 4)[0])
    assert order == ["zero_grad", "forward", "backward", "step"]
    assert all(p.grad is not None for p in model.parameters())
    t2 = Trainer(m := _model(), F.mse_loss, MultiOptimizer.from_spec(m, RULES))
    t2.train_step(_batches(1, 4)[0])
    assert all(p.grad is None for p in m.parameters())


def test_muon_on_matrices_and_adamw_on_the_rest_trains_an_mlp():
    torch.manual_seed(0)
    model = MLP(32, 3)
    mo = MultiOptimizer.from_spec(model, "@matrix=muon(lr=0.02); rest=adamw(lr=3e-3)")
    assert [type(o).__name__ for o in mo] == ["Muon", "AdamW"]
    t = Trainer(model, F.mse_loss, mo)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    y = torch.randn(64, 32, generator=g)
    losses = [t.train_step((x, y)).item() for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("kw, needle", [({"amp": "fp8"}, "amp must be"), ({"zero_grad_at": "middle"}, "zero_grad_at"), ({"grad_accum": 0}, "grad_accum")])
def test_bad_trainer_settings(kw, needle):
    model = _model()
    with pytest.raises(UsageError, match=needle):
        Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters()), **kw)
