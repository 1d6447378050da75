"""`multiopt` / `python -m multiopt`: train, measure, estimate, run, fit, report, gate.

The only module that knows argparse: each subcommand parses its arguments here and calls
typed functions of the stage that owns the work (loaded when the command runs, so `--help`
and a bad flag cost no torch import). Any UsageError becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import gc
import math
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .errors import UsageError
from .kinds import Probe, Status, Target, effective_target

if TYPE_CHECKING:
    from .instrument.allocator import AllocatorConfig
    from .rules import Rules


class _Parser(argparse.ArgumentParser):
    """argparse, but bad arguments exit 2 with one line (argparse prints usage + message)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="multiopt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_train_parser, _measure_parsers, _run_parser, _fit_parser, _plan_parser, _gate_parser,
                _report_parser):
        add(sub)  # in this order in --help
    return p


def _train_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="train a model on synthetic data, printing loss and memory per step")
    t.add_argument("--rules", required=True, help='e.g. "layer1=sgd(lr=0.01); layer2=adam(lr=1e-3)"')
    t.add_argument("--model", default="simple", help="simple | mlp | transformer | pkg.module:factory")
    t.add_argument("--width", type=int, default=64)
    t.add_argument("--depth", type=int, default=2)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_train)


def _measure_parsers(sub: Any) -> None:
    m = sub.add_parser("measure", help="measure one config with the protocol and print its record")
    _config_arguments(m, probe="auto", steps=20, target=Target.CPU)
    e = sub.add_parser("estimate", help="the same on the fake probe: sizes only, no compute, any size in seconds")
    _config_arguments(e, probe=Probe.FAKE, steps=0, target=Target.CUDA)


def _run_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="sweep a grid of configs into DIR/results.jsonl, env.json and report.md")
    r.add_argument("--preset", default="default", choices=["quick", "default", "wide"])
    r.add_argument("--widths", help="e.g. 64,256")
    r.add_argument("--batches", help="e.g. 16,64")
    r.add_argument("--depths", help="e.g. 2,4")
    r.add_argument("--combos", help="combo presets, comma separated: sgd,adam,muon+adamw,...")
    r.add_argument("--rules", action="append", metavar="[NAME::]RULES",
                   help='your own combo, repeatable: "split::layer1=sgd(lr=0.01); rest=adam"')
    r.add_argument("--dtypes", help="float32,bfloat16")
    r.add_argument("--impls", help="default,foreach,fused,forloop")
    r.add_argument("--models", help="mlp,simple,transformer, your own pkg.module:factory, hf:PATH, timm:NAME")
    _real_model_arguments(r, sweep=True)
    r.add_argument("--step-in-backward", default=None, metavar="0,1", help="optimizer step inside backward, each "
                   "gradient freed once used: off (0) and/or on (1), a sweep axis (default 0)")
    r.add_argument("--zero", metavar="0,1", help="ZeRO optimizer-state sharding: 1 wraps each optimizer in "
                   "ZeroRedundancyOptimizer across all torchrun ranks (default 0)")
    r.add_argument("--probe", default=None, help="auto | cuda | tracked | fake (default: the preset's)")
    _target_arguments(r, Target.CPU)
    _fsdp_arguments(r)
    r.add_argument("--out", default=None, help="output directory (default: runs/PRESET-TIMESTAMP)")
    r.add_argument("--resume", action="store_true", help="skip configs already recorded in OUT/results.jsonl")
    r.add_argument("--isolate", dest="isolate", action="store_true", default=True,
                   help="each config in a child process (default)")
    r.add_argument("--no-isolate", dest="isolate", action="store_false", help="all configs in this process (faster)")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per config (isolated runs)")
    r.add_argument("--steps", type=int, default=None, help="timed samples per config (default: the preset's; 0: memory only)")
    r.add_argument("--warmup", type=int, default=None, help="warm-up steps before the measured one (default: 1 on the fake probe, 3 on the others)")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads per config (torch.set_num_threads); 1 gives steadier CPU timings on a shared machine")
    r.add_argument("--limit", default=None, help="tracked probe memory limit per config, e.g. 8GiB")
    r.add_argument("--no-report", dest="report", action="store_false", help="do not write report.md")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)


