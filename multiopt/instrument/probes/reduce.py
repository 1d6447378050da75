"""Scratch memory that CUDA's reduction kernels take from the caching allocator.

ATen's `gpu_reduce_kernel` (`aten/src/ATen/native/cuda/Reduce.cuh`, torch 2.11) picks a launch
configuration in `setReduceConfig`. When that splits one output's inputs across thread blocks
(`config.should_global_reduce()`), the kernel allocates, through the caching allocator, a
staging buffer of `global_memory_size()` bytes and a semaphore array of `semaphore_size()`
bytes, launches, and frees both (their `DataPtr`s die at the end of `gpu_reduce_kernel`,
semaphores first) before the op returns. A CPU probe never sees them: they are neither
outputs nor made through the dispatcher. They raise CUDA's peak, and a large staging buffer
(8 MiB for `torch.norm(g, dim=-2)` of a 1024 x 1024 gradient, Adafactor's column means) also
raises reserved memory.

`staging_bytes` replays `setReduceConfig` for one input tensor. Checked against the H200
records (reports/gpu-h200, torch 2.11): `mean()` of 262,144+ fp32 values takes 2 x 512 B
more at the forward peak, and Adafactor's column norms take
4 * width * ctas * 32 * 4 bytes more at the step peak (bench/cuda_target_check.py).

Simplifications (documented): the input vector width is 4 (`input_vec_size = vt0 = 4`, the
default of every sum/mean/norm/amax kernel); tensors over 2**31 elements (split into 32-bit
sub-iterators, plus an accumulation buffer for 16-bit outputs) and inputs with broadcast
(stride-0) dimensions are not modelled (no scratch counted); a `dtype=` cast inside the op
is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch

_MIN_VALUES_PER_THREAD = 16  # setReduceConfig (CUDA; ROCm uses 128)
_MAX_VALUES_PER_THREAD = 256
_INPUT_VEC_SIZE = 4


@dataclass(frozen=True)
class GpuProps:
    """The device properties `setReduceConfig` reads. Defaults: H200 (sm90)."""

    sm_count: int = 132  # cudaDeviceProp.multiProcessorCount
    max_threads_per_sm: int = 2048  # cudaDeviceProp.maxThreadsPerMultiProcessor
    warp_size: int = 32


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _last_pow2(n: int) -> int:
    return max(1, 1 << (n.bit_length() - 1)) if n > 0 else 1


def _acc_size(dtype: torch.dtype) -> int:
    """sizeof(arg_t) for sum/mean/norm: the accumulate type (at::acc_type, CUDA)."""
    if dtype.is_complex:
        return 16 if dtype == torch.complex128 else 8
    if dtype == torch.float64 or not dtype.is_floating_point:
        return 8  # double; integers accumulate in int64
    return 4  # float, half, bfloat16 (and the float8s) accumulate in float


def _iterator_dims(shape: Sequence[int], strides: Sequence[int], reduced: frozenset[int]) -> list[tuple[int, int, bool]]:
    """TensorIterator's view of a reduction: (size, input stride, reduced) fastest first,
    size-1 dims dropped, reduced dims moved to the front (`reorder_dimensions`: output strides
    of reduced dims are 0), then sorted by input stride, then coalesced (`coalesce_dimensions`)."""
    red = sorted(((int(n), int(s), True) for d, (n, s) in enumerate(zip(shape, strides)) if n != 1 and d in reduced),
                 key=lambda x: x[1])
    # Kept dims follow the (contiguous) output's strides: the last dim is the fastest.
    kept = [(int(shape[d]), int(strides[d]), False) for d in reversed(range(len(shape)))
            if shape[d] != 1 and d not in reduced]
    out: list[tuple[int, int, bool]] = []
    for n, s, r in red + kept:
        if out and out[-1][2] == r and out[-1][1] * out[-1][0] == s:
            pn, ps, _ = out[-1]
            out[-1] = (pn * n, ps, r)
        else:
            out.append((n, s, r))
    return out


def _output_vec_size(dims: list[tuple[int, int, bool]], n_reduce: int, offset: int) -> int:
    """get_output_vec_size: 4, halved until it divides the input's address (in elements;
    blocks are 512-aligned, so the storage offset), the first output dim and every other stride."""
    vec = 4
    for n in [offset, dims[n_reduce][0]] + [s for j, (_, s, _) in enumerate(dims) if j != n_reduce]:
        while n % vec:
            vec //= 2
    return vec


@dataclass
class _Config:
    num_outputs: int
    num_inputs: int
    step_input: int = 1
    step_output: int = 1
    ctas_per_output: int = 1
    output_vec_size: int = 1
    block_x_reduce: bool = False

    def values_per_thread(self) -> int:
        return _div_up(self.num_inputs, self.step_input)

    def grid_x(self) -> int:
        return _div_up(self.num_outputs // self.output_vec_size, self.step_output)


def _block_dims(cfg: _Config, dim0: int, dim1: int, mnt: int, warp: int) -> tuple[int, int]:
    """ReduceConfig::set_block_dimension -> (block_width, block_height)."""
    max_threads = mnt // cfg.output_vec_size
    d0 = _last_pow2(dim0) if dim0 < max_threads else max_threads
    d1 = _last_pow2(dim1) if dim1 < max_threads else max_threads
    width = min(d0, warp)
    height = min(d1, max_threads // width)
    return min(d0, max_threads // height), height


#: what decides a reduction's scratch: (shape, strides, storage offset mod 4, reduced dims,
#: dtype, accumulator bytes); the input's shape and strides are what a batch size changes
Layout = tuple[tuple[int, ...], tuple[int, ...], int, frozenset, torch.dtype, int]


def layout(t: torch.Tensor, dims: Sequence[int] | None, acc_size: int | None = None) -> Layout:
    """The layout `staging` sizes: reducing `t` over `dims` (None or empty: all)."""
    ndim = t.dim()
    reduced = frozenset(range(ndim)) if not dims else frozenset(d % ndim for d in dims)
    return (tuple(t.shape), tuple(t.stride()), t.storage_offset() % 4, reduced, t.dtype, acc_size or _acc_size(t.dtype))


def staging_bytes(t: torch.Tensor, dims: Sequence[int] | None, acc_size: int | None = None,
                  gpu: GpuProps = GpuProps()) -> tuple[int, int]:
    """(staging buffer, semaphores) bytes `gpu_reduce_kernel` allocates to reduce `t` over
    `dims` (None or empty: all), or (0, 0) when it reduces without global memory."""
    return staging(layout(t, dims, acc_size), gpu)


def staging(key: Layout, gpu: GpuProps = GpuProps()) -> tuple[int, int]:
    """`staging_bytes` for a `layout`."""
    # A training step reduces the same few layouts over and over: decide each once.
    return _staging(*key, gpu)


@lru_cache(maxsize=4096)
def _staging(shape: tuple[int, ...], strides: tuple[int, ...], offset: int, reduced: frozenset[int],
             dtype: torch.dtype, acc_size: int, gpu: GpuProps) -> tuple[int, int]:
    numel = 1
    for n in shape:
        numel *= n
    if numel == 0 or numel >= 1 << 31 or any(s == 0 and n > 1 for n, s in zip(shape, strides)):
        return 0, 0
    it = _iterator_dims(shape, strides, reduced)
    n_reduce = sum(r for _, _, r in it)
    num_outputs = 1
    for n, _, r in it:
        num_outputs *= 1 if r else n
    cfg = _Config(num_outputs, numel // num_outputs)
    if it:
        fastest = n_reduce == len(it) or it[0][1] < it[n_reduce][1]
        dim0, dim1 = (cfg.num_inputs, num_outputs) if fastest else (num_outputs, cfg.num_inputs)
        unit_stride = it[0][1] == 1 if fastest else it[n_reduce][1] == 1
    else:
        fastest, dim0, dim1, unit_stride = True, 1, 1, True
    if unit_stride and fastest and dim0 >= 128 and n_reduce == 1:
        dim0 //= _INPUT_VEC_SIZE  # vectorize along input
    elif unit_stride and not fastest:
        cfg.output_vec_size = _output_vec_size(it, n_reduce, offset)
        dim0 //= cfg.output_vec_size  # vectorize along output
    mnt = 256 if dtype == torch.complex128 else 512
    width, height = _block_dims(cfg, dim0, dim1, mnt, gpu.warp_size)
    if fastest:
        cfg.block_x_reduce = True
        cfg.step_input *= width
    else:
        cfg.step_output *= width
    split_warps = cfg.values_per_thread() >= min(height * 16, _MAX_VALUES_PER_THREAD)
    if split_warps:
        cfg.step_input *= height
    else:
        cfg.step_output *= height
    target_grid = gpu.sm_count * (gpu.max_threads_per_sm // (width * height))
    grid = cfg.grid_x()
    vpt = cfg.values_per_thread()
    if not (split_warps and vpt >= _MAX_VALUES_PER_THREAD and grid <= target_grid):
        return 0, 0
    ctas = max(min(_div_up(target_grid, grid), _div_up(vpt, _MIN_VALUES_PER_THREAD)),
               _div_up(vpt, _MAX_VALUES_PER_THREAD))
    if ctas <= 1:
        return 0, 0
    size = acc_size * num_outputs * ctas
    if not cfg.block_x_reduce:
        size *= width * cfg.output_vec_size
    return size, 4 * grid


def _all_dims(args: tuple, kwargs: dict) -> None:
    return None


def _dim_arg(i: int) -> Any:
    def get(args: tuple, kwargs: dict) -> Any:
        d = args[i] if len(args) > i else kwargs.get("dim")
        return [d] if isinstance(d, int) else d
    return get


def reduction_ops() -> dict[Any, tuple[Any, bool]]:
    """ATen ops whose CUDA kernels are `gpu_reduce_kernel`s: op -> (dims getter, whether
    arg_t is the input's own type (max/min) rather than its accumulate type)."""
    aten = torch.ops.aten
    table = {
        "sum.default": (_all_dims, False), "sum.dim_IntList": (_dim_arg(1), False),
        "mean.default": (_all_dims, False), "mean.dim": (_dim_arg(1), False),
        "linalg_vector_norm.default": (_dim_arg(2), False),
        "norm.Scalar": (_all_dims, False), "norm.ScalarOpt_dim": (_dim_arg(2), False),
        "amax.default": (_dim_arg(1), True), "amin.default": (_dim_arg(1), True),
        "all.default": (_all_dims, True), "any.default": (_all_dims, True),  # bool in, bool arg_t
    }
    ops = {}
    for name, entry in table.items():
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            ops[op] = entry
    return ops
