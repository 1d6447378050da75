"""The measurement protocol (DESIGN.md): one config in, one Record out.

1. base = allocated(); 2. build the model: param_bytes; 3. build the optimizers;
4. warm up, then count optimizer state (measured and expected); 5. one instrumented step,
phase by phase; 6. time N un-instrumented steps with tracking paused; 7. status.
A failure (OOM, non-finite loss, exception) becomes the record's status, with every
number measured before it.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import sys
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from . import models, optimizers as registry
from .errors import UsageError
from .multi import IMPLS, MultiOptimizer, impl_of
from .probes import Probe, make_probe, round_alloc
from .record import Record
from .spec import format_rules, rules_from
from .dist import local_optimizer
from .state import StateBytes, expected_state, measured_state
from .timing import time_steps
from .trainer import Trainer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
AMPS = ("none", "fp16", "bf16")


@dataclass(frozen=True)
class Config:
    """What is measured: model, sizes, dtypes and the optimizer combo."""

    model: str = "mlp"
    width: int = 256
    depth: int = 3
    batch: int = 32
    dtype: str = "float32"
    amp: str = "none"
    combo: str = "adam"
    rules: str = "rest=adam"
    impl: str = "default"
    zero_grad_at: str = "end"
    seed: int = 0
    device: str = "cpu"
    # 1: every optimizer wrapped in ZeroRedundancyOptimizer, the config run by `ranks` ranks
    # together (torchrun); 0: one process, ranks == 1
    zero: int = 0
    ranks: int = 1

    def label(self) -> str:
        zero = f" zero/{self.ranks}" if self.zero else ""
        return f"{self.combo} {self.model} w={self.width} d={self.depth} b={self.batch} {self.dtype} amp={self.amp} {self.impl}{zero}"


@dataclass(frozen=True)
class Protocol:
    """How it is measured."""

    probe: str = "tracked"
    warmup: int = 3
    steps: int = 20  # timed samples; 0 = memory only
    limit_bytes: int | None = None
    # each timed sample averages a block of steps lasting at least this long (see timing.py)
    min_block_ms: float = 10.0
    # CPU threads for the config (torch.set_num_threads); None = torch's default
    threads: int | None = None


def validate(config: Config, protocol: Protocol = Protocol()) -> None:
    """Raise UsageError for anything wrong with a config before any compute: unknown model,
    dtype, amp or impl, rules that do not parse, unknown optimizers, bad keywords, rules
    that claim nothing or leave parameters unclaimed (checked on a meta-device model)."""
    if config.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    if config.amp not in AMPS:
        raise UsageError(f"unknown amp {config.amp!r}; choose one of {', '.join(AMPS)}")
    if config.impl not in IMPLS:
        raise UsageError(f"unknown impl {config.impl!r}; choose one of {', '.join(IMPLS)}")
    if config.zero_grad_at not in ("end", "start"):
        raise UsageError(f"zero_grad_at must be 'end' or 'start', got {config.zero_grad_at!r}")
    if config.batch < 1:
        raise UsageError(f"batch must be >= 1, got {config.batch}")
    if config.zero not in (0, 1):
        raise UsageError(f"zero must be 0 or 1, got {config.zero!r}")
    if config.zero == 0 and config.ranks != 1:
        raise UsageError(f"a zero=0 config runs on one rank; got ranks={config.ranks}")
    if config.zero == 1:
        from .dist import rank_env

        launch = rank_env()
        if launch is None:
            raise UsageError("zero=1 shards optimizer state across ranks: launch with torchrun, e.g. "
                             "`torchrun --nproc-per-node 2 -m multiopt run --zero 1 ...`")
        if config.ranks != launch.world_size:
            raise UsageError(f"a zero=1 config for {config.ranks} ranks cannot run in a launch of {launch.world_size}")
        if protocol.probe == "fake":
            raise UsageError("zero=1 needs real tensors for its broadcasts: use --probe tracked or cuda, not fake")
    if protocol.probe == "fake" and config.amp == "fp16":
        raise UsageError("the fake probe cannot run fp16 AMP: GradScaler reads real values (found_inf); use --probe tracked")
    rules = rules_from(config.rules)
    for rule in rules:
        spec = registry.resolve(rule.optimizer)
        spec.check_keywords(rule.options, where=f"rule '{rule}'")
        if protocol.probe == "fake" and spec.name in registry.HOST_READS:
            raise UsageError(
                f"the fake probe cannot run rule '{rule}': {registry.HOST_READS[spec.name]}, and fake "
                "tensors have no values; use --probe tracked"
            )
    with torch.device("meta"):
        model = models.resolve(config.model).build(config.width, config.depth)
    from .spec import assign

    groups = assign(model.named_parameters(), rules)
    for rule, group in zip(rules, groups):
        spec = registry.resolve(rule.optimizer)
        if spec.matrix_only:
            from .multi import _check_matrix_only

            _check_matrix_only(rule, spec, group, rules[rules.index(rule) + 1 :])


def measure(config: Config, protocol: Protocol = Protocol(), **meta: Any) -> Record:
    """Run the protocol on `config`; never raises for a failing config (see `status`).
    `meta` fills identity fields (run_id, preset, git_sha, ...)."""
    fields: dict[str, Any] = {
        "run_id": meta.pop("run_id", None) or uuid.uuid4().hex[:12],
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": config.device,
        "probe": protocol.probe,
        **{k: getattr(config, k) for k in ("model", "width", "depth", "batch", "dtype", "amp", "combo", "impl", "zero_grad_at", "seed",
                                           "zero", "ranks")},
        "rules": config.rules,
        **meta,
    }
    fields.setdefault("device_name", _device_name(config.device))
    threads = torch.get_num_threads()
    try:
        if protocol.threads:
            torch.set_num_threads(protocol.threads)
        if config.device.startswith("cuda") and torch.cuda.is_available():
            _fresh_cuda(config.device)
        fields["rules"] = format_rules(rules_from(config.rules))
        probe = make_probe(protocol.probe, device=config.device, limit_bytes=protocol.limit_bytes)
        _run(config, protocol, probe, fields)
        fields["status"] = "ok"
    except torch.OutOfMemoryError as e:
        fields.update(status="oom", error=_one_line(e))
    except _Diverged as e:
        fields.update(status="diverged", error=str(e))
    except Exception as e:  # a failing config is a record, never a stopped sweep
        msg = f"{type(e).__name__}: {_one_line(e)}"
        if type(e).__name__ == "DataDependentOutputException":
            msg = f"the fake probe cannot run this config: an optimizer or the model reads tensor values ({msg})"
        fields.update(status="error", error=msg)
    finally:
        torch.set_num_threads(threads)
        # The next config's protocol starts with gc.collect(); here only give cached CUDA
        # blocks back so memory_reserved starts low too.
        if config.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Record.from_dict(fields)


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
    spec = models.resolve(config.model)

    def factory() -> torch.nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return spec.build(config.width, config.depth)
        finally:
            torch.set_default_dtype(previous)

    return factory


def training(config: Config, model: torch.nn.Module, device: torch.device | str) -> tuple[Any, Trainer, Any]:
    """Optimizers (one per rule; each in ZeroRedundancyOptimizer when config.zero), the
    Trainer and the synthetic batch for `model`, as every measurement of the config builds them."""
    spec = models.resolve(config.model)
    if config.zero:
        from .dist import zero_multi_optimizer

        optimizer = zero_multi_optimizer(model, config.rules, impl=config.impl)
    else:
        optimizer = MultiOptimizer.from_spec(model, config.rules, impl=config.impl)
    trainer = Trainer(model, spec.loss_fn, optimizer, amp=None if config.amp == "none" else config.amp,
                      zero_grad_at=config.zero_grad_at)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    batch = spec.make_batch(model, config.batch, dtype=DTYPES[config.dtype], device=device, generator=gen)
    return optimizer, trainer, batch


def _run(config: Config, protocol: Protocol, probe: Probe, out: dict[str, Any]) -> None:
    torch.manual_seed(config.seed)
    with probe:
        gc.collect()
        probe.sync()
        base = out["mem_base"] = probe.allocated()

        model = probe.build_model(model_factory(config))
        probe.sync()
        out["param_bytes"] = probe.allocated() - base
        out["n_params"] = sum(p.numel() for p in model.parameters())
        optimizer, trainer, batch = training(config, model, probe.device)

        def step(where: str) -> None:
            loss = trainer.train_step(batch)
            if probe.computes and not math.isfinite(loss.item()):
                raise _Diverged(f"loss became {loss.item()} at {where}; lower the learning rate")

        for i in range(protocol.warmup):
            step(f"warm-up step {i + 1}")

        children = optimizer.optimizers
        # ZeRO: the state lives in each wrapper's local optimizer, over this rank's partition
        local = {k: local_optimizer(o) for k, o in children.items()}
        measured = {k: measured_state(o) for k, o in local.items()}
        expected = {k: expected_state(o) for k, o in local.items()}
        total = sum(measured.values(), StateBytes(0, 0, 0, 0))
        out["opt_state_bytes"] = total.total
        out["opt_state_scalar_bytes"] = total.scalar
        out["opt_state_alloc_bytes"] = total.alloc
        out["opt_state_expected"] = (
            sum(e.total for e in expected.values()) if all(e is not None for e in expected.values()) else None
        )

        temps = _instrumented_step(probe, trainer, step, out)
        out["opt_state_by_optimizer"] = json.dumps([
            {
                "name": key,
                "rule": str(rule),
                "optimizer": registry.name_of(local[key]),
                "impl": impl_of(local[key]),
                "n_params": sum(p.numel() for g in local[key].param_groups for p in g["params"]),
                "n_param_tensors": sum(len(g["params"]) for g in local[key].param_groups),
                "n_tensors": measured[key].n_tensors,
                "state_bytes": measured[key].total,
                "state_scalar_bytes": measured[key].scalar,
                "state_alloc_bytes": measured[key].alloc,
                "expected": expected[key].total if expected[key] is not None else None,
                "step_temp_bytes": temps.get(key),
            }
            for (key, opt), rule in zip(children.items(), optimizer.rules or [None] * len(children))
        ])
        if probe.computes:
            bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                raise _Diverged(f"parameters became non-finite ({', '.join(bad[:3])}); lower the learning rate")
            extra = probe.extra()
            out["reserved_after_step"] = extra.get("reserved")
            out["peak_reserved"] = extra.get("peak_reserved")
        if probe.computes and protocol.steps > 0:  # steps=0: memory only
            with probe.paused():
                timing = time_steps(lambda: step("a timed step"), steps=protocol.steps, warmup=1,
                                    # ZeRO ranks step together (collectives in every step): each
                                    # calibrating its own block size would desynchronise them
                                    device=probe.device, min_block_ms=0.0 if config.zero else protocol.min_block_ms)
            out.update(
                step_ms_median=timing.median, step_ms_iqr=timing.iqr, step_ms_min=timing.min,
                step_ms_mean=timing.mean, steps_timed=timing.steps,
            )


def _instrumented_step(probe: Probe, trainer: Trainer, step: Any, out: dict[str, Any]) -> dict[str, int]:
    """One step with allocated/peak per phase; returns each optimizer's step temporaries
    (its peak during its own step() above the memory at its start)."""
    phase_peak: dict[str, int] = {}
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
                grads = {g.untyped_storage()._cdata: g.untyped_storage().nbytes()
                         for p in trainer.model.parameters() if (g := p.grad) is not None}
                out["grad_bytes"] = sum(round_alloc(n) for n in grads.values())

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
            temps[key] = p - running["start"]
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
    out["peak_total"] = max(out[f"peak_{p}"] for p in ("zero_grad", "forward", "backward", "step"))
    out["step_temp_bytes"] = out["peak_step"] - out.pop("_before_step")
    for k in [k for k in out if k.startswith("_before_")]:
        out.pop(k)
    return temps


def _device_name(device: str) -> str:
    from .env import device_name

    return device_name(device)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def measure_cli(args: Any) -> int:
    """`multiopt measure`: one config, printed as a readable table (or one JSON line)."""
    from .record import dumps
    from .sweep import COMBOS, combos, resolve_probe
    from .units import fmt_bytes, fmt_ms, parse_bytes

    probe, device = resolve_probe(args.probe)
    combo, rules = (combos([args.combo])[0] if args.combo else ("custom", args.rules))
    config = Config(model=args.model, width=args.width, depth=args.depth, batch=args.batch, dtype=args.dtype,
                    amp=args.amp, combo=combo, rules=rules, impl=args.impl, zero_grad_at=args.zero_grad_at,
                    seed=args.seed, device=device)
    protocol = Protocol(probe=probe, warmup=args.warmup, steps=args.steps, threads=args.threads,
                        limit_bytes=parse_bytes(args.limit) if args.limit else None)
    validate(config, protocol)
    record = measure(config, protocol)
    if args.json:
        print(dumps(record))
        return 0 if record.status == "ok" else 1
    from tabulate import tabulate

    d = record.to_dict()
    rows = []
    for k, v in d.items():
        if k == "opt_state_by_optimizer":
            continue
        if isinstance(v, int) and not isinstance(v, bool) and (k.startswith(("mem_", "peak_")) or k.endswith("_bytes") or k == "opt_state_expected"):
            rows.append((k, fmt_bytes(v), f"{v:,}"))
        elif isinstance(v, float) and k.startswith("step_ms"):
            rows.append((k, fmt_ms(v), f"{v:.4f}"))
        else:
            rows.append((k, "" if v is None else v, ""))
    print(tabulate(rows, headers=["field", "value", "raw"], tablefmt="github", disable_numparse=True))
    opts = record.by_optimizer()
    if opts:
        print()
        print(tabulate(
            [(o["name"], o["optimizer"], o["impl"], f"{o['n_params']:,}", fmt_bytes(o["state_bytes"]),
              f"{o['state_bytes']:,}", "-" if o["expected"] is None else f"{o['expected']:,}",
              fmt_bytes(o["step_temp_bytes"])) for o in opts],
            headers=["optimizer", "class", "impl", "params", "state", "state bytes", "expected bytes", "step temporaries"],
            tablefmt="github", disable_numparse=True,
        ))
    if record.status != "ok":
        print(f"\nstatus {record.status}: {record.error}", file=sys.stderr)
        return 1
    return 0
