"""`multiopt plan`: the setups that fit a memory budget, searched jointly on the fake probe.

A *candidate* is a config with its batch left open; the candidates are the product of the
*axes* (`Axis`: a name, its values, and how a value sets a Config field). For each one the
engine finds the largest batch that fits, and the frontier of those answers is the plan.

Fast by construction. Candidates that differ only by optimizers form a *class* (same model,
dtype, AMP, checkpointing, LoRA, placement): their activations and gradients are the same.

1. Target cuda: the class's first member has allocator programs (instrument/program.py) at
   batches 2 and 3. Where the two are one program, the program at any batch is known (sizes
   affine in the batch) and replayed under the budget (release-and-retry included): the
   largest batch that fits is the prediction. Each program comes from a run whose last step
   makes its gradients by hand, that step's forward and backward made again from the step
   before's (`program.repeated`, `Runner.program`: a little over half a run). Another member
   whose state by formula is within 5% of the budget of the first's is predicted from the
   same programs with it swapped in (`_shares`); otherwise from the first's programs with its
   own optimizers' requests spliced in (`program.spliced`, `_spliced_pair`), taken from one
   run of its optimizers' side alone (`Runner.step_program`: no forward, no backward; one for
   both checkpointing values), or, where that cannot be done, programs of its own. Target
   cpu, FSDP, or two programs: each phase's peak is taken affine in the batch from runs near
   the answer, the allocator's slack at the anchor on top (`_predict_by_peaks`).
2. The prediction is confirmed at its boundary with the budget as the probe's limit (as
   `set_per_process_memory_fraction` would cap a GPU): batch b runs, b + 1 runs out of
   memory; where they disagree the boundary is searched from there (doubling steps, then
   bisection), so a wrong prediction costs runs, never a wrong answer. A batch with a run
   under any limit needs no other: its program replayed under this one ends as the limited
   run would (`Runner.known_fit`; programs made by splicing or repeating a step predict, and
   never stand for a run here). Each row says what its prediction came from (`basis`),
   and the plan how far its predictions were from their confirmations (`checks`).
3. Runs are made `jobs` at a time, in processes forked from the planner (`Runner.prefetch`):
   every class's program runs and step-only runs first, then each confirming round's first
   two runs per row.

The model is built once on meta and copied for every run (`measure(build=...)`). An optimizer
that cannot run on the fake probe (it reads tensor values: Adafactor, 8-bit AdamW) is sized
by its state formula from the registry (`instrument.state.expected_state`): the candidate
runs with SGD (no state) in its place and the formula's bytes held against the budget; the
row says so, and that its step temporaries are not measured.

Throughput needs a time model: `Predictor` (a record -> predicted step ms, or None), the
GPU model of instrument/gpu.py with `gpu`; a plan without one says "no time model" and ranks
by batch alone.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import itertools
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tabulate import tabulate

from ..errors import UsageError
from ..instrument.allocator import AllocatorConfig, AllocatorOOM
from ..instrument.gpu import check_text
from ..instrument.probes import Workspaces
from ..instrument.program import Program, between, repeated, spliced
from ..instrument.protocol import AMPS, DTYPES, Config, Protocol, measure, model_bytes, model_factory, validate
from ..instrument.state import expected_state, host_state
from ..kinds import Probe, Status, Target
from ..record import PHASES, UNSTEADY_WHY, Record
from ..train import models, optimizers as registry
from ..train.hf import parse_lora
from ..train.multi import MultiOptimizer
from ..rules import Rule, Rules, format_rules
from ..units import fmt_bytes, parse_bytes, round_alloc
from .presets import combos as preset_combos

_MiB = 1 << 20
#: CUDA context bytes per GPU family (driver, kernels loaded lazily, cuBLAS handles): what
#: nvidia-smi shows for a process after `torch.cuda.init()` and a first matmul, torch 2.x
#: with CUDA 12 lazy loading. Estimates, not measured by this project: set --context.
CONTEXT: dict[str, int] = {"hopper": 512 * _MiB, "ampere": 448 * _MiB, "ada": 448 * _MiB, "turing": 384 * _MiB}
DEFAULT_CONTEXT = "hopper"
CONTEXT_SOURCE = ("an estimate per GPU family (nvidia-smi after torch.cuda.init() and a first matmul, "
                  "CUDA 12 lazy loading), not measured here: measure yours and pass --context")

#: the largest batch a search tries (a model whose peak does not grow with the batch)
BATCH_CAP = 1 << 24
#: the 8-bit AdamW the default combos add where its package is installed (sized by formula:
#: it reads tensor values, which fake tensors do not have)
EIGHT_BIT = ("adamw8bit", "torchao", "rest=torchao.optim:AdamW8bit(lr=0.001, weight_decay=0.01)")
DEFAULT_COMBOS = ("adamw", "adafactor", "muon+adamw", "sgd-momentum")


def context_bytes(text: str | None) -> int:
    """--context: a GPU family name from CONTEXT, or bytes ("512MiB"); None: the default family's."""
    if text is None:
        return CONTEXT[DEFAULT_CONTEXT]
    if text.strip().lower() in CONTEXT:
        return CONTEXT[text.strip().lower()]
    try:
        return parse_bytes(text)
    except UsageError:
        raise UsageError(f"--context {text!r} is neither bytes (e.g. 512MiB) nor a GPU family "
                         f"({', '.join(CONTEXT)})") from None


# --- axes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One open knob of a plan: its values, how a value sets the config, and the `estimate`
    flags that reproduce it. A new axis (FSDP degree, LoRA rank) is one more of these."""

    name: str
    values: tuple[Any, ...]
    set: Callable[[Config, Any], Config]
    show: Callable[[Any], str] = str
    flags: Callable[[Any], list[str]] = lambda v: []


def combo_axis(chosen: Sequence[tuple[str, str]]) -> Axis:
    """Optimizer combos: (name, rules) pairs."""
    return Axis("combo", tuple((n, Rules(r)) for n, r in chosen),
                lambda c, v: replace(c, combo=v[0], rules=v[1]), lambda v: v[0], lambda v: ["--rules", v[1]])


def field_axis(name: str, flag: str, values: Iterable[Any]) -> Axis:
    """An axis that sets one Config field. A field this build's Config lacks (a feature not
    merged yet) is refused in one line, unless only its default is asked for (then it is no
    axis at all: the caller drops it)."""
    values = tuple(values)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if name not in fields:
        raise UsageError(f"{flag}: this build has no {name!r} config field yet; leave {flag} out")
    return Axis(name, values, lambda c, v: replace(c, **{name: v}), str, lambda v: [flag, str(v)])


def default_combos() -> list[tuple[str, str]]:
    """adamw, adafactor, muon+adamw, sgd-momentum, and torchao's 8-bit AdamW where installed."""
    out = list(preset_combos(DEFAULT_COMBOS))
    if importlib.util.find_spec(EIGHT_BIT[1]) is not None:
        out.append((EIGHT_BIT[0], EIGHT_BIT[2]))
    return out


def int_values(text: str, flag: str, allowed: Sequence[int] | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"{flag} takes integers separated by commas, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: give at least one value")
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad:
        raise UsageError(f"{flag}: unknown value {bad[0]}; choose from {', '.join(map(str, allowed))}")
    return values


def str_values(text: str, flag: str, allowed: Sequence[str]) -> tuple[str, ...]:
    values = tuple(s.strip() for s in text.split(",") if s.strip())
    if not values:
        raise UsageError(f"{flag}: give at least one value")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UsageError(f"{flag}: unknown value {bad[0]!r}; choose from {', '.join(allowed)}")
    return values


