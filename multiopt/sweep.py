"""Sweeps: grids of configs, run one by one, every record appended and fsynced at once.

Isolation: each config runs in a child forked from a forkserver that imported torch once,
so an OOM, a crash or leaked memory in one config cannot touch the next, and no config
pays torch's import time. A killed sweep loses at most the config it was running;
`resume` skips every config already recorded.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import UsageError
from .measure import Config, Protocol, measure, validate
from .record import CONFIG_COLUMNS, Record, append_jsonl, config_key, iter_jsonl

COMBOS: dict[str, str] = {
    "sgd": "rest=sgd(lr=0.01)",
    "sgd-momentum": "rest=sgd(lr=0.01, momentum=0.9)",
    "adam": "rest=adam(lr=0.001)",
    "adamw": "rest=adamw(lr=0.001, weight_decay=0.01)",
    "adagrad": "rest=adagrad(lr=0.01)",
    "rmsprop": "rest=rmsprop(lr=0.001)",
    "adafactor": "rest=adafactor(lr=0.01)",
    "muon+adamw": "@matrix=muon(lr=0.02); rest=adamw(lr=0.0003)",
    "sgd+adam": "layer1=sgd(lr=0.01); rest=adam(lr=0.001)",
    "adam+sgd": "layer1=adam(lr=0.001); rest=sgd(lr=0.01)",
}


@dataclass(frozen=True)
class Grid:
    """The cartesian product of its lists; a preset is a union of grids."""

    widths: tuple[int, ...] = (256,)
    batches: tuple[int, ...] = (32,)
    combos: tuple[tuple[str, str], ...] = (("adam", COMBOS["adam"]),)  # (name, rules)
    depths: tuple[int, ...] = (3,)
    dtypes: tuple[str, ...] = ("float32",)
    amps: tuple[str, ...] = ("none",)
    impls: tuple[str, ...] = ("default",)
    zero_grad_ats: tuple[str, ...] = ("end",)
    models: tuple[str, ...] = ("mlp",)
    zeros: tuple[int, ...] = (0,)
    seed: int = 0

    def configs(self, device: str = "cpu", ranks: int = 1) -> list[Config]:
        """`ranks`: the world size a zero=1 config runs across (zero=0 configs run on one rank)."""
        out = []
        for model, depth, width, batch, dtype, amp, (combo, rules), impl, zg, zero in itertools.product(
            self.models, self.depths, self.widths, self.batches, self.dtypes, self.amps, self.combos,
            self.impls, self.zero_grad_ats, self.zeros,
        ):
            out.append(Config(model=model, width=width, depth=depth, batch=batch, dtype=dtype, amp=amp,
                              combo=combo, rules=rules, impl=impl, zero_grad_at=zg, seed=self.seed, device=device,
                              zero=zero, ranks=ranks if zero else 1))
        return out


def combos(names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name not in COMBOS:
            raise UsageError(f"unknown combo {name!r}; presets: {', '.join(COMBOS)}; for your own rules use --rules")
        out.append((name, COMBOS[name]))
    return tuple(out)


def user_combo(text: str, taken: Iterable[str] = ()) -> tuple[str, str]:
    """`NAME::RULES` or bare RULES (named after its optimizers, e.g. `sgd+adam*`).
    `::` cannot occur in a rule, so it never collides with `pkg.mod:Class` paths."""
    from .spec import parse

    name, sep, rules = text.partition("::")
    if not sep:
        name, rules = "", text
    parsed = parse(rules)
    if not name:
        name = "+".join(r.optimizer.rsplit(":", 1)[-1].lower() for r in parsed)
        taken = set(taken)
        if name in COMBOS or name in taken:
            base, n = name + "*", 1
            name = base
            while name in taken:
                n += 1
                name = f"{base}{n}"
    return name.strip(), rules.strip()


ALL = tuple(COMBOS.items())
# Muon on the transformer's matrices, its embeddings (`emb`, `pos_emb`) on AdamW as Muon's authors advise.
_MUON_LM = ("muon+adamw-emb", "*emb*=adamw(lr=0.0003); @matrix=muon(lr=0.02); rest=adamw(lr=0.0003)")
PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: under 60 s on a 2-core CPU with the tracked probe, isolation on.
    "quick": {
        "probe": "tracked",
        "grids": (
            Grid(widths=(64, 256), batches=(16, 64), combos=ALL, depths=(3,)),
            Grid(widths=(256,), batches=(64,), combos=combos(["sgd-momentum", "adam", "adamw"]),
                 impls=("forloop", "foreach", "fused")),
            Grid(models=("transformer",), widths=(64,), batches=(8,), depths=(2,),
                 combos=(*combos(["adam", "sgd+adam"]), _MUON_LM)),
        ),
        "steps": 30,
        "min_block_ms": 5.0,
    },
    # The README's main job: a few minutes on a CPU.
    "default": {
        "probe": "auto",
        "grids": (
            Grid(widths=(128, 512, 1024), batches=(16, 64, 256), combos=ALL, depths=(4,)),
            Grid(widths=(1024,), batches=(64,), combos=combos(["sgd-momentum", "adam", "adamw", "adagrad"]),
                 depths=(4,), impls=("forloop", "foreach", "fused")),
            Grid(widths=(1024,), batches=(64,), combos=combos(["adam", "muon+adamw", "sgd+adam"]), depths=(4,),
                 dtypes=("bfloat16",)),
            Grid(widths=(1024,), batches=(64,), combos=combos(["adam", "sgd+adam"]), depths=(4,),
                 zero_grad_ats=("start",)),
            Grid(models=("transformer",), widths=(128, 256), batches=(8, 32), depths=(2,),
                 combos=(*combos(["adam", "adafactor", "sgd+adam"]), _MUON_LM)),
        ),
        "steps": 20,
    },
    # Fake probe: sizes only, for the shape of the curves at scale.
    "wide": {
        "probe": "fake",
        "grids": (
            Grid(widths=(1024, 2048, 4096, 8192, 16384), batches=(64, 512), depths=(8,),
                 combos=combos(["sgd", "sgd-momentum", "adam", "adamw", "muon+adamw", "sgd+adam"])),
        ),
        "steps": 0,
    },
}


def preset_configs(name: str, device: str = "cpu", ranks: int = 1) -> list[Config]:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dedupe(c for g in PRESETS[name]["grids"] for c in g.configs(device, ranks))


def dedupe(configs: Iterable[Config]) -> list[Config]:
    seen, out = set(), []
    for c in configs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def config_key_of(config: Config, probe: str) -> tuple:
    """The record-side key a config will have (rules normalised as the record stores them)."""
    from .spec import format_rules, rules_from

    d = {**config.__dict__, "probe": probe, "rules": format_rules(rules_from(config.rules))}
    return tuple(d.get(c) for c in CONFIG_COLUMNS)


def recorded_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {config_key(row) for row in iter_jsonl(path)}


# --- running --------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs configs and appends each record to `results` the moment it exists.

    Under torchrun (dist.run_sharded): `child` tells each isolated config's worker which rank
    it acts for (its device; for a ZeRO config, the process group its peers join), and
    `finish(config, record)` turns a measured record into the one to keep, or None to keep
    none (a ZeRO config's ranks merge into one record on rank 0).
    """

    results: Path
    protocol: Protocol
    isolate: bool = True
    timeout: float = 600.0
    meta: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    child: Any = None
    finish: Callable[[Config, Record], Record | None] | None = None

    def run(self, configs: Sequence[Config], *, on_record: Callable[[Record], None] | None = None) -> list[Record]:
        out: list[Record] = []
        bar = _progress(len(configs), self.progress)
        ctx = _context() if self.isolate else None
        if ctx is None:
            gc.collect()
            gc.freeze()  # what exists now outlives every config: no need to scan it per config
        try:
            for config in configs:
                bar.set_description(config.label())
                record = self._one(ctx, config)
                if self.finish is not None:
                    record = self.finish(config, record)
                bar.update(1)
                if record is None:
                    continue
                append_jsonl(self.results, [record])
                out.append(record)
                bar.set_postfix_str(_postfix(record))
                if on_record:
                    on_record(record)
        finally:
            bar.close()
        return out

    def _one(self, ctx: Any, config: Config) -> Record:
        if ctx is None:
            return measure(config, self.protocol, **self.meta)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(config, self.protocol, self.meta, send, self.child), daemon=True)
        t0 = time.monotonic()
        proc.start()
        send.close()
        result = None
        try:
            if recv.poll(self.timeout):
                result = recv.recv()
        except (EOFError, OSError):
            result = None
        finally:
            recv.close()
        if result is None:
            timed_out = proc.is_alive() and time.monotonic() - t0 >= self.timeout
            proc.kill()
            proc.join()
            if timed_out:
                why = f"timed out after {self.timeout:g} s"
            elif proc.exitcode == -9:
                why = "worker died: killed by SIGKILL (the kernel's OOM killer does this when host memory runs out)"
            else:
                why = f"worker died with exit code {proc.exitcode} (a crash in native code?)"
            return measure_failed(config, self.protocol, "error", why, **self.meta)
        proc.join()
        return Record.from_dict(result)