def _fit_parser(sub: Any) -> None:
    f = sub.add_parser("fit", help="largest batch and width that fit a memory budget, per combo (fake probe)")
    f.add_argument("--budget", required=True, help="device memory, e.g. 24GiB, 80GB, 512MiB or bytes")
    f.add_argument("--width", type=int, default=1024, help="width at which to find the largest batch (default 1024)")
    f.add_argument("--batch", type=int, default=64, help="batch at which to find the largest width (default 64)")
    f.add_argument("--combos", help="combo presets, comma separated (default: sgd,sgd-momentum,adam,adamw,muon+adamw,sgd+adam)")
    f.add_argument("--rules", action="append", metavar="[NAME::]RULES", help="your own combo, repeatable")
    f.add_argument("--model", default="mlp", help="mlp | transformer | simple | pkg.module:factory")
    f.add_argument("--depth", type=int, default=4)
    f.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    f.add_argument("--impl", default="default", help="default | foreach | fused | forloop")
    _target_arguments(f, Target.CUDA)
    f.add_argument("--context", default=None, help="CUDA context bytes outside torch's counters, e.g. 512MiB, "
                   "or a GPU family (hopper, ampere, ...; default: hopper's) - target cuda only")
    _jobs_argument(f)
    f.set_defaults(func=_cmd_fit)


def _jobs_argument(p: Any) -> None:
    p.add_argument("--jobs", type=int, default=None, help="fake runs at once, each in a forked process "
                   "(default: the CPUs this process may use)")


def _plan_parser(sub: Any) -> None:
    pl = sub.add_parser("plan", help="the setups that fit a memory budget: every candidate's largest batch, the frontier")
    pl.add_argument("--budget", required=True, help="device memory, e.g. 24GiB, 80GB")
    pl.add_argument("--model", default="transformer", help="mlp | transformer | simple | pkg.module:factory")
    pl.add_argument("--width", type=int, default=1024, help="for a model that takes a width (default 1024)")
    pl.add_argument("--depth", type=int, default=4, help="for a model that takes a depth (default 4)")
    pl.add_argument("--seq", default=None, help="sequence length, for a model that takes one")
    pl.add_argument("--combos", default=None, help="combo presets, comma separated (default: adamw,adafactor,"
                    "muon+adamw,sgd-momentum and torchao's 8-bit AdamW where installed)")
    pl.add_argument("--rules", action="append", metavar="[NAME::]RULES", help="your own combo, repeatable")
    pl.add_argument("--checkpointing", default=None, metavar="0,1", help="activation checkpointing values (where the build has it)")
    pl.add_argument("--lora", default=None, metavar="none,8", help="LoRA ranks (where the build has it)")
    pl.add_argument("--dtype", default="float32", metavar="LIST", help="parameter dtypes, e.g. float32,bfloat16")
    pl.add_argument("--amp", default="none", metavar="LIST", help="autocast, e.g. none,bf16")
    pl.add_argument("--step-in-backward", default="0,1", metavar="0,1",
                    help="optimizer step inside backward, gradients freed as used (default 0,1)")
    pl.add_argument("--impl", default="default", help="default | foreach | fused | forloop")
    _target_arguments(pl, Target.CUDA)
    _fsdp_arguments(pl, axis=True)
    pl.add_argument("--context", default=None, help="CUDA context bytes, e.g. 512MiB, or a GPU family (default hopper's)")
    pl.add_argument("--warmup", type=int, default=None,
                    help="warm-up steps before the measured one (default: the fake probe's, 1)")
    pl.add_argument("--confirm", default="frontier", choices=["frontier", "all"],
                    help="confirm at its boundary every frontier batch (default) or every candidate's")
    _jobs_argument(pl)
    pl.add_argument("--json", action="store_true", help="the plan as one JSON object")
    pl.add_argument("--report", default=None, metavar="DIR", help="write DIR/plan.md and DIR/plan.png (candidates "
                    "against the budget line)")
    pl.set_defaults(func=_cmd_plan)


