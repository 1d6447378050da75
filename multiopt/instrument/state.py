"""Optimizer-state bytes, three ways, to the byte: what an optimizer holds (walked), what it
allocated and keeps alive (attributed), and what its algorithm says it should hold (expected).

`measured_state` walks the optimizer object (`optimizer.state`, its other attributes, and
containers, objects, slots, dataclasses and tensor subclasses inside them) and counts unique
storages, so aliases are paid once and tensors that are really parameters or gradients are
not paid at all. `attributed_state` counts the storages a ledger probe saw born while the
optimizer was built (`constructing_optimizer` names the owner) or stepped that are still
alive: it never reads the state, so state the walk cannot reach shows as a gap.
`expected_state` never looks at `optimizer.state`: it derives the same numbers from each
parameter's shape, dtype and device and its param_group's options, from a formula per
registered optimizer, written from torch 2.13's `torch/optim/*.py` (third-party ones, named
by import path, from their installed sources: see `_THIRD_PARTY`). The three agreeing is the
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
import math
import sys
import types
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.optim.optimizer import _get_scalar_dtype
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..train.optimizers import name_of
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


class _Planned(NamedTuple):
    """One state tensor the algorithm creates: its shape, dtype and device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_Formula = Callable[[torch.Tensor, dict[str, Any]], list[_Planned]]


def _like(p: torch.Tensor, n: int = 1) -> list[_Planned]:
    """n tensors shaped, typed and placed like the parameter (zeros_like / clone of grad); for a
    sharded parameter (FSDP's DTensor) like its local shard, which is what `zeros_like` allocates
    on this rank (the shard without FSDP's padding)."""
    shape = tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
    return [_Planned(shape, p.dtype, p.device) for _ in range(n)]


def _scalars(n: int, device: torch.device, dtype: torch.dtype | None = None) -> list[_Planned]:
    """n 0-dim tensors; dtype defaults to torch's `_get_scalar_dtype()` (float32, or float64
    when the default dtype is float64), read now: torch reads it when state is created."""
    return [_Planned((), dtype or _get_scalar_dtype(), device) for _ in range(n)]


def _step_on(p: torch.Tensor, on_param_device: bool) -> torch.device:
    """Where `step` lives: with the parameter under capturable/fused, else deliberately on the
    CPU (torch avoids a kernel launch per scalar update)."""
    return p.device if on_param_device else _CPU


