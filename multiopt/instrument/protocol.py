"""The measurement protocol (docs/DESIGN.md): one config in, one Record out.

1. base = allocated(); 2. build the model: param_bytes (parameters) and buffer_bytes;
3. build the optimizers; 4. warm up, then count optimizer state (measured and expected);
5. one instrumented step, phase by phase; 6. time N un-instrumented steps with tracking paused; 7. status.
A failure (OOM, non-finite loss, exception) becomes the record's status, with every
number measured before it.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..env import device_name, rank_env
from ..errors import UsageError, one_line
from ..kinds import Probe as ProbeName, Status, Target, effective_target
from ..record import PHASES, Config, OptimizerRecord, Record, phase_order
from ..train import models, optimizers as registry
from ..train.multi import IMPLS, MultiOptimizer, impl_of, local_optimizer, plan
from ..train.spec import Rule
from ..train.trainer import Trainer
from ..units import round_alloc
from . import fsdp
from .allocator import AllocatorConfig
from .probes import COMPILED_UNKNOWN, Probe, Watch, Workspaces, make_probe
from .state import (StateBytes, attributed_state, constructing_optimizer, expected_state, host_state, measured_state,
                    observed_impl)
from .gpu import check_gpu, predict
from .timing import Calibration, time_steps
from .work import Work, counting_work

__all__ = ["AMPS", "DTYPES", "Config", "Protocol", "failed_record", "measure", "measure_work", "model_bytes",
           "default_warmup", "model_factory", "probe_target", "storage_bytes", "training", "validate"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
AMPS = ("none", "fp16", "bf16")


@dataclass(frozen=True)
class Protocol:
    """How it is measured."""

    probe: str = ProbeName.TRACKED
    # steps run before the measured one; None: the probe's (`default_warmup`)
    warmup: int | None = None
    steps: int = 20  # timed samples; 0 = memory only
    limit_bytes: int | None = None
    # each timed sample averages a block of steps lasting at least this long (see timing.py)
    min_block_ms: float = 10.0
    # CPU threads for the config (torch.set_num_threads); None = torch's default
    threads: int | None = None
    # target cuda (Config.target): the allocator model's options, PYTORCH_CUDA_ALLOC_CONF
    # text parsed once here (None: read from the environment when a probe needs them), and
    # the library workspaces it adds
    alloc_conf: AllocatorConfig | str | None = None
    workspaces: Workspaces = Workspaces()
    # Read reserved memory after the finite-parameter check (isfinite(p).all() per parameter),
    # not right after the step: the order schema-v1 records were measured in (reports/gpu-h200),
    # whose reserved columns include the check's temporaries. For replaying those records.
    reserved_after_check: bool = False
    # count the instrumented step's work (work.py: FLOPs, bytes, kernels per phase and per
    # optimizer) on the tracked and fake probes; False only to measure what counting costs
    count_work: bool = True
    # predict the step time on this GPU (gpu.py: h100, h200, ...) from the work, target cuda
    gpu: str | None = None

    def __post_init__(self) -> None:
        if self.warmup is None:
            object.__setattr__(self, "warmup", default_warmup(self.probe))
        if isinstance(self.alloc_conf, str):
            object.__setattr__(self, "alloc_conf", AllocatorConfig.parse(self.alloc_conf, "alloc_conf"))


def default_warmup(probe: str) -> int:
    """Warm-up steps before the measured one when none are asked for. Real tensors (tracked,
    cuda): 3, since values, allocator caches and lazily built kernels settle over steps. Fake
    tensors carry no values and no history but the ledger's: the first step makes the state,
    and every step after it runs the same ops on the same shapes. Measured (250 configs: the
    default preset on both targets, tiny Llama, Qwen2, Mistral, BERT, GPT-2 with AMP, LoRA,
    checkpointing, step-in-backward and FSDP), 1 warm-up step gives every memory, reserved and
    work field of 3, to the byte. Each record still says whether its measured step was steady
    (`mem_step_end` against `mem_step_start`); one that was not is flagged, never trusted."""
    return 1 if probe == ProbeName.FAKE else 3


def validate(config: Config, protocol: Protocol = Protocol(), *, model: torch.nn.Module | None = None) -> None:
    """Raise UsageError for anything wrong with a config before any compute: unknown model,
    dtype, amp or impl, rules that do not parse, unknown optimizers, bad keywords, rules that
    claim nothing or leave parameters unclaimed (checked on a meta-device model: `model`,
    where the caller has the config's built already, read and not changed)."""
    _check_fields(config)
    if protocol.gpu is not None:
        check_gpu(protocol.gpu, config.target, protocol.probe)
    if config.zero == 1:
        _check_zero(config, protocol)
    if protocol.probe == ProbeName.FAKE:
        for rule in config.rules.parsed:
            reads = registry.resolve(rule.optimizer).host_reads
            if reads:
                raise UsageError(f"the fake probe cannot run rule '{rule}': {reads}, and fake "
                                 "tensors have no values; use --probe tracked")
    if model is None:
        with torch.device("meta"):
            model = models.for_config(config).build(config.width, config.depth)
    plan(model, config.rules)
    fsdp.check(config, protocol.probe, model)


def _check_fields(config: Config) -> None:
    if config.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    if config.amp not in AMPS:
        raise UsageError(f"unknown amp {config.amp!r}; choose one of {', '.join(AMPS)}")
    if config.impl not in IMPLS:
        raise UsageError(f"unknown impl {config.impl!r}; choose one of {', '.join(IMPLS)}")
    if config.target not in Target.values():
        raise UsageError(f"unknown target {config.target!r}; choose one of {', '.join(Target.values())}")
    if config.zero_grad_at not in ("end", "start"):
        raise UsageError(f"zero_grad_at must be 'end' or 'start', got {config.zero_grad_at!r}")
    if config.batch < 1:
        raise UsageError(f"batch must be >= 1, got {config.batch}")
    if config.zero not in (0, 1):
        raise UsageError(f"zero must be 0 or 1, got {config.zero!r}")
    if config.zero == 0 and config.ranks != 1:
        raise UsageError(f"a zero=0 config runs on one rank; got ranks={config.ranks}")
    if config.step_in_backward not in (0, 1):
        raise UsageError(f"step_in_backward must be 0 or 1, got {config.step_in_backward!r}")
    if config.step_in_backward and config.amp == "fp16":
        raise UsageError("step_in_backward cannot run with fp16 AMP: its GradScaler unscales and checks every "
                         "gradient for inf/nan before any optimizer steps; use bf16 AMP or none")
    if config.step_in_backward and config.zero:
        raise UsageError("step_in_backward steps each parameter alone; ZeRO's step broadcasts every partition: "
                         "use zero=0")
    fsdp.check_fields(config)


def _check_zero(config: Config, protocol: Protocol) -> None:
    launch = rank_env()
    if launch is None:
        raise UsageError("zero=1 shards optimizer state across ranks: launch with torchrun, e.g. "
                         "`torchrun --nproc-per-node 2 -m multiopt run --zero 1 ...`")
    if config.ranks != launch.world_size:
        raise UsageError(f"a zero=1 config for {config.ranks} ranks cannot run in a launch of {launch.world_size}")
    if protocol.probe == ProbeName.FAKE:
        raise UsageError("zero=1 needs real tensors for its broadcasts: use --probe tracked or cuda, not fake")


def _identity(config: Config, protocol: Protocol, meta: dict[str, Any]) -> dict[str, Any]:
    """The record fields every record of `config` starts from, measured or not: the config,
    the probe, torch, when, and the caller's `meta` (run_id, preset, git_sha, device_name)."""
    fields = {
        **asdict(config),  # rules: the canonical text, parsed when the Config was made
        **_sizes(config),
        "run_id": meta.pop("run_id", None) or uuid.uuid4().hex[:12],
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "probe": protocol.probe,
        "target": effective_target(protocol.probe, config.target),
        "warmup_steps": protocol.warmup,
        **meta,
    }
    return fields


def _sizes(config: Config) -> dict[str, Any]:
    """width and depth as the record keeps them: 0 for one the model's factory does not take
    (`ModelSpec.sizes`); seq as the batches have it and lora in canonical text; as given when
    the model cannot be resolved (measure records why)."""
    try:
        spec = models.for_config(config)
    except UsageError:
        return {}
    width, depth = spec.sizes(config.width, config.depth)
    return {"width": width, "depth": depth, "seq": spec.seq, "lora": spec.lora}


def failed_record(config: Config, protocol: Protocol, status: str, error: str, **meta: Any) -> Record:
    """A record for a config that never reported back (its worker died or timed out)."""
    return Record.from_dict({**_identity(config, protocol, meta), "status": status, "error": error})


#: how a run's steps make their gradients (`measure(grads=...)`)
GRADS = ("backward", "by-hand", "last-by-hand")


def measure(config: Config, protocol: Protocol = Protocol(), *, build: Callable[[], torch.nn.Module] | None = None,
            requests: list | None = None, grads: str = "backward", **meta: Any) -> Record:
    """Run the protocol on `config`; never raises for a failing config (see `status`).
    `meta` fills identity fields (run_id, preset, git_sha, ...). `build`: the config's model
    factory when the caller already has one (a plan reuses one meta-built model for every
    candidate: a copy per run); it must build what `model_factory(config)` builds.
    `requests`: a list that receives the allocator model's requests (target cuda on the
    tracked or fake probe, one process: see `instrument.program`), with marks where the run
    passes a phase or builds its optimizers and each step's gradient table; left empty
    elsewhere. `grads` (with `requests`; GRADS): "by-hand", every step's gradients made by hand
    with no forward or backward (the optimizers' requests alone, for `program.spliced`);
    "last-by-hand", the instrumented step's (its model side is the warm-up's again, for
    `program.repeated`). Either way the record holds the run's identity, status and sizes only."""
    return measure_work(config, protocol, build=build, requests=requests, grads=grads, **meta)[0]


def measure_work(config: Config, protocol: Protocol = Protocol(), *,
                 build: Callable[[], torch.nn.Module] | None = None, requests: list | None = None,
                 grads: str = "backward", **meta: Any) -> tuple[Record, Work | None]:
    """`measure`, and the op stream of its instrumented step (work.py; None where no work was
    counted: the cuda probe, a config that failed before its instrumented step)."""
    if config.fsdp > 1 and protocol.probe == ProbeName.FAKE and not fsdp.in_group():
        # N ranks simulated here, each on a fake process group of its own (instrument/fsdp.py);
        # each rank's record carries its own work counters, the merged one rank 0's
        meta.setdefault("run_id", uuid.uuid4().hex[:12])
        return fsdp.simulate(config, lambda: measure(config, protocol, build=build, **meta)), None
    fields = _identity(config, protocol, meta)
    fields.setdefault("device_name", device_name(config.device))
    threads = torch.get_num_threads()
    try:
        if protocol.threads:
            torch.set_num_threads(protocol.threads)
        if config.device.startswith("cuda") and torch.cuda.is_available():
            _fresh_cuda(config.device)
        sharding = fsdp.Sharding(config) if config.fsdp > 1 else None  # its mesh before the probe's modes
        probe = _probe(config, protocol)
        log_requests = getattr(probe, "log_requests", None)  # False: a probe whose target keeps no allocator
        logged = (requests is not None and sharding is None and log_requests is not None
                  and log_requests(requests) is not False)
        if grads not in GRADS:
            raise UsageError(f"grads={grads!r}: give one of {', '.join(GRADS)}")
        if grads != "backward" and not logged:
            raise UsageError(f"measure(grads={grads!r}) keeps only the allocator model's requests: give `requests` "
                             "and a tracked or fake probe with target cuda, one rank")
        fields["alloc_model"] = getattr(probe, "alloc_model", None)
        _run(config, protocol, probe, fields, build, sharding, requests if logged else None, grads)
        fields["unmodelled"] = ", ".join(getattr(probe, "unmodelled", ())) or None
        fields["status"] = Status.OK
    except torch.OutOfMemoryError as e:
        fields.update(status=Status.OOM, error=one_line(e))
    except _Diverged as e:
        fields.update(status=Status.DIVERGED, error=str(e))
    except Exception as e:  # a failing config is a record, never a stopped sweep
        fields.update(status=Status.ERROR, error=_reads_values(e) or f"{type(e).__name__}: {one_line(e)}")
    finally:
        torch.set_num_threads(threads)
        # The next config's protocol starts with gc.collect(); here only give cached CUDA
        # blocks back so memory_reserved starts low too.
        if config.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    work = fields.pop("_work", None)
    return Record.from_dict(fields), work


def _probe(config: Config, protocol: Protocol) -> Probe:
    """The protocol's probe for `config`; target cuda on a CPU probe takes the allocator
    options from `protocol.alloc_conf`, else from PYTORCH_CUDA_ALLOC_CONF. (A cuda probe is
    the device itself: it models no target.)"""
    alloc = None
    if config.target == Target.CUDA and protocol.probe != ProbeName.CUDA:
        alloc = protocol.alloc_conf if protocol.alloc_conf is not None else AllocatorConfig.from_env()
    target = Target.CPU if protocol.probe == ProbeName.CUDA else config.target
    return make_probe(protocol.probe, device=config.device, limit_bytes=protocol.limit_bytes, target=target,
                      alloc_config=alloc, workspaces=protocol.workspaces)


def _fresh_cuda(device: str) -> None:
    """Start a CUDA config as a fresh process would: cuBLAS keeps its workspaces (~33 MB)
    allocated through the caching allocator after the first matmul, and a config measured
    in the same process after another one would otherwise count them in its base but never
    allocate them, unlike an isolated one."""
    gc.collect()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        torch.cuda.synchronize(device)
        clear()
    torch.cuda.empty_cache()


class _Diverged(Exception):
    pass


def model_factory(config: Config) -> Callable[[], torch.nn.Module]:
    """The config's model, built the one way the suite builds it (measure, bench, profile
    comparisons): parameters created in the config's dtype, not converted after, since a
    conversion would briefly hold both copies and the fake probe's meta tensors cannot be
    swapped by Module.to. Call it under a device context or through a probe's build_model."""
    dtype = DTYPES[config.dtype]
    spec = models.for_config(config)

    def factory() -> torch.nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return spec.build(config.width, config.depth)
        finally:
            torch.set_default_dtype(previous)

    return factory


def training(config: Config, model: torch.nn.Module, device: torch.device | str,
             computes: bool = True, built: Callable[[], None] | None = None) -> tuple[Any, Trainer, Any]:
    """Optimizers (one per rule; each in ZeroRedundancyOptimizer when config.zero), the
    Trainer and the synthetic batch for `model`, as every measurement of the config builds them.
    `computes=False` (fake tensors): fp16's scaler steps without reading its inf checks.
    `built`: called once the optimizers are built, before anything else is."""
    spec = models.for_config(config)
    optimizer = MultiOptimizer.from_spec(model, config.rules, impl=config.impl, zero=bool(config.zero),
                                         target=config.target)
    if built is not None:
        built()
    trainer = Trainer(model, spec.loss_fn, optimizer, amp=None if config.amp == "none" else config.amp,
                      zero_grad_at=config.zero_grad_at, assume_finite=not computes,
                      step_in_backward=bool(config.step_in_backward))
    gen = torch.Generator(device=device).manual_seed(config.seed)
    batch = spec.make_batch(model, config.batch, dtype=DTYPES[config.dtype], device=device, generator=gen)
    return optimizer, trainer, batch


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the unique storages under `tensors` (None skipped), each rounded up to 512
    as every probe (and CUDA's memory_allocated) counts an allocation. Unique by storage, so
    tied weights and views count once; on fake tensors too (their data pointers are all 0)."""
    sizes = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in _plain(tensors)}
    return sum(round_alloc(n) for n in sizes.values())


def _plain(tensors: Iterable[torch.Tensor | None]) -> Iterator[torch.Tensor]:
    """The tensors holding the memory: a wrapper subclass's inner tensors (a DTensor's local
    shard, under FSDP), never its storage-less wrapper. None skipped."""
    for t in tensors:
        if t is None:
            continue
        if is_traceable_wrapper_subclass(t):
            attrs, _ = t.__tensor_flatten__()
            yield from _plain(x for a in attrs if isinstance(x := getattr(t, a), torch.Tensor))  # not a DTensor's mesh
        else:
            yield t


def _setup(config: Config, probe: Probe, out: dict[str, Any], build: Callable[[], torch.nn.Module] | None,
           sharding: fsdp.Sharding | None, mark: Callable[[str], None]) -> tuple[torch.nn.Module, MultiOptimizer,
                                                                                 Trainer, Any, Watch]:
    """The run's model (its sizes into `out`), optimizers, trainer and batch, built on the
    probe, and what building the optimizers allocated (`Watch`); `mark` names the span where
    the optimizers are built (the allocator's request log, program.spliced)."""
    gc.collect()
    probe.sync()
    out["mem_base"] = probe.allocated()
    model = probe.build_model(build or model_factory(config))
    if sharding is not None:  # FSDP2: param_bytes are this rank's shards
        sharding.attach(probe)
        model = sharding.shard(model)
        gc.collect()
    probe.sync()
    out["param_bytes"], out["buffer_bytes"] = model_bytes(model)
    out["n_params"] = sum(p.numel() for p in model.parameters())
    # births while optimizers are built belong to the one being built (shared maps)
    with probe.watching(Watch(constructing_optimizer)) as built:
        mark("optimizer:before")
        optimizer, trainer, batch = training(config, model, probe.device, probe.computes,
                                             built=lambda: mark("optimizer:after"))
    if sharding is not None:
        trainer.register_phase_hook(sharding.buffers.on_phase)
    return model, optimizer, trainer, batch, built


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of `model`, storages counted as the probes count them;
    a buffer that shares a parameter's storage is counted with the parameters."""
    params = storage_bytes(model.parameters())
    both = storage_bytes([*model.parameters(), *model.buffers()])
    return params, both - params


def _run(config: Config, protocol: Protocol, probe: Probe, out: dict[str, Any],
         build: Callable[[], torch.nn.Module] | None = None, sharding: fsdp.Sharding | None = None,
         log: list | None = None, grads: str = "backward") -> None:
    torch.manual_seed(config.seed)
    mark = (lambda name: log.append(("mark", name))) if log is not None else (lambda name: None)
    with probe, (sharding or nullcontext()):
        model, optimizer, trainer, batch, built = _setup(config, probe, out, build, sharding, mark)
        if log is not None:
            trainer.register_phase_hook(_marking(log, model))

        def step(where: str, by_hand: bool = grads == "by-hand") -> None:
            mark("train_step:before")
            if by_hand:
                trainer.step_with(_grad_by_hand())
            else:
                loss = trainer.train_step(batch)
                if probe.computes and not math.isfinite(loss.item()):
                    raise _Diverged(f"loss became {loss.item()} at {where}; lower the learning rate")
                del loss  # the step's last request: its loss freed (program.repeated)
            mark("train_step:after")

        # Target cuda: state torch keeps on the host (non-fused `step` counters) leaves the
        # device's allocator as soon as each optimizer's step made it.
        hooks = [o.register_step_post_hook(lambda o_, a, k: probe.host(*host_state(local_optimizer(o_))))
                 for o in optimizer.optimizers.values()] if getattr(probe, "target", Target.CPU) == Target.CUDA else []
        if log is not None and config.step_in_backward:  # after the host hooks: their frees inside the span
            _mark_steps(optimizer, mark)
        with _watching_steps(probe, optimizer.optimizers) as stepped:
            for i in range(protocol.warmup):
                step(f"warm-up step {i + 1}")
        for h in hooks:
            h.remove()
        if grads != "backward":  # the allocator's requests alone: nothing else to record
            step("the instrumented step", by_hand=True)
            mark("end")
            return
        # ZeRO: the state lives in each wrapper's local optimizer, over this rank's partition
        local = {k: local_optimizer(o) for k, o in optimizer.optimizers.items()}
        rules = optimizer.rules or (None,) * len(local)
        counted = _count_state(local, out)
        # attributed at the same moment as walked: later steps may replace state tensors
        watched = {k: _attributed(probe, built, stepped[k], optimizer.optimizers[k], o) for k, o in local.items()}
        with (counting_work(probe, trainer, probe_target(probe)) if protocol.count_work
              else _no_counter()) as counter:
            temps = _instrumented_step(probe, trainer, step, out)
        out["optimizers"] = [_optimizer_record(key, rule, opt, *counted[key], temps.get(key), watched[key], probe)
                             for (key, opt), rule in zip(local.items(), rules)]
        if counter is not None:
            _record_work(counter.work(), config, protocol, out)
        if sharding is not None:
            out["ranks_state"] = [sharding.row(out)]
        extra = None if protocol.reserved_after_check else probe.extra()
        if probe.computes or protocol.reserved_after_check:  # fake: the ops alone, for the reserved read after
            _check_finite(model, read=probe.computes)
        extra = extra or probe.extra()
        mark("end")  # what the log holds after this is the run's teardown (program.spliced)
        out["reserved_after_step"] = extra.get("reserved")
        out["peak_reserved"] = extra.get("peak_reserved")
        if probe.computes and protocol.steps > 0:  # steps=0: memory only
            _time(config, protocol, probe, step, out)


def _marking(log: list, model: torch.nn.Module) -> Callable[[str, str], None]:
    """A phase hook that marks each phase's start and end in the allocator's request log, and
    before each step the trainable parameters' gradients (their storages, as the probe keys
    them; None: no gradient): what `program.spliced` finds the optimizers' requests by."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def hook(phase: str, when: str) -> None:
        if phase == "step" and when == "before":
            log.append(("grads", tuple(None if p.grad is None else id(p.grad.untyped_storage()) for p in trainable)))
        log.append(("mark", f"{phase}:{when}"))
    return hook


def _mark_steps(optimizer: MultiOptimizer, mark: Callable[[str], None]) -> None:
    """step_in_backward: mark each parameter's step inside backward, a span of its own in the
    allocator's request log (program.OPTIMIZER_SPANS "param_step")."""
    for o in optimizer.optimizers.values():
        o.register_step_pre_hook(lambda o_, a, k: mark("param_step:before"))
        o.register_step_post_hook(lambda o_, a, k: mark("param_step:after"))


def _grad_by_hand() -> Callable[[torch.Tensor], torch.Tensor]:
    """A parameter's gradient as backward would leave it (zeros: a tracked probe's optimizers
    read them; AccumulateGrad gives a gradient its parameter's strides), for `measure(grads=
    "by-hand")`, one step's worth. Its first call makes one matmul first: in a real step the
    forward makes the thread's first one, which allocates its cuBLAS workspaces
    (probes/target.py); without it an optimizer's first matmul (Muon's) would, inside its step."""
    first = [True]

    def make(p: torch.Tensor) -> torch.Tensor:
        if first[0]:
            first[0] = False
            one = torch.ones(1, 1, device=p.device)
            torch.mm(one, one)
        return torch.zeros_like(p)
    return make


def probe_target(probe: Probe) -> str:
    """Whose choices the probe's numbers follow: cuda on the cuda probe, else its target."""
    return effective_target(probe.name, getattr(probe, "target", Target.CPU))


@contextmanager
def _no_counter() -> Iterator[None]:
    yield None


def _record_work(work: Work, config: Config, protocol: Protocol, out: dict[str, Any]) -> None:
    """The step's work into `out`: per phase, the whole step, each optimizer's share; and,
    with `protocol.gpu`, the predicted step time (gpu.py)."""
    order = phase_order(config.zero_grad_at)
    phases = work.phases(order)
    total = work.total()
    out["_work"] = work
    out["step_flops"], out["step_bytes"], out["step_kernels"] = total.flops, total.bytes, total.kernels
    owners = work.by_owner()
    out["optimizers"] = [replace(o, work_flops=owners[o.name].flops if o.name in owners else 0,
                                 work_bytes=owners[o.name].bytes if o.name in owners else 0,
                                 work_kernels=owners[o.name].kernels if o.name in owners else 0)
                         for o in out["optimizers"]]
    predicted: dict[str, float] = {}
    if protocol.gpu is not None:
        p = predict(work, protocol.gpu)
        predicted = p.phase_ms
        out.update(gpu=p.gpu, predicted_step_ms=p.step_ms, predicted_device_ms=p.device_ms,
                   predicted_check=p.checked)
    out["work"] = [{"phase": w.phase, "flops": w.flops, "bytes": w.bytes, "kernels": w.kernels,
                    "predicted_ms": predicted.get(w.phase)} for w in phases]


def _count_state(local: dict[str, Any], out: dict[str, Any]) -> dict[str, tuple[StateBytes, StateBytes | None]]:
    """Every optimizer's state, walked and expected; the totals go into `out`."""
    counted = {k: (measured_state(o), expected_state(o)) for k, o in local.items()}
    total = sum((m for m, _ in counted.values()), StateBytes(0, 0, 0, 0))
    out["opt_state_bytes"] = total.total
    out["opt_state_scalar_bytes"] = total.scalar
    out["opt_state_alloc_bytes"] = total.alloc
    expected = [e for _, e in counted.values()]
    out["opt_state_expected"] = sum(e.total for e in expected) if all(e is not None for e in expected) else None
    return counted


class _Watched:
    """What the probe saw of one optimizer: its step (ops, births, compiled calls) and the
    state attributed to it by allocation (None where the probe keeps no ledger)."""

    def __init__(self, steps: Watch, attributed: StateBytes | None) -> None:
        self.steps = steps
        self.attributed = attributed


@contextmanager
def _watching_steps(probe: Probe, children: dict[str, Any]) -> Iterator[dict[str, Watch]]:
    """Watch each child optimizer's steps during the block: key -> Watch."""
    with ExitStack() as stack:
        yield {key: _watch_steps_of(probe, opt, stack) for key, opt in children.items()}


def _watch_steps_of(probe: Probe, opt: Any, stack: ExitStack) -> Watch:
    """Step pre/post hooks that enter and leave `probe.watching` around `opt`'s step; their
    removal goes on `stack`."""
    watch = Watch()
    inside = ExitStack()

    def pre(opt_: Any, args: Any, kwargs: Any) -> None:
        inside.enter_context(probe.watching(watch))

    def post(opt_: Any, args: Any, kwargs: Any) -> None:
        inside.close()

    for handle in (opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)):
        stack.callback(handle.remove)
    stack.callback(inside.close)  # a step that raised never reached its post hook
    return watch


def _attributed(probe: Probe, built: Watch, steps: Watch, wrapper: Any, local: Any) -> _Watched:
    """`local`'s state by allocation: what building it (or its ZeRO wrapper) and its steps
    allocated that is still alive. None on a probe without a ledger (no births seen)."""
    if not probe.sees_births:
        return _Watched(steps, None)
    born = built.alive(id(wrapper)) + built.alive(id(local)) + steps.alive(None)
    return _Watched(steps, attributed_state(local, born))


def _optimizer_record(key: str, rule: Rule | None, opt: Any, measured: StateBytes, expected: StateBytes | None,
                      temps: int | None, watched: _Watched, probe: Probe) -> OptimizerRecord:
    params = [p for g in opt.param_groups for p in g["params"]]
    attributed = watched.attributed
    return OptimizerRecord(
        name=key, rule=str(rule), optimizer=registry.name_of(opt),
        impl=observed_impl(watched.steps.op_names()) or impl_of(opt),
        n_params=sum(p.numel() for p in params), n_param_tensors=len(params), n_tensors=measured.n_tensors,
        state_bytes=measured.total, state_scalar_bytes=measured.scalar, state_alloc_bytes=measured.alloc,
        expected=expected.total if expected is not None else None, step_temp_bytes=temps,
        state_attributed_bytes=attributed.total if attributed is not None else None,
        state_gap_bytes=attributed.total - measured.total if attributed is not None else None,
        compiled=_compiled(probe, watched.steps.compiled_calls),
    )


def _compiled(probe: Probe, calls: int | None) -> str | None:
    """The record's `compiled`: how the probe ran the step's compiled code, None when the step
    entered none, unknown when a C profiler kept the calls from being counted."""
    if calls is None:
        return COMPILED_UNKNOWN
    return probe.compile_mode if calls else None


def _check_finite(model: torch.nn.Module, read: bool = True) -> None:
    """`isfinite(p).all()` per parameter. `read=False` (fake tensors hold no values) runs the
    same ops unread, so an allocator model sees the same temporaries in the same order (the
    reserved memory of `Protocol.reserved_after_check` depends on them)."""
    bad = []
    for name, p in model.named_parameters():
        finite = torch.isfinite(p).all()  # isfinite's bool tensor dies here, as on the GPU
        if read and not bool(finite):
            bad.append(name)
        del finite
    if bad:
        raise _Diverged(f"parameters became non-finite ({', '.join(bad[:3])}); lower the learning rate")


def _time(config: Config, protocol: Protocol, probe: Probe, step: Callable[[str], None], out: dict[str, Any]) -> None:
    with probe.paused():
        host = Calibration(probe.device)  # the host's noise, timed around and between the samples
        timing = time_steps(lambda: step("a timed step"), steps=protocol.steps, warmup=1,
                            # ZeRO ranks step together (collectives in every step): each
                            # calibrating its own block size would desynchronise them
                            device=probe.device, min_block_ms=0.0 if config.zero or config.fsdp > 1 else protocol.min_block_ms,
                            host=host)
    out.update(step_ms_median=timing.median, step_ms_iqr=timing.iqr, step_ms_min=timing.min,
               step_ms_mean=timing.mean, steps_timed=timing.steps,
               step_ms_samples=[round(t, 5) for t in timing.times_ms], host_calib=host.KERNEL,
               host_calib_ms=[round(t, 5) for t in timing.host_ms], host_noise=timing.host_noise,
               host_wait=None if timing.host_wait is None else round(timing.host_wait, 5))


def _instrumented_step(probe: Probe, trainer: Trainer, step: Any, out: dict[str, Any]) -> dict[str, int]:
    """One step with allocated/peak per phase; returns each optimizer's step temporaries
    (its peak during its own step() above the memory at its start)."""
    temps: dict[str, int] = {}
    running = {"peak": 0, "start": 0}

    def on_phase(phase: str, when: str) -> None:
        probe.sync()
        if when == "before":
            out[f"_before_{phase}"] = probe.allocated()
            probe.reset_peak()
            running["peak"] = 0
        else:
            out[f"mem_after_{phase}"] = probe.allocated()
            out[f"peak_{phase}"] = max(probe.peak(), running["peak"])
            if phase == "backward":
                out["grad_bytes"] = storage_bytes(p.grad for p in trainer.model.parameters())

    handles = [trainer.register_phase_hook(on_phase)]
    for key, opt in trainer.optimizer.optimizers.items():
        def pre(opt_: Any, args: Any, kwargs: Any, key: str = key) -> None:
            probe.sync()
            running["peak"] = max(running["peak"], probe.peak())
            running["start"] = probe.allocated()
            probe.reset_peak()

        def post(opt_: Any, args: Any, kwargs: Any, key: str = key) -> None:
            probe.sync()
            p = probe.peak()
            # step_in_backward steps once per parameter: the largest of its steps
            temps[key] = max(temps.get(key, 0), p - running["start"])
            running["peak"] = max(running["peak"], p)
            probe.reset_peak()

        handles += [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    try:
        probe.sync()
        out["mem_step_start"] = probe.allocated()
        step("the instrumented step")
    finally:
        for h in handles:
            h.remove()
    probe.sync()
    out["mem_step_end"] = probe.allocated()  # the step's loss released: mem_step_start again if steady
    out["peak_total"] = max(out[f"peak_{p}"] for p in PHASES)
    out["step_temp_bytes"] = out["peak_step"] - out.pop("_before_step")
    for k in [k for k in out if k.startswith("_before_")]:
        out.pop(k)
    return temps


def _reads_values(e: BaseException) -> str | None:
    """The fake probe's refusal, naming its cause, when `e` (or what it was raised from or
    while handling: the UsageError a rule's construction becomes keeps it as context) is fake
    mode refusing to read a tensor's value; else None."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    if not any(type(x).__name__ == "DataDependentOutputException" or "_local_scalar_dense" in str(x) for x in chain):
        return None
    first = one_line(chain[0])
    who = first.split(": ", 1)[0] if first.startswith("rule '") else "an optimizer or the model"
    return (f"the fake probe cannot run this config: {who} reads tensor values (.item(), .tolist(): "
            "aten._local_scalar_dense), which fake tensors do not have; use --probe tracked")
