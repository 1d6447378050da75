"""FSDP2 per rank: `fully_shard` on a config's model, and what each rank holds, phase by phase.

A config with `fsdp = N > 1` runs its model sharded by `torch.distributed.fsdp.fully_shard`
(FSDP2, the engine torchtitan builds on): each Linear of an `mlp`, then each block (`layer*`
modules: our MLP's and transformer's layers; the elements of a ModuleList: Hugging Face decoder
layers, GPT-2's `h`), then the root. Each parameter becomes a DTensor sharded on dim 0 the
way `torch.chunk` splits it: chunks of ceil(dim0 / N) rows, the last ones shorter or empty;
every rank's storage is padded to the first chunk's size (FSDP2's `_sharded_param_data`),
while optimizer state made by `zeros_like(param)` takes the unpadded local shard.

Two ways to run a rank (`protocol.measure` picks):

- **fake probe**: ranks simulated one at a time in this process, each on torch's fake process
  group (`FakeStore`, backend "fake": collectives do nothing, as torchtitan's
  `scripts/estimate/estimation.py` uses it) under FakeTensorMode: sizes only. Ranks whose
  shards are the same size hold the same bytes, so one of each kind is run (rank 0, and every
  rank whose padding differs) and the others carry its numbers (`same_as`).
- **tracked (or cuda) probe**: real tensors on the ranks of a torchrun launch, over gloo
  (nccl on GPUs): each rank measures itself; the sweep merges the ranks' records.

What the probes need to see FSDP2 whole (`Sharding`, entered around a config's run):

- FSDP2 frees and re-allocates the unsharded parameters (the all-gather outputs) with
  `UntypedStorage.resize_`, which is no op a dispatch mode sees; the two functions it uses
  (`_fsdp_param.alloc_storage` / `free_storage`) are wrapped to tell the ledger the new size.
- What FSDP2 allocates is named by where it is made: all-gather outputs per parameter
  (`FSDPParam.init_all_gather_outputs`: the unsharded parameters), the flat all-gather buffer
  (`foreach_all_gather`: staging), the reduce-scatter input (`foreach_reduce`'s first
  allocation; its second is the reduce output the sharded gradients view). Their live bytes
  and their peak per phase go into the rank's row of `ranks_state`.
- Muon needs each whole matrix for its Newton-Schulz step. On a DTensor torch's Muon would let
  DTensor's sharding propagation redistribute inside its own dispatch, where no mode sees the
  buffers; `Sharding` makes the step gather the matrix explicitly (`full_tensor()`: an
  all-gather every probe counts), orthogonalise it whole, and keep this rank's rows (the
  scatter needs no communication: every rank holds the whole result). The gather shows in the
  step's peak.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from ..env import rank_env
from ..errors import UsageError
from ..kinds import Probe, Status
from ..record import Config, Record
from ..train import models
from ..units import round_alloc

__all__ = ["MIXED_PRECISION", "Sharding", "check", "check_fields", "fake_group", "merge_ranks", "rank_kinds",
           "shard_model", "shard_rows", "simulate"]

MIXED_PRECISION = ("none", "bf16")
#: What FSDP2 itself allocates, as a rank's row names it (`<category>_<phase>`).
CATEGORIES = ("unsharded", "all_gather", "reduce_scatter")


def check_fields(config: Config) -> None:
    """The FSDP fields of a config, alone (UsageError naming the one that is wrong)."""
    if not isinstance(config.fsdp, int) or config.fsdp < 0:
        raise UsageError(f"fsdp must be a sharding degree >= 0 (0 or 1 = no sharding), got {config.fsdp!r}")
    if config.reshard_after_forward not in (0, 1):
        raise UsageError(f"reshard_after_forward must be 0 or 1, got {config.reshard_after_forward!r}")
    if config.fsdp_mp not in MIXED_PRECISION:
        raise UsageError(f"unknown fsdp_mp {config.fsdp_mp!r}; choose one of {', '.join(MIXED_PRECISION)}")
    if config.fsdp > 1 and config.zero:
        raise UsageError("--fsdp shards parameters, gradients and optimizer state already; it does not combine "
                         "with ZeRO-1 (--zero 1): choose one")
    if config.fsdp > 1 and config.step_in_backward:
        raise UsageError("step_in_backward steps each parameter as its gradient accumulates; FSDP2 assigns the "
                         "sharded gradients after its reduce-scatter instead: use step_in_backward=0 with --fsdp")


def check(config: Config, probe: str, model: nn.Module) -> None:
    """Everything wrong with an fsdp > 1 config before any compute: its fields, a degree the
    model's parameters cannot spread over, a launch it cannot run in. `model` may be on meta."""
    check_fields(config)
    n = config.fsdp
    if n <= 1:
        return
    rows = [_dim0(p) for p in model.parameters()]
    if rows and not any(shard_rows(d, n)[n - 1] for d in rows):
        most = max(rows)
        useful = max(k for k in range(1, n) if any(shard_rows(d, k)[k - 1] for d in rows))
        raise UsageError(f"--fsdp {n} is larger than the parameters can shard: FSDP2 splits dim 0 into chunks of "
                         f"ceil(rows / {n}), and with at most {most} rows rank {n - 1} would hold nothing; use "
                         f"--fsdp {useful} (the largest degree below {n} whose last rank holds rows)")
    if probe == Probe.FAKE:
        return
    launch = rank_env()
    if launch is None:
        raise UsageError(f"--fsdp {n} on the {probe} probe runs {n} ranks: launch with torchrun, e.g. "
                         f"`torchrun --nproc-per-node {n} -m multiopt run --fsdp {n} ...`, or use --probe fake")
    if launch.world_size != n:
        raise UsageError(f"an fsdp={n} config cannot run in a torchrun launch of {launch.world_size} ranks; "
                         f"launch with --nproc-per-node {n}")


