"""Tracked probe: real CPU tensors, every storage counted to the byte as it is born and dies.

A TorchDispatchMode sees every op (forward, backward, and optimizer steps, including the
list-returning `_foreach_*` and `_fused_*` kernels) and registers each *new* output storage
once, with a weakref callback on the storage that subtracts it when the storage dies.
Storages that existed before tracking are counted only when handed to `track()`.

Which outputs are new is read from the op's schema, once per op: outputs annotated as
aliasing an input (views, in-place and out= ops) are never new allocations, with one
exception: `aten.lift_fresh`, through which `torch.tensor(...)` / `torch.as_tensor` hand a
freshly made tensor to the mode. Ops that may grow an output's storage (out= variants,
`resize_`) update the size of a storage already counted.

Known blind spots (documented, not papered over): `UntypedStorage.resize_` (not an op),
storages created under `torch._C._DisableTorchDispatch` / `no_dispatch()`, tensors created
while the probe is paused or exited, and temporaries a kernel allocates and frees *inside*
one op (the mode sees only what an op returns).

Measured against `torch.cuda.memory_allocated` on an H200 (torch 2.11), per-phase allocated
bytes agree exactly, except:
- non-fused Adam/AdamW keep their `step` counters on the CPU even for CUDA parameters:
  CUDA shows 512 bytes per parameter tensor less than this (all-CPU) probe;
- kernel-internal temporaries raise CUDA's *peak*: e.g. mse_loss holds a second
  batch x width buffer while it reduces, so peak_forward on CUDA is higher by that much, and
  a reduction split across thread blocks allocates a staging buffer and semaphores (target
  cuda models those: probes/reduce.py);
- CUDA's large pool (blocks > 1 MiB) does not split off a tail of <= 1 MiB, so a block
  can count up to 1 MiB more than its 512-rounded size, depending on allocator history;
- cuBLAS workspaces (~32 MiB) appear at the first matmul of a process.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, is_traceable_wrapper_subclass

from ...errors import UsageError
from ...kinds import Probe as ProbeName, Target
from ..allocator import AllocatorConfig
from ...units import ALLOC_GRANULE, round_alloc
from .base import EAGER_UNDER_PROBE, Probe, Watch, iter_tensors
from .target import CudaTarget, Workspaces

_Tensor = torch.Tensor

# What an op's outputs mean for the ledger, decided once per OpOverload from its schema.
_FRESH = 0  # outputs may be new storages: register each one not yet seen
_ALIAS = 1  # outputs alias inputs (views, in-place): nothing allocated
_RESIZE = 2  # outputs alias inputs but the op may have grown their storage (out=, resize_)
_SIZED = 3  # a sizer given to the ledger says how big the (one) output's storage really is
_DEVICE = 4  # prim.device: a fake tensor's device, answered here (see StorageLedger.__torch_dispatch__)

_PRIM_DEVICE = torch.ops.prim.device.default

#: (args, kwargs, output) -> the bytes the output's storage really has on a device.
Sizer = Callable[[tuple, dict, torch.Tensor], int]

_MASK = ~(ALLOC_GRANULE - 1)

# Tensor classes whose storage is their own (FakeTensor, Parameter, ...), learnt as they are met.
_PLAIN: set[type] = set()


def _format_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} bytes"


def _classify(func: Any) -> int:
    """Decide, from the schema alone, whether an op's outputs can be new storages."""
    aten = torch.ops.aten
    if func is _PRIM_DEVICE:
        return _DEVICE
    packet = getattr(func, "overloadpacket", None)
    if packet in (aten.lift_fresh,):
        return _FRESH  # torch.tensor(): annotated as an alias, but the tensor is brand new
    if packet in (aten.resize_, aten.resize_as_, aten.set_):
        return _RESIZE
    schema = getattr(func, "_schema", None)
    if schema is None:
        return _FRESH
    returns = schema.returns
    if not returns:
        return _ALIAS
    aliased = [r.alias_info is not None for r in returns]
    if not all(aliased):
        # No op mixes fresh and aliased returns in practice; if one does, the storage
        # dedupe still keeps an aliased output from being counted twice.
        return _FRESH
    if any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return _RESIZE  # out= variant: the kernel may resize `out`
    return _ALIAS


