"""Work counters: what a training step does, counted exactly on the tracked and fake probes.

Every op the probe's dispatch mode sees during the instrumented step becomes one `OpWork`:
its phase (and the optimizer whose step ran it), its FLOPs, the bytes it reads and writes,
the kernels it launches, and its dtype. Counted from shapes alone, so the tracked probe (real
tensors) and the fake probe (sizes only) count the same, and two runs count the same: the
counters are gated like memory, with tolerance 0.

- FLOPs: torch's own formulas (`torch.utils.flop_counter.flop_registry`, what
  `FlopCounterMode` counts: matmuls, convolutions, attention; elementwise ops count 0).
- Bytes: each tensor argument an op reads and each tensor it writes (its outputs, and the
  arguments an in-place or out= op mutates), by the elements its view touches (a broadcast
  dimension, stride 0, is read once); one view read twice by the same op counts once.
  Under target cuda, host tensors (non-fused optimizers' `step` counters, `torch.tensor`
  literals) are not device traffic and not counted.
- Kernels, target cuda: what CUDA launches. A view or an allocation launches nothing; an op
  on host tensors only runs on the CPU; a `_foreach_*` or `_fused_*` op launches one kernel
  per chunk set of `multi_tensor_apply` (aten/src/ATen/native/cuda/MultiTensorApply.cuh:
  65536-element chunks, a launch whenever the depth's tensor or block limit fills) when its
  lists take the fast route, else one kernel per tensor (the slow path); any other op one.
  Target cpu: a foreach or fused op is one kernel per tensor (ATen's CPU loops), any other
  op that is not a view or an allocation one.

Documented approximations (the counters are exact for what they count, these are what they
do not see): an op whose CUDA implementation launches more than one kernel (cuBLAS split-K
reductions, a loss that reduces in a second kernel) counts one; `_foreach_norm` counts its
chunk launches plus the one cleanup launch torch makes (ForeachReduceOp.cu).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense
from torch.utils.flop_counter import flop_registry

from ..kinds import Target

__all__ = ["CHUNK", "KERNEL_ARG_LIMITS", "OpWork", "PhaseWork", "Work", "WorkCounter", "counting_work", "mta_launches"]

_Tensor = torch.Tensor

# multi_tensor_apply's limits (MultiTensorApply.cuh, DepthToMaxConfig): tensors and blocks per
# launch by depth (the number of tensor lists, outputs included). `True`: the 32 KB kernel
# argument build (CUDA runtime >= 12.1 and driver >= 530 on sm70+: every current CUDA build of
# torch on the GPUs of gpu.py); `False`: the 4 KB one.
KERNEL_ARG_LIMITS: dict[bool, dict[str, tuple[int, ...]]] = {
    False: {"tensors": (110, 64, 48, 36, 30), "blocks": (320,) * 5, "tensors_scalarlist": (96, 64, 48, 36, 30)},
    True: {"tensors": (770, 448, 336, 252, 210), "blocks": (2240,) * 5,
           "tensors_scalarlist": (672, 448, 336, 252, 210)},
}
CHUNK = 65536  # kChunkSize: elements per block of a multi_tensor_apply launch


def mta_launches(numels: Iterable[int], depth: int, scalarlist: bool = False, large_args: bool = True) -> int:
    """Kernel launches of one `multi_tensor_apply` over tensors of these sizes (the loop of
    MultiTensorApply.cuh, replayed): empty tensors are skipped; a launch when the tensors
    slot fills on a tensor's last chunk, or the blocks fill; the tail launches once."""
    limits = KERNEL_ARG_LIMITS[large_args]
    d = min(max(depth, 1), 5) - 1
    max_tensors = limits["tensors_scalarlist" if scalarlist else "tensors"][d]
    max_blocks = limits["blocks"][d]
    launches = blocks = tensors = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if (tensors == max_tensors and last) or blocks == max_blocks:
                launches += 1
                blocks = 0
                tensors = 0 if last else 1
    return launches + (blocks != 0)