def measure_failed(config: Config, protocol: Protocol, status: str, error: str, **meta: Any) -> Record:
    """A record for a config whose worker never reported back."""
    import datetime as _dt

    import torch

    from .spec import format_rules, rules_from

    d = {**config.__dict__, "probe": protocol.probe, "rules": format_rules(rules_from(config.rules)),
         "torch": torch.__version__, "status": status, "error": error,
         "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    return Record.from_dict(d)


def _child(config: Config, protocol: Protocol, meta: dict[str, Any], conn: Any, child: Any = None) -> None:
    # Everything inherited from the server is long-lived: keep it out of the collector, so
    # the protocol's gc.collect() scans only this config's objects (and pages stay shared).
    gc.freeze()
    try:
        if child is None:
            record = measure(config, protocol, **meta)
        else:
            scope = child.enter(config)
            try:
                scope.__enter__()
            except Exception as e:  # joining the ranks' group failed: a record like any failure
                why = (str(e).strip().splitlines() or [""])[0]
                record = measure_failed(config, protocol, "error", f"rank {child.rank} could not join the "
                                        f"config's process group: {type(e).__name__}: {why}", **meta)
            else:
                try:
                    record = measure(config, protocol, **meta)
                finally:
                    try:
                        scope.__exit__(None, None, None)
                    except Exception:
                        pass  # leaving the group cannot change what was measured
        conn.send(record.to_dict())
    finally:
        conn.close()


# Imported once by the forkserver; torch._dynamo alone costs over a second (the tracked
# probe keeps dynamo out of the optimizers' steps), which every config would pay otherwise.
_PRELOAD = ["multiopt.measure", "multiopt.probes.tracked", "multiopt.probes.fake", "torch._dynamo"]


def _context() -> Any:
    # forkserver: the server imports torch once; each config is a cheap fork of it, and the
    # server never initialised CUDA, so children may.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _postfix(r: Record) -> str:
    from .units import fmt_bytes

    if r.status != "ok":
        return f"last: {r.status}"
    return f"last peak {fmt_bytes(r.peak_total)}"


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="cfg", disable=not enabled, dynamic_ncols=True, leave=True)


