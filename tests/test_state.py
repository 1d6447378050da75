"""measured_state vs expected_state, to the byte, on real torch optimizers and real steps.

The agreement tests are only worth something because the formulas in multiopt/state.py are
written from the algorithms, not from measurement; the hand-checked tests below pin a few of
them to arithmetic done by hand.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch
from torch import nn

from multiopt.train.optimizers import available, resolve
from multiopt.instrument.state import StateBytes, expected_state, has_formula, measured_state
from multiopt.units import round_alloc

from .support import needs_cuda, sequential

FOREACH = {"foreach": False}, {"foreach": True}
FUSED = {"fused": True}

# Every registered optimizer -> the option sets that change its state (or where it lives),
# each crossed with the implementations torch offers for it on CPU (forloop, foreach, fused).
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "sgd": (
        [{"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "dampening": 0.0}],
        [*FOREACH, FUSED],
    ),
    "adam": ([{}, {"amsgrad": True}], [*FOREACH, FUSED]),
    "adamw": ([{}, {"amsgrad": True}], [*FOREACH, FUSED]),
    "adamax": ([{}], [*FOREACH]),
    "nadam": ([{}, {"decoupled_weight_decay": True, "weight_decay": 0.01}], [*FOREACH]),
    "radam": ([{}, {"decoupled_weight_decay": True, "weight_decay": 0.01}], [*FOREACH]),
    "adagrad": ([{}], [*FOREACH, FUSED]),
    "adadelta": ([{}], [*FOREACH]),
    "rmsprop": (
        [{}, {"momentum": 0.9}, {"centered": True}, {"momentum": 0.9, "centered": True}],
        [*FOREACH],
    ),
    "rprop": ([{}], [*FOREACH]),
    "asgd": ([{}], [*FOREACH]),
    "adafactor": ([{}], [*FOREACH]),
    "muon": ([{}, {"momentum": 0.0}, {"nesterov": False}], [{}]),  # Muon has no foreach/fused
}


def _cases() -> Iterator[Any]:
    for name in available():
        options, impls = CASES.get(name, ([], []))
        for opts in options:
            for impl in impls:
                for dtype in (torch.float32, torch.bfloat16):
                    kw = {**opts, **impl}
                    label = ",".join(f"{k}={v}" for k, v in kw.items()) or "default"
                    yield pytest.param(name, kw, dtype, id=f"{name}-{label}-{str(dtype)[6:]}")


def _params_for(name: str, model: nn.Module) -> list[nn.Parameter]:
    # Muon only accepts 2-D parameters; everyone else gets the 2-D weights and 1-D biases.
    return [p for p in model.parameters() if p.dim() == 2] if resolve(name).matrix_only else list(model.parameters())


def _train(model: nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(4, 6, dtype=dtype)).square().mean().backward()
        opt.step()


def test_every_registered_optimizer_has_cases_and_a_formula() -> None:
    """A name added to the registry must come with a formula and a case here."""
    for name in available():
        assert has_formula(name), name
        assert CASES.get(name, ([], []))[0], f"no test case for {name}"


@pytest.mark.parametrize(("name", "kwargs", "dtype"), list(_cases()))
def test_measured_matches_expected(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    model = sequential(6, 10, 3, act=nn.Tanh, dtype=dtype)
    opt = resolve(name).build(_params_for(name, model), {"lr": 1e-3, **kwargs})
    _train(model, opt, dtype)
    measured, expected = measured_state(opt), expected_state(opt)
    assert measured == expected
    if not (name == "sgd" and kwargs.get("momentum") == 0.0):
        assert measured.n_tensors > 0


# --- hand-checked numbers, worked out from the algorithms --------------------------------


def _stepped(name: str, module: nn.Module, dtype: torch.dtype = torch.float32, **kw: Any) -> torch.optim.Optimizer:
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    opt = resolve(name).build(module.parameters(), kw)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_adam_linear_10_20_by_hand() -> None:
    # m and v for 200 weights + 20 biases, 4 bytes each; one float32 step per parameter.
    # alloc: 800 B -> 1024, 80 B -> 512 (x2 moments); each 4-byte step -> 512.
    want = StateBytes(elem=2 * (200 + 20) * 4, scalar=2 * 4, alloc=2 * (1024 + 512) + 2 * 512, n_tensors=6)
    assert want == StateBytes(1760, 8, 4096, 6)
    opt = _stepped("adam", nn.Linear(10, 20))
    assert expected_state(opt) == want
    assert measured_state(opt) == want


def test_adamw_amsgrad_bf16_by_hand() -> None:
    # m, v, max v in bf16 (2 bytes) for 220 elements; step stays float32.
    opt = _stepped("adamw", nn.Linear(10, 20), torch.bfloat16, amsgrad=True)
    want = StateBytes(elem=3 * 220 * 2, scalar=2 * 4, alloc=3 * (512 + 512) + 2 * 512, n_tensors=8)
    assert expected_state(opt) == want == measured_state(opt)


def test_sgd_momentum_bf16_by_hand() -> None:
    # one bf16 buffer per element, no step: 400 B weight -> 512, 40 B bias -> 512.
    opt = _stepped("sgd", nn.Linear(10, 20), torch.bfloat16, lr=0.1, momentum=0.9)
    want = StateBytes(elem=220 * 2, scalar=0, alloc=1024, n_tensors=2)
    assert expected_state(opt) == want == measured_state(opt)


def test_sgd_without_momentum_keeps_nothing() -> None:
    opt = _stepped("sgd", nn.Linear(10, 20), lr=0.1)
    assert expected_state(opt) == StateBytes(0, 0, 0, 0) == measured_state(opt)


def test_adafactor_conv_factors_by_hand() -> None:
    # Conv2d(3, 8, (5, 2)): weight (8, 3, 5, 2). row_var (8, 3, 5, 1) = 120 elements,
    # col_var (8, 3, 1, 2) = 48; the 1-D bias keeps a full variance of 8. One CPU step each.
    opt = _stepped("adafactor", nn.Conv2d(3, 8, (5, 2)))
    want = StateBytes(elem=(120 + 48 + 8) * 4, scalar=2 * 4, alloc=3 * 512 + 2 * 512, n_tensors=5)
    assert expected_state(opt) == want == measured_state(opt)
    conv_state = opt.state[opt.param_groups[0]["params"][0]]
    assert tuple(conv_state["row_var"].shape) == (8, 3, 5, 1)
    assert tuple(conv_state["col_var"].shape) == (8, 3, 1, 2)


def test_asgd_three_scalars_per_param_by_hand() -> None:
    # ax per element; step, eta, mu per parameter.
    opt = _stepped("asgd", nn.Linear(10, 20))
    want = StateBytes(elem=220 * 4, scalar=2 * 3 * 4, alloc=1024 + 512 + 6 * 512, n_tensors=8)
    assert expected_state(opt) == want == measured_state(opt)


def test_muon_one_buffer_no_step_by_hand() -> None:
    opt = _stepped("muon", nn.Linear(10, 20, bias=False), momentum=0.0)
    want = StateBytes(elem=200 * 4, scalar=0, alloc=1024, n_tensors=1)
    assert expected_state(opt) == want == measured_state(opt)
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"momentum_buffer"}


def test_rmsprop_centered_momentum_by_hand() -> None:
    # square_avg, momentum_buffer, grad_avg on a 40-element weight; one step.
    opt = _stepped("rmsprop", nn.Linear(4, 10, bias=False), momentum=0.9, centered=True)
    want = StateBytes(elem=3 * 40 * 4, scalar=4, alloc=4 * 512, n_tensors=4)
    assert expected_state(opt) == want == measured_state(opt)


# --- what the formula assumes, and where state lives -------------------------------------


def test_adagrad_state_exists_before_any_step() -> None:
    opt = resolve("adagrad").build(nn.Linear(10, 20).parameters(), {})
    assert measured_state(opt) == expected_state(opt) == StateBytes(880, 8, 2560, 4)


def test_params_without_grad_have_no_state_but_are_expected() -> None:
    """The formula assumes every parameter got a gradient; one that never did is the gap."""
    model = sequential(6, 10, 3, act=nn.Tanh)
    model[2].requires_grad_(False)  # second Linear: 30 + 3 parameters, never a grad
    frozen_adam = (2 * (30 + 3) * 4, 2 * 4)
    opt = resolve("adam").build(model.parameters(), {})
    _train(model, opt, torch.float32)
    m, e = measured_state(opt), expected_state(opt)
    assert (e.elem - m.elem, e.scalar - m.scalar, e.n_tensors - m.n_tensors) == (*frozen_adam, 6)
    # Adagrad made its state in __init__, grads or not.
    opt = resolve("adagrad").build(model.parameters(), {})
    _train(model, opt, torch.float32)
    assert measured_state(opt) == expected_state(opt)


@pytest.fixture
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("fused", [False, True])
def test_step_dtype_follows_default_dtype_unless_fused(float64_default: None, fused: bool) -> None:
    # torch's _get_scalar_dtype(): float64 steps under a float64 default, but fused kernels
    # always take float32 steps.
    opt = _stepped("adam", nn.Linear(10, 20, dtype=torch.float32), fused=fused)
    step_bytes = 4 if fused else 8
    assert expected_state(opt).scalar == 2 * step_bytes
    assert measured_state(opt) == expected_state(opt)


def test_zero_dim_param_state_counts_as_scalar() -> None:
    # A 0-dim parameter's exp_avg is 0-dim like step: shape cannot tell them apart, so both
    # sides call all three scalar.
    temp = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.Adam([temp])
    temp.grad = torch.tensor(0.5)
    opt.step()
    assert measured_state(opt) == expected_state(opt) == StateBytes(0, 12, 3 * 512, 3)


def _meta_params(matrix_only: bool) -> list[nn.Parameter]:
    ps = [nn.Parameter(torch.empty(20, 10, device="meta"))]
    if not matrix_only:
        ps.append(nn.Parameter(torch.empty(20, device="meta")))
    for p in ps:
        p.grad = torch.empty_like(p)
    return ps


# (name, options, the error torch raises on meta tensors *after* the state was created)
META_CASES = [
    ("sgd", {"momentum": 0.9}, None),
    ("adam", {}, None),
    ("adam", {"capturable": True}, "capturable=True"),
    ("adamw", {"capturable": True, "amsgrad": True}, "capturable=True"),
    ("adamax", {}, None),
    ("adamax", {"capturable": True}, "capturable=True"),
    ("nadam", {}, None),
    ("nadam", {"capturable": True}, "capturable=True"),
    ("radam", {"capturable": True}, "capturable=True"),
    ("adagrad", {}, None),
    ("adadelta", {"capturable": True}, "capturable=True"),
    ("rmsprop", {"capturable": True, "momentum": 0.9, "centered": True}, "capturable=True"),
    ("rprop", {}, None),
    ("rprop", {"capturable": True}, "capturable=True"),
    ("asgd", {}, "meta tensors"),
    ("adafactor", {}, "meta tensors"),
    ("muon", {}, None),
]


@pytest.mark.parametrize(("name", "kwargs", "raises"), META_CASES, ids=lambda v: str(v))
def test_where_state_lives(name: str, kwargs: dict[str, Any], raises: str | None) -> None:
    """Params on the meta device separate 'with the parameter' from 'on the CPU' without a GPU.
    capturable is for accelerators only: torch refuses it on meta, but after _init_group has
    made the state, which is all this test needs."""
    params = _meta_params(resolve(name).matrix_only)
    opt = resolve(name).build(params, kwargs)
    if raises:
        with pytest.raises(Exception, match=raises):  # AssertionError or RuntimeError by optimizer
            opt.step()
    else:
        opt.step()
    assert measured_state(opt) == expected_state(opt)
    for dev in ("meta", "cpu"):
        assert measured_state(opt, device=dev) == expected_state(opt, device=dev), dev
    on_cpu = expected_state(opt, device="cpu")
    step_moves = kwargs.get("capturable") or name == "asgd"
    has_step = name not in ("sgd", "muon")
    assert on_cpu.n_tensors == (0 if step_moves or not has_step else len(params) * (2 if name == "nadam" else 1))
    assert on_cpu.elem == 0


def test_fused_adagrad_state_lives_with_param_from_init() -> None:
    params = _meta_params(False)
    opt = torch.optim.Adagrad(params, fused=True)
    assert expected_state(opt, device="cpu") == StateBytes(0, 0, 0, 0)
    assert measured_state(opt, device="meta") == expected_state(opt, device="meta") == StateBytes(880, 8, 2560, 4)


# --- measurement mechanics ---------------------------------------------------------------


def test_aliased_entries_are_counted_once() -> None:
    opt = _stepped("adam", nn.Linear(10, 20))
    w, b = opt.param_groups[0]["params"]
    before = measured_state(opt)
    opt.state[w]["exp_avg_sq"] = opt.state[w]["exp_avg"]  # same tensor twice
    opt.state[b]["alias"] = opt.state[w]["exp_avg"].view(-1)[:5]  # a view, under another param
    opt.state[b]["nested"] = [opt.state[b]["exp_avg"], {"again": opt.state[b]["exp_avg"]}]
    after = measured_state(opt)
    assert after == StateBytes(before.elem - 800, before.scalar, before.alloc - 1024, before.n_tensors - 1)


def test_storage_shared_with_a_0dim_view_is_elem() -> None:
    opt = _stepped("sgd", nn.Linear(10, 20), lr=0.1, momentum=0.9)
    w = opt.param_groups[0]["params"][0]
    opt.state[w]["first"] = opt.state[w]["momentum_buffer"][0, 0]  # 0-dim view of a matrix buffer
    assert measured_state(opt) == expected_state(opt)


def test_state_that_aliases_params_or_grads_is_not_state() -> None:
    opt = _stepped("adam", nn.Linear(10, 20))
    w = opt.param_groups[0]["params"][0]
    before = measured_state(opt)
    opt.state[w]["weight_ref"] = w.detach()
    opt.state[w]["grad_ref"] = w.grad
    assert measured_state(opt) == before


def test_empty_storages_are_distinct() -> None:
    # Empty tensors share data_ptr 0; they are still separate storages.
    opt = _stepped("adam", nn.Linear(0, 3))  # weight (3, 0) has no elements
    assert measured_state(opt) == expected_state(opt)
    assert measured_state(opt).n_tensors == 6


class _Trace(torch.optim.Optimizer):
    """An optimizer outside the registry: keeps the last grad and a step per parameter."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", torch.zeros((), dtype=torch.float64))
                state["step"] += 1
                state["trace"] = p.grad.clone()
                p.add_(state["trace"], alpha=-group["lr"])


