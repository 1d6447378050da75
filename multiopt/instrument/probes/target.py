"""Target "cuda" for the CPU probes: what a CUDA device would report for the same program.

The tracked and fake probes see every storage born and dying, in order. `CudaTarget` replays
those events through the caching-allocator model (`instrument/allocator.py`), so allocated
(blocks, as `torch.cuda.memory_allocated` counts them), reserved and their peaks are CUDA's,
and adds what only CUDA allocates through the caching allocator: library workspaces.

Workspaces (torch 2.11, checked against the H200 records in reports/gpu-h200: at step start
`mem_step_start - params - state - batch` is 65 MiB on every config, reserved 66 MiB on the
smallest; see bench/cuda_target_check.py):

- cuBLAS keeps one workspace per (handle, stream) (`aten/src/ATen/cuda/CublasHandlePool.cpp`,
  `getCurrentCUDABlasHandle` / `cublas_handle_stream_to_workspace`), allocated through the
  caching allocator when a thread first runs a matmul. Its size is `getChosenWorkspaceSize()`:
  `CUBLAS_WORKSPACE_CONFIG` if set, else `:4096:8` = 32 MiB on Hopper (sm90+) and
  `:4096:2:16:8` = 8.125 MiB before it. A training step has two matmul threads: the caller
  (forward, optimizer steps) and autograd's device thread (backward) -> 2 x 32 MiB.
- 1 MiB more, once, at the first forward matmul: the cuBLASLt workspace of the bias-fused
  `addmm` path (`getCUDABlasLtWorkspace`, `TORCH_CUBLASLT_WORKSPACE_SIZE`, default 1024 KiB).

Reductions (`sum`, `mean`, norms, `amax`/`amin`) that split one output over thread blocks
allocate a staging buffer and semaphores for the kernel's duration (`probes/reduce.py`, from
`Reduce.cuh`); their size depends on the GPU's SM count (`Workspaces.gpu`).

Set them with `Workspaces` (e.g. for another GPU family or `CUBLAS_WORKSPACE_CONFIG`).
Non-fused Adam-family `step` counters are host tensors on CUDA: `host()` takes them out.

Not modelled, and said so (`unmodelled`, the record's field of that name): ops whose CUDA
kernels keep or borrow different memory from the CPU kernel that ran. Attention
(`scaled_dot_product_attention`): the CPU runs its flash kernel; CUDA picks flash,
memory-efficient or cuDNN attention by dtype, shape and GPU, whose saved tensors (the
memory-efficient kernel pads logsumexp to 32 rows, RNG state for dropout) and backward
workspaces differ. Whatever else the model gets right, a config that ran such an op is not
CUDA's to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..allocator import ALLOC_MODEL, AllocatorConfig, AllocatorOOM, CachingAllocator, LoggedAllocator
from .reduce import GpuProps, layout, reduction_ops, staging

_MiB = 1 << 20


@dataclass(frozen=True)
class Workspaces:
    """Bytes CUDA libraries allocate through the caching allocator, and when (see module doc).
    Defaults: torch 2.11 on an H200 (sm90)."""

    cublas: int = 32 * _MiB  # per matmul thread: forward/optimizer thread, autograd thread
    cublaslt: int = 1 * _MiB  # once, at the first matmul outside backward
    gpu: GpuProps = GpuProps()  # sizes the reductions' staging buffers (probes/reduce.py)

    @property
    def total(self) -> int:
        return 2 * self.cublas + self.cublaslt


# aten op -> what the record names as not modelled for CUDA (see the module doc)
_UNMODELLED = {
    "_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA kernels)",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "attention (SDPA kernels)",
}


def _overloads(names: Iterable[str]) -> list[tuple[Any, str]]:
    """(OpOverload, its packet's name) for every overload of the named aten ops torch has."""
    aten = torch.ops.aten
    return [(getattr(packet, o), name) for name in names if (packet := getattr(aten, name, None)) is not None
            for o in packet.overloads()]


def _matmul_ops() -> list[Any]:
    return [op for op, _ in _overloads(("mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot",
                                        "_addmm_activation", "_scaled_dot_product_efficient_attention",
                                        "_scaled_dot_product_flash_attention"))]


class CudaTarget:
    """The ledger's hook for target "cuda": its allocator model, workspaces and host tensors."""

    def __init__(self, label: str, config: AllocatorConfig | None = None, limit: int | None = None,
                 workspaces: Workspaces = Workspaces()) -> None:
        self.label = label
        self.allocator = CachingAllocator(config or AllocatorConfig.from_env(), limit)
        self.workspaces = workspaces
        self._host: set[int] = set()
        self._threads_seen: set[str] = set()
        self.unmodelled: set[str] = set()  # what ran that CUDA would allocate for differently

    @property
    def alloc_model(self) -> str:
        return ALLOC_MODEL

    def attach(self, ledger: Any) -> None:
        ledger.on_alloc = self.on_alloc
        ledger.on_free = self.on_free
        ledger.op_hooks = {**dict.fromkeys(_matmul_ops(), self.on_matmul),
                        **{op: self._on_reduce(entry) for op, entry in reduction_ops().items()},
                        **{op: self._noting(_UNMODELLED[name]) for op, name in _overloads(_UNMODELLED)}}

    def log_requests(self, log: list) -> None:
        """Keep the allocator model's requests in `log` from now on (allocator.LoggedAllocator).
        Before the first allocation only: the log is the whole program or nothing."""
        if len(self.allocator) or self.allocator.reserved:
            raise RuntimeError("log_requests after allocations: the log would miss the program's start")
        self.allocator = LoggedAllocator(log, self.allocator.config, self.allocator.limit)

    def _noting(self, what: str) -> Callable[[tuple, dict, Any], None]:
        def note(args: tuple, kwargs: dict, out: Any) -> None:
            self.unmodelled.add(what)
        return note

    def _on_reduce(self, entry: tuple[Callable[[tuple, dict], Any], bool]) -> Callable[[tuple, dict, Any], None]:
        dims_of, own_type = entry

        def on_reduce(args: tuple, kwargs: dict, out: Any) -> None:
            # gpu_reduce_kernel: the output exists; buffer then semaphores are allocated,
            # the kernel runs, and they die in reverse order before the op returns.
            t = args[0]
            key = layout(t, dims_of(args, kwargs), t.element_size() if own_type else None)
            buf, sem = staging(key, self.workspaces.gpu)
            try:
                self.allocator.stage(buf, sem, (key, self.workspaces.gpu))
            except AllocatorOOM as e:
                raise self._out_of_memory(e) from None
        return on_reduce

    def _out_of_memory(self, e: AllocatorOOM) -> torch.OutOfMemoryError:
        """The allocator model's refusal as the error a CUDA device raises."""
        return torch.OutOfMemoryError(f"{self.label} probe (target cuda) out of memory: {e}")

    def on_alloc(self, key: int, nbytes: int) -> None:
        try:
            self.allocator.malloc(key, nbytes)
        except AllocatorOOM as e:
            raise self._out_of_memory(e) from None

    def on_free(self, key: int) -> None:
        if key in self._host:
            self._host.discard(key)
        else:
            self.allocator.free(key)

    def on_matmul(self, args: tuple = (), kwargs: dict | None = None, out: Any = None) -> None:
        # Autograd runs CUDA backward on its own device thread, with its own cuBLAS handle.
        thread = "backward" if torch._C._current_graph_task_id() != -1 else "main"
        if thread in self._threads_seen:
            return
        self._threads_seen.add(thread)
        self.on_alloc(("cublas", thread), self.workspaces.cublas)  # type: ignore[arg-type]
        if thread == "main":
            self.on_alloc(("cublaslt", thread), self.workspaces.cublaslt)  # type: ignore[arg-type]

    def host(self, tensors: Callable[[], Any] | Any) -> None:
        """These storages live on the host under CUDA: out of the device's allocator."""
        for t in tensors:
            key = id(t.untyped_storage())
            if key in self.allocator and key not in self._host:
                self.allocator.free(key)
                self._host.add(key)

    def is_host(self, key: int) -> bool:
        return key in self._host

    def extra(self) -> dict[str, int]:
        return {"reserved": self.allocator.reserved, "peak_reserved": self.allocator.peak_reserved}