def dtype_axis(text: str) -> Axis:
    return field_axis("dtype", "--dtype", str_values(text, "--dtype", tuple(DTYPES)))


def amp_axis(text: str) -> Axis:
    return field_axis("amp", "--amp", str_values(text, "--amp", AMPS))


def lora_axis(text: str) -> Axis:
    """--lora none,8,64: LoRA ranks (peft's default targets), `none` for full training; each
    value the Config's canonical text ("" for none), shown as its rank."""
    values = tuple(s.strip() for s in text.split(",") if s.strip())
    if not values:
        raise UsageError("--lora: give at least one value (none, or a rank such as 8)")
    bad = [v for v in values if v != "none" and not (v.isdigit() and int(v) > 0)]
    if bad:
        raise UsageError(f"--lora: unknown value {bad[0]!r}; give ranks (8,64) or none, comma separated")
    texts = tuple("" if v == "none" else parse_lora(v).text for v in values)
    axis = field_axis("lora", "--lora", texts)
    return replace(axis, show=lambda t: t.split(",")[0].removeprefix("r=") if t else "none",
                   flags=lambda t: ["--lora", t] if t else [])


# --- time -----------------------------------------------------------------------------------

#: a record -> its predicted step time in ms on the plan's GPU, None where it cannot say
Predictor = Callable[[Record], "float | None"]


def time_model(gpu: str | None) -> tuple[Predictor | None, str]:
    """The predictor for `gpu`, and a sentence saying what it is and what it was checked
    against: each record's `predicted_step_ms` (instrument/gpu.py), made by the Runner."""
    if gpu is None:
        return None, "no time model (no --gpu given): ranked by batch, no throughput claimed"
    return (lambda r: r.predicted_step_ms), f"predicted step time on {gpu}: {check_text(gpu)}"


# --- the engine -----------------------------------------------------------------------------


class PlanFailed(Exception):
    """A fake run ended neither ok nor oom."""


# Config fields that do not change the model the factory builds (its meta copy is shared;
# FSDP shards the built copy inside the run)
_NOT_MODEL = {"batch", "combo", "rules", "impl", "zero_grad_at", "seed", "step_in_backward", "amp", "target",
              "device", "zero", "ranks", "fsdp", "reshard_after_forward", "fsdp_mp"}