def test_import_path_optimizer_has_no_expected_but_is_measured() -> None:
    model = nn.Linear(10, 20)
    opt = _Trace(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    assert expected_state(opt) is None
    assert measured_state(opt) == StateBytes(elem=220 * 4, scalar=2 * 8, alloc=1024 + 512 + 2 * 512, n_tensors=4)


def test_registered_class_subclass_has_no_formula() -> None:
    class MyAdam(torch.optim.Adam):
        pass

    opt = MyAdam(nn.Linear(2, 2).parameters())
    assert expected_state(opt) is None


def test_fake_tensor_state_is_measured() -> None:
    """The fake probe builds optimizers under FakeTensorMode: storages have no data pointer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        opt = _stepped("adam", nn.Linear(10, 20))
        assert measured_state(opt) == expected_state(opt) == StateBytes(1760, 8, 4096, 6)


@pytest.mark.parametrize(
    ("nbytes", "want"), [(0, 0), (1, 512), (4, 512), (511, 512), (512, 512), (513, 1024), (800, 1024), (10**6, 1000448)]
)
def test_round_alloc(nbytes: int, want: int) -> None:
    assert round_alloc(nbytes) == want


def test_state_bytes_add_and_total() -> None:
    a, b = StateBytes(10, 4, 1024, 2), StateBytes(1, 8, 1024, 2)
    assert a + b == StateBytes(11, 12, 2048, 4)
    assert (a + b).total == 23


# --- CUDA: placement and allocator rounding against torch.cuda itself ---------------------

CUDA_CASES = [
    ("adam", {}),
    ("adam", {"foreach": True}),
    ("adam", {"fused": True}),
    ("adam", {"capturable": True}),
    ("adamw", {"fused": True, "amsgrad": True}),
    ("sgd", {"momentum": 0.9, "fused": True}),
    ("sgd", {"momentum": 0.9, "foreach": True}),
    ("adagrad", {}),  # fused Adagrad is CPU-only in torch (cuda_unsupported=True)
    ("nadam", {"capturable": True}),
    ("rmsprop", {"capturable": True, "momentum": 0.9, "centered": True}),
    ("asgd", {}),
    ("adafactor", {}),
    ("muon", {}),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("name", "kwargs"), CUDA_CASES, ids=lambda v: str(v))
def test_cuda_state_matches_memory_allocated(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    """On CUDA the state's rounded bytes on the GPU are exactly what the first step adds to
    memory_allocated(); steps kept on the CPU are not in it."""
    model = sequential(6, 10, 3, act=nn.Tanh, dtype=dtype, device="cuda")
    opt = resolve(name).build(_params_for(name, model), {"lr": 1e-3, **kwargs})
    model(torch.randn(4, 6, dtype=dtype, device="cuda")).square().mean().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    assert measured_state(opt) == expected_state(opt)
    for dev in ("cuda", "cpu"):
        assert measured_state(opt, device=dev) == expected_state(opt, device=dev), dev
    on_gpu = expected_state(opt, device="cuda")
    if name == "adagrad":  # state made in __init__, before `before`
        assert added == 0
    else:
        assert added == on_gpu.alloc