def _dim0(p: torch.Tensor) -> int:
    return int(p.shape[0]) if p.dim() else 1


def shard_rows(rows: int, n: int) -> tuple[int, ...]:
    """Rows of a dim 0 of `rows` on each of `n` ranks, as FSDP2 shards it (`torch.chunk`:
    chunks of ceil(rows / n), the last ones shorter or empty)."""
    chunk = -(-rows // n)
    return tuple(max(0, min(chunk, rows - r * chunk)) for r in range(n))


def rank_kinds(model: nn.Module, n: int) -> list[tuple[int, tuple[int, ...]]]:
    """The ranks that hold different bytes: (the first such rank, every rank holding the same
    shard sizes), rank 0's kind first. Ranks with equal local shards run the same program on
    tensors of the same sizes, so their memory is the same to the byte."""
    per_param = [shard_rows(_dim0(p), n) for p in model.parameters()]
    kinds: dict[tuple[int, ...], list[int]] = {}
    for r in range(n):
        kinds.setdefault(tuple(rows[r] for rows in per_param), []).append(r)
    return [(ranks[0], tuple(ranks)) for ranks in kinds.values()]


# --- sharding a model ----------------------------------------------------------------------------


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules `fully_shard` wraps before the root, innermost first: each Linear under a
    module named `mlp`, then each block (`layer<i>` modules, elements of a ModuleList)."""
    linears, blocks = [], []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and ".mlp." in f".{name}":
            linears.append(module)
        if module is not model and (leaf.startswith("layer") and leaf[5:].isdigit()):
            blocks.append(module)
        if isinstance(module, nn.ModuleList):
            blocks.extend(m for m in module if any(True for _ in m.parameters()))
    seen: set[int] = set()
    ordered = []
    for m in linears + blocks:
        if id(m) not in seen and any(True for _ in m.parameters()):
            seen.add(id(m))
            ordered.append(m)
    return ordered


def shard_model(model: nn.Module, mesh: Any, config: Config) -> nn.Module:
    """`fully_shard` on each unit (`_units`) and the root, with the config's reshard and mixed
    precision policy; returns the model (FSDP2 shards in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if config.fsdp_mp == "bf16" else MixedPrecisionPolicy())
    reshard = bool(config.reshard_after_forward)
    for module in _units(model):
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    return model


# --- process groups --------------------------------------------------------------------------


@contextmanager
def fake_group(rank: int, world: int) -> Iterator[None]:
    """This process as rank `rank` of `world` on torch's fake process group: collectives return
    at once and move nothing, so one process can play any rank (sizes are all that count)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UsageError("a process group is already initialised in this process; the fake probe simulates FSDP "
                         "ranks on a fake group of its own: run it outside torchrun")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def in_group() -> bool:
    """Whether this process already is a rank of a process group (torchrun, or a simulated rank)."""
    return dist.is_available() and dist.is_initialized()


def simulate(config: Config, measure_rank: Callable[[], Record]) -> Record:
    """An fsdp config on the fake probe: each kind of rank (`rank_kinds`, from the model built
    on meta) measured on a fake group of its own, merged into one record."""
    with torch.device("meta"):
        model = models.for_config(config).build(config.width, config.depth)
    kinds = rank_kinds(model, config.fsdp)
    del model
    measured: dict[int, Record] = {}
    for rank, _ in kinds:
        with fake_group(rank, config.fsdp):
            measured[rank] = measure_rank()
        if measured[rank].status != Status.OK:
            break  # a failing rank fails the config; the others would fail alike
    same = {r: first for first, ranks in kinds for r in ranks}
    rows = [measured.get(same[r]) for r in range(config.fsdp)]
    return merge_ranks([rec for rec in rows], same_as=[None if same[r] == r else same[r] for r in range(config.fsdp)])


_BAD_FIRST = (Status.OOM, Status.DIVERGED, Status.ERROR)


def merge_ranks(records: Sequence[Record | dict[str, Any] | None],
                same_as: Sequence[int | None] | None = None) -> Record:
    """One record of an fsdp config from its ranks' (index = rank; each holds its own row in
    `ranks_state`): rank 0's fields, one row per rank, `opt_state_unsharded` = every rank's state.
    `same_as[r]`: the rank whose record stands for rank r (None: its own). Status: ok when every
    rank is ok; else the first oom or diverged rank, else the first error, named with its rank."""
    rows = [None if r is None else (r.to_dict() if isinstance(r, Record) else Record.from_dict(r).to_dict())
            for r in records]
    same_as = list(same_as or [None] * len(rows))
    first = next(r for r in rows if r is not None)
    out = dict(first)
    per_rank = []
    for rank, r in enumerate(rows):
        source = rows[same_as[rank]] if same_as[rank] is not None else r
        if source is None:
            per_rank.append({"rank": rank, "status": Status.ERROR, "error": "not measured: an earlier rank failed"})
            continue
        own = (source.get("ranks_state") or [{}])[0]
        per_rank.append({**own, "rank": rank, "same_as": same_as[rank], "status": source.get("status"),
                         "error": source.get("error")})
    out["ranks_state"] = per_rank
    states = [p.get("state_bytes") for p in per_rank]
    out["opt_state_unsharded"] = sum(states) if all(s is not None for s in states) else None
    bad = [(i, p) for i, p in enumerate(per_rank) if p.get("status") != Status.OK]
    for status in _BAD_FIRST:
        hit = [(i, p) for i, p in bad if p.get("status") == status]
        if hit:
            i, p = hit[0]
            out["status"], out["error"] = status, f"rank {i}: {p.get('error')}"
            break
    return Record.from_dict(out)


# --- what a rank holds ----------------------------------------------------------------------


class _Buffers:
    """Live and peak bytes of FSDP2's own buffers, by category (`CATEGORIES`), each storage
    rounded to 512 as the probes count it; resizes followed (`resized`)."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[str, weakref.ref, int]] = {}
        self.now = dict.fromkeys(CATEGORIES, 0)
        self.peak = dict.fromkeys(CATEGORIES, 0)
        self.phases: dict[str, dict[str, int]] = {}

    def add(self, category: str, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        size = round_alloc(st.nbytes())
        self.live[key] = (category, weakref.ref(st, lambda _r, key=key: self._gone(key)), size)
        self._move(category, size)

    def resized(self, t: torch.Tensor) -> None:
        key = id(t.untyped_storage())
        entry = self.live.get(key)
        if entry is not None:
            size = round_alloc(t.untyped_storage().nbytes())
            self.live[key] = (entry[0], entry[1], size)
            self._move(entry[0], size - entry[2])

    def _gone(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self._move(entry[0], -entry[2])

    def _move(self, category: str, delta: int) -> None:
        self.now[category] += delta
        if self.now[category] > self.peak[category]:
            self.peak[category] = self.now[category]

    def on_phase(self, phase: str, when: str) -> None:
        """A Trainer phase hook: each phase's peaks, kept for the last step run."""
        if when == "before":
            self.peak = dict(self.now)
        else:
            self.phases[phase] = dict(self.peak)


class Sharding:
    """One fsdp config's run on this rank: the device mesh (made before any probe is entered:
    FakeTensorMode must not see it), `shard` for the model, and while entered the hooks that
    let a probe see FSDP2's storage resizes, name its buffers, and gather Muon's matrices."""

    def __init__(self, config: Config) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise UsageError(f"an fsdp={config.fsdp} config needs its ranks' process group: launch with torchrun, "
                             "or use the fake probe")
        if dist.get_world_size() != config.fsdp:
            raise UsageError(f"an fsdp={config.fsdp} config cannot run in a process group of "
                             f"{dist.get_world_size()} ranks; launch with --nproc-per-node {config.fsdp}")
        self.config = config
        self.rank = dist.get_rank()
        self.mesh = init_device_mesh(torch.device(config.device).type, (config.fsdp,))
        self.buffers = _Buffers()
        # gloo's worker threads let go of a collective's tensors a moment after it completes:
        # collectives then run on copies no probe sees (`_detached`), so what a rank holds is
        # what FSDP2 holds, deterministic (fake: collectives hold nothing; nccl: none patched)
        self.detached = dist.get_backend() == "gloo"
        self._resized: Callable[..., None] = lambda *t: None
        self._stack: ExitStack | None = None

    def shard(self, model: nn.Module) -> nn.Module:
        return shard_model(model, self.mesh, self.config)

    def attach(self, probe: Any) -> None:
        """Tell `probe` (a ledger probe: tracked, fake) of every storage FSDP2 resizes."""
        self._resized = getattr(probe, "resized", self._resized)

    def __enter__(self) -> "Sharding":
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

        stack = ExitStack()
        self._follow_resizes(stack)
        _name_buffers(stack, self.buffers)
        if self.detached:
            for comm in (coll.DefaultAllGather, coll.DefaultReduceScatter):
                _patch(stack, comm, "__call__", _detached(comm.__call__))
        _gather_muon(stack, self.detached)
        self._stack = stack
        return self

    def _follow_resizes(self, stack: ExitStack) -> None:
        """FSDP2's `alloc_storage` / `free_storage` (UntypedStorage.resize_, which no dispatch
        mode sees) tell the probe and the buffers the storage's new size."""
        from torch.distributed.fsdp._fully_shard import _fsdp_param as fparam

        buffers = self.buffers
        alloc, free = fparam.alloc_storage, fparam.free_storage

        def alloc_storage(t: torch.Tensor) -> None:
            alloc(t)
            self._resized(t)
            buffers.resized(t)

        def free_storage(t: torch.Tensor) -> None:
            free(t)
            self._resized(t)
            buffers.resized(t)

        _patch(stack, fparam, "alloc_storage", alloc_storage)
        _patch(stack, fparam, "free_storage", free_storage)

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def row(self, out: dict[str, Any]) -> dict[str, Any]:
        """This rank's row of `ranks_state` from its measured fields (`out`, the protocol's)."""
        opts = out.get("optimizers") or []
        phases = self.buffers.phases
        row = {
            "rank": self.rank,
            "state_bytes": out.get("opt_state_bytes"),
            "state_scalar_bytes": out.get("opt_state_scalar_bytes"),
            "state_alloc_bytes": out.get("opt_state_alloc_bytes"),
            "expected": out.get("opt_state_expected"),
            "n_params": sum(o.n_params or 0 for o in opts) if opts else None,
            "n_param_tensors": sum(o.n_param_tensors or 0 for o in opts) if opts else None,
            "peak_total": out.get("peak_total"),
            "by_optimizer": [{"name": o.name, "optimizer": o.optimizer, "n_params": o.n_params,
                              "n_param_tensors": o.n_param_tensors, "state_bytes": o.state_bytes} for o in opts],
        }
        row.update({k: out.get(k) for k in ("param_bytes", "grad_bytes", "mem_step_start", "peak_forward",
                                             "peak_backward", "peak_step", "peak_zero_grad", "mem_after_step")})
        for category, phase in (("unsharded", "forward"), ("unsharded", "backward"), ("all_gather", "forward"),
                                ("all_gather", "backward"), ("reduce_scatter", "backward")):
            row[f"{category}_{phase}"] = phases.get(phase, {}).get(category)
        return row


def _name_buffers(stack: ExitStack, buffers: _Buffers) -> None:
    """Name what FSDP2 allocates by where it is made (see the module docstring) into `buffers`."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll
    from torch.distributed.fsdp._fully_shard import _fsdp_param as fparam
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fgroup

    init_outputs = fparam.FSDPParam.init_all_gather_outputs

    def init_all_gather_outputs(fsdp_param: Any, *args: Any, **kwargs: Any) -> None:
        init_outputs(fsdp_param, *args, **kwargs)
        for t in fsdp_param.all_gather_outputs:
            buffers.add("unsharded", t)

    naming: list[list[str]] = []  # what the next allocations of a collective are, innermost last

    def allocating(allocate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapped(comm: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            t = allocate(comm, *args, **kwargs)
            if naming and naming[-1]:
                category = naming[-1].pop(0)
                if category:
                    buffers.add(category, t)
            return t
        return wrapped

    def named(fn: Callable[..., Any], categories: list[str]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            naming.append(list(categories))
            try:
                return fn(*args, **kwargs)
            finally:
                naming.pop()
        return wrapped

    _patch(stack, fparam.FSDPParam, "init_all_gather_outputs", init_all_gather_outputs)
    for mixin in (coll.DefaultAllocMixin, coll.ProcessGroupAllocMixin):
        _patch(stack, mixin, "allocate", allocating(mixin.allocate))
    _patch(stack, fgroup, "foreach_all_gather", named(fgroup.foreach_all_gather, ["all_gather"]))
    # foreach_reduce allocates the reduce-scatter input, then the output the sharded grads view
    _patch(stack, fgroup, "foreach_reduce", named(fgroup.foreach_reduce, ["reduce_scatter", ""]))


def _patch(stack: ExitStack, owner: Any, name: str, value: Any) -> None:
    """Set `owner.name` to `value` until `stack` closes."""
    old = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, old)


def _detached(collective: Callable[..., Any]) -> Callable[..., None]:
    """`collective(output_tensor=, input_tensor=, ...)` run synchronously on untracked copies
    (made with every dispatch mode off), the result copied into `output_tensor`. Gloo keeps its
    own references to a collective's tensors until its worker thread moves on, a moment after
    `wait()` returns, so a buffer FSDP2 drops would otherwise die early or late by a race."""
    def run(comm: Any, output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        kwargs["async_op"] = False
        with _disable_current_modes():
            out, inp = torch.empty_like(output_tensor), input_tensor.clone()
            collective(comm, out, inp, *args, **kwargs)
            output_tensor.copy_(out)
        return None  # FSDP2 waits only on a Work it is given

    return run


def _gather_muon(stack: ExitStack, detached: bool) -> None:
    """torch's Muon orthogonalises through `_muon._zeropower_via_newtonschulz`: on a sharded
    (DTensor) update, gather the matrix into one buffer of every rank's padded rows (the
    all-gather's output, as FSDP2 gathers parameters), orthogonalise its first rows (the
    whole matrix), keep this rank's rows."""
    try:
        from torch.optim import _muon
    except ImportError:  # a torch without Muon
        return
    newton_schulz = _muon._zeropower_via_newtonschulz

    def gathered(grad: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(grad, DTensor):
            return newton_schulz(grad, *args, **kwargs)
        if any(not isinstance(p, Shard) or p.dim != 0 for p in grad.placements):
            raise UsageError(f"Muon under FSDP gathers dim-0 shards; got placements {grad.placements}")
        mesh = grad.device_mesh
        rank, world = mesh.get_local_rank(), mesh.size()
        rows = shard_rows(grad.shape[0], world)
        mine = grad.to_local()
        gathered = mine.new_empty((rows[0] * world, *mine.shape[1:]))  # the all-gather's output
        slot = gathered.narrow(0, rank * rows[0], rows[0])
        slot.narrow(0, 0, rows[rank]).copy_(mine)
        gather = lambda comm, output_tensor, input_tensor, **kw: dist.all_gather_into_tensor(  # noqa: E731
            output_tensor, input_tensor, group=mesh.get_group(), **kw)
        (_detached(gather) if detached else gather)(None, output_tensor=gathered, input_tensor=slot)
        del slot
        ortho = newton_schulz(gathered.narrow(0, 0, grad.shape[0]), *args, **kwargs)  # the whole matrix
        del gathered
        start = rows[0] * rank
        local = ortho.narrow(0, start, rows[rank]).clone()  # the scatter: this rank keeps its rows
        del ortho
        return DTensor.from_local(local, mesh, grad.placements, run_check=False, shape=grad.shape,
                                  stride=grad.stride())

    _patch(stack, _muon, "_zeropower_via_newtonschulz", gathered)

