"""Optimizers nobody here wrote: state found by walking and by allocation, compiled steps,
observed kernels, and the fake probe's refusal. Third-party packages are optional (the
`test` extra): each test skips when its package is missing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from multiopt.instrument.probes import EAGER_UNDER_PROBE, TrackedProbe, Watch, make_probe
from multiopt.instrument.protocol import Config, Protocol, measure
from multiopt.instrument.state import (attributed_state, constructing_optimizer, expected_state, measured_state,
                                       observed_impl)
from multiopt.train.optimizers import available, resolve

# a small MLP (two matrices, two vectors), memory only
_SMALL = dict(model="mlp", width=16, depth=1, batch=2, combo="x")


def _measure(rules: str, probe: str = "tracked") -> Any:
    return measure(Config(rules=rules, **_SMALL), Protocol(probe=probe, steps=0, warmup=2))


@pytest.mark.parametrize("rules, package", [
    ("rest=torchao.optim:AdamW8bit", "torchao"),
    ("rest=heavyball:AdamW", "heavyball"),
])
def test_compiled_step_is_measured_eagerly_and_exactly(rules: str, package: str) -> None:
    pytest.importorskip(package)
    r = _measure(rules)
    assert r.status == "ok", r.error
    (o,) = r.optimizers
    assert o.compiled == EAGER_UNDER_PROBE
    assert o.state_bytes > 0 and o.state_attributed_bytes == o.state_bytes and o.state_gap_bytes == 0


class _Holder:
    """State kept in a plain Python object, as pytorch-optimizer's Shampoo does."""

    __slots__ = ("momentum", "count")

    def __init__(self, p: torch.Tensor) -> None:
        self.momentum = torch.zeros_like(p)
        self.count = torch.zeros((), dtype=torch.int64)


_HIDDEN: dict[int, list[torch.Tensor]] = {}  # out of the walk's reach: keyed by id(optimizer)


class _ObjectState(torch.optim.Optimizer):
    """SGD with momentum in a `_Holder` per parameter; `hide=True` also keeps a copy of every
    gradient where no walk of the optimizer can find it (a module-level dict)."""

    def __init__(self, params: Any, lr: float = 0.01, hide: bool = False) -> None:
        super().__init__(params, {"lr": lr})
        self.hide = hide
        self.scratch = {"shared": torch.zeros(3)}  # made at construction, kept as an attribute

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                holder = self.state[p].setdefault("holder", _Holder(p))
                holder.momentum.mul_(0.9).add_(p.grad)
                holder.count += 1
                p.add_(holder.momentum, alpha=-group["lr"])
                if self.hide:
                    _HIDDEN.setdefault(id(self), []).append(p.grad.clone())


def _watched_steps(hide: bool) -> tuple[torch.optim.Optimizer, Any, Any]:
    probe = TrackedProbe()
    with probe:
        model = probe.build_model(lambda: nn.Linear(4, 3))
        with probe.watching(Watch(constructing_optimizer)) as built:
            opt = _ObjectState(model.parameters(), hide=hide)
        steps = Watch()
        model(torch.ones(2, 4)).sum().backward()
        with probe.watching(steps):
            opt.step()
        return opt, measured_state(opt), attributed_state(opt, built.alive(id(opt)) + steps.alive(None))


def test_state_in_objects_and_attributes_is_walked_to_the_byte() -> None:
    opt, walked, attributed = _watched_steps(hide=False)
    # momentum like weight (12 floats) and bias (3), an int64 count per parameter, scratch (3 floats)
    assert walked.total == (12 + 3) * 4 + 2 * 8 + 3 * 4 == attributed.total
    assert walked.n_tensors == 5 == attributed.n_tensors


def test_state_the_walk_cannot_reach_is_caught_by_attribution() -> None:
    opt, walked, attributed = _watched_steps(hide=True)
    try:
        assert attributed.total - walked.total == (12 + 3) * 4  # the hidden gradient copies
    finally:
        _HIDDEN.pop(id(opt), None)


def test_measure_records_the_gap_for_hidden_state() -> None:
    r = _measure("rest=tests.test_third_party:_ObjectState(hide=True)")
    _HIDDEN.clear()
    assert r.status == "ok", r.error
    (o,) = r.optimizers
    # two warm-up steps, each hiding a float32 copy of every gradient
    assert o.state_gap_bytes == 2 * r.n_params * 4 == o.state_attributed_bytes - o.state_bytes
    assert o.compiled is None
    # the report flags it, with the gap in bytes; a record without a gap is not flagged
    from multiopt.analyze import frame, report

    clean = _measure("rest=sgd(lr=0.01, momentum=0.9)")
    md = report.render(frame.records_to_frame([r.to_dict(), clean.to_dict()]))
    section = md.split("## Flagged: state attribution and compiled steps", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "rest=" in line]
    assert len(rows) == 1 and f"{o.state_bytes:,}" in rows[0] and f"{o.state_attributed_bytes:,}" in rows[0]


@pytest.mark.parametrize("names, want", [
    ({"aten::_fused_adam_", "aten::_foreach_add_.Scalar"}, "fused"),
    ({"aten::_foreach_mul_.Scalar", "aten::add_.Tensor"}, "foreach"),
    ({"aten::add_.Tensor"}, "forloop"),
    ({"bitsandbytes::optimizer_update_8bit_blockwise", "aten::add_.Tensor"}, "kernel:bitsandbytes"),
    (set(), None),
])
def test_observed_impl(names: set[str], want: str | None) -> None:
    assert observed_impl(names) == want