def _gate_parser(sub: Any) -> None:
    g = sub.add_parser("gate", help="compare current records to a baseline; exit 0 pass, 1 regression, 2 bad input")
    g.add_argument("--baseline", required=True, help="baseline JSONL (e.g. reports/baselines/cpu-quick.jsonl)")
    g.add_argument("--current", required=True, nargs="+", help="run dir, results JSONL or pytest-benchmark JSON")
    g.add_argument("--mem-tol", default=None, help="relative memory tolerance, e.g. 0, 1%% or 0.01 (default: 0 on tracked/fake, 1%% on cuda)")
    g.add_argument("--time-tol", default="10%", help="relative step-time tolerance (default 10%%)")
    g.add_argument("--time-k", type=float, default=3.0, help="time band is at least K x baseline IQR/median (default 3)")
    g.add_argument("--only", default=None, metavar="KINDS",
                   help="compare only these: memory, work, time, or a comma list (CPU CI: memory,work)")
    g.add_argument("--update-baseline", action="store_true", help="after comparing, write the current records as the new baseline")
    g.add_argument("--summary", default=None, metavar="PATH", help="append the markdown here (default: $GITHUB_STEP_SUMMARY if set)")
    g.set_defaults(func=_cmd_gate)


def _report_parser(sub: Any) -> None:
    rp = sub.add_parser("report", help="markdown report + plots from run dirs, results JSONL or pytest-benchmark JSON")
    rp.add_argument("paths", nargs="+", metavar="RUN_OR_JSON", help="run directory, results .jsonl or --benchmark-json file")
    rp.add_argument("-o", "--out", default=None, help="output markdown, e.g. reports/NAME.md (default: report.md beside the first run)")
    rp.add_argument("--baseline", default=None, metavar="B",
                    help="baseline records (as for `multiopt gate`): add the gate's verdict to the report")
    rp.set_defaults(func=_cmd_report)


def _target_arguments(m: argparse.ArgumentParser, target: str) -> None:
    m.add_argument("--target", default=target, choices=list(Target.values()),
                   help=f"whose numbers a CPU probe reports: cpu, or what a CUDA device would (default {target})")
    m.add_argument("--alloc-conf", default=None, metavar="TEXT",
                   help="CUDA allocator options for --target cuda (default: $PYTORCH_CUDA_ALLOC_CONF)")
    m.add_argument("--gpu", default=None, metavar="NAME",
                   help="with --target cuda: predict the step time on this GPU (h100, h200, a100, l4, rtx4090) "
                        "from the step's work counters")


def _gpu(args: argparse.Namespace, probe: str) -> str | None:
    """--gpu, checked now (a known GPU, target cuda, a counting probe) so a bad value is a
    usage error before any work."""
    if args.gpu is None:
        return None
    from .instrument.gpu import check_gpu

    check_gpu(args.gpu, args.target, probe)
    return args.gpu.strip().lower()


def _alloc_conf(args: argparse.Namespace) -> "AllocatorConfig | None":
    """--alloc-conf (else $PYTORCH_CUDA_ALLOC_CONF for --target cuda), parsed once, now, so a
    bad value is a usage error before any work; every config's probe gets the parsed value."""
    from .instrument.allocator import AllocatorConfig

    if args.alloc_conf is not None:
        return AllocatorConfig.parse(args.alloc_conf, "--alloc-conf")
    if args.target == Target.CUDA:
        return AllocatorConfig.from_env()
    return None