class StorageLedger(TorchDispatchMode):
    """The accounting behind the tracked and fake probes: live storages and their bytes.

    Kept deliberately flat: one dict keyed by the id of the storage's Python object (stable
    for the storage's lifetime, since torch preserves it) holding (weakref, allocated,
    requested). Every op costs one dict lookup for its kind and one per output tensor.
    """

    def __init__(self, label: str, limit_bytes: int | None = None,
                 sizers: Mapping[Any, Sizer] | None = None) -> None:
        super().__init__()
        if limit_bytes is not None and (not isinstance(limit_bytes, int) or limit_bytes < 0):
            raise UsageError(f"limit_bytes must be a non-negative int of bytes, got {limit_bytes!r}")
        self.label = label
        self.limit = limit_bytes
        self.live: dict[int, tuple[weakref.ref, int, int]] = {}
        self.allocated = 0
        self.requested = 0
        self.peak = 0
        self.peak_requested = 0
        self._kinds: dict[Any, tuple[int, Callable[..., Any], Callable[..., None] | None]] = {}
        self._sizers: dict[Any, Sizer] = dict(sizers or {})
        # The target hook (probes/target.py): told of every storage born (key, exact bytes)
        # and dying (key), and called after each op listed in `op_hooks` with the op's
        # (args, kwargs, output), its output already counted. None: CPU semantics.
        self.on_alloc: Callable[[int, int], None] | None = None
        self.on_free: Callable[[int], None] | None = None
        self.op_hooks: dict[Any, Callable[[tuple, dict, Any], None]] = {}
        # set by LedgerProbe.watching: told every op run and every storage born
        self.watch: Watch | None = None
        # set by LedgerProbe.counting: told every op with its (args, kwargs, output) (work.py)
        self.work: Callable[[Any, tuple, dict | None, Any], None] | None = None

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode would wrap __torch_dispatch__ in torch._disable_dynamo, which
        # costs ~2.5 us per op (a third of the tracking overhead on small models). We keep
        # Dynamo out of the hot frames by marking their code objects instead (__enter__).
        return False

    def __enter__(self) -> "StorageLedger":
        _keep_dynamo_out()
        return super().__enter__()

    # -- the hot path -------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        entry = self._kinds.get(func)
        if entry is None:
            # OpOverload.__call__ only forwards to ._op: calling that skips a Python frame.
            kind = _SIZED if func in self._sizers else _classify(func)
            entry = self._kinds[func] = (kind, getattr(func, "_op", func), self.op_hooks.get(func))
        kind, op, hook = entry
        if kind == _DEVICE:
            # `t.device` on a fake tensor is an op (its device is Python's), asked by the
            # autograd engine and by model code for every tensor: two thirds of a fake LLM
            # step's dispatches. FakeTensor's own handler answers `fake_device` outside its
            # kernels; answering here saves the trip through the fake mode. Nothing allocates.
            t = args[0]
            if type(t) is FakeTensor and not t.fake_mode.in_kernel_invocation:
                return t.fake_device
            return op(*args)
        if self.watch is not None:
            self.watch.ops.add(func)
        out = op(*args, **kwargs) if kwargs else op(*args)
        if kind == _FRESH:
            if isinstance(out, _Tensor):
                self.add(out)
            elif isinstance(out, (list, tuple)):
                self._add_all(out)
        elif kind == _RESIZE:
            self._resized(out)
        elif kind == _SIZED:
            self.add(out, self._sizers[func](args, kwargs or {}, out))
        if hook is not None:
            hook(args, kwargs or {}, out)
        if self.work is not None:
            self.work(func, args, kwargs, out)
        return out

    def add(self, t: torch.Tensor, nbytes: int | None = None) -> None:
        """Count `t`'s storage (as `nbytes` if given) if not yet counted; raise
        OutOfMemoryError past the limit. Meta tensors hold no memory and are not counted
        (a model built under `torch.device("meta")`, optimizers validated on meta parameters)."""
        cls = type(t)
        if (t.fake_device.type == "meta") if cls is FakeTensor else t.is_meta:  # a fake's is_meta is an op
            return
        if cls is not _Tensor and cls not in _PLAIN:
            if is_traceable_wrapper_subclass(t):
                # DTensor and other wrapper subclasses: the memory is their inner tensors' (a
                # DTensor's local shard); the wrapper's own storage is a sizeless stand-in of the
                # global shape. Their ops run below this mode, so only their outputs are seen.
                attrs, _ = t.__tensor_flatten__()
                self._add_all([getattr(t, a) for a in attrs])  # _add_all skips non-tensors (a DTensor's mesh)
                return
            _PLAIN.add(cls)
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            self._add_all(_components(t))  # sparse and other storage-less layouts
            return
        key = id(st)
        if key in self.live:
            return
        req = st.nbytes() if nbytes is None else nbytes
        alloc = (req + (ALLOC_GRANULE - 1)) & _MASK
        total = self.allocated + alloc
        if self.limit is not None and total > self.limit:
            raise self._oom(alloc)
        if self.on_alloc is not None:
            self.on_alloc(key, req)  # may raise OutOfMemoryError: then nothing is counted
        self.live[key] = (weakref.ref(st, partial(self._release, key)), alloc, req)
        if self.watch is not None:
            self.watch.born(st)
        self.allocated = total
        self.requested += req
        if total > self.peak:
            self.peak = total
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested

    def _add_all(self, outs: Any) -> None:
        for o in outs:
            if isinstance(o, _Tensor):
                self.add(o)
            elif isinstance(o, (list, tuple)):
                self._add_all(o)

    def _release(self, key: int, _ref: weakref.ref) -> None:
        # Runs inside the storage's deallocation, before its address can be reused.
        entry = self.live.pop(key, None)
        if entry is not None:
            if self.on_free is not None:
                self.on_free(key)
            self.allocated -= entry[1]
            self.requested -= entry[2]

    def _resized(self, outs: Any) -> None:
        if isinstance(outs, _Tensor):
            outs = (outs,)
        elif not isinstance(outs, (list, tuple)):
            return
        for t in outs:
            if not isinstance(t, _Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            entry = self.live.get(key)
            if entry is None:
                continue  # a storage we were never told about: not ours to count
            req = st.nbytes()
            if req == entry[2]:
                continue
            alloc = round_alloc(req)
            total = self.allocated - entry[1] + alloc
            if self.limit is not None and alloc > entry[1] and total > self.limit:
                raise self._oom(alloc - entry[1])
            if self.on_alloc is not None and self.on_free is not None:
                self.on_free(key)  # a grown storage is a new block (resize_ reallocates)
                self.on_alloc(key, req)
            self.live[key] = (entry[0], alloc, req)
            self.allocated = total
            self.requested += req - entry[2]
            if total > self.peak:
                self.peak = total
            if self.requested > self.peak_requested:
                self.peak_requested = self.requested

    def _oom(self, alloc: int) -> torch.OutOfMemoryError:
        assert self.limit is not None
        free = max(self.limit - self.allocated, 0)
        return torch.OutOfMemoryError(
            f"{self.label} probe out of memory. Tried to allocate {_format_bytes(alloc)} ({alloc} bytes). "
            f"Limit {_format_bytes(self.limit)} ({self.limit} bytes), of which {_format_bytes(self.allocated)} "
            f"is allocated by tensors and {_format_bytes(free)} is free."
        )


def _keep_dynamo_out() -> None:
    """Tell Dynamo never to compile the ledger's per-op frames (what torch's per-call
    wrapper would do, at no per-call cost). Idempotent; a no-op where torch lacks the hook."""
    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # pragma: no cover - older/newer torch without the hook
        return
    for fn in (StorageLedger.__torch_dispatch__, StorageLedger.add, StorageLedger._add_all,
               StorageLedger._release, StorageLedger._resized, _components):
        skip_code(fn.__code__)


def _components(t: torch.Tensor) -> list[torch.Tensor]:
    """The dense tensors a sparse tensor is made of (its storage-owning parts)."""
    layout = t.layout
    if layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return []


class LedgerProbe(Probe):
    """Shared front of the tracked and fake probes: a StorageLedger plus the Probe API.

    While active, `torch.compile`d code runs eagerly (stance "force_eager"): Dynamo cannot
    trace through the ledger's dispatch mode ("missing tp_iter"), and eager runs the same
    ops, so the bytes are the eager program's; records say so (`compile_mode`).
    """

    compile_mode = EAGER_UNDER_PROBE
    sees_births = True

    def __init__(self, device: torch.device | str | None = None, limit_bytes: int | None = None, target: str = Target.CPU,
                 alloc_config: AllocatorConfig | None = None, workspaces: Workspaces = Workspaces(),
                 sizers: Mapping[Any, Sizer] | None = None) -> None:
        device = torch.device("cpu" if device is None else device)
        if device.type != "cpu":
            raise UsageError(
                f"the {self.name} probe measures CPU tensors; got device {str(device)!r} "
                "(use the cuda probe for a GPU)"
            )
        if target not in Target.values():
            raise UsageError(f"unknown target {target!r} for the {self.name} probe; choose {' or '.join(Target.values())}")
        self.device = device
        self.target = Target(target)
        # target cuda: the allocator model holds the limit (on reserved bytes, as CUDA's does)
        self._ledger = StorageLedger(self.name, limit_bytes if self.target == Target.CPU else None, sizers)
        self._cuda: CudaTarget | None = None
        if self.target == Target.CUDA:
            self._cuda = CudaTarget(self.name, alloc_config, limit_bytes, workspaces)
            self._cuda.attach(self._ledger)
        self._active = False
        self._stance: Any = None  # the force_eager stance while active

    @property
    def limit_bytes(self) -> int | None:
        return self._ledger.limit if self._cuda is None else self._cuda.allocator.limit

    def log_requests(self, log: list) -> bool:
        """Target cuda: keep the allocator model's requests in `log` (before entering; see
        allocator.LoggedAllocator). False, and nothing logged, for target cpu."""
        if self._cuda is None:
            return False
        self._cuda.log_requests(log)
        return True

    @property
    def alloc_model(self) -> str | None:
        """The allocator model behind the numbers (target cuda), else None."""
        return None if self._cuda is None else self._cuda.alloc_model

    def host(self, *tensors: torch.Tensor) -> None:
        """Tensors that live on the host under the target (CUDA: non-fused optimizers' `step`
        counters): not device memory. A no-op for target cpu."""
        if self._cuda is not None:
            self._cuda.host(tensors)

    def extra(self) -> dict[str, int]:
        return {} if self._cuda is None else self._cuda.extra()

    def resized(self, *tensors: torch.Tensor) -> None:
        """Count the new sizes of storages resized outside any op (`UntypedStorage.resize_`:
        FSDP2 frees and re-allocates its unsharded parameters so); storages never counted stay so."""
        self._ledger._resized(list(tensors))

    @property
    def unmodelled(self) -> tuple[str, ...]:
        """Under target cuda: what ran whose CUDA allocations are not modelled (target.py)."""
        return () if self._cuda is None else tuple(sorted(self._cuda.unmodelled))

    @property
    def active(self) -> bool:
        return self._active

    def _started(self) -> None:
        """After the modes are entered: compiled code eager, active, a fresh peak window."""
        self._stance = torch.compiler.set_stance("force_eager")  # sets it now; __exit__ restores
        self._active = True
        self.reset_peak()  # entering starts a peak window, as on CUDA

    def _stopping(self) -> bool:
        """Before the modes are exited: inactive, compiled code compiles again. False when the
        probe was not active (nothing to exit)."""
        if not self._active:
            return False
        self._active = False
        stance, self._stance = self._stance, None
        if stance is not None:
            stance.__exit__(None, None, None)
        return True

    @contextmanager
    def watching(self, watch: Watch) -> Iterator[Watch]:
        """Record into `watch` the storages born, the ops run and the compiled calls entered."""
        previous, self._ledger.watch = self._ledger.watch, watch
        try:
            with watch.counting_compiled_calls():
                yield watch
        finally:
            self._ledger.watch = previous

    @contextmanager
    def counting(self, counter: Callable[[Any, tuple, dict | None, Any], None]) -> Iterator[bool]:
        """Tell `counter` (instrument/work.py) every op the block runs; yields True (counted)."""
        previous, self._ledger.work = self._ledger.work, counter
        try:
            yield True
        finally:
            self._ledger.work = previous

    def is_host(self, key: int) -> bool:
        """Whether the storage keyed `key` lives on the host under the target (see `host`)."""
        return self._cuda is not None and self._cuda.is_host(key)

    def _check_not_active(self) -> None:
        if self._active:
            raise UsageError(
                f"the {self.name} probe is already active; a probe cannot be entered twice "
                "(use one `with probe:` block, or make a second probe to nest)"
            )

    def allocated(self) -> int:
        return self._ledger.allocated if self._cuda is None else self._cuda.allocator.allocated

    def requested(self) -> int:
        return self._ledger.requested if self._cuda is None else self._cuda.allocator.requested

    def peak(self) -> int:
        return self._ledger.peak if self._cuda is None else self._cuda.allocator.peak_allocated

    def peak_requested(self) -> int:
        return self._ledger.peak_requested if self._cuda is None else self._cuda.allocator.peak_requested

    def reset_peak(self) -> None:
        self._ledger.peak = self._ledger.allocated
        self._ledger.peak_requested = self._ledger.requested
        if self._cuda is not None:
            self._cuda.allocator.reset_peak()

    @contextmanager
    def _tracking(self) -> Iterator[None]:
        """Tracking on for the block: this probe's own `with` if it is not active already."""
        if self._active:
            yield
        else:
            with self:
                yield

    def track(self, *objs: Any) -> None:
        """Count tensors made before tracking. Not subject to `limit_bytes`: they already exist."""
        ledger = self._ledger
        limit, ledger.limit = ledger.limit, None
        try:
            for t in iter_tensors(*objs):
                ledger.add(t)
        finally:
            ledger.limit = limit


class TrackedProbe(LedgerProbe):
    """Real CPU tensors, counted per storage as CUDA's allocator would (512-byte blocks)."""

    name = ProbeName.TRACKED
    computes = True

    def __enter__(self) -> "TrackedProbe":
        self._check_not_active()
        self._ledger.__enter__()
        self._started()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stopping():
            self._ledger.__exit__(*exc)

    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Run `factory()` with tracking on, so the parameters are counted as they are made."""
        with self._tracking(), torch.device(self.device):
            return factory()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Take the mode off the stack, so timed code pays nothing for tracking.

        Storages freed while paused are still subtracted; storages created while paused are
        never counted (call `track()` on what must survive, e.g. the model, afterwards).
        """
        if not self._active:
            raise UsageError("paused() needs an active tracked probe: use it inside `with probe:`")
        if _get_current_dispatch_mode() is not self._ledger:
            raise UsageError(
                "cannot pause the tracked probe: another dispatch mode was entered after it "
                "and is still active; exit that mode first"
            )
        self._active = False
        self._ledger.__exit__(None, None, None)
        try:
            yield
        finally:
            self._ledger.__enter__()
            self._active = True