@dataclass(frozen=True)
class OpWork:
    """One op of the step: where it ran, what it computed and moved, what it launched."""

    phase: str
    op: str  # qualified aten name, e.g. "aten::addmm"
    flops: int
    read: int  # bytes
    written: int  # bytes
    kernels: int
    dtype: str  # e.g. "float32": the dtype its FLOPs run in (its first tensor's)
    owner: str | None = None  # the optimizer (MultiOptimizer key) whose step ran it
    tensors: int = 1  # tensors in its first list (foreach and fused ops), else 1
    host: bool = False  # ran on host tensors only (target cuda): no device work
    sync: bool = False  # reads a device value on the host (`.item()`): the host waits for the device

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass(frozen=True)
class PhaseWork:
    """A phase's totals (the record's `work` list)."""

    phase: str
    flops: int = 0
    bytes: int = 0
    kernels: int = 0


@dataclass(frozen=True)
class Work:
    """The op stream of one step and its totals."""

    ops: tuple[OpWork, ...]
    target: str = Target.CPU

    def phases(self, order: Iterable[str]) -> list[PhaseWork]:
        """Per-phase totals in `order` (a phase that ran no op has zeros)."""
        return [self.total(lambda o, p=p: o.phase == p, p) for p in order]

    def total(self, which: Callable[[OpWork], bool] = lambda o: True, phase: str = "step") -> PhaseWork:
        f = b = k = 0
        for o in self.ops:
            if which(o):
                f += o.flops
                b += o.read + o.written
                k += o.kernels
        return PhaseWork(phase, f, b, k)

    def by_owner(self) -> dict[str, PhaseWork]:
        """Each optimizer's share of the step phase, by its MultiOptimizer key."""
        owners = dict.fromkeys(o.owner for o in self.ops if o.owner is not None)
        return {k: self.total(lambda o, k=k: o.owner == k) for k in owners}


# what an op is, decided once per OpOverload
_VIEW, _ALLOC, _LIST, _FUSED, _SYNC, _KERNEL, _HOST, _SKIP = range(8)
# namespaces of ops that are no device work: `prim::device` (FakeTensor asks it; real
# tensors answer without dispatch), `profiler::` (record_function around steps: host only)
_SKIPPED_NAMESPACES = {"prim"}
_HOST_NAMESPACES = {"profiler"}
# ops that allocate and launch nothing; `lift_fresh` hands torch.tensor() literals over
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
              "resize_", "resize_as_", "set_", "_local_scalar_dense", "detach", "alias", "_unsafe_view",
              "lift", "lift_fresh_copy_"}
# their first argument is written without being read
_WRITE_ONLY_SELF = {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
                    "_foreach_zero_", "_foreach_copy_"}
# a host-side literal (torch.tensor(1.0) in an optimizer's step): a host tensor under target cuda
_HOST_BORN = {"lift_fresh"}
# the optimizer-state lists a fused kernel reads and writes (the rest it only reads)
_FUSED_READ_ONLY = {"grads", "state_steps", "grad_scale", "found_inf"}


@dataclass(frozen=True)
class _OpInfo:
    kind: int
    name: str
    packet: Any
    flops: Callable[..., int] | None
    write_args: tuple[int, ...]  # positions of arguments the op mutates
    read_skip: tuple[int, ...]  # positions of arguments it writes without reading
    list_args: tuple[int, ...]  # positions of List[Tensor] arguments
    list_names: tuple[str, ...]
    out_of_place: bool  # a foreach op that returns new lists (one more list of depth)
    scalarlist: bool  # a foreach op over a list of scalars (its own tensor limits)
    host_born: bool