@pytest.mark.parametrize("rules, want", [
    ("rest=adam(foreach=True)", "foreach"),
    ("rest=adam", "forloop"),  # torch picks foreach by default only on CUDA
])
def test_impl_is_observed_by_the_ledger(rules: str, want: str) -> None:
    r = _measure(rules)
    assert r.status == "ok", r.error
    assert r.optimizers[0].impl == want


def test_fake_probe_refusal_names_the_cause() -> None:
    pytest.importorskip("bitsandbytes")
    r = _measure("rest=bitsandbytes.optim:Adam8bit", probe="fake")
    assert r.status == "error"
    assert "rule 'rest=bitsandbytes.optim:Adam8bit' reads tensor values" in r.error
    assert "--probe tracked" in r.error and "refused its settings" not in r.error


class _Mixed(nn.Module):
    """An embedding and matrices above the 8-bit thresholds (4096 elements, whole blocks),
    a matrix and vectors below them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 128)
        self.big = nn.Linear(128, 32)
        self.small = nn.Linear(32, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.small(self.big(self.emb(idx))).sum()


# (import path, package, also on the fake probe): bitsandbytes cannot run there (it builds
# its maps with .tolist()); of the rest one per package, to keep the suite's time
_WITH_FORMULAS = [
    ("bitsandbytes.optim:Adam8bit", "bitsandbytes", False),
    ("bitsandbytes.optim:AdamW8bit", "bitsandbytes", False),
    ("bitsandbytes.optim:Lion8bit", "bitsandbytes", False),
    ("torchao.optim:AdamW8bit", "torchao", False),
    ("torchao.optim:AdamW4bit", "torchao", True),
    ("torchao.optim:AdamWFp8", "torchao", False),
    ("pytorch_optimizer:Lion", "pytorch_optimizer", False),
    ("pytorch_optimizer:Adan", "pytorch_optimizer", False),
    ("pytorch_optimizer:SOAP", "pytorch_optimizer", True),
    ("schedulefree:AdamWScheduleFree", "schedulefree", True),
    ("schedulefree:SGDScheduleFree", "schedulefree", False),
]


def _state_three_ways(path: str, probe_name: str) -> tuple[Any, Any, Any, str | None]:
    """walked, attributed and expected state after two steps of `path` on `_Mixed`, and the
    implementation its steps were seen to run."""
    probe = make_probe(probe_name)
    with probe:
        model = probe.build_model(_Mixed)
        spec = resolve(path)
        params = [p for p in model.parameters() if p.dim() == 2 or not spec.matrix_only]
        with probe.watching(Watch(constructing_optimizer)) as built:
            opt = spec.cls(params)
        if hasattr(opt, "train"):
            opt.train()  # schedulefree refuses to step in eval mode
        steps = Watch()
        for _ in range(2):
            model(torch.arange(8) % 64).backward()
            with probe.watching(steps):
                opt.step()
            opt.zero_grad()
        born = built.alive(id(opt)) + steps.alive(None)
        impl = observed_impl(steps.op_names())
        return measured_state(opt), attributed_state(opt, born), expected_state(opt), impl


@pytest.mark.parametrize("probe_name", ["tracked", "fake"])
@pytest.mark.parametrize("path, package, on_fake", _WITH_FORMULAS, ids=[c[0] for c in _WITH_FORMULAS])
def test_third_party_state_walked_attributed_expected(path: str, package: str, on_fake: bool, probe_name: str) -> None:
    pytest.importorskip(package)
    if probe_name == "fake" and not on_fake:
        pytest.skip(f"{path}: not on the fake probe (see _WITH_FORMULAS)")
    walked, attributed, expected, impl = _state_three_ways(path, probe_name)
    assert expected is not None
    assert walked.total == attributed.total == expected.total, (walked, attributed, expected)
    assert walked.alloc == attributed.alloc == expected.alloc
    assert impl == _IMPLS.get(path, "forloop")


# what the ledger sees these steps run on CPU (torch.optim's flags would say forloop for all)
_IMPLS = {
    "pytorch_optimizer:Lion": "foreach",
    "pytorch_optimizer:Adan": "foreach",
    "schedulefree:AdamWScheduleFree": "foreach",
    "schedulefree:SGDScheduleFree": "foreach",
    "bitsandbytes.optim:Adam8bit": "kernel:bitsandbytes",
    "bitsandbytes.optim:AdamW8bit": "kernel:bitsandbytes",
    "bitsandbytes.optim:Lion8bit": "kernel:bitsandbytes",
}


@pytest.mark.parametrize("probe_name", ["tracked", "fake"])
@pytest.mark.parametrize("name", available())
def test_torch_optim_state_walked_attributed_expected(name: str, probe_name: str) -> None:
    if probe_name == "fake" and resolve(name).host_reads:
        pytest.skip(f"{name}: {resolve(name).host_reads}")
    walked, attributed, expected, _ = _state_three_ways(name, probe_name)
    assert walked.total == attributed.total == expected.total, (walked, attributed, expected)
    assert walked.alloc == attributed.alloc == expected.alloc