# --- the `run` command ------------------------------------------------------------------


def resolve_probe(name: str) -> tuple[str, str]:
    """Probe name (auto resolved) and the device its configs run on."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "tracked"
    if name not in ("cuda", "tracked", "fake"):
        raise UsageError(f"unknown probe {name!r}; choose auto, cuda, tracked or fake")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--probe cuda needs a CUDA GPU, and torch sees none; use --probe tracked or fake")
    return name, ("cuda" if name == "cuda" else "cpu")


def run_sweep(
    configs: Sequence[Config],
    out: Path,
    protocol: Protocol,
    *,
    preset: str | None = None,
    resume: bool = False,
    isolate: bool = True,
    timeout: float = 600.0,
    report: bool = True,
    progress: bool = True,
) -> int:
    """Run `configs` into OUT/results.jsonl (+ env.json, report.md). Returns an exit code."""
    import json
    import uuid

    from . import env as envmod

    for c in configs:
        validate(c, protocol)
    from .dist import rank_env

    launch = rank_env()
    if launch is not None:  # under torchrun: configs sharded over the ranks (see dist.py)
        from .dist import run_sharded

        return run_sharded(configs, out, protocol, env=launch, preset=preset, resume=resume, isolate=isolate,
                           timeout=timeout, report=report, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    from .dist import fold_shards, has_shards

    if has_shards(out) and not resume:
        raise UsageError(f"{out / 'ranks'} already holds results of a sharded sweep; pass --resume to continue it, or another --out")
    if resume:
        fold_shards(out)  # a killed torchrun sweep's per-rank records join results.jsonl
    done = recorded_keys(results) if resume else set()
    if results.exists() and not resume:
        raise UsageError(f"{results} already holds results; pass --resume to continue that sweep, or another --out")
    todo = [c for c in configs if config_key_of(c, protocol.probe) not in done]
    device = configs[0].device if configs else "cpu"
    env = envmod.collect(device, protocol.probe, preset, protocol.threads)
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    if resume and len(todo) < len(configs):
        print(f"resuming: {len(configs) - len(todo)} of {len(configs)} configs already in {results}")
    meta = {"run_id": uuid.uuid4().hex[:12], "git_sha": env["git_sha"], "preset": preset,
            "device_name": env["device_name"]}
    runner = Runner(results, protocol, isolate=isolate, timeout=timeout, meta=meta, progress=progress)
    t0 = time.monotonic()
    records = runner.run(todo)
    failed = [r for r in records if r.status != "ok"]
    print(f"{len(records)} configs in {time.monotonic() - t0:.1f} s ({len(failed)} not ok) -> {results}")
    for r in failed:
        print(f"  {r.status}: {r.combo} w={r.width} b={r.batch} {r.impl}: {r.error}")
    if report:
        from .report import write_report

        path = write_report([out], out / "report.md")
        print(f"report: {path}")
    return 0


def run_cli(args: Any) -> int:
    """`multiopt run`: a preset, narrowed or replaced by explicit lists."""
    from .units import parse_bytes

    preset = args.preset
    p = PRESETS[preset]
    probe, device = resolve_probe(args.probe or p["probe"])
    from .dist import world_size

    ranks = world_size()
    configs = preset_configs(preset, device, ranks)
    grid_over = {
        "width": _ints(args.widths, "--widths"), "batch": _ints(args.batches, "--batches"),
        "depth": _ints(args.depths, "--depths"),
        "dtype": _strs(args.dtypes), "impl": _strs(args.impls), "model": _strs(args.models),
        "zero": _ints(getattr(args, "zero", None), "--zero"),
    }
    chosen = list(combos(_strs(args.combos) or []))
    for text in args.rules or []:
        chosen.append(user_combo(text, taken=[n for n, _ in chosen]))
    if chosen or any(grid_over.values()):
        # Explicit lists override the preset's; what is not given comes from the preset's
        # main grid (its first), so `--widths 64` means "the main grid at width 64".
        base: Grid = p["grids"][0]
        grid = Grid(
            widths=tuple(grid_over["width"]) or base.widths, batches=tuple(grid_over["batch"]) or base.batches,
            depths=tuple(grid_over["depth"]) or base.depths, dtypes=tuple(grid_over["dtype"]) or base.dtypes,
            impls=tuple(grid_over["impl"]) or base.impls, models=tuple(grid_over["model"]) or base.models,
            combos=tuple(chosen) or base.combos, amps=base.amps, zero_grad_ats=base.zero_grad_ats,
            zeros=tuple(grid_over["zero"]) or base.zeros,
        )
        configs = dedupe(grid.configs(device, ranks))
    protocol = Protocol(probe=probe, steps=args.steps if args.steps is not None else p["steps"],
                        warmup=args.warmup, limit_bytes=parse_bytes(args.limit) if args.limit else None,
                        threads=args.threads, min_block_ms=p.get("min_block_ms", Protocol.min_block_ms))
    out = Path(args.out) if args.out else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_sweep(configs, out, protocol, preset=preset, resume=args.resume, isolate=args.isolate,
                     timeout=args.timeout, report=args.report, progress=not args.no_progress)


def _strs(text: str | None) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def _ints(text: str | None, flag: str) -> list[int]:
    try:
        return [int(s) for s in _strs(text)]
    except ValueError:
        raise UsageError(f"{flag} takes integers separated by commas, got {text!r}") from None