def _info(func: Any) -> _OpInfo:
    schema = func._schema
    packet = func.overloadpacket
    namespace, _, base = schema.name.rpartition("::")
    if namespace in _SKIPPED_NAMESPACES:
        return _OpInfo(_SKIP, schema.name, packet, None, (), (), (), (), False, False, False)
    args = schema.arguments
    write = tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write)
    lists = tuple(i for i, a in enumerate(args) if str(a.type) == "List[Tensor]")
    names = tuple(args[i].name for i in lists)
    # a list of scalars (`.ScalarList`, or the `scalars` tensor torch turns into one) has its own limits
    scalarlist = any(str(a.type) == "List[number]" or (a.name == "scalars" and str(a.type) == "Tensor")
                     for a in args)
    if namespace in _HOST_NAMESPACES:
        kind = _HOST
    elif base in _HOST_BORN:
        kind = _ALLOC
    elif func.is_view or (schema.returns and all(r.alias_info is not None and not r.alias_info.is_write
                                               for r in schema.returns) and not write):
        kind = _VIEW
    elif base == "_local_scalar_dense":
        kind = _SYNC
    elif base in _NO_KERNEL:
        kind = _ALLOC
    elif base.startswith("_fused_"):
        kind = _FUSED
        write = tuple(i for i in write if args[i].name not in _FUSED_READ_ONLY)
    elif base.startswith("_foreach_") and lists:
        kind = _LIST
    else:
        kind = _KERNEL
    skip = write[:1] if base in _WRITE_ONLY_SELF else ()
    skip += tuple(i for i, a in enumerate(args) if a.kwarg_only and i in write)  # out=
    return _OpInfo(kind, schema.name, packet,
                   flop_registry.get(packet), write, skip, lists, names,
                   kind == _LIST and bool(schema.returns), scalarlist, base in _HOST_BORN)


def _tensors(value: Any) -> Iterator[_Tensor]:
    if isinstance(value, _Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, _Tensor):
                yield v


