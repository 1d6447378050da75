"""Optimizer-state bytes, three ways, to the byte: what an optimizer holds (walked), what it
allocated and keeps alive (attributed), and what its algorithm says it should hold (expected).

`measured_state` walks the optimizer object (`optimizer.state`, its other attributes, and
containers, objects, slots, dataclasses and tensor subclasses inside them) and counts unique
storages, so aliases are paid once and tensors that are really parameters or gradients are
not paid at all. `attributed_state` counts the storages a ledger probe saw born while the
optimizer was built (`constructing_optimizer` names the owner) or stepped that are still
alive: it never reads the state, so state the walk cannot reach shows as a gap.
`expected_state` never looks at `optimizer.state`: it derives the same numbers from each
parameter's shape, dtype and device and its param_group's options, from the state formula
of the optimizer's descriptor in the registry (`train/optimizers.py`, formulas written in
`train/formulas.py` from torch 2.13's `torch/optim/*.py` and third-party libraries' installed
sources; a class the registry does not know has none). The three agreeing is the
evidence that the measured number means what the report says it means; disagreeing means a
library changed its state layout or the measurement is broken.

Both split bytes into per-element state (`elem`: moments, buffers, Adafactor factors) and
per-tensor scalars (`scalar`: `step`, NAdam's `mu_product`, ASGD's `eta`/`mu`). The rule is
by shape, the same on both sides: a storage only ever seen through 0-dim tensors is a
scalar. So the per-element state of a 0-dim parameter (a learnt temperature) counts as
scalar too: its `exp_avg` and its `step` cannot be told apart by shape.

`device=` restricts either count to storages on one device. It matters on accelerators:
most torch optimizers keep `step` on the CPU unless `capturable` or `fused` is set, so
`torch.cuda.memory_allocated()` never sees it (see `expected_state(opt, device="cuda")`).
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..train import optimizers as registry
# One rounding rule for the whole suite (512-byte blocks, 0 stays 0); re-exported here.
from ..units import round_alloc

__all__ = ["StateBytes", "attributed_state", "constructing_optimizer", "expected_state", "has_formula",
           "host_state", "measured_state", "observed_impl", "round_alloc"]

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class StateBytes:
    """Bytes of an optimizer's state. `elem` + `scalar` are exact (`requested` semantics);
    `alloc` is the same storages each rounded by `round_alloc`; `n_tensors` counts storages."""

    elem: int
    scalar: int
    alloc: int
    n_tensors: int

    @property
    def total(self) -> int:
        return self.elem + self.scalar

    def __add__(self, other: "StateBytes") -> "StateBytes":
        """Sum of two disjoint states (two optimizers of one model)."""
        if not isinstance(other, StateBytes):
            return NotImplemented
        return StateBytes(
            self.elem + other.elem,
            self.scalar + other.scalar,
            self.alloc + other.alloc,
            self.n_tensors + other.n_tensors,
        )


# ---------------------------------------------------------------------------------------
# measured


def _device_matches(dev: torch.device, want: torch.device | None) -> bool:
    if want is None:
        return True
    return dev.type == want.type and (want.index is None or dev.index == want.index)


def _as_device(device: str | torch.device | None) -> torch.device | None:
    return None if device is None else torch.device(device)


def _tensors_in(obj: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    """Every plain tensor reachable from a state value: torch optimizers keep flat dicts of
    tensors; third-party ones nest containers, keep state in Python objects (attributes,
    `__slots__`, dataclasses: pytorch-optimizer's Shampoo preconditioners, GaLore's
    projector) and in wrapper subclasses (DTensor, torchao's 8-bit state), whose inner
    tensors' storages are the real memory. Modules, classes, functions and modules of code
    are not state and are not entered."""
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            attrs, _ = obj.__tensor_flatten__()
            for a in attrs:
                yield from _tensors_in(getattr(obj, a), seen)
        else:
            yield obj
        if type(obj) is not torch.Tensor and not isinstance(obj, _PLAIN_TENSORS):
            yield from _attributes_of(obj, seen)  # a subclass may carry more tensors
        return
    if isinstance(obj, _ATOMS) or id(obj) in seen:  # id: cycles, and objects reachable twice
        return
    seen.add(id(obj))
    if isinstance(obj, (dict, list, tuple, set, frozenset, deque)):
        items = obj.values() if isinstance(obj, dict) else obj
        for item in items:
            yield from _tensors_in(item, seen)
    elif not isinstance(obj, _NOT_STATE):
        yield from _attributes_of(obj, seen)


# Tensors whose attributes are torch's bookkeeping, not memory the program keeps (a fake
# tensor's `constant` is the real value fake mode propagates for small tensors).
_PLAIN_TENSORS = (torch.nn.Parameter, FakeTensor)
# Values that hold no tensors, and objects that are not state even when state points at them.
_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_NOT_STATE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
              functools.partial, weakref.ref, torch.nn.Module)


def _attributes_of(obj: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    """The tensors in an object's `__dict__` and `__slots__` (dataclasses included)."""
    values = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                values.append(getattr(obj, name))
    for value in values:
        yield from _tensors_in(value, seen)


def _storage_key(t: torch.Tensor) -> int:
    # The StorageImpl's address: shared by every view of one storage, and unique while the
    # storage lives (state keeps it alive). Not data_ptr(): that is 0 for every empty, meta
    # or FakeTensor storage, which would merge storages that are distinct.
    return t.untyped_storage()._cdata


def _not_state_keys(optimizer: torch.optim.Optimizer) -> set[int]:
    """Storages of the optimizer's own parameters and gradients: a state entry that aliases
    one costs nothing beyond the weights/grads, which the record counts elsewhere."""
    keys: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for t in _tensors_in(p, set()):
                keys.add(_storage_key(t))
            if p.grad is not None:
                for t in _tensors_in(p.grad, set()):
                    keys.add(_storage_key(t))
    return keys


def measured_state(optimizer: torch.optim.Optimizer, device: str | torch.device | None = None) -> StateBytes:
    """Unique storages across every tensor the optimizer object reaches (`optimizer.state`,
    its other attributes, and objects inside them), each counted once however many entries
    (of one parameter or of several) alias it; the parameters' and gradients' own storages
    are not state. A storage is `scalar` when every
    tensor seen on it is 0-dim. `device` keeps only storages on that device."""
    want = _as_device(device)
    excluded = _not_state_keys(optimizer)
    storages: dict[int, tuple[int, torch.device]] = {}
    only_scalar: dict[int, bool] = {}
    # the whole object, not only `optimizer.state`: bitsandbytes keeps its shared quantization
    # maps in `name2qmap`, which state reaches only for parameters large enough to quantize
    for t in _attributes_of(optimizer, {id(optimizer)}):
        key = _storage_key(t)
        if key in excluded:
            continue
        if key not in storages:
            storages[key] = (t.untyped_storage().nbytes(), t.device)
            only_scalar[key] = True
        only_scalar[key] = only_scalar[key] and t.dim() == 0
    elem = scalar = alloc = n = 0
    for key, (nbytes, dev) in storages.items():
        if not _device_matches(dev, want):
            continue
        if only_scalar[key]:
            scalar += nbytes
        else:
            elem += nbytes
        alloc += round_alloc(nbytes)
        n += 1
    return StateBytes(elem, scalar, alloc, n)


# ---------------------------------------------------------------------------------------
# attributed: what the ledger saw the optimizer allocate (see protocol.py, which watches
# each optimizer's construction and steps with `probe.watching`)


def constructing_optimizer() -> int | None:
    """id() of the innermost optimizer whose method is running on this thread's stack, or
    None: the owner of a storage born while optimizers are being built (a wrapper such as
    ZeroRedundancyOptimizer builds its inner optimizer, which is then the innermost)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.optim.Optimizer):
                return id(owner)
        frame = frame.f_back
    return None


def attributed_state(optimizer: torch.optim.Optimizer, storages: Iterable[torch.UntypedStorage]) -> StateBytes:
    """The storages an optimizer allocated (during its construction and steps) that are still
    alive, less its parameters' and gradients' own: its state, found without reading it.
    `elem` holds every byte (a storage carries no shape to tell scalars by)."""
    excluded = _not_state_keys(optimizer)
    unique = {st._cdata: st.nbytes() for st in storages}
    kept = [n for key, n in unique.items() if key not in excluded]
    return StateBytes(sum(kept), 0, sum(round_alloc(n) for n in kept), len(kept))


def observed_impl(op_names: Iterable[str]) -> str | None:
    """The implementation a step really ran, from the qualified names (`ns::op.overload`) of
    the ops seen during it: any torch `_fused_*` kernel is fused, else any `_foreach_*` is
    foreach, else an op of a library's own namespace (bitsandbytes' 8-bit update) is
    `kernel:<namespace>`, else forloop; None when no op was seen."""
    parsed = [name.partition("::") for name in op_names]
    if not parsed:
        return None
    if any(op.startswith("_fused_") for ns, _, op in parsed if ns == "aten"):
        return "fused"
    if any(op.startswith("_foreach_") for ns, _, op in parsed if ns == "aten"):
        return "foreach"
    custom = sorted({ns for ns, _, _ in parsed if ns not in _TORCH_NAMESPACES})
    return f"kernel:{custom[0]}" if custom else "forloop"


_TORCH_NAMESPACES = {"aten", "prims", "prim", "profiler", "_c10d_functional", "c10d"}


# ---------------------------------------------------------------------------------------
# expected


def has_formula(name: str) -> bool:
    """Whether `expected_state` knows the registry name's (or import path's) algorithm."""
    desc = registry.lookup(name)
    return desc is not None and desc.state is not None


def expected_state(optimizer: torch.optim.Optimizer, device: str | torch.device | None = None) -> StateBytes | None:
    """State the optimizer's algorithm creates after at least one step() in which every
    parameter had a gradient, from each parameter's shape/dtype/device and its group's options
    only (never `optimizer.state`). None for classes without a formula (other import paths,
    subclasses), whose state layout is unknown.

    Parameters that never receive a gradient get no state in torch (except Adagrad, which
    creates it in __init__), so for them measured < expected: that gap is information.
    """
    desc = registry.descriptor_of(type(optimizer))
    if desc is None or desc.state is None:
        return None
    planned = [t for g in optimizer.param_groups for p in g["params"] for t in desc.state(p, g, optimizer)]
    planned += desc.shared_state(optimizer) if desc.shared_state is not None else []
    want = _as_device(device)
    kept = [t for t in planned if _device_matches(t.device, want)]
    scalar = sum(t.nbytes for t in kept if t.shape == ())
    elem = sum(t.nbytes for t in kept if t.shape != ())
    return StateBytes(elem, scalar, sum(round_alloc(t.nbytes) for t in kept), len(kept))


class _OnCuda(NamedTuple):
    """A parameter as the formulas see it, placed on a CUDA device (shape, dtype, device)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device = torch.device("cuda")

    def dim(self) -> int:
        return len(self.shape)


def host_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The 0-dim state tensors (`step`, NAdam's `mu_product`) this optimizer would keep on the
    host if its parameters were on CUDA, read from the same formulas as `expected_state`
    (e.g. non-fused, non-capturable Adam's `step`). Empty for classes without a formula."""
    desc = registry.descriptor_of(type(optimizer))
    if desc is None or desc.state is None or not desc.in_torch:  # third-party formulas need real tensors
        return []
    out: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            planned = desc.state(_OnCuda(p.shape, p.dtype), group, optimizer)  # type: ignore[arg-type]
            if not any(t.shape == () and t.device == _CPU for t in planned):
                continue
            state = optimizer.state.get(p, {})
            out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() == 0]
    return out
