"""What each optimizer's algorithm keeps and does per parameter, written from its source:
the state tensors a step creates (`Planned`: shape, dtype, device) and the work a step does
per parameter element (`Work`). The registry (`optimizers.py`) attaches one of each to an
optimizer's descriptor; the measure stage (`instrument/state.py`) turns the state into bytes.

State formulas take the parameter, its param_group's options and the optimizer (third-party
libraries keep options outside param_groups: bitsandbytes' `args`, torchao's `block_size`),
and never look at `optimizer.state`. torch's are written from torch 2.13's `torch/optim/*.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch.optim.optimizer import _get_scalar_dtype

_CPU = torch.device("cpu")

# A state formula: (parameter, its param_group, the optimizer) -> the state tensors planned.
StateFormula = Callable[[torch.Tensor, dict[str, Any], Any], "list[Planned]"]
# State the optimizer keeps once for all its parameters (shared quantization maps, ...).
SharedFormula = Callable[[Any], "list[Planned]"]


class Planned(NamedTuple):
    """One state tensor the algorithm creates: its shape, dtype and device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize




def like(p: torch.Tensor, n: int = 1) -> list[Planned]:
    """n tensors shaped, typed and placed like the parameter (zeros_like / clone of grad); for a
    sharded parameter (FSDP's DTensor) like its local shard, which is what `zeros_like` allocates
    on this rank (the shard without FSDP's padding)."""
    shape = tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
    return [Planned(shape, p.dtype, p.device) for _ in range(n)]


def _scalars(n: int, device: torch.device, dtype: torch.dtype | None = None) -> list[Planned]:
    """n 0-dim tensors; dtype defaults to torch's `_get_scalar_dtype()` (float32, or float64
    when the default dtype is float64), read now: torch reads it when state is created."""
    return [Planned((), dtype or _get_scalar_dtype(), device) for _ in range(n)]


def _step_on(p: torch.Tensor, on_param_device: bool) -> torch.device:
    """Where `step` lives: with the parameter under capturable/fused, else deliberately on the
    CPU (torch avoids a kernel launch per scalar update)."""
    return p.device if on_param_device else _CPU