def _touched(t: _Tensor) -> int:
    """Bytes of the elements a view touches: a broadcast (stride-0) dimension once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def _view_key(t: _Tensor) -> tuple:
    return (id(t.untyped_storage()), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


class WorkCounter:
    """Told every op the probe runs (`StorageLedger.work`); counts those inside a phase.

    `phase` and `owner` are set by the caller (the Trainer's phase hooks, the optimizers'
    step hooks). `host(storage_key)` says whether a storage lives on the host under the
    target (probes: `LedgerProbe.is_host`); tensors born of host-only ops are host too."""

    def __init__(self, target: str = Target.CPU, host: Callable[[int], bool] = lambda key: False,
                 large_kernel_args: bool = True) -> None:
        self.target = target
        self.cuda = target == Target.CUDA
        self._host_of = host
        # storages born of host-only ops, by id, weakly: an id is reused once its storage dies
        self._host_born: dict[int, weakref.ref] = {}
        self.large_args = large_kernel_args
        self.phase: str | None = None
        self.owner: str | None = None
        self.ops: list[OpWork] = []
        self._infos: dict[Any, _OpInfo] = {}

    def work(self) -> Work:
        return Work(tuple(self.ops), self.target)

    def _is_host(self, t: _Tensor) -> bool:
        st = t.untyped_storage()
        key = id(st)
        ref = self._host_born.get(key)
        return (ref is not None and ref() is st) or self._host_of(key)

    def _born_on_host(self, out: Any) -> None:
        for t in _tensors(out):
            st = t.untyped_storage()
            self._host_born[id(st)] = weakref.ref(st)

    def __call__(self, func: Any, args: tuple, kwargs: dict | None, out: Any) -> None:
        if self.phase is None:
            return
        info = self._infos.get(func)
        if info is None:
            info = self._infos[func] = _info(func)
        if info.kind == _SKIP:
            return
        kwargs = kwargs or {}
        all_args = list(args)
        schema_args = func._schema.arguments
        if kwargs:
            all_args += [kwargs.get(a.name) for a in schema_args[len(args):]]
        dtype = _first_dtype(all_args, out)
        if info.kind == _HOST or (self.cuda and info.host_born):
            self._born_on_host(out)
            self.ops.append(OpWork(self.phase, info.name, 0, 0, 0, 0, dtype, self.owner, host=True))
            return
        if info.kind == _VIEW:
            self.ops.append(OpWork(self.phase, info.name, 0, 0, 0, 0, dtype, self.owner))
            return
        outs = list(_tensors(out)) if not info.write_args else []
        inputs = [t for a in all_args for t in _tensors(a)]
        if self.cuda and inputs and all(self._is_host(t) for t in inputs):
            self._born_on_host(outs)
            self.ops.append(OpWork(self.phase, info.name, 0, 0, 0, 0, dtype, self.owner, host=True))
            return
        flops = int(info.flops(*args, **kwargs, out_val=out)) if info.flops is not None else 0
        if info.kind in (_ALLOC, _SYNC):
            self.ops.append(OpWork(self.phase, info.name, flops, 0, 0, 0, dtype, self.owner,
                                   sync=info.kind == _SYNC))
            return
        read, written = self._bytes(info, all_args, outs)
        kernels, tensors = self._kernels(info, all_args, out)
        self.ops.append(OpWork(self.phase, info.name, flops, read, written, kernels, dtype, self.owner, tensors))

    def _bytes(self, info: _OpInfo, args: list, outs: list[_Tensor]) -> tuple[int, int]:
        seen: set[tuple] = set()
        read = written = 0
        for i, a in enumerate(args):
            if i in info.read_skip:
                continue
            for t in _tensors(a):
                if self.cuda and self._is_host(t):
                    continue  # a host scalar is a kernel argument, not device traffic
                key = _view_key(t)
                if key not in seen:
                    seen.add(key)
                    read += _touched(t)
        wseen: set[tuple] = set()
        for t in [t for i in info.write_args for t in _tensors(args[i])] + outs:
            if self.cuda and self._is_host(t):
                continue
            key = _view_key(t)
            if key not in wseen:
                wseen.add(key)
                written += _touched(t)
        return read, written

    def _kernels(self, info: _OpInfo, args: list, out: Any) -> tuple[int, int]:
        if info.kind == _KERNEL:
            return 1, 1
        lists = [list(args[i]) if args[i] is not None else [] for i in info.list_args]
        names = info.list_names
        if info.kind == _FUSED:
            # the kernel's lists: every non-empty one but the step counters
            lists = [lst for lst, n in zip(lists, names) if lst and n != "state_steps"]
        first = lists[0] if lists else list(_tensors(out))
        numels = [t.numel() for t in first]
        if not self.cuda:
            return sum(1 for n in numels if n), len(first)
        depth = len(lists) + (1 if info.out_of_place else 0)
        if info.kind == _LIST and not _fast_route(lists):
            launches = sum(1 for n in numels if n)  # ATen's slow path: the op per tensor
        else:
            launches = mta_launches(numels, depth, info.scalarlist, self.large_args)
        if info.name.endswith("_foreach_norm") and launches:
            launches += 1  # lpnorm_cleanup (ForeachReduceOp.cu)
        return launches, len(first)


def _fast_route(lists: list[list[_Tensor]]) -> bool:
    """ForeachUtils.h `check_fast_path_restrictions`, as far as shapes tell: one dtype, and
    per index the same sizes and strides, non-overlapping and dense, in every list."""
    if not lists or not lists[0]:
        return True
    dtype = lists[0][0].dtype
    for i, t in enumerate(lists[0]):
        for lst in lists:
            if i >= len(lst):
                return False
            u = lst[i]
            if u.dtype != dtype or u.shape != t.shape or u.stride() != t.stride():
                return False
        if not is_non_overlapping_and_dense(t):
            return False
    return True


def _first_dtype(args: list, out: Any) -> str:
    for a in args:
        for t in _tensors(a):
            return str(t.dtype).removeprefix("torch.")
    for t in _tensors(out):
        return str(t.dtype).removeprefix("torch.")
    return ""


@contextmanager
def counting_work(probe: Any, trainer: Any, target: str) -> Iterator[WorkCounter | None]:
    """Count the work of what the block runs through `trainer`: each op inside one of its
    phases, the step phase's ops under the optimizer (MultiOptimizer key) whose step ran
    them. Yields None on a probe that does not count (cuda)."""
    counter = WorkCounter(target, host=getattr(probe, "is_host", lambda key: False))

    def on_phase(phase: str, when: str) -> None:
        counter.phase = phase if when == "before" else None

    handles = [trainer.register_phase_hook(on_phase)]
    depth = [0]  # a subclass's step calling super().step() runs the hooks twice, nested
    for key, opt in trainer.optimizer.optimizers.items():
        def pre(opt_: Any, args: Any, kwargs: Any, key: str = key) -> None:
            depth[0] += 1
            counter.owner = key

        def post(opt_: Any, args: Any, kwargs: Any) -> None:
            depth[0] -= 1
            if depth[0] <= 0:
                depth[0] = 0
                counter.owner = None

        handles += [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    try:
        with probe.counting(counter) as counted:
            yield counter if counted else None
    finally:
        for h in handles:
            h.remove()