class Runner:
    """Fake runs with their records kept: each (config, limit) runs once; the model is built
    once on meta per model-shaping fields and copied into every run."""

    def __init__(self, limit: int, *, warmup: int | None = None, alloc_conf: str | None = None,
                 workspaces: Workspaces = Workspaces(), gpu: str | None = None, jobs: int = 1) -> None:
        self.limit = limit
        # runs `prefetch` may make at once, each in a process forked from this one
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None
        # gpu: each record also predicts its step time there (instrument/gpu.py), from the
        # step's work; without one, no work is counted (a plan reads bytes only: ~10% a run)
        self.protocol = Protocol(probe=Probe.FAKE, warmup=warmup, steps=0, alloc_conf=alloc_conf, workspaces=workspaces,
                                 gpu=gpu, count_work=gpu is not None)
        self.runs = 0
        self.step_runs = 0  # of the runs, those of the optimizers' side alone (`step_program`)
        self.once_runs = 0  # of the runs, those with one step's model side, made again (`program`)
        self.seconds = 0.0
        self.replays = 0  # programs replayed instead of run (instrument/program.py)
        self._records: dict[tuple[Config, int | None], Record] = {}
        self._programs: dict[Config, Program] = {}  # a config's allocator program, from any ok run of it
        self._steps: dict[Config, Program | None] = {}  # a config's optimizers' requests alone
        # a config's program from a run whose last step's model side is its warm-up's again
        # (`program.repeated`): for predictions; `known_fit` answers only from programs run
        self._derived: dict[Config, Program | None] = {}
        self._peaks: dict[tuple[int, int, int], tuple[int, int]] = {}  # `peaks`, by (programs' ids, batch)
        self._meta: dict[tuple, torch.nn.Module] = {}
        self._sized: dict[tuple, Any] = {}  # formula_for / formula_state answers (each builds optimizers)
        conf = self.protocol.alloc_conf
        self.alloc_config = conf if isinstance(conf, AllocatorConfig) else AllocatorConfig.from_env()

    def model_key(self, config: Config) -> tuple:
        return tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(Config) if f.name not in _NOT_MODEL)

    def formula(self, config: Config) -> "Formula | None":
        """`formula_for` the config, once per model and optimizers."""
        return self._sized_once(formula_for, config)

    def state(self, config: Config) -> int | None:
        """`formula_state` of the config, once per model and optimizers."""
        return self._sized_once(formula_state, config)

    def _sized_once(self, sizer: Callable[[Config, torch.nn.Module], Any], config: Config) -> Any:
        key = (sizer.__name__, self.model_key(config), config.rules, config.impl, config.target)
        if key not in self._sized:
            self._sized[key] = sizer(config, self.meta_model(config))
        return self._sized[key]

    def meta_model(self, config: Config) -> torch.nn.Module:
        key = self.model_key(config)
        if key not in self._meta:
            with torch.device("meta"):
                self._meta[key] = model_factory(config)()
        return self._meta[key]

    def run(self, config: Config, limit: int | None) -> Record:
        key = (config, limit)
        same = None if key in self._records or limit is None else self._within(config, limit)
        if same is not None:
            return same
        if key not in self._records:
            self._keep(config, limit, "backward", *self._measure(config, limit))
        return self._records[key]

    def _measure(self, config: Config, limit: int | None, grads: str = "backward") -> tuple[Record, Program | None,
                                                                                          float]:
        """One fake run: its record, its allocator program (None: not kept, or not ok), its
        seconds. `grads` (`measure`'s): "by-hand", the optimizers' side alone (`step_program`);
        "last-by-hand", one step's model side made again (`program.repeated`); the record of
        either is not kept."""
        meta = self.meta_model(config)
        start = time.perf_counter()
        log: list | None = [] if self.logs(config) else None
        record = measure(config, replace(self.protocol, limit_bytes=limit), build=lambda: copy.deepcopy(meta),
                         requests=log, grads=grads)
        # an oom run's log stops at its failed request: no program
        program = Program.of(config.batch, log) if log and record.status == Status.OK else None
        if program is not None and grads == "last-by-hand":
            program = repeated(program)
        return record, program, time.perf_counter() - start

    def _keep(self, config: Config, limit: int | None, grads: str, record: Record, program: Program | None,
              seconds: float) -> None:
        self.seconds += seconds
        self.runs += 1
        if grads == "by-hand":
            self.step_runs += 1
            self._steps[config] = program
            return
        if grads == "last-by-hand":
            self.once_runs += 1
            self._derived[config] = program
            return
        self._records[(config, limit)] = record
        if program is not None:
            self._programs.setdefault(config, program)

    def step_program(self, config: Config) -> Program | None:
        """The requests `config`'s optimizers make (their construction, steps and zero_grads),
        from a run that makes its gradients by hand, with no forward or backward (a fraction of
        a run: `program.spliced` puts them into another member's programs). None where runs
        keep no program, the config steps inside backward, or the run did not end ok."""
        config = _step_key(config)
        if not self.splices(config):
            return None
        if config not in self._steps:
            self._keep(config, None, "by-hand", *self._measure(config, None, "by-hand"))
        return self._steps[config]

    def peaks(self, pair: "Pair", batch: int) -> tuple[int, int]:
        """(peak requested, peak reserved) of the pair's program at `batch`, replayed without
        a limit, once: under a limit at or above its peak reserved the program fits; under one
        below its peak requested (live bytes) no allocator holds it."""
        key = (id(pair.a), id(pair.b), batch)
        if key not in self._peaks:
            self.replays += 1
            a = between(pair.a, pair.b, batch).replay(self.alloc_config)  # type: ignore[union-attr]
            self._peaks[key] = (a.peak_requested, a.peak_reserved)
        return self._peaks[key]

    def splices(self, config: Config) -> bool:
        """Whether `config`'s optimizers' requests can be taken alone (`step_program`)."""
        return self.logs(config) and not config.step_in_backward

    def prefetch(self, wanted: Iterable[tuple[Config, int | None]] = (), steps: Iterable[Config] = (),
                 programs: Iterable[Config] = ()) -> None:
        """Make these runs (and the runs these configs' `step_program` and `program` need) now,
        `jobs` at a time, each in a process forked from this one (the meta models and imports
        shared, nothing pickled but configs and results); `run` then finds their records. The
        same records as one at a time: a fake run is deterministic. Nothing is done with jobs
        1, where fork is not available, or under FSDP (its ranks simulated on process groups
        of their own)."""
        programs = list(programs)
        wanted = [*wanted, *((c, None) for c in programs if not self.logs(c))]
        todo: list[tuple[Config, int | None, str]] = list(dict.fromkeys(
            (*k, "backward") for k in wanted if self.needs_run(*k) and k[0].fsdp <= 1))
        todo += dict.fromkeys((c, None, "by-hand") for c in map(_step_key, steps) if self.splices(c) and c not in self._steps)
        todo += dict.fromkeys((c, None, "last-by-hand") for c in programs
                              if self.logs(c) and c not in self._derived and c not in self._programs)
        if self.jobs <= 1 or len(todo) < 2 or "fork" not in mp.get_all_start_methods():
            return
        for config, _, _ in todo:
            self.meta_model(config)  # before the fork, so every worker has it
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("fork"), initializer=_worker,
                                             initargs=(self,))
        for key, made in zip(todo, self._pool.map(_run_in_worker, todo)):
            self._keep(*key, *made)

    def needs_run(self, config: Config, limit: int | None) -> bool:
        """Whether `run(config, limit)` would make a run (none made or standing for it yet)."""
        return (config, limit) not in self._records and (limit is None or self._within(config, limit) is None)

    def close(self) -> None:
        """Stop the forked workers, if any (a later `prefetch` forks new ones)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def logs(self, config: Config) -> bool:
        """Whether runs of `config` keep their allocator program: target cuda, one rank."""
        return config.target == Target.CUDA and config.fsdp <= 1

    def program(self, config: Config) -> Program | None:
        """`config`'s allocator program, for predictions: an ok run's, or one made from a run
        whose last step makes its gradients by hand, that step's model side the warm-up's again
        (`program.repeated`: a little over half a run); a whole run where that cannot be made.
        None where runs keep none, or the run did not end ok."""
        if config in self._programs or not self.logs(config):
            return self._programs.get(config)
        if config not in self._derived:
            self._keep(config, None, "last-by-hand", *self._measure(config, None, "last-by-hand"))
        if self._derived[config] is not None:
            return self._derived[config]
        self.run(config, None)
        return self._programs.get(config)

    def known_fit(self, config: Config, limit: int) -> bool | None:
        """Whether `config` fits `limit`, when a run already made says so without another:
        one under that limit, or an unlimited one whose metric stayed within it (then the
        limited run is the same run), or any ok run of it, whose allocator program replayed
        under the limit ends as the limited run would (instrument/program.py), or whose live
        bytes alone went past it (no allocator can hold more live bytes than its limit).
        None: only a run can tell."""
        done = self._records.get((config, limit))
        if done is not None:
            return done.status == Status.OK if done.status in (Status.OK, Status.OOM) else None
        if self._within(config, limit) is not None:
            return True
        known = self._programs.get(config)
        if known is not None:  # the same requests under this limit: what its limited run would end as
            self.replays += 1
            return known.fits(self.alloc_config, limit)
        free = self._records.get((config, None))
        if free is not None and free.status == Status.OK and config.fsdp <= 1 and (free.peak_total or 0) > limit:
            return False
        return None

    def reserved(self, config: Config, limit: int | None) -> int | None:
        """The peak reserved of `config`'s run under `limit` over the whole run: its program
        replayed under the limit. A record's `peak_reserved` is CUDA's `max_memory_reserved`
        since the last phase began; without a limit reserved memory only grows, so that is the
        run's, but under one the allocator releases cached blocks and retries, and an earlier
        phase may have held more. None where no program of `config` was run (target cpu)."""
        program = self._programs.get(config)
        if program is None:
            return None
        self.replays += 1
        try:
            return program.replay(self.alloc_config, limit).peak_reserved
        except AllocatorOOM:  # the run did not hold the limit: it has no peak under it
            return None

    def _within(self, config: Config, limit: int) -> Record | None:
        """`config`'s unlimited run when it never reached `limit`: under that limit, the same
        ops and bytes, so the limited run's record. None under FSDP (the record is rank 0's
        numbers alone; a limited run holds every rank to the limit)."""
        free = self._records.get((config, None))
        if free is None or free.status != Status.OK or config.fsdp > 1 or metric(free) > limit:
            return None
        return free


def _step_key(config: Config) -> Config:
    """The config whose `step_program` stands for `config`'s: the optimizers' requests depend
    on neither the batch nor activation checkpointing (the same parameters, the same gradients)."""
    return replace(config, batch=PROGRAM_BATCHES[0], checkpointing=0)


#: the Runner a forked worker runs for (set once in each worker by `_worker`)
_WORKER: list[Runner] = []


def _worker(runner: Runner) -> None:
    _WORKER.append(runner)  # the parent's, as forked: its meta models, nothing pickled
    torch.set_num_threads(1)  # fake ops compute nothing; jobs, not threads, use the cores
    # every run starts with gc.collect(): the parent's objects (meta models, imports) are
    # never garbage, so out of the collector's way (~0.1 s a run on a 1B model)
    gc.freeze()


def _run_in_worker(key: tuple[Config, int | None, str]) -> tuple[Record, Program | None, float]:
    return _WORKER[0]._measure(*key)


def metric(r: Record, reserved: int | None = None) -> int:
    """What counts against the budget, context aside: peak reserved (target cuda), else peak allocated.
    `reserved`: the run's peak reserved where known (`Runner.reserved`), in place of the record's
    (since its last phase began). Under FSDP the record's numbers are rank 0's, whose shards are
    the largest (torch.chunk gives it ceil(rows / N) of every parameter); a confirming run holds
    every simulated rank to the limit."""
    if r.target == Target.CUDA and reserved is not None:
        return reserved
    if r.target == Target.CUDA and r.peak_reserved is not None:
        return r.peak_reserved
    return r.peak_total or 0


def boundary(ok: Callable[[int], bool], guess: int, cap: int) -> tuple[int, bool]:
    """The largest n in 1..cap with ok(n), for ok true up to some n and false after, searched
    from `guess`: a right guess costs two calls (guess, guess + 1); a wrong one doubling steps
    away from it, then bisection. (0, False) when even 1 fails; (cap, True) when cap passes."""
    guess = min(max(guess, 1), cap)
    if ok(guess):
        lo, step = guess, 1
        while True:
            if lo >= cap:
                return cap, True
            n = min(lo + step, cap)
            if not ok(n):
                hi = n
                break
            lo, step = n, step * 2
    else:
        hi, step = guess, 1
        while True:
            if hi <= 1:
                return 0, False
            n = max(hi - step, 1)
            if ok(n):
                lo = n
                break
            hi, step = n, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


@dataclass(frozen=True)
class Slopes:
    """Bytes per sample of each phase's peak (and of the metric), from two runs of a class."""

    phases: dict[str, float]
    metric: float
    points: tuple[int, int]
    #: the class's first member's run at points[1], and its optimizers' state by formula (None:
    #: no formula): the other members are predicted from it, their own state swapped in
    anchor: Record | None = None
    state: int | None = None