def sgd(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """SGD: nothing when momentum == 0; else one momentum_buffer per element (a clone of the
    first grad, or empty_like under fused). Nesterov and dampening use the same buffer. No step."""
    return like(p) if g["momentum"] != 0 else []


def adam(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """Adam/AdamW: exp_avg (m) and exp_avg_sq (v), one each per element; amsgrad adds
    max_exp_avg_sq. step is a 0-dim tensor per parameter: float32 on the parameter's device
    under fused; `_get_scalar_dtype()` on the parameter's device under capturable; else
    `_get_scalar_dtype()` on the CPU."""
    fused = bool(g.get("fused"))
    dtype = _get_scalar_dtype(is_fused=True) if fused else _get_scalar_dtype()
    step = _scalars(1, _step_on(p, fused or g["capturable"]), dtype)
    return step + like(p, 3 if g["amsgrad"] else 2)


def adamax(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """Adamax: exp_avg and exp_inf (infinity-norm second moment) per element; step (0-dim,
    on the parameter's device under capturable, else CPU)."""
    return _scalars(1, _step_on(p, g["capturable"])) + like(p, 2)


def nadam(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """NAdam: exp_avg and exp_avg_sq per element; step and mu_product (the running product of
    momentum coefficients), both 0-dim, placed like Adam's step under capturable.
    decoupled_weight_decay changes the update, not the state."""
    return _scalars(2, _step_on(p, g["capturable"])) + like(p, 2)


def radam(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """RAdam: exp_avg and exp_avg_sq per element; step (0-dim). decoupled_weight_decay and the
    rectification term add no state."""
    return _scalars(1, _step_on(p, g["capturable"])) + like(p, 2)


def adagrad(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """Adagrad: sum (accumulated squared grads) per element; step (0-dim: float32 on the
    parameter's device under fused, else CPU). Created in __init__ for every parameter, so
    it exists before any step and for parameters that never get a gradient."""
    fused = bool(g.get("fused"))
    dtype = _get_scalar_dtype(is_fused=True) if fused else _get_scalar_dtype()
    return _scalars(1, _step_on(p, fused), dtype) + like(p)


def adadelta(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """Adadelta: square_avg and acc_delta per element; step (0-dim)."""
    return _scalars(1, _step_on(p, g["capturable"])) + like(p, 2)


def rmsprop(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """RMSprop: square_avg per element; momentum > 0 adds momentum_buffer; centered adds
    grad_avg; step (0-dim)."""
    n = 1 + (g["momentum"] > 0) + bool(g["centered"])
    return _scalars(1, _step_on(p, g["capturable"])) + like(p, n)


def rprop(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """Rprop: prev (last grad's sign source) and step_size per element; step (0-dim)."""
    return _scalars(1, _step_on(p, g["capturable"])) + like(p, 2)


def asgd(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """ASGD: ax (the running average of the parameter) per element; step, eta and mu, three
    0-dim tensors, always on the parameter's device (capturable or not)."""
    return _scalars(3, p.device) + like(p)


def adafactor(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """Adafactor: for ndim >= 2 a factored second moment, row_var (shape with the last dim set
    to 1) and col_var (shape with the second-to-last dim set to 1), so O(rows + cols) per
    matrix; for ndim < 2 a full variance like the parameter. step is 0-dim, always on the CPU."""
    state = _scalars(1, _CPU)
    if p.dim() > 1:
        row = list(p.shape)
        row[-1] = 1
        col = list(p.shape)
        col[-2] = 1
        state += [Planned(tuple(row), p.dtype, p.device), Planned(tuple(col), p.dtype, p.device)]
    else:
        state += like(p)
    return state


def muon(p: torch.Tensor, g: dict[str, Any], opt: Any = None) -> list[Planned]:
    """Muon (2-D parameters only): one momentum_buffer per element, created even when
    momentum == 0. No step: the Newton-Schulz update needs no bias correction."""
    return like(p)


_F32 = torch.float32
_U8 = torch.uint8


def bnb(n_states: int) -> Callable[[torch.Tensor, dict[str, Any], Any], list[Planned]]:
    """bitsandbytes Optimizer1State/Optimizer2State, blockwise: per parameter `n_states`
    buffers, float32 like the parameter below `min_8bit_size` elements, else uint8 codes plus
    one float32 absmax per 256-element block; `unorm_vec` (one float32) when max_unorm > 0.
    `step` is a Python int."""
    def formula(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[Planned]:
        args = opt.args
        n = p.numel()
        if args.optim_bits == 32 or n < args.min_8bit_size:
            state = [Planned(tuple(p.shape), _F32, p.device)] * n_states
        else:
            blocks = -(-n // 256)
            state = [Planned(tuple(p.shape), _U8, p.device), Planned((blocks,), _F32, p.device)] * n_states
        return state + ([Planned((1,), _F32, p.device)] if args.max_unorm > 0 else [])
    return formula


def bnb_qmaps(opt: Any) -> list[Planned]:
    """The two 256-entry float32 quantization maps (signed, unsigned) `fill_qmap` makes in
    __init__ for 8-bit optimizers, shared by every parameter (state holds them by reference)."""
    dev = opt.param_groups[0]["params"][0].device
    return [Planned((256,), _F32, dev), Planned((256,), _F32, dev)] if opt.args.optim_bits == 8 else []


def torchao(codes: Callable[[int], tuple[int, torch.dtype]], qmap: int) -> Callable[..., list[Planned]]:
    """torchao low-bit AdamW: `step` = torch.tensor(0.0) (default dtype, CPU); exp_avg and
    exp_avg_sq (and max_exp_avg_sq under amsgrad) each a quantized subclass when the parameter
    has >= 4096 elements divisible by `block_size` (codes, one float32 scale per block, and
    its own `qmap`-entry float32 map), else zeros like the parameter."""
    def formula(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[Planned]:
        n, bs = p.numel(), opt.block_size
        if n >= 4096 and n % bs == 0:
            numel, dtype = codes(n)
            one = [Planned((numel,), dtype, p.device), Planned((n // bs,), _F32, p.device)]
            one += [Planned((qmap,), _F32, p.device)] if qmap else []
        else:
            one = like(p)
        return _scalars(1, _CPU, torch.get_default_dtype()) + one * (3 if g["amsgrad"] else 2)
    return formula


def adanorm(p: torch.Tensor, g: dict[str, Any]) -> list[Planned]:
    """pytorch-optimizer's AdaNorm option: one (1,)-shaped running gradient norm."""
    return [Planned((1,), p.dtype, p.device)] if g.get("adanorm") else []


def soap(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[Planned]:
    """SOAP (merge_dims=False): exp_avg and exp_avg_sq like the parameter, and per dimension
    of size <= max_precondition_dim a preconditioner GG and its eigenbasis Q, both dim x dim;
    a vector only when precondition_1d."""
    if g["merge_dims"]:
        raise NotImplementedError("SOAP with merge_dims=True has no formula")
    dims = [] if p.dim() == 1 and not g["precondition_1d"] else list(p.shape)
    square = [Planned((d, d), p.dtype, p.device) for d in dims if d <= g["max_precondition_dim"]]
    return like(p, 2) + square * 2


def torchao_lr(opt: Any) -> list[Planned]:
    """torchao's add_param_group turns each group's float lr into a float32 0-dim CPU tensor
    (so a changed lr does not recompile the step)."""
    return _scalars(len(opt.param_groups), _CPU, _F32)


def lion(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[Planned]:
    """pytorch-optimizer Lion: exp_avg like the parameter (+ AdaNorm's norm)."""
    return like(p) + adanorm(p, g)


def adan(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[Planned]:
    """pytorch-optimizer Adan: exp_avg, exp_avg_sq, exp_avg_diff, previous_grad (+ AdaNorm's norm)."""
    return like(p, 4) + adanorm(p, g)


def adamw_schedulefree(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[Planned]:
    """schedulefree AdamW: z (the averaged iterate) and exp_avg_sq."""
    return like(p, 2)


def sgd_schedulefree(p: torch.Tensor, g: dict[str, Any], opt: Any) -> list[Planned]:
    """schedulefree SGD: z only."""
    return like(p)


torchao_8bit = torchao(lambda n: (n, _U8), 256)
torchao_4bit = torchao(lambda n: (n // 2, _U8), 16)
torchao_fp8 = torchao(lambda n: (n, torch.float8_e4m3fn), 0)


# ---------------------------------------------------------------------------------------
# work: what one step does per parameter element


@dataclass(frozen=True)
class Work:
    """What one optimizer step does per parameter element in torch's for-loop implementation
    (`_single_tensor_*`), once its state exists: `kernels` elementwise kernels, each reading
    `reads` and writing `writes` parameter-sized tensors in all (a tensor read twice by one
    kernel counts once) and doing `flops` floating-point operations (lerp, addcmul, addcdiv:
    3 each; add with alpha: 2; mul, sqrt, div, add: 1). Bytes per element are
    (reads + writes) x the element size. The foreach implementation runs the same ops over
    lists (same reads, writes and flops); a fused kernel makes one pass, not counted here."""

    kernels: int
    reads: int
    writes: int
    flops: int

    def __add__(self, other: "Work") -> "Work":
        return Work(self.kernels + other.kernels, self.reads + other.reads, self.writes + other.writes,
                    self.flops + other.flops)


_NONE = Work(0, 0, 0, 0)
_ADD_ALPHA = Work(1, 2, 1, 2)  # out = a + alpha * b (a new tensor, or in place)
_MUL = Work(1, 1, 1, 1)        # a *= c, -a, sqrt(a), a / c, a + c
# WorkFormula: a param_group's options -> Work, or None where the options leave the plain
# for-loop and foreach paths these counts were read from (capturable, differentiable, fused).
WorkFormula = Callable[[Mapping[str, Any]], "Work | None"]


def _plain(g: Mapping[str, Any]) -> bool:
    return not (g.get("capturable") or g.get("differentiable") or g.get("fused"))


def sgd_work(g: Mapping[str, Any]) -> Work | None:
    """`_single_tensor_sgd`: -grad under maximize; grad + wd * param; buf.mul_(momentum)
    .add_(grad, alpha=1 - dampening); under nesterov grad + momentum * buf; param.add_(d, alpha=-lr).
    So plain SGD is one kernel (3 tensors, 2 flops) and momentum SGD three (8 tensors, 5 flops)."""
    if not _plain(g):
        return None
    work = _MUL if g.get("maximize") else _NONE
    work += _ADD_ALPHA if g.get("weight_decay") else _NONE
    if g.get("momentum"):
        work += _MUL + _ADD_ALPHA + (_ADD_ALPHA if g.get("nesterov") else _NONE)
    return work + _ADD_ALPHA


def adam_work(g: Mapping[str, Any]) -> Work | None:
    """`_single_tensor_adam` (Adam and AdamW): -grad under maximize; weight decay, decoupled
    (AdamW: param.mul_(1 - lr * wd)) or added to the grad; exp_avg.lerp_(grad) (3 tensors, 3
    flops); exp_avg_sq.mul_(beta2).addcmul_(grad, grad) (1 + 3 flops); under amsgrad
    torch.maximum(max, exp_avg_sq, out=max); denom = (v.sqrt() / bc2).add_(eps) (three
    kernels, a temporary); param.addcdiv_(exp_avg, denom) (4 tensors, 3 flops).
    Plain Adam: 7 kernels, 11 reads, 7 writes, 13 flops per element; AdamW adds its decay."""
    if not _plain(g):
        return None
    work = _MUL if g.get("maximize") else _NONE
    if g.get("weight_decay"):
        work += _MUL if g.get("decoupled_weight_decay") else _ADD_ALPHA
    work += Work(1, 2, 1, 3) + _MUL + Work(1, 2, 1, 3)  # lerp; mul_; addcmul_
    work += Work(1, 2, 1, 1) if g.get("amsgrad") else _NONE  # maximum(..., out=)
    return work + _MUL + _MUL + _MUL + Work(1, 3, 1, 3)  # sqrt, /, +eps; addcdiv_