def _fsdp_arguments(m: argparse.ArgumentParser, *, axis: bool = False) -> None:
    """FSDP2 sharding (instrument/fsdp.py), on measure, estimate and run; on plan (`axis`) the
    degree is a list of values, one axis of the candidates."""
    if axis:
        m.add_argument("--fsdp", default=None, metavar="LIST",
                       help="FSDP2 degrees to plan, e.g. 1,2,8: per-rank memory, each rank's batch (default: none)")
    else:
        m.add_argument("--fsdp", type=int, default=0, metavar="N",
                       help="FSDP2 degree: fully_shard each block and the root over N ranks; per-rank numbers (fake "
                            "probe: simulated in one process; tracked: torchrun --nproc-per-node N -m multiopt run)")
    m.add_argument("--reshard-after-forward", type=int, default=1, choices=[0, 1],
                   help="1 (FSDP2's default): blocks free their unsharded parameters after forward; 0: keep them")
    m.add_argument("--fsdp-mp", default="none", choices=["none", "bf16"],
                   help="bf16: MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)")


def _fsdp_fields(args: argparse.Namespace) -> dict:
    return {"fsdp": args.fsdp, "reshard_after_forward": args.reshard_after_forward, "fsdp_mp": args.fsdp_mp}


def _config_arguments(m: argparse.ArgumentParser, *, probe: str, steps: int, target: str) -> None:
    """One config's flags, shared by `measure` and `estimate`."""
    _target_arguments(m, target)
    _fsdp_arguments(m)
    m.add_argument("--rules", default="rest=adam", help='e.g. "layer1=sgd(lr=0.01); rest=adam"')
    m.add_argument("--combo", default=None, help="a combo preset name instead of --rules (sgd, adam, muon+adamw, ...)")
    m.add_argument("--model", default="mlp", help="simple | mlp | transformer | pkg.module:factory | "
                   "hf:PATH (a config.json or its directory; a hub id already cached) | timm:NAME")
    _real_model_arguments(m)
    m.add_argument("--width", type=int, default=256)
    m.add_argument("--depth", type=int, default=3)
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    m.add_argument("--amp", default="none", help="none | fp16 | bf16")
    m.add_argument("--impl", default="default", help="default | foreach | fused | forloop")
    m.add_argument("--zero-grad-at", default="end", choices=["end", "start"])
    m.add_argument("--step-in-backward", type=int, default=0, choices=[0, 1],
                   help="1: each parameter's optimizer steps inside backward as its gradient completes (default 0)")
    m.add_argument("--probe", default=probe, help=f"auto | cuda | tracked | fake (default {probe})")
    m.add_argument("--steps", type=int, default=steps, help=f"timed samples, 0 = memory only (default {steps})")
    m.add_argument("--warmup", type=int, default=None, help="warm-up steps before the measured one (default: 1 on the fake probe, 3 on the others)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's")
    m.add_argument("--limit", default=None, help="tracked probe memory limit, e.g. 2GiB (over it: status oom)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print the record as one JSON line")
    m.set_defaults(func=_cmd_measure)