def slopes(a: Record, b: Record) -> Slopes:
    db = b.batch - a.batch
    phases = {p: (getattr(b, f"peak_{p}") - getattr(a, f"peak_{p}")) / db for p in PHASES}
    return Slopes(phases, (metric(b) - metric(a)) / db, (a.batch, b.batch))


def predict(anchor: Record, s: Slopes, room: int, cap: int = BATCH_CAP) -> int:
    """The largest batch whose predicted metric stays within `room`, from a record `anchor` at
    a batch near the answer and its class's slopes: per phase peak + slope x (b - anchor's
    batch), with the allocator's slack at the anchor on top. 0 when batch 1 is predicted not to fit."""
    slack = metric(anchor) - (anchor.peak_total or 0)
    at = anchor.batch
    best = cap
    for p in PHASES:
        base, slope = getattr(anchor, f"peak_{p}") + slack, s.phases[p]
        if slope > 0:
            best = min(best, at + int((room - base) // slope))
        elif base > room:
            return 0
    return min(max(best, 0), cap)


@dataclass(frozen=True)
class Formula:
    """A candidate sized by its optimizers' state formula: the rules that ran in their place,
    and the state bytes held against the budget."""

    twin_rules: str
    state: int
    why: str


def formula_for(config: Config, meta_model: torch.nn.Module) -> Formula | None:
    """For a candidate whose optimizers read tensor values: SGD (no state) in their place, and
    their state from the registry's formula; None when every optimizer runs on the fake probe."""
    rules = config.rules.parsed  # parsed once, when the Config was made
    reads = [r for r in rules if _reads_values(r.optimizer)]
    if not reads:
        return None
    opt = MultiOptimizer.from_spec(_Parameters(meta_model), config.rules, impl=config.impl, target=config.target)
    state = 0
    for rule, child in zip(opt.rules or (), opt.optimizers.values()):
        if rule not in reads:
            continue
        expected = expected_state(child)
        if expected is None:
            raise PlanFailed(f"{rule.optimizer} cannot run on the fake probe (it reads tensor values) and the "
                             "registry has no state formula for it")
        host = sum(round_alloc(t.nbytes) for t in host_state(child)) if config.target == Target.CUDA else 0
        state += expected.alloc - host
    twin = [Rule(r.selector, "sgd", (("lr", 0.01),)) if r in reads else r for r in rules]
    names = ", ".join(sorted({r.optimizer for r in reads}))
    return Formula(format_rules(twin), state, f"{names}: state by formula ({fmt_bytes(state)}), step temporaries "
                                               "not measured (it reads tensor values: not run on the fake probe)")


class _Parameters(torch.nn.Module):
    """A model's parameters alone, fresh meta copies under their names: all that building its
    optimizers reads of it (`MultiOptimizer.from_spec`: `named_parameters`), for sizing their
    state by formula. The shared meta model stays untouched without a deep copy of its
    module tree (~50 ms a 1B model, once per candidate)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._named = [(n, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
                       for n, p in model.named_parameters()]

    def named_parameters(self, prefix: str = "", recurse: bool = True,  # type: ignore[override]
                         remove_duplicate: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from self._named

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:  # type: ignore[override]
        for _, p in self._named:
            yield p


def _reads_values(optimizer: str) -> bool:
    """An optimizer the fake probe cannot step: the registry's HOST_READS, and 8-bit optimizers
    (bitsandbytes, torchao: block-wise quantisation reads scales on the host)."""
    name = optimizer.strip()
    if "8bit" in name.lower() or name.startswith("bitsandbytes"):
        return True
    desc = registry.lookup(name)  # case-insensitive for names, exact for import paths
    return desc is not None and desc.host_reads is not None


@dataclass
class Row:
    """One candidate's answer. `batch` is the largest that fits (0: none); `confirmed` when the
    fake probe ran it under the budget and batch + 1 ran out of memory."""

    values: dict[str, str]
    config: Config
    predicted: int | None = None
    batch: int = 0
    capped: bool = False
    confirmed: bool = False
    record: Record | None = None
    formula: Formula | None = None
    why: str | None = None
    step_ms: float | None = None
    throughput: float | None = None
    frontier: bool = False
    flags: list[str] = field(default_factory=list)
    shared: bool = False  # predicted from its class's first member's run, its own state by formula
    basis: str = ""  # what the prediction came from, in words
    klass: tuple = ()  # candidates that differ only by optimizers share activations, slopes, bias
    bias: int = 0  # what confirming a row of the class moved its prediction by (target cuda: the
    # limited run releases cached blocks and retries, as CUDA does, so more fits than unlimited peaks say)
    by_peaks: bool = False  # predicted from phase peaks (`_predict_by_peaks`)
    reserved: int | None = None  # the confirmed run's peak reserved over the whole run (`Runner.reserved`)

    @property
    def approximate(self) -> bool:
        """Predicted by an approximation a class shares: phase peaks, or another member's
        programs with this one's state swapped in by formula. Such a row's miss moves its
        class's other such rows (`bias`: what limits one likely limits the others, e.g. a
        block's rounding the state does not move); a row predicted by its own (or spliced)
        programs is the limited allocator's answer, and its misses are its own."""
        return self.by_peaks or self.shared

    @property
    def label(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.values.items())

    @property
    def answer(self) -> int:
        return self.batch if self.confirmed else max((self.predicted or 0) + self.bias, 0)


@dataclass
class Plan:
    budget: int
    context: int
    limit: int
    target: str
    rows: list[Row]
    time_note: str
    runs: int
    seconds: float
    weights: int
    base: Config
    jobs: int = 1  # fake runs made at once (`seconds` is their sum)
    partial: int = 0  # of the runs, those with one step's model side or the optimizers' side alone

    @property
    def fitting(self) -> list[Row]:
        return [r for r in self.rows if r.why is None and r.answer > 0]

    @property
    def refused(self) -> list[Row]:
        return [r for r in self.rows if r.why is not None or r.answer == 0]


def candidates(base: Config, axes: Sequence[Axis]) -> list[tuple[dict[str, str], Config, list[str]]]:
    """The product of the axes over `base` (batch 1): (shown values, config, estimate flags)."""
    out = []
    for combo in itertools.product(*(a.values for a in axes)):
        config, shown, flags = base, {}, []
        for axis, value in zip(axes, combo):
            config = axis.set(config, value)
            if axis.name == "combo" or len(axis.values) > 1:  # a value every candidate shares is no label
                shown[axis.name] = axis.show(value)
            flags += axis.flags(value)
        out.append((shown, replace(config, batch=1), flags))
    return out


def plan(base: Config, axes: Sequence[Axis], budget: int, *, context: int = 0, warmup: int | None = None,
         alloc_conf: str | None = None, gpu: str | None = None, confirm: str = "frontier",
         cap: int = BATCH_CAP, runner: Runner | None = None, jobs: int = 1) -> Plan:
    """Every candidate's largest batch under `budget` (target cuda: predicted peak reserved +
    `context`), confirmed at its boundary by the fake probe: every frontier row (`confirm=
    "frontier"`; the others keep their prediction, labelled) or every row (`"all"`). `jobs`:
    fake runs made at once, each in a forked process (`Runner.prefetch`).

    UsageError: a budget below the weights, a model that cannot build."""
    if warmup is not None and warmup < 1:
        raise UsageError(f"--warmup {warmup}: a plan needs at least 1 warm-up step (optimizer state is made in the first)")
    if confirm not in ("frontier", "all"):
        raise UsageError(f"confirm must be 'frontier' or 'all', got {confirm!r}")
    limit = budget - context
    if limit <= 0:
        raise UsageError(f"the budget {fmt_bytes(budget)} leaves nothing beside the CUDA context ({fmt_bytes(context)})")
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: give 1 or more")
    runner = runner or Runner(limit, warmup=warmup, alloc_conf=alloc_conf, gpu=gpu, jobs=jobs)
    predictor, note = time_model(gpu)
    if predictor is not None:
        confirm = "all"  # a throughput needs a run at the batch it is claimed for
    cands = candidates(base, axes)
    if not cands:
        raise UsageError("no candidates: every axis needs at least one value")
    try:
        models.resolve(base.model)
        weights = min(model_bytes(runner.meta_model(c))[0] for _, c, _ in cands)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"model {base.model!r} cannot be built: {type(e).__name__}: {_first_line(e)}") from None
    if weights > limit:
        raise UsageError(f"the budget {fmt_bytes(budget)} is below the weights alone ({fmt_bytes(weights)} of "
                         f"{base.model}{'' if not context else f' + {fmt_bytes(context)} CUDA context'}); "
                         "raise --budget or choose a smaller model or dtype")
    rows = [Row(shown, config, flags=flags) for shown, config, flags in cands]
    try:
        _predict_all(rows, runner, limit, cap)
        _confirm_all(rows, runner, limit, cap, predictor, confirm)
    finally:
        runner.close()
    return Plan(budget, context, limit, base.target, rows, note, runner.runs, runner.seconds, weights, base,
                runner.jobs, runner.step_runs + runner.once_runs)


def _predict_all(rows: list[Row], runner: Runner, limit: int, cap: int) -> None:
    """Every row's prediction; the runs each class's first member starts from made first,
    `runner.jobs` at a time."""
    ready = [row for row in rows if _prepare(row, runner)]
    firsts: dict[tuple, Config] = {}
    own = []  # members that get programs of their own (`_shares`)
    for row in ready:
        config = _run_config(row)
        first = firsts.setdefault(klass(runner, row.config), config)
        if first != config and runner.logs(config) and not _shares(runner, runner.state(first), runner.state(config)):
            own.append(config)
    # a member with programs of its own: its optimizers' side alone, spliced into its class's
    # first member's programs (`_spliced_pair`); two runs of its own where that cannot be done
    classes = [*firsts.values(), *(c for c in own if not runner.splices(c))]
    runner.prefetch(((replace(c, batch=1), None) for c in classes if not runner.logs(c)), steps=own,
                    programs=(replace(c, batch=n) for c in classes if runner.logs(c) for n in PROGRAM_BATCHES))
    classes: dict[tuple, Slopes] = {}
    pairs: dict[tuple, Pair] = {}
    for row in ready:
        _predict(row, runner, classes, pairs, limit, cap)


def _confirm_all(rows: list[Row], runner: Runner, limit: int, cap: int, predictor: Predictor | None,
                 confirm: str) -> None:
    """Confirm every row (`confirm="all"`), or the frontier until it holds only confirmed rows;
    each round's first two runs per row (its answer, and one more) made first, `runner.jobs`
    at a time."""
    bias: dict[tuple, int] = {}
    while True:
        for r in rows:
            r.bias = bias.get(r.klass, 0) if r.approximate else 0
        _frontier(rows, predictor is not None)
        # a row predicted to fit nothing is confirmed too: "fits nothing" is a claim, and a
        # phase whose slope is near zero extrapolates far from its anchor
        todo = [r for r in rows if r.why is None and not r.confirmed and (confirm == "all" or r.frontier or r.answer == 0)]
        if not todo:
            break
        wanted = []
        for r in todo:
            room, config = _room(r, limit), _run_config(r)
            if r.answer == 0:
                # what batch 1 needs, for the row that says it fits nothing: one unlimited run,
                # whose program (or peak) also answers whether batch 1 fits the room
                wanted.append((replace(config, batch=1), None))
                continue
            wanted += [(replace(config, batch=n), room) for n in (r.answer, r.answer + 1)
                       if runner.known_fit(replace(config, batch=n), room) is None or n == r.answer]
        runner.prefetch(wanted)
        for row in todo:
            row.bias = bias.get(row.klass, 0) if row.approximate else 0
            _confirm(row, runner, limit, cap, predictor)
            if row.why is None and row.predicted and row.approximate:
                bias[row.klass] = row.batch - row.predicted


def _room(row: Row, limit: int) -> int:
    """What the row's runs may use of `limit`: less the state its formula holds aside."""
    return limit - (row.formula.state if row.formula else 0)


def _run_config(row: Row) -> Config:
    """What the fake probe runs for `row`: its own rules, or their SGD twin (formula rows)."""
    return row.config if row.formula is None else replace(row.config, rules=row.formula.twin_rules)


def _predict(row: Row, runner: Runner, classes: dict[tuple, Slopes], pairs: dict[tuple, "Pair"], limit: int,
             cap: int) -> None:
    """The row's predicted batch. Target cuda: its class's allocator programs at two batches
    replayed between them (`_predict_by_program`). Otherwise, or where the two batches make
    different programs: one unlimited run at its class's anchor batch (near the answer), the
    class's slopes from its first member's runs at batch 1 and at the anchor. `row` has
    passed `_prepare`."""
    room = _room(row, limit)
    config = _run_config(row)
    row.klass = key = klass(runner, row.config)
    if runner.logs(config) and _predict_by_program(row, runner, config, room, key, pairs, cap):
        return
    _predict_by_peaks(row, runner, config, room, key, classes, cap)


def klass(runner: Runner, config: Config) -> tuple:
    """What candidates that differ only by their optimizers share: activations, gradients."""
    return (runner.model_key(config), config.dtype, config.amp, config.step_in_backward, config.zero_grad_at,
            config.target, config.fsdp, config.reshard_after_forward, config.fsdp_mp)


def _prepare(row: Row, runner: Runner) -> bool:
    """Check the row's rules and size its formula optimizers; False (and why) when it cannot run."""
    try:
        # rules checked as rules (names, keywords, claims); the fake probe's refusal of optimizers
        # that read values does not apply: those are sized by formula
        validate(replace(row.config, fsdp=0), Protocol(probe=Probe.TRACKED), model=runner.meta_model(row.config))
        row.formula = runner.formula(row.config)
        if row.formula is not None and row.config.fsdp > 1:
            raise PlanFailed(f"{row.formula.why.split(':')[0]} sized by formula on the whole model only; its "
                             f"state per FSDP rank is not measured: plan it without --fsdp")
        if row.formula is not None or row.config.fsdp > 1:  # FSDP: the degree against the parameters
            validate(_run_config(row), Protocol(probe=Probe.FAKE), model=runner.meta_model(row.config))
    except (UsageError, PlanFailed) as e:
        row.why = str(e)
        return False
    return True


def _predict_by_peaks(row: Row, runner: Runner, config: Config, room: int, key: tuple, classes: dict[tuple, Slopes],
                      cap: int) -> None:
    """Predict from each phase's peak, affine in the batch: the class's slopes from runs near
    the answer, the allocator's slack at the anchor on top, other optimizers' state swapped in."""
    if key not in classes:
        r1 = runner.run(config, None)
        if r1.status != Status.OK:
            row.why = f"batch 1: {r1.status}: {r1.error}"
            return
        # batch 1 is often below the affine range (the step's temporaries hold the peak): a
        # second point from a rough guess, then a third at that point's prediction when the
        # guess was far off, so the slopes come from the two points nearest the answer
        a, b = r1, runner.run(replace(config, batch=_second_batch(r1, room, cap)), None)
        for _ in range(2):
            if b.status != Status.OK:
                row.why = f"batch {b.batch}: {b.status}: {b.error}"
                return
            guess = max(predict(b, slopes(a, b), room, cap), 2)
            if abs(guess - b.batch) <= max(b.batch // 16, 1) or guess == a.batch:
                break
            a, b = b, runner.run(replace(config, batch=guess), None)
        classes[key] = slopes(a, b) if a.batch < b.batch else slopes(b, a)
        classes[key] = replace(classes[key], points=(min(a.batch, b.batch), b.batch))
        anchor = runner.run(replace(config, batch=classes[key].points[1]), None)
        classes[key] = replace(classes[key], anchor=anchor, state=runner.state(config))
    s = classes[key]
    # FSDP shards the state: the whole model's formula is not its per-rank bytes, so it runs
    state = runner.state(config) if s.state is not None and config.fsdp <= 1 else None
    if state is not None and s.anchor is not None and s.anchor.status == Status.OK:
        # same model, dtype, amp and placement: the same activations and gradients; only the
        # optimizers' state (and their step temporaries, left to the confirmation) differ
        row.shared = row.by_peaks = True
        row.basis = "its class's phase peaks, its own state by formula (step temporaries not counted)"
        row.predicted = predict(s.anchor, s, room - (state - s.state), cap)
        return
    anchor = runner.run(replace(config, batch=s.points[1]), None)
    if anchor.status != Status.OK:
        row.why = f"batch {anchor.batch}: {anchor.status}: {anchor.error}"
        return
    row.basis, row.by_peaks = "phase peaks affine in the batch", True
    row.predicted = predict(anchor, s, room, cap)


#: the two batches a class's programs are taken at: batch 1 often makes another program
#: (ops squeeze its size-1 dimension), 2 and 3 the same one as every larger batch
PROGRAM_BATCHES = (2, 3)


@dataclass(frozen=True)
class Pair:
    """A class's first member's allocator programs at two batches: the program at every batch
    predicted between them (instrument/program.py), the other members' state swapped in by
    formula (`state`: the first member's by formula, None: it has none)."""

    a: Program
    b: Program
    rules: Rules
    state: int | None
    answer: int  # the first member's predicted batch: where the others' searches start
    spliced: bool = False  # another member's programs with these rules' optimizers' requests in theirs
    room: int = 0  # what `answer` was searched under


def _predict_by_program(row: Row, runner: Runner, config: Config, room: int, key: tuple,
                        pairs: dict[tuple, Pair], cap: int) -> bool:
    """Predict the row's batch by replaying its class's programs between two batches under
    the room (the allocator model's release-and-retry under a limit included). A member with
    other optimizers holds its state's difference by formula aside (`shared`) where that
    difference is small (`_shares`); otherwise, or without a formula, it gets programs of its
    own. False: the two batches made different programs (the caller predicts from peaks)."""
    state = runner.state(config)
    pair = pairs.get(key)
    if pair is not None and pair.rules != config.rules and not _shares(runner, pair.state, state):
        first, key = pair, (*key, config.rules)  # this member's own programs
        pair = pairs.get(key)
        if pair is None and (made := _spliced_pair(runner, first, config, state, room, cap)) is not None:
            pair = pairs[key] = made
    if pair is None:
        made = _pair_of(runner, config, state, room, cap)
        if isinstance(made, Record):
            row.why = f"batch {made.batch}: {made.status}: {made.error}"
            return True
        if made is None:
            return False
        pair = pairs[key] = made
    shift = 0 if pair.rules == config.rules else state - pair.state  # type: ignore[operator]
    row.shared = pair.rules != config.rules
    row.basis = ("its class's allocator program, its own state by formula (step temporaries not counted)"
                 if row.shared else "its class's allocator program, its own optimizers' requests spliced in"
                 if pair.spliced else "its allocator program between batches 2 and 3")
    # the pair's answer is for the room it was searched under: another row with the same run
    # rules (formula optimizers' SGD twin) holds another state aside
    same = not row.shared and room == pair.room
    row.predicted = pair.answer if same else _largest(runner, pair, room - shift, cap, pair.answer)
    return True


#: how far (a share of the plan's limit) a member's state by formula may be from its class's
#: first member's and still be predicted from the first's programs with it swapped in. Its
#: step's temporaries, not counted by the swap, scale with the same parameters: on the 7B
#: without LoRA at 80 GiB (AdamW first), Adafactor was predicted 4 and confirmed at 92
SHARE_FRACTION = 0.05


def _shares(runner: Runner, first: int | None, state: int | None) -> bool:
    """Whether a member with `state` is predicted from its class's first member's programs
    (state `first`); if not, it gets programs of its own (two runs). No formula: its own."""
    return first is not None and state is not None and abs(state - first) <= SHARE_FRACTION * runner.limit


def _pair_of(runner: Runner, config: Config, state: int | None, room: int, cap: int) -> Pair | Record | None:
    """`config`'s programs at PROGRAM_BATCHES, its answer under `room` searched between them;
    the failed run's record where one did not end ok; None where they are two programs."""
    runner.prefetch(programs=(replace(config, batch=n) for n in PROGRAM_BATCHES))
    progs = []
    for n in PROGRAM_BATCHES:
        prog = runner.program(replace(config, batch=n))
        if prog is None:
            return runner.run(replace(config, batch=n), None)
        progs.append(prog)
    a, b = progs
    if not a.same_program(b):
        return None
    pair = Pair(a, b, config.rules, state, 0)
    return replace(pair, answer=_largest(runner, pair, room, cap, _secant(runner, pair, room, cap)), room=room)


def _spliced_pair(runner: Runner, first: Pair, config: Config, state: int | None, room: int,
                  cap: int) -> Pair | None:
    """`config`'s programs without a run of its model: its class's first member's programs
    with the requests of `config`'s optimizers (one run of their side alone) in place of the
    first member's (instrument/program.py `spliced`: exact where the optimizers' requests do
    not depend on the batch); its answer under `room` searched between them. None where that
    cannot be done (the caller runs the member's own programs)."""
    steps = runner.step_program(config)
    if steps is None:
        return None
    a, b = spliced(first.a, steps), spliced(first.b, steps)
    if a is None or b is None or not a.same_program(b):
        return None
    pair = Pair(a, b, config.rules, state, 0, spliced=True)
    return replace(pair, answer=_largest(runner, pair, room, cap, _secant(runner, pair, room, cap)), room=room)


def _secant(runner: Runner, pair: Pair, room: int, cap: int) -> int:
    """A first guess at the pair's answer, so its search takes a few replays, not a doubling
    walk from batch 3: the batch where the unlimited peak reserved meets `room`, by the secant
    through two unlimited replays, refined once. (A limited run frees cached blocks and
    retries, so the answer is at or a little past it.)"""
    def peak(n: int) -> int:
        return runner.peaks(pair, n)[1]

    x0 = max(pair.a.batch, pair.b.batch)
    x1 = min(max(4 * x0, 16), cap)
    y0, y1 = peak(x0), peak(x1)
    for _ in range(2):
        if y1 <= y0 or x1 == x0:  # flat: nothing to aim at; the search doubles from the last point
            return x1
        x2 = int(min(max(x1 + (room - y1) * (x1 - x0) / (y1 - y0), x0), cap))
        if x2 == x1:
            break
        x0, y0, x1, y1 = x1, y1, x2, peak(x2)
    return max(x1, 1)


def _largest(runner: Runner, pair: Pair, room: int, cap: int, guess: int) -> int:
    """The largest batch whose program between the pair's fits `room`; 0 when the pair's
    smaller batch does not fit (a smaller batch's program is not known, batch 1's is often
    another: the plan confirms every row predicted to fit nothing, with a run at batch 1)."""
    low = min(pair.a.batch, pair.b.batch)

    def ok(n: int) -> bool:
        if n < low:
            return True
        live, reserved = runner.peaks(pair, n)
        if reserved <= room or live > room:  # never reaches the limit / more live bytes than it holds
            return reserved <= room
        runner.replays += 1
        return between(pair.a, pair.b, n).fits(runner.alloc_config, room)  # type: ignore[union-attr]

    if room < 0 or not ok(low):
        return 0
    return boundary(ok, max(guess, low), cap)[0]


def formula_state(config: Config, meta_model: torch.nn.Module) -> int | None:
    """The bytes the registry's formulas give the config's optimizers (what counts on the
    target: a cuda step's host scalars left out); None when one of them has no formula."""
    opt = MultiOptimizer.from_spec(_Parameters(meta_model), config.rules, impl=config.impl, target=config.target)
    total = 0
    for child in opt.optimizers.values():
        expected = expected_state(child)
        if expected is None:
            return None
        host = sum(round_alloc(t.nbytes) for t in host_state(child)) if config.target == Target.CUDA else 0
        total += expected.alloc - host
    return total


def _second_batch(r1: Record, room: int, cap: int) -> int:
    """A batch near the answer, for the slope: the room left after batch 1's peak, divided by
    what batch 1 holds above the batch-independent bytes."""
    fixed = (r1.param_bytes or 0) + (r1.grad_bytes or 0) + (r1.opt_state_alloc_bytes or 0)
    per = max(metric(r1) - fixed, 512)
    return int(min(max((room - fixed) // per, 2), cap, 1 << 16))


def _confirm(row: Row, runner: Runner, limit: int, cap: int, predictor: Predictor | None) -> None:
    room = _room(row, limit)
    config = _run_config(row)

    def ok(n: int) -> bool:
        known = runner.known_fit(replace(config, batch=n), room)
        if known is not None:
            return known
        r = runner.run(replace(config, batch=n), room)
        if r.status not in (Status.OK, Status.OOM):
            raise PlanFailed(f"batch {n}: {r.status}: {r.error}")
        return r.status == Status.OK

    try:
        guess = row.answer or 1
        if row.shared and runner.logs(config):
            # where the state swapped in by formula missed (the optimizers' step temporaries
            # differ): by one, one more run says so; by more, two runs of this member's own
            # programs make its prediction, where a search would double away from the miss
            over = not ok(guess)
            under = not over and ok(guess + 1)
            if over and guess > 1 and ok(guess - 1):
                guess -= 1
            elif under and not ok(guess + 2):
                guess += 1
            elif (over or under) and isinstance(own := _pair_of(runner, config, None, room, cap), Pair):
                guess = max(own.answer, 1)
        row.batch, row.capped = boundary(ok, guess, cap)
    except PlanFailed as e:
        row.why = str(e)
        return
    row.confirmed = True
    if row.batch == 0:
        row.why = f"batch 1 does not fit ({_need(runner.run(config, None), row, limit)})"
        return
    row.record = runner.run(replace(config, batch=row.batch), room)
    row.reserved = runner.reserved(replace(config, batch=row.batch), room)
    row.config = replace(row.config, batch=row.batch)
    if predictor is not None:
        row.step_ms = predictor(row.record)
        if row.step_ms:
            row.throughput = row.batch * 1000.0 / row.step_ms


def _need(r: Record, row: Row, limit: int) -> str:
    need = metric(r) + (row.formula.state if row.formula else 0)
    return f"needs {fmt_bytes(need)} of {fmt_bytes(limit)}" if r.status == Status.OK else f"{r.status}: {r.error}"


def _frontier(rows: list[Row], timed: bool) -> None:
    """Timed: Pareto in (memory used, throughput); otherwise the largest batch (ties kept)."""
    live = [r for r in rows if r.why is None and r.answer > 0]
    for r in rows:
        r.frontier = False
    if not live:
        return
    if timed:
        for r in live:
            if r.throughput is None:
                continue
            r.frontier = not any(o is not r and o.throughput is not None and used(o) <= used(r)
                                 and o.throughput >= r.throughput and (used(o) < used(r) or o.throughput > r.throughput)
                                 for o in live)
        return
    best = max(r.answer for r in live)
    for r in live:
        r.frontier = r.answer == best


def used(row: Row, context: int = 0) -> int:
    """What the row's confirmed run counts against the budget (formula state included)."""
    if row.record is None:
        return 0
    return metric(row.record, row.reserved) + (row.formula.state if row.formula else 0) + context


def split(r: Record, context: int, workspaces: Workspaces = Workspaces(), formula_state: int = 0,
          reserved: int | None = None) -> dict[str, int]:
    """The budget a record uses, by kind: weights, grads (held after backward: none with
    step_in_backward), optimizer state (walked, or by formula), activations (held from forward
    into backward), temporaries (the rest of the allocated peak), workspaces, allocator slack
    (peak reserved - peak allocated) and the CUDA context. Sums to what counts against the budget.
    `reserved`: the run's peak reserved where the record's (since its last phase began) is not
    (a run under a limit releases cached blocks and retries: `Runner.reserved`)."""
    peak = r.peak_total or 0
    cuda = r.target == Target.CUDA
    ws = workspaces.total if cuda else 0
    fixed = {"weights": r.param_bytes or 0, "grads": r.grad_bytes or 0, "optimizer state": r.opt_state_alloc_bytes or 0}
    room = max(peak - sum(fixed.values()) - ws, 0)
    # backward frees activations as it makes grads: at the peak, at most what is left is held
    activations = min(max((r.mem_after_forward or 0) - (r.mem_step_start or 0), 0), room)
    fixed["optimizer state"] += formula_state
    return {**fixed, "activations": activations, "temporaries": room - activations, "workspaces": ws,
            "allocator slack": (metric(r, reserved) - peak) if cuda else 0,
            "CUDA context": context if cuda else 0}


def reproduce(plan_: Plan, row: Row) -> str:
    """The `multiopt estimate` command that gives the row's numbers."""
    b = plan_.base
    spec = models.resolve(b.model)
    sizes = [f"--{s} {getattr(b, s)}" for s in ("width", "depth") if s in spec.takes]
    flags = " ".join(_quote(f) for f in row.flags)
    target = f" --target {b.target}" if b.target != Target.CUDA else ""
    target += "" if b.reshard_after_forward else " --reshard-after-forward 0"
    target += "" if b.fsdp_mp == "none" else f" --fsdp-mp {b.fsdp_mp}"
    return f"multiopt estimate --model {b.model} {' '.join(sizes)} --batch {row.answer} {flags}{target}".replace("  ", " ")


def _quote(text: str) -> str:
    return text if text.startswith("--") or all(ch.isalnum() or ch in "._-+" for ch in text) else f'"{text}"'


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --- output ---------------------------------------------------------------------------------


def as_dict(p: Plan, workspaces: Workspaces = Workspaces()) -> dict[str, Any]:
    """The plan as plain data (`--json`, the report's plot)."""
    def row(r: Row) -> dict[str, Any]:
        out: dict[str, Any] = {"candidate": r.values, "batch": r.answer, "confirmed": r.confirmed,
                               "predicted": r.predicted, "shared": r.shared, "basis": r.basis, "frontier": r.frontier,
                               "capped": r.capped,
                               "step_ms": r.step_ms, "throughput": r.throughput, "why": r.why,
                               "formula": r.formula.why if r.formula else None}
        if r.record is not None and r.why is None:
            out["used"] = used(r, p.context if p.target == Target.CUDA else 0)
            out["breakdown"] = split(r.record, p.context, workspaces, r.formula.state if r.formula else 0, r.reserved)
        if r.why is None and r.answer:
            out["reproduce"] = reproduce(p, r)
        return out

    return {"budget": p.budget, "context": p.context if p.target == Target.CUDA else 0, "target": p.target,
            "context_source": CONTEXT_SOURCE if p.target == Target.CUDA else None, "time": p.time_note,
            "weights": p.weights, "fake_runs": p.runs, "fake_runs_partial": p.partial,
            "fake_seconds": round(p.seconds, 3), "jobs": p.jobs,
            "rows": [row(r) for r in p.rows]}


def render(p: Plan, workspaces: Workspaces = Workspaces()) -> str:
    """Markdown: the frontier with its breakdown and commands, the other fitting candidates,
    the candidates that fit nothing with why."""

    ctx = p.context if p.target == Target.CUDA else 0
    b = p.base
    sizes = ", ".join(f"{s} {getattr(b, s)}" for s in ("width", "depth") if s in models.resolve(b.model).takes)
    semantics = (f"target cuda: predicted peak reserved (caching-allocator model, cuBLAS workspaces) + CUDA context "
                 f"{fmt_bytes(ctx)} ({CONTEXT_SOURCE})" if p.target == Target.CUDA else
                 "target cpu: peak allocated (`memory_allocated` semantics); a GPU needs its context, workspaces and "
                 "allocator slack on top (use --target cuda)")
    lines = [f"# Plan: what fits in {fmt_bytes(p.budget)} ({p.budget:,} bytes)", "",
             f"{b.model}{f' ({sizes})' if sizes else ''}; {semantics}. Time: {p.time_note}.",
             f"{len(p.rows)} candidates, {len(p.fitting)} fit; {p.runs} fake runs"
             f"{f' ({p.partial} of them partial: one step of the model, or the optimizers alone)' if p.partial else ''}, "
             f"{p.seconds:.1f} s of them{f' ({p.jobs} at a time)' if p.jobs > 1 else ''}."]
    front = [r for r in p.fitting if r.frontier]
    rest = [r for r in p.fitting if not r.frontier]
    head = ["candidate", "batch", "used", "headroom", "weights", "grads", "state", "activations", "temporaries",
            "workspaces", "slack", "context"]
    if p.time_note.startswith("predicted"):
        head[2:2] = ["step ms", "samples/s"]

    if front:
        how = "memory used vs throughput" if "step ms" in head else "the largest batch; no time model"
        lines += ["", f"## Frontier ({how}): each batch confirmed, it runs and batch + 1 does not", "", *_table(p, front, head, workspaces), "",
                  "Reproduce:", ""]
        lines += [f"- {r.label}: `{reproduce(p, r)}`" for r in front]
        notes = [f"- {r.label}: {r.formula.why}" for r in front if r.formula]
        if notes:
            lines += ["", "Sized by formula:", "", *notes]
    confirmed = [r for r in rest if r.record is not None]
    if confirmed:
        lines += ["", "## Also fit (confirmed)", "", *_table(p, confirmed, head, workspaces)]
    predicted = [r for r in rest if r.record is None]
    if predicted:
        lines += ["", "## Also fit (predicted, not confirmed: off the frontier; `--confirm all` confirms them)", "",
                  tabulate([[r.label, f"{r.answer:,}", r.basis] for r in sorted(predicted, key=lambda r: -r.answer)],
                           headers=["candidate", "predicted batch", "predicted from"], tablefmt="github",
                           disable_numparse=True)]
    checked = checks(p)
    if checked:
        lines += ["", checked]
    if p.refused:
        lines += ["", "## Fit nothing", "",
                  tabulate([[r.label, r.why or "batch 1 does not fit"] for r in p.refused], headers=["candidate", "why"],
                           tablefmt="github", disable_numparse=True)]
    unmodelled = sorted({r.record.unmodelled for r in p.fitting if r.record is not None and r.record.unmodelled})
    if unmodelled:
        lines += ["", f"Estimate, not CUDA's to the byte: ops whose CUDA kernels allocate differently are not modelled "
                      f"({'; '.join(unmodelled)}); leave headroom."]
    unsteady = [r.label for r in p.fitting if r.record is not None and r.record.step_growth]
    if unsteady:
        lines += ["", f"NOT STEADY: the measured step of {', '.join(unsteady)} ended with a different amount allocated "
                      f"than it started with ({UNSTEADY_WHY}): its batch may not hold on later "
                      "steps; plan again with more --warmup steps."]
    return "\n".join(lines) + "\n"


def checks(p: Plan) -> str:
    """How far the predictions were from what confirming found, by what they came from."""
    done = [r for r in p.rows if r.confirmed and r.predicted is not None and r.why is None]
    if not done:
        return ""
    parts = []
    for basis in dict.fromkeys(r.basis for r in done):
        rows = [r for r in done if r.basis == basis]
        off = [abs(r.batch - r.predicted) for r in rows if r.batch != r.predicted]  # type: ignore[operator]
        miss = f"; {len(off)} off, by up to {max(off):,}" if off else ""
        parts.append(f"from {basis}: {len(rows) - len(off)} of {len(rows)} exact{miss}")
    return "Predictions checked by their confirmations (batch): " + "; ".join(parts) + "."


def _table(p: Plan, rows: list[Row], head: list[str], workspaces: Workspaces) -> list[str]:
    """Rows with their breakdown, best first."""

    ctx = p.context if p.target == Target.CUDA else 0
    body = []
    for r in sorted(rows, key=lambda r: (-(r.throughput or 0), -r.answer)):
        if r.record is None:
            body.append([r.label, f"{r.answer:,} (predicted)"] + ["-"] * (len(head) - 2))
            continue
        s = split(r.record, p.context, workspaces, r.formula.state if r.formula else 0, r.reserved)
        u = used(r, ctx)
        cells = [r.label, f"{r.batch:,}" + (" (search cap)" if r.capped else ""), fmt_bytes(u), fmt_bytes(p.budget - u),
                 *(fmt_bytes(v) for v in s.values())]
        if "step ms" in head:
            cells[2:2] = [f"{r.step_ms:.1f}" if r.step_ms else "-", f"{r.throughput:,.0f}" if r.throughput else "-"]
        body.append(cells)
    return [tabulate(body, headers=head, tablefmt="github", disable_numparse=True)]