def _sgd(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """SGD: nothing when momentum == 0; else one momentum_buffer per element (a clone of the
    first grad, or empty_like under fused). Nesterov and dampening use the same buffer. No step."""
    return _like(p) if g["momentum"] != 0 else []


def _adam(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """Adam/AdamW: exp_avg (m) and exp_avg_sq (v), one each per element; amsgrad adds
    max_exp_avg_sq. step is a 0-dim tensor per parameter: float32 on the parameter's device
    under fused; `_get_scalar_dtype()` on the parameter's device under capturable; else
    `_get_scalar_dtype()` on the CPU."""
    fused = bool(g.get("fused"))
    dtype = _get_scalar_dtype(is_fused=True) if fused else _get_scalar_dtype()
    step = _scalars(1, _step_on(p, fused or g["capturable"]), dtype)
    return step + _like(p, 3 if g["amsgrad"] else 2)


def _adamax(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """Adamax: exp_avg and exp_inf (infinity-norm second moment) per element; step (0-dim,
    on the parameter's device under capturable, else CPU)."""
    return _scalars(1, _step_on(p, g["capturable"])) + _like(p, 2)


def _nadam(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """NAdam: exp_avg and exp_avg_sq per element; step and mu_product (the running product of
    momentum coefficients), both 0-dim, placed like Adam's step under capturable.
    decoupled_weight_decay changes the update, not the state."""
    return _scalars(2, _step_on(p, g["capturable"])) + _like(p, 2)


def _radam(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """RAdam: exp_avg and exp_avg_sq per element; step (0-dim). decoupled_weight_decay and the
    rectification term add no state."""
    return _scalars(1, _step_on(p, g["capturable"])) + _like(p, 2)


def _adagrad(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """Adagrad: sum (accumulated squared grads) per element; step (0-dim: float32 on the
    parameter's device under fused, else CPU). Created in __init__ for every parameter, so
    it exists before any step and for parameters that never get a gradient."""
    fused = bool(g.get("fused"))
    dtype = _get_scalar_dtype(is_fused=True) if fused else _get_scalar_dtype()
    return _scalars(1, _step_on(p, fused), dtype) + _like(p)


def _adadelta(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """Adadelta: square_avg and acc_delta per element; step (0-dim)."""
    return _scalars(1, _step_on(p, g["capturable"])) + _like(p, 2)


def _rmsprop(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """RMSprop: square_avg per element; momentum > 0 adds momentum_buffer; centered adds
    grad_avg; step (0-dim)."""
    n = 1 + (g["momentum"] > 0) + bool(g["centered"])
    return _scalars(1, _step_on(p, g["capturable"])) + _like(p, n)


def _rprop(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """Rprop: prev (last grad's sign source) and step_size per element; step (0-dim)."""
    return _scalars(1, _step_on(p, g["capturable"])) + _like(p, 2)


def _asgd(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """ASGD: ax (the running average of the parameter) per element; step, eta and mu, three
    0-dim tensors, always on the parameter's device (capturable or not)."""
    return _scalars(3, p.device) + _like(p)


def _adafactor(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """Adafactor: for ndim >= 2 a factored second moment, row_var (shape with the last dim set
    to 1) and col_var (shape with the second-to-last dim set to 1), so O(rows + cols) per
    matrix; for ndim < 2 a full variance like the parameter. step is 0-dim, always on the CPU."""
    state = _scalars(1, _CPU)
    if p.dim() > 1:
        row = list(p.shape)
        row[-1] = 1
        col = list(p.shape)
        col[-2] = 1
        state += [_Planned(tuple(row), p.dtype, p.device), _Planned(tuple(col), p.dtype, p.device)]
    else:
        state += _like(p)
    return state


def _muon(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """Muon (2-D parameters only): one momentum_buffer per element, created even when
    momentum == 0. No step: the Newton-Schulz update needs no bias correction."""
    return _like(p)


_FORMULAS: dict[str, _Formula] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adam,
    "adamax": _adamax,
    "nadam": _nadam,
    "radam": _radam,
    "adagrad": _adagrad,
    "adadelta": _adadelta,
    "rmsprop": _rmsprop,
    "rprop": _rprop,
    "asgd": _asgd,
    "adafactor": _adafactor,
    "muon": _muon,
}


# ---------------------------------------------------------------------------------------
# third-party optimizers, by the import path `name_of` gives their class. Each formula was
# read from the installed source of the version named beside it and takes the optimizer too:
# these libraries keep options outside param_groups (bitsandbytes' `args`, torchao's
# `block_size`). `_SHARED` adds the per-optimizer storages all parameters share.
# bitsandbytes 0.50.2 (optim/optimizer.py), torchao 0.18.0 (optim/adam.py, subclass_*.py),
# pytorch-optimizer 4.1.0 (optimizer/lion.py, adan.py, soap.py), schedulefree 1.4.1.

_F32 = torch.float32
_U8 = torch.uint8


def _bnb(n_states: int) -> Callable[[torch.Tensor, dict[str, Any], Any], list[_Planned]]:
    """bitsandbytes Optimizer1State/Optimizer2State, blockwise: per parameter `n_states`
    buffers, float32 like the parameter below `min_8bit_size` elements, else uint8 codes plus
    one float32 absmax per 256-element block; `unorm_vec` (one float32) when max_unorm > 0.
    `step` is a Python int."""
    def formula(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[_Planned]:
        args = opt.args
        n = p.numel()
        if args.optim_bits == 32 or n < args.min_8bit_size:
            state = [_Planned(tuple(p.shape), _F32, p.device)] * n_states
        else:
            blocks = -(-n // 256)
            state = [_Planned(tuple(p.shape), _U8, p.device), _Planned((blocks,), _F32, p.device)] * n_states
        return state + ([_Planned((1,), _F32, p.device)] if args.max_unorm > 0 else [])
    return formula


def _bnb_qmaps(opt: Any) -> list[_Planned]:
    """The two 256-entry float32 quantization maps (signed, unsigned) `fill_qmap` makes in
    __init__ for 8-bit optimizers, shared by every parameter (state holds them by reference)."""
    dev = opt.param_groups[0]["params"][0].device
    return [_Planned((256,), _F32, dev), _Planned((256,), _F32, dev)] if opt.args.optim_bits == 8 else []


def _torchao(codes: Callable[[int], tuple[int, torch.dtype]], qmap: int) -> Callable[..., list[_Planned]]:
    """torchao low-bit AdamW: `step` = torch.tensor(0.0) (default dtype, CPU); exp_avg and
    exp_avg_sq (and max_exp_avg_sq under amsgrad) each a quantized subclass when the parameter
    has >= 4096 elements divisible by `block_size` (codes, one float32 scale per block, and
    its own `qmap`-entry float32 map), else zeros like the parameter."""
    def formula(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[_Planned]:
        n, bs = p.numel(), opt.block_size
        if n >= 4096 and n % bs == 0:
            numel, dtype = codes(n)
            one = [_Planned((numel,), dtype, p.device), _Planned((n // bs,), _F32, p.device)]
            one += [_Planned((qmap,), _F32, p.device)] if qmap else []
        else:
            one = _like(p)
        return _scalars(1, _CPU, torch.get_default_dtype()) + one * (3 if g["amsgrad"] else 2)
    return formula


def _adanorm(p: torch.Tensor, g: dict[str, Any]) -> list[_Planned]:
    """pytorch-optimizer's AdaNorm option: one (1,)-shaped running gradient norm."""
    return [_Planned((1,), p.dtype, p.device)] if g.get("adanorm") else []


def _soap(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[_Planned]:
    """SOAP (merge_dims=False): exp_avg and exp_avg_sq like the parameter, and per dimension
    of size <= max_precondition_dim a preconditioner GG and its eigenbasis Q, both dim x dim;
    a vector only when precondition_1d."""
    if g["merge_dims"]:
        raise NotImplementedError("SOAP with merge_dims=True has no formula")
    dims = [] if p.dim() == 1 and not g["precondition_1d"] else list(p.shape)
    square = [_Planned((d, d), p.dtype, p.device) for d in dims if d <= g["max_precondition_dim"]]
    return _like(p, 2) + square * 2


_THIRD_PARTY: dict[str, Callable[[torch.Tensor, dict[str, Any], Any], list[_Planned]]] = {
    "bitsandbytes.optim.adam:Adam8bit": _bnb(2),
    "bitsandbytes.optim.adamw:AdamW8bit": _bnb(2),
    "bitsandbytes.optim.lion:Lion8bit": _bnb(1),
    "bitsandbytes.optim.sgd:SGD8bit": _bnb(1),
    "torchao.optim.adam:AdamW8bit": _torchao(lambda n: (n, _U8), 256),
    "torchao.optim.adam:AdamW4bit": _torchao(lambda n: (n // 2, _U8), 16),
    "torchao.optim.adam:AdamWFp8": _torchao(lambda n: (n, torch.float8_e4m3fn), 0),
    "pytorch_optimizer.optimizer.lion:Lion": lambda p, g, opt: _like(p) + _adanorm(p, g),
    # exp_avg, exp_avg_sq, exp_avg_diff, previous_grad
    "pytorch_optimizer.optimizer.adan:Adan": lambda p, g, opt: _like(p, 4) + _adanorm(p, g),
    "pytorch_optimizer.optimizer.soap:SOAP": _soap,
    # z (the averaged iterate) and exp_avg_sq; SGD keeps only z
    "schedulefree.adamw_schedulefree:AdamWScheduleFree": lambda p, g, opt: _like(p, 2),
    "schedulefree.sgd_schedulefree:SGDScheduleFree": lambda p, g, opt: _like(p),
}


def _torchao_lr(opt: Any) -> list[_Planned]:
    """torchao's add_param_group turns each group's float lr into a float32 0-dim CPU tensor
    (so a changed lr does not recompile the step)."""
    return _scalars(len(opt.param_groups), _CPU, _F32)


_SHARED: dict[str, Callable[[Any], list[_Planned]]] = {
    **{name: _bnb_qmaps for name in _THIRD_PARTY if name.startswith("bitsandbytes.")},
    **{name: _torchao_lr for name in _THIRD_PARTY if name.startswith("torchao.")},
}


def has_formula(name: str) -> bool:
    """Whether `expected_state` knows the registry name's (or import path's) algorithm."""
    return name in _FORMULAS or name in _THIRD_PARTY


def expected_state(optimizer: torch.optim.Optimizer, device: str | torch.device | None = None) -> StateBytes | None:
    """State the optimizer's algorithm creates after at least one step() in which every
    parameter had a gradient, from each parameter's shape/dtype/device and its group's options
    only (never `optimizer.state`). None for classes without a formula (other import paths,
    subclasses), whose state layout is unknown.

    Parameters that never receive a gradient get no state in torch (except Adagrad, which
    creates it in __init__), so for them measured < expected: that gap is information.
    """
    name = name_of(optimizer)
    if name in _FORMULAS:
        formula = _FORMULAS[name]
        planned = [t for g in optimizer.param_groups for p in g["params"] for t in formula(p, g)]
    elif name in _THIRD_PARTY:
        formula3 = _THIRD_PARTY[name]
        planned = [t for g in optimizer.param_groups for p in g["params"] for t in formula3(p, g, optimizer)]
        planned += _SHARED.get(name, lambda opt: [])(optimizer)
    else:
        return None
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
    formula = _FORMULAS.get(name_of(optimizer))
    if formula is None:
        return []
    out: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            planned = formula(_OnCuda(p.shape, p.dtype), group)  # type: ignore[arg-type]
            if not any(t.shape == () and t.device == _CPU for t in planned):
                continue
            state = optimizer.state.get(p, {})
            out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() == 0]
    return out