def _real_model_arguments(m: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """--task, --seq, --lora and --checkpointing (a list in a sweep: `--checkpointing 0,1`)."""
    m.add_argument("--task", default=None, help="hf: models: causal-lm | masked-lm | seq-cls | image-cls "
                   "(default: from the config's architectures)")
    m.add_argument("--seq", type=int, default=0, help="tokens per sequence for hf: models "
                   "(default: min(512, max_position_embeddings))")
    m.add_argument("--lora", default="", metavar="r=8[,alpha=8][,dropout=0][,targets=q_proj,v_proj]",
                   help="LoRA adapters through peft: the base frozen, the rules see only the adapters")
    if sweep:
        m.add_argument("--checkpointing", default=None, metavar="0,1",
                       help="activation checkpointing off (0) and/or on (1): a sweep axis (default 0)")
    else:
        m.add_argument("--checkpointing", action="store_true",
                       help="activation checkpointing: each block recomputed in the backward (mlp, transformer, "
                            "hf: and timm: models)")


def _model_name(model: str, task: str | None) -> str:
    """The model as configs name it: `hf:PATH#TASK` when --task names one."""
    if not task:
        return model
    from .train.hf import TASKS  # no torch import: hf imports torch, but only when a command runs

    if not model.startswith("hf:"):
        raise UsageError(f"--task {task}: applies to hf: models, not {model!r}")
    if task not in TASKS:
        raise UsageError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    return f"{model}#{task}"


def _lora_text(text: str) -> str:
    """--lora in canonical form ("" = none), checked before any work."""
    if not text.strip():
        return ""
    from .train.hf import parse_lora

    return parse_lora(text).text


def _cmd_train(args: argparse.Namespace) -> int:
    """The classic program: trains on synthetic data, prints loss and memory per step."""
    import math

    import torch

    from .instrument.probes import make_probe
    from .rules import Rules
    from .train import models
    from .train.multi import MultiOptimizer
    from .train.trainer import Trainer
    from .units import fmt_bytes

    torch.manual_seed(args.seed)
    probe = make_probe("auto")
    with probe, _user_code(args.model):
        spec = models.resolve(args.model)
        model = probe.build_model(lambda: spec.build(args.width, args.depth))
        optimizer = MultiOptimizer.from_spec(model, Rules(args.rules))
        print(optimizer.describe())
        trainer = Trainer(model, spec.loss_fn, optimizer, amp=None if args.amp == "none" else args.amp)
        gen = torch.Generator(device=probe.device).manual_seed(args.seed)
        batch = spec.make_batch(model, args.batch, device=probe.device, generator=gen)
        for step in range(1, args.steps + 1):
            probe.reset_peak()
            loss = trainer.train_step(batch).item()
            if not math.isfinite(loss):
                print(f"step {step}: loss is {loss}; training diverged (lower the learning rate)")
                return 1
            print(f"step {step:>4}  loss {loss:.6f}  allocated {fmt_bytes(probe.allocated())}"
                  f"  peak {fmt_bytes(probe.peak())}  ({probe.name} probe)")
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    """One config, printed as a readable table (or one JSON line); exit 1 when not ok."""
    from .analyze.card import record_text
    from .instrument.probes import resolve_probe
    from .instrument.protocol import Config, Protocol, measure, model_factory, validate
    from .run.launch import settle
    from .run.presets import combos
    from .rules import Rules
    from .store import dumps

    probe, device = resolve_probe(args.probe)
    combo, rules = (combos([args.combo])[0] if args.combo else ("custom", Rules(args.rules)))
    config = Config(model=_model_name(args.model, args.task), width=args.width, depth=args.depth, batch=args.batch,
                    dtype=args.dtype, amp=args.amp, combo=combo, rules=rules, impl=args.impl,
                    zero_grad_at=args.zero_grad_at, seed=args.seed, device=device,
                    target=effective_target(probe, args.target), checkpointing=int(args.checkpointing),
                    lora=_lora_text(args.lora), seq=args.seq, step_in_backward=args.step_in_backward,
                    **_fsdp_fields(args))
    protocol = Protocol(probe=probe, warmup=args.warmup, steps=args.steps, threads=args.threads,
                        limit_bytes=_bytes(args.limit, "--limit") if args.limit else None, alloc_conf=_alloc_conf(args),
                        gpu=_gpu(args, probe))
    model = None
    # fake probe: the model built once on meta, checked by validate and run by measure (under
    # FSDP each simulated rank shards a model of its own: measure builds those)
    if probe == Probe.FAKE and config.fsdp <= 1:
        import torch

        with torch.device("meta"):
            model = model_factory(config)()
    validate(config, protocol, model=model)
    settle()  # this process ends with the command
    record = measure(config, protocol, build=None if model is None else (lambda: model))
    if record.status == Status.ERROR and (record.error or "").startswith(_USAGE):
        # the user's input (model, batch, rules, flags) refused at run time: one line, no card
        raise UsageError(record.error[len(_USAGE):])
    print(dumps(record) if args.json else record_text(record))
    if record.status != Status.OK:
        if not args.json:
            whose = f" (model {args.model!r})" if ":" in args.model else ""  # user code: name it
            print(f"status {record.status}{whose}: {record.error}", file=sys.stderr)
        return 1
    return 0


# how measure() records a UsageError raised while the config ran (the type's name first)
_USAGE = "UsageError: "


def _cmd_run(args: argparse.Namespace) -> int:
    """A preset, narrowed or replaced by explicit lists; the report written at the end."""
    import time
    from dataclasses import replace
    from pathlib import Path

    from .analyze.report import write_report
    from .env import world_size
    from .instrument.probes import resolve_probe
    from .instrument.protocol import Protocol
    from .run.presets import PRESETS, combos, select, user_combo
    from .run.sweep import sweep

    p = PRESETS[args.preset]
    probe, device = resolve_probe(args.probe or p["probe"])
    chosen = _chosen_combos(combos(_strs(args.combos)), args.rules, user_combo)
    configs = select(args.preset, device=device, ranks=world_size(), widths=_ints(args.widths, "--widths"),
                     batches=_ints(args.batches, "--batches"), depths=_ints(args.depths, "--depths"),
                     dtypes=_strs(args.dtypes), impls=_strs(args.impls), models=_strs(args.models),
                     zeros=_ints(args.zero, "--zero"), combos=chosen)
    configs = [replace(c, target=effective_target(probe, args.target), **_fsdp_fields(args)) for c in configs]
    if args.task:
        configs = [replace(c, model=_model_name(c.model, args.task)) for c in configs]
    checkpointing = _switches(args.checkpointing, "--checkpointing")
    in_backward = _switches(args.step_in_backward, "--step-in-backward")
    lora = _lora_text(args.lora)
    configs = [replace(c, checkpointing=k, step_in_backward=s, lora=lora, seq=args.seq)
               for c in configs for k in checkpointing for s in in_backward]
    protocol = Protocol(probe=probe, steps=args.steps if args.steps is not None else p["steps"], alloc_conf=_alloc_conf(args),
                        warmup=args.warmup, limit_bytes=_bytes(args.limit, "--limit") if args.limit else None,
                        threads=args.threads, min_block_ms=p.get("min_block_ms", Protocol.min_block_ms),
                        gpu=_gpu(args, probe))
    out = Path(args.out) if args.out else Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_writable_dir(out, "--out")
    result = sweep(configs, out, protocol, preset=args.preset, resume=args.resume, isolate=args.isolate,
                   timeout=args.timeout, progress=not args.no_progress)
    if result is None:
        return 0  # a torchrun rank other than 0: rank 0 reports
    print("\n".join(result.summary()))
    if args.report:
        print(f"report: {write_report([out], out / 'report.md')}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    """0 when every question was answered, 1 when a fake run failed, 2 bad input."""
    from .run.fit import DEFAULT_COMBOS, context_bytes, fit, render  # fit: a plan with one axis
    from .run.launch import settle
    from .run.presets import combos, user_combo

    budget = _bytes(args.budget, "--budget")
    chosen = _chosen_combos(combos(_strs(args.combos)), args.rules, user_combo)
    if not chosen:
        chosen = list(combos(DEFAULT_COMBOS))
    settle()  # this process ends with the command
    answers = fit(chosen, budget, width=args.width, batch=args.batch, model=args.model, depth=args.depth,
                  dtype=args.dtype, impl=args.impl, target=args.target, alloc_conf=_alloc_conf(args),
                  context=context_bytes(args.context) if args.target == Target.CUDA else 0, gpu=_gpu(args, "fake"),
                  jobs=_jobs(args))
    print(render(answers, budget, model=args.model, depth=args.depth, dtype=args.dtype), end="")
    return 1 if any(a.error for a in answers) else 0


def _jobs(args: argparse.Namespace) -> int:
    """--jobs, or the CPUs this process may run on (its affinity, as taskset or a container's
    cpuset sets it)."""
    if args.jobs is not None:
        return args.jobs
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cmd_plan(args: argparse.Namespace) -> int:
    """0 when something fits, 1 when no candidate does, 2 bad input."""
    import json

    from .instrument.protocol import Config
    from .run import plan as planning
    from .run.launch import settle
    from .run.presets import combos, user_combo

    budget = _bytes(args.budget, "--budget")
    if args.report:
        _check_writable_dir(Path(args.report), "--report")
    chosen = _chosen_combos(combos(_strs(args.combos)), args.rules, user_combo) or planning.default_combos()
    axes = [planning.combo_axis(chosen), planning.dtype_axis(args.dtype), planning.amp_axis(args.amp),
            planning.field_axis("step_in_backward", "--step-in-backward",
                                planning.int_values(args.step_in_backward, "--step-in-backward", (0, 1)))]
    axes.append(planning.field_axis("checkpointing", "--checkpointing",
                                    planning.int_values(args.checkpointing or "0,1", "--checkpointing", (0, 1))))
    if args.lora is not None and _strs(args.lora) != ["none"]:
        axes.append(planning.lora_axis(args.lora))
    if args.fsdp is not None:
        degrees = planning.int_values(args.fsdp, "--fsdp")
        if min(degrees) < 1:
            raise UsageError(f"--fsdp {args.fsdp}: each degree is 1 (unsharded) or more")
        axes.append(planning.field_axis("fsdp", "--fsdp", degrees))
    extra = {"reshard_after_forward": args.reshard_after_forward, "fsdp_mp": args.fsdp_mp}
    if args.seq is not None:
        planning.field_axis("seq", "--seq", ())  # refused in one line where the build has no seq
        extra["seq"] = _ints(args.seq, "--seq")[0]
    base = Config(model=args.model, width=args.width, depth=args.depth, impl=args.impl, target=args.target, **extra)
    context = planning.context_bytes(args.context) if args.target == Target.CUDA else 0
    alloc_conf = _alloc_conf(args)
    settle()  # this process ends with the command
    with _user_code(args.model):
        p = planning.plan(base, axes, budget, context=context, warmup=args.warmup, alloc_conf=alloc_conf,
                          gpu=args.gpu, confirm=args.confirm, jobs=_jobs(args))
    data = planning.as_dict(p)
    text = planning.render(p)
    if args.report:
        from .analyze.frontier import plot_plan

        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        png = plot_plan(data, out / "plan.png")
        (out / "plan.md").write_text(text + f"\n![candidates against the budget]({png.name})\n")
        (out / "plan.json").write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data) if args.json else text, end="\n" if args.json else "")
    return 0 if p.fitting else 1


def _cmd_gate(args: argparse.Namespace) -> int:
    from .analyze.gate import parse_tolerance, run_gate

    return run_gate(
        args.baseline, args.current,
        mem_tol=None if args.mem_tol is None else parse_tolerance(args.mem_tol, "--mem-tol"),
        time_tol=parse_tolerance(args.time_tol, "--time-tol"),
        time_k=args.time_k,
        update_baseline=args.update_baseline,
        only=args.only,
        summary=args.summary,
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from .analyze.report import write_report

    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"-o {out}: is a directory; name the markdown file, e.g. {out / 'report.md'}")
        _check_writable_dir(out.parent, "-o")
    print(f"report: {write_report(args.paths, args.out, baseline=args.baseline)}")
    return 0


def _chosen_combos(presets: Sequence[tuple[str, "Rules"]], texts: Sequence[str] | None,
                   user_combo: Callable[..., tuple[str, "Rules"]]) -> list[tuple[str, "Rules"]]:
    """Preset combos then each `--rules [NAME::]RULES`; one name never stands for two rule sets
    (the gate and the report know a combo by its name)."""
    chosen = list(presets)
    for text in texts or []:
        name, rules = user_combo(text, taken=[n for n, _ in chosen])
        same = [r for n, r in chosen if n == name]
        if same and same[0] != rules:  # both canonical text
            raise UsageError(f"--rules {text!r}: the name {name!r} already stands for {same[0]!r}; give it another name")
        if not same:
            chosen.append((name, rules))
    return chosen


@contextmanager
def _user_code(model: str) -> Iterator[None]:
    """A user's model (factory, forward, loss) that raises: one line naming it and the exception."""
    try:
        yield
    except (UsageError, KeyboardInterrupt, OSError):
        raise
    except Exception as e:
        if ":" not in model:
            raise  # a built-in model failing is multiopt's bug: keep the traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"model {model!r} raised {type(e).__name__}: {first}") from None


def _bytes(text: str, flag: str) -> int:
    from .units import parse_bytes

    try:
        value = parse_bytes(text)
    except (OverflowError, ValueError) as e:
        raise UsageError(f"{flag} {text!r}: {e}" if isinstance(e, UsageError) else f"{flag} {text!r} is too large") from None
    if value <= 0:
        raise UsageError(f"{flag} {text!r}: give a size of at least 1 byte, e.g. 24GiB")
    return value


def _check_writable_dir(path: Path, flag: str) -> None:
    """Before any work: `path` is (or can become) a directory this process may write in."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, not a directory; choose another place")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {probe} is not writable; choose another place")


# flag -> (lowest, highest) allowed value; checked before any command runs
_INT_LIMITS: dict[str, tuple[int, int]] = {
    "width": (1, 2**31 - 1), "depth": (1, 2**31 - 1), "batch": (1, 2**31 - 1), "threads": (1, 4096),
    "steps": (0, 2**31 - 1), "warmup": (0, 2**31 - 1), "seed": (0, 2**63 - 1), "seq": (0, 2**31 - 1),
}


def _check_flags(args: argparse.Namespace) -> None:
    for name, (lo, hi) in _INT_LIMITS.items():
        value = getattr(args, name, None)
        if args.command in ("fit", "plan") and name in ("width", "batch", "depth"):
            continue  # fit checks its start sizes itself (and searches past any cap on the fake probe)
        if value is not None and not lo <= value <= hi:
            raise UsageError(f"--{name} {value}: must be between {lo} and {hi}")
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"--timeout {timeout}: give a finite number of seconds above 0")
    for name in ("widths", "batches", "depths"):
        for v in _ints(getattr(args, name, None), f"--{name}"):
            if not 1 <= v <= 2**31 - 1:
                raise UsageError(f"--{name} {v}: each must be between 1 and {2**31 - 1}")


def _strs(text: str | None) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def _switches(text: str | None, flag: str) -> list[int]:
    """A sweep axis of 0 (off) and/or 1 (on), each once in the order given; [0] when not given."""
    values = list(dict.fromkeys(_ints(text, flag))) or [0]
    if any(k not in (0, 1) for k in values):
        raise UsageError(f"{flag} {text}: each is 0 (off) or 1 (on)")
    return values


def _ints(text: str | None, flag: str) -> list[int]:
    try:
        return [int(s) for s in _strs(text)]
    except ValueError:
        raise UsageError(f"{flag} takes integers separated by commas, got {text!r}") from None


def entry() -> None:
    """The `multiopt` script and `python -m multiopt`: `main()`, then exit.

    `gc.freeze()` first: the interpreter's last garbage collection walks every object torch
    and its compiler stack created (~300k), 0.5-1 s after every command on a 2-core machine;
    frozen objects are left out of it. Atexit handlers, stream flushes and module teardown
    still run. Not in `main()`, which tests and users call in a live process."""
    rc = main()
    gc.freeze()
    sys.exit(rc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_flags(args)
        return int(args.func(args) or 0)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"multiopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _PLACE_ERRORS:
            raise
        print(f"multiopt {args.command}: error: {e.filename or ''}: {e.strerror}; choose another place or free space",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"multiopt {args.command}: interrupted", file=sys.stderr)
        return 130


# A file or directory a command cannot write or read there: the user's to fix, one line.
_PLACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                 errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}
