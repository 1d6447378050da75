"""The record: one config's measurements as one flat, versioned row.

Everything downstream (JSONL store, DataFrame, report, gate) reads this schema and nothing
else, so it is defined once here. A `Record` is the `Config` it measured (the config
columns are Config's fields, declared once) plus what was measured; per-optimizer and
per-rank results are typed sub-records, stored as nested JSON lists in the row.

What a column *is* is declared once, on its field (`dataclasses.field(metadata=...)`, see
`Role`), and every column list here and downstream (config, key, series, name, memory,
bytes, time) is derived from those declarations; a field's type is read from its annotation
in one place (`scalar_type`). So a new Config field with a default is at once a config, key
and series column, and a row written before it existed reads at its default.

Schema history (readers accept every version; `upgrade` brings an old row to this one):

- ``multiopt.record/1``: per-optimizer and per-rank results as JSON *text* in
  ``opt_state_by_optimizer`` / ``opt_state_by_rank``; ``zero``/``ranks`` absent in the first
  files (ZeRO came later: 0 and 1).
- ``multiopt.record/2``: those lists as nested JSON in ``optimizers`` / ``ranks_state``;
  ``target`` added (absent: the record's own device, see `Config.target`).
- ``multiopt.record/3``: the columns are declared by field metadata; config fields added from
  here on (this round: checkpointing, lora, seq, step_in_backward, fsdp) and result fields
  (work, step_flops, step_bytes, step_kernels, gpu, predicted_step_ms) are absent from older
  rows, which read at the field's default: a config measured before a knob existed was
  measured with it off. The row's layout is otherwise v2's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

from .errors import UsageError
from .kinds import Phase, Probe, Status, Target, effective_target
from .rules import Rules

SCHEMA = "multiopt.record/3"
SCHEMAS: tuple[str, ...] = ("multiopt.record/1", "multiopt.record/2", SCHEMA)

STATUSES: tuple[str, ...] = Status.values()

# The four phases of a training step, as the Trainer names them and the record stores them
# (`mem_after_<phase>`, `peak_<phase>`); execution order depends on zero_grad_at (see phase_order).
PHASES: tuple[str, ...] = Phase.values()


def phase_order(zero_grad_at: str) -> tuple[str, ...]:
    """Execution order of the four phases for a zero_grad placement ("start" or "end")."""
    if zero_grad_at == "start":
        return PHASES
    return (Phase.FORWARD, Phase.BACKWARD, Phase.STEP, Phase.ZERO_GRAD)


class Role(str, Enum):
    """What a column is, declared on its field as ``metadata={ROLE: Role.X}``.

    A Config field without a role is a plain config column: part of the config key, of the
    series a report names and of the gate's config names. The roles below say otherwise."""

    NAME = "name"      # config: what a series is called (the combo's name)
    AXIS = "axis"      # config: a size a series is measured across (width, batch): a table's column
    DETAIL = "detail"  # config: spelled out by another column (rules, by the combo's name): not in the key
    WHERE = "where"    # config: where it was measured (probe, device): named after the others
    MEMORY = "memory"  # result: bytes (or parameters) measured exactly on the deterministic probes
    BYTES = "bytes"    # result: other byte counts (checked like memory, compared by nobody)
    TIME = "time"      # result: step time and how many steps it is of
    WORK = "work"      # result: work counters (FLOPs, bytes, kernels), exact on the deterministic probes


ROLE = "role"      # metadata key: a `Role`
GATED = "gated"    # metadata key: True on the memory metrics the regression gate compares
CONFIG = "config"  # metadata key: True on a Record field that is a config column (probe)
SIGNED = "signed"  # metadata key: True on a sub-record's byte count that may be negative
# metadata key: a function of an older row lacking the column, giving the value it was
# measured at (default: the field's default)
ABSENT = "absent"


def _role(role: Role, default: Any = None, gated: bool = False) -> Any:
    return field(default=default, metadata={ROLE: role, GATED: gated})


def _target_when_absent(row: Mapping[str, Any]) -> str:
    # written before `target` existed: the record reported what its own device allocates
    cuda = row.get("probe") == Probe.CUDA or str(row.get("device", "")).startswith("cuda")
    return Target.CUDA if cuda else Target.CPU


@dataclass(frozen=True)
class Config:
    """What is measured: model, sizes, dtypes and the optimizer combo. Its fields are the
    record's config columns. `rules` is parsed once, here: rule text (or a list of dicts, or
    Rule values) becomes `Rules`, the canonical text (as records store it and keys compare it)
    carrying its parsed rules; text that does not parse is a UsageError naming the part."""

    device: str = _role(Role.WHERE, "cpu")
    model: str = "mlp"
    width: int = _role(Role.AXIS, 256)
    depth: int = 3
    batch: int = _role(Role.AXIS, 32)
    dtype: str = "float32"
    amp: str = "none"
    combo: str = _role(Role.NAME, "adam")
    rules: Rules = _role(Role.DETAIL, Rules("rest=adam"))
    impl: str = "default"
    zero_grad_at: str = "end"
    seed: int = 0
    # ZeRO-1: 1 = every optimizer wrapped in ZeroRedundancyOptimizer, the config run by
    # `ranks` ranks together (torchrun); 0 = one process, ranks == 1
    zero: int = 0
    ranks: int = 1
    # the device whose numbers a CPU probe reports: "cpu" (this machine) or "cuda" (what a
    # CUDA device would report: its optimizer defaults, workspaces, caching allocator)
    target: str = field(default=Target.CPU.value, metadata={ABSENT: _target_when_absent})
    # activation checkpointing (1: each block recomputed in the backward), LoRA adapters
    # (canonical `hf.parse_lora` text, "" = none) and the batches' sequence length (0: the
    # model has none)
    checkpointing: int = 0
    lora: str = ""
    seq: int = 0
    # 1: each parameter's optimizer steps inside backward as its gradient completes, and the
    # gradient is freed there (Trainer(step_in_backward=True)); 0: one step after backward
    step_in_backward: int = 0
    # FSDP2 (`fully_shard` on each block and the root): the sharding degree, 0 or 1 = none;
    # whether blocks free their unsharded parameters after forward (1, FSDP2's default) or keep
    # them until backward (0); "bf16" = MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32).
    # Plain config columns (no role): in the key and the series, read at these defaults from
    # rows written before FSDP existed (they were measured unsharded).
    fsdp: int = 0
    reshard_after_forward: int = 1
    fsdp_mp: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.rules, Rules):
            object.__setattr__(self, "rules", Rules.of(self.rules))

    def label(self) -> str:
        zero = f" zero/{self.ranks}" if self.zero else ""
        if self.fsdp > 1:
            zero += f" fsdp/{self.fsdp}" + ("" if self.reshard_after_forward else " keep-after-fwd") + \
                ("" if self.fsdp_mp == "none" else f" mp={self.fsdp_mp}")
        target = f" target={self.target}" if self.target != Target.CPU else ""
        sib = " step-in-backward" if self.step_in_backward else ""
        return (f"{self.combo} {self.model} w={self.width} d={self.depth} b={self.batch} {self.dtype} "
                f"amp={self.amp} {self.impl}{zero}{target}{sib}")

    def record_key(self, probe: str) -> tuple:
        """The key a record of this config, measured on `probe`, will have (see config_key)."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(Config)}
        return config_key({**row, "probe": probe, "target": effective_target(probe, self.target)})


@dataclass(frozen=True)
class OptimizerRecord:
    """One child optimizer of a config: its rule, class, implementation and state bytes
    (walked: unique storages, exact; of which per-tensor scalars; each rounded to 512;
    expected from the registry's formula; step temporaries: its step's peak above its start).

    On the tracked and fake probes `impl` is observed (the `_fused_*`/`_foreach_*` kernels its
    step ran; `kernel:<ns>` for a library's own ops), elsewhere torch's flags. The ledger also
    attributes state by allocation: `state_attributed_bytes` are the storages its
    construction and steps allocated that are still alive; `state_gap_bytes` = attributed -
    walked (> 0: state the walk cannot reach; < 0: walked state allocated elsewhere); None
    where nothing attributes (cuda probe). `compiled`: None when its step entered no
    `torch.compile`d code, "eager-under-probe" when the probe ran that code eagerly (tracked,
    fake), "compiled" when it ran compiled (cuda), "unknown: ..." when a C profiler (cProfile)
    held the hook that counts compiled calls.
    """

    name: str = ""
    rule: str | None = None
    optimizer: str = ""
    impl: str | None = None
    n_params: int | None = None
    n_param_tensors: int | None = None
    n_tensors: int | None = None
    state_bytes: int | None = None
    state_scalar_bytes: int | None = None
    state_alloc_bytes: int | None = None
    expected: int | None = None
    step_temp_bytes: int | None = None
    state_attributed_bytes: int | None = None
    state_gap_bytes: int | None = field(default=None, metadata={SIGNED: True})
    compiled: str | None = None
    # its step()'s work (instrument/work.py): FLOPs, bytes read + written, kernels; None
    # where nothing counts work (cuda probe)
    work_flops: int | None = None
    work_bytes: int | None = None
    work_kernels: int | None = None


@dataclass(frozen=True)
class WorkRecord:
    """One phase's work (instrument/work.py), and its predicted time on the record's `gpu`."""

    phase: str = ""
    flops: int = 0
    bytes: int = 0
    kernels: int = 0
    predicted_ms: float | None = None


@dataclass(frozen=True)
class RankRecord:
    """One rank of a ZeRO or FSDP config: its partition's state and peak, its outcome, and its
    optimizers (name, optimizer, n_params, n_param_tensors, state_bytes).

    FSDP (config fsdp > 1) fills the rest: the rank's sharded parameters (local shards with
    their padding), sharded gradients, phase peaks, and what FSDP2 itself holds per phase
    (instrument/fsdp.py): the peak bytes of unsharded parameters (all-gather outputs) live in
    forward and in backward, of the all-gather staging buffers, and of the reduce-scatter
    inputs. `same_as`: the rank whose run these numbers are, where the fake probe simulated one
    rank for every rank whose shards are the same size (None: measured on this rank)."""

    rank: int = 0
    state_bytes: int | None = None
    state_scalar_bytes: int | None = None
    state_alloc_bytes: int | None = None
    expected: int | None = None
    n_params: int | None = None
    n_param_tensors: int | None = None
    peak_total: int | None = None
    status: str | None = None
    error: str | None = None
    by_optimizer: tuple[OptimizerRecord, ...] = ()
    # FSDP's per-rank bytes (Role.MEMORY: exact on the deterministic probes, compared per rank)
    param_bytes: int | None = _role(Role.MEMORY)
    grad_bytes: int | None = _role(Role.MEMORY)
    mem_step_start: int | None = _role(Role.MEMORY)
    peak_forward: int | None = _role(Role.MEMORY)
    peak_backward: int | None = _role(Role.MEMORY)
    peak_step: int | None = _role(Role.MEMORY)
    peak_zero_grad: int | None = _role(Role.MEMORY)
    mem_after_step: int | None = _role(Role.MEMORY)
    unsharded_forward: int | None = _role(Role.MEMORY)
    unsharded_backward: int | None = _role(Role.MEMORY)
    all_gather_forward: int | None = _role(Role.MEMORY)
    all_gather_backward: int | None = _role(Role.MEMORY)
    reduce_scatter_backward: int | None = _role(Role.MEMORY)
    same_as: int | None = None


#: why a measured step that did not end where it started (`Record.step_growth` nonzero) cannot
#: be trusted: the words of every place that flags one (card, report, fit, plan)
UNSTEADY_WHY = "optimizer state was still being made (too few warm-up steps) or memory leaks across steps"


@dataclass(frozen=True)
class Record(Config):
    """One config's measurements. Memory in bytes (CUDA `memory_allocated` semantics), time in ms.

    Fields that a failed config never reached stay None; `status` says why.
    """

    # identity of the run
    schema: str = SCHEMA
    run_id: str = ""
    created_at: str = ""
    git_sha: str | None = None
    torch: str = ""
    device_name: str = ""
    probe: str = field(default=Probe.TRACKED.value, metadata={ROLE: Role.WHERE, CONFIG: True})
    preset: str | None = None
    # sizes (param/grad/state in allocated semantics unless said otherwise)
    n_params: int | None = _role(Role.MEMORY)
    param_bytes: int | None = _role(Role.MEMORY, gated=True)
    # the model's buffers (BatchNorm running stats, ...), apart from its parameters; None in
    # records written before it was measured (param_bytes then held both)
    buffer_bytes: int | None = _role(Role.BYTES)
    grad_bytes: int | None = _role(Role.MEMORY, gated=True)
    # exact bytes of the unique storages in every optimizer's state (requested semantics),
    # of which per-tensor scalars (step, mu_product, ...); alloc = rounded to 512 per storage
    opt_state_bytes: int | None = _role(Role.MEMORY, gated=True)
    opt_state_scalar_bytes: int | None = _role(Role.MEMORY)
    opt_state_alloc_bytes: int | None = _role(Role.MEMORY)
    # a formula, not a measurement: never gated
    opt_state_expected: int | None = _role(Role.MEMORY)
    optimizers: tuple[OptimizerRecord, ...] = ()
    # ZeRO (zero == 1): every per-rank field of the record (param/grad/state bytes, phases,
    # peaks, optimizers, time) is RANK 0's; every rank is summarised in `ranks_state`.
    # opt_state_unsharded = the sum of every rank's state_bytes = the state one process would
    # hold without ZeRO (the partitions are disjoint); the ZeRO paper's model for a rank is
    # opt_state_unsharded / ranks, which whole-parameter partitions miss by up to one tensor's
    # state. n_params stays the whole model's; per-optimizer n_params are rank 0's partition.
    # For zero == 0 ranks_state stays empty and opt_state_unsharded None.
    ranks_state: tuple[RankRecord, ...] = ()
    opt_state_unsharded: int | None = _role(Role.BYTES)
    # memory per phase (the gate compares the peaks; the levels are implied by them)
    mem_base: int | None = _role(Role.MEMORY)
    mem_step_start: int | None = _role(Role.MEMORY)
    mem_after_zero_grad: int | None = _role(Role.MEMORY)
    peak_zero_grad: int | None = _role(Role.MEMORY, gated=True)
    mem_after_forward: int | None = _role(Role.MEMORY)
    peak_forward: int | None = _role(Role.MEMORY, gated=True)
    mem_after_backward: int | None = _role(Role.MEMORY)
    peak_backward: int | None = _role(Role.MEMORY, gated=True)
    mem_after_step: int | None = _role(Role.MEMORY)
    peak_step: int | None = _role(Role.MEMORY, gated=True)
    step_temp_bytes: int | None = _role(Role.MEMORY, gated=True)
    peak_total: int | None = _role(Role.MEMORY, gated=True)
    # allocated after the measured step returned (its loss released): mem_step_start again
    # when the step is steady; else state was still being made (too few warm-up steps) or
    # memory leaks across steps, and the step's numbers may not repeat (`step_growth`)
    mem_step_end: int | None = _role(Role.MEMORY)
    # reserved memory: the cuda probe's, or the allocator model's on a CPU probe with
    # target "cuda" (None elsewhere); alloc_model names that model and the torch rules it follows
    reserved_after_step: int | None = _role(Role.BYTES)
    # what decides an out-of-memory error on CUDA: gated where both sides have it
    peak_reserved: int | None = _role(Role.BYTES, gated=True)
    alloc_model: str | None = None
    # target "cuda" on a CPU probe: what ran whose CUDA kernels allocate differently and is not
    # modelled (e.g. "attention (SDPA kernels)"); the numbers are then not CUDA's to the byte
    unmodelled: str | None = None
    # time
    step_ms_median: float | None = _role(Role.TIME)
    step_ms_iqr: float | None = _role(Role.TIME)
    step_ms_min: float | None = _role(Role.TIME)
    step_ms_mean: float | None = _role(Role.TIME)
    steps_timed: int = _role(Role.TIME, 0)
    # the warm-up steps run before the measured one (Protocol.warmup; the probe's default when
    # not given); None in records written before it was kept
    warmup_steps: int | None = _role(Role.TIME)
    # the timed samples themselves (ms, each the mean of a block of steps), and the host's own
    # noise while they ran: a fixed calibration kernel (`host_calib` names it) timed around and
    # between them (`host_calib_ms`), and its spread, IQR / median (`host_noise`). Empty / None
    # in records written before they were measured; the gate then cannot tell noise from a change.
    step_ms_samples: tuple[float, ...] = ()
    host_calib: str | None = None
    host_calib_ms: tuple[float, ...] = ()
    host_noise: float | None = _role(Role.TIME)
    # the fraction of the timed window this process's threads spent runnable but waiting for a
    # CPU (the scheduler's count, timing.runqueue_ms): another job on the cores. None where the
    # system does not say, and in records written before it was measured
    host_wait: float | None = _role(Role.TIME)
    # work per phase and of the whole step (instrument/work.py; tracked and fake probes, None or
    # empty elsewhere): exact and deterministic, so gated like memory
    work: tuple[WorkRecord, ...] = ()
    step_flops: int | None = _role(Role.WORK)
    step_bytes: int | None = _role(Role.WORK)
    step_kernels: int | None = _role(Role.WORK)
    # predicted step time on a named GPU (instrument/gpu.py) from the work counters; what the
    # model was checked against and how far off it was there
    gpu: str | None = None
    predicted_step_ms: float | None = None
    predicted_device_ms: float | None = None
    predicted_check: str | None = None
    # outcome
    status: str = Status.OK.value
    error: str | None = None

    def __post_init__(self) -> None:
        # A record keeps the rule text it was stored with: parsed (`Rules`) when it parses, as
        # every record this version writes does, else kept as text: reading never refuses a
        # row for its rules; only a Config (what is about to be measured) must parse.
        try:
            super().__post_init__()
        except UsageError:
            pass

    def to_dict(self) -> dict[str, Any]:
        """The row as stored: fields in `FIELDS` order, sub-records as lists of dicts."""
        return {k: plain(getattr(self, k)) for k in FIELDS}

    def key(self) -> tuple:
        return tuple(getattr(self, c) for c in CONFIG_COLUMNS)

    def config(self) -> Config:
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})

    def by_optimizer(self) -> list[dict[str, Any]]:
        return plain(self.optimizers)

    @property
    def step_growth(self) -> int | None:  # nonzero: flagged wherever shown, with UNSTEADY_WHY
        """Bytes the measured step left allocated beyond its start: 0 when steady, None when
        not measured (a failed config, a record from before `mem_step_end`)."""
        if self.mem_step_end is None or self.mem_step_start is None:
            return None
        return self.mem_step_end - self.mem_step_start

    def by_rank(self) -> list[dict[str, Any]]:
        return plain(self.ranks_state)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        """A record from a row of any schema version (unknown fields dropped)."""
        row = upgrade(dict(d))
        kept = {k: v for k, v in row.items() if k in _NAMES}
        kept["optimizers"] = _subrecords(OptimizerRecord, kept.get("optimizers"))
        kept["ranks_state"] = _subrecords(RankRecord, kept.get("ranks_state"))
        for c in SAMPLE_COLUMNS:  # tuples, as measured: a frozen record stays hashable
            kept[c] = tuple(kept.get(c) or ())
        kept["work"] = _subrecords(WorkRecord, kept.get("work"))
        return cls(**kept)


def plain(value: Any) -> Any:
    """A field's value as a stored row holds it: sub-records as dicts, tuples as lists (so
    equal rows compare equal), every other value as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- columns
# Every list below is read from the field declarations above; none is written out by hand.

_NAMES = frozenset(f.name for f in dataclasses.fields(Record))
_CONFIG_FIELDS: tuple[dataclasses.Field, ...] = (
    *(f for f in dataclasses.fields(Record) if f.metadata.get(CONFIG)), *dataclasses.fields(Config))


def _with_role(*roles: Role | None, fields: tuple[dataclasses.Field, ...] = _CONFIG_FIELDS) -> tuple[str, ...]:
    return tuple(f.name for f in fields if f.metadata.get(ROLE) in roles)


# Columns that identify a config. Two records with equal values here measured the same thing.
CONFIG_COLUMNS: tuple[str, ...] = tuple(f.name for f in _CONFIG_FIELDS)
# The gate's key: a combo is known by its name, its rule text (a DETAIL) is not part of it.
KEY_COLUMNS: tuple[str, ...] = tuple(c for c in CONFIG_COLUMNS if c not in _with_role(Role.DETAIL))
# What tells two series apart besides the combo's name: every plain config column, then
# where it ran. Width and batch are a series' axes; rules are spelled out by the combo.
SERIES_COLUMNS: tuple[str, ...] = (*_with_role(None), *_with_role(Role.WHERE))
# A config's name, column by column in the order they are tried (the gate names a config by
# the fewest of these that tell it from the others).
NAME_COLUMNS: tuple[str, ...] = (*_with_role(Role.NAME), *_with_role(Role.AXIS), *SERIES_COLUMNS,
                                 *_with_role(Role.DETAIL))
# The config columns of the optimizer choice (the combo's name and its rules).
OPTIMIZER_COLUMNS: tuple[str, ...] = _with_role(Role.NAME, Role.DETAIL)

_ALL = dataclasses.fields(Record)
# Memory metrics in bytes (and n_params), compared exactly on deterministic probes.
MEMORY_COLUMNS: tuple[str, ...] = _with_role(Role.MEMORY, fields=_ALL)
# Every byte count a record holds (checked as non-negative integers).
BYTE_COLUMNS: tuple[str, ...] = _with_role(Role.MEMORY, Role.BYTES, fields=_ALL)
TIME_COLUMNS: tuple[str, ...] = _with_role(Role.TIME, fields=_ALL)
# The per-rank memory columns an FSDP config adds to `ranks_state` (RankRecord's Role.MEMORY).
RANK_FSDP_COLUMNS: tuple[str, ...] = _with_role(Role.MEMORY, fields=dataclasses.fields(RankRecord))
# Lists of timed samples (ms): the step's and the host's calibration kernel's.
SAMPLE_COLUMNS: tuple[str, ...] = ("step_ms_samples", "host_calib_ms")
# Work counters of the whole step (instrument/work.py), exact on deterministic probes.
WORK_COLUMNS: tuple[str, ...] = _with_role(Role.WORK, fields=_ALL)
# The memory metrics the regression gate compares.
GATED_COLUMNS: tuple[str, ...] = tuple(f.name for f in _ALL if f.metadata.get(GATED))

# The value a row written before a config column existed was measured at: the field's
# `ABSENT` function of the row, else its default. Only the columns of schema 1's first files
# are required; any column added since (zero, ranks, target, and every later one) is filled.
_FIRST_COLUMNS = frozenset(("probe", "device", "model", "width", "depth", "batch", "dtype", "amp", "combo",
                            "rules", "impl", "zero_grad_at", "seed"))
_WHEN_ABSENT: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    f.name: f.metadata.get(ABSENT, lambda _row, d=f.default: d) for f in _CONFIG_FIELDS if f.name not in _FIRST_COLUMNS}
CONFIG_DEFAULTS: dict[str, Any] = {f.name: f.default for f in _CONFIG_FIELDS if f.name in _WHEN_ABSENT}

# Identity first, then the config, then what was measured: the order of a stored row.
_IDENTITY = ("schema", "run_id", "created_at", "git_sha", "torch", "device", "device_name", "probe", "preset")
FIELDS: tuple[str, ...] = (*_IDENTITY, *(f.name for f in dataclasses.fields(Record) if f.name not in _IDENTITY))


# --------------------------------------------------------------------------- types

_SCALARS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


def scalar_type(f: dataclasses.Field) -> tuple[type | None, bool]:
    """The scalar type a field holds (int, float, bool or str; None for anything else:
    sub-records, parsed values) and whether it may be None, read from its annotation. The one
    place a type is recovered from one (annotations are text here: `from __future__`)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    named = [p for p in parts if p != "None"]
    return (_SCALARS.get(named[0]) if len(named) == 1 else None), optional


def scalar_types(cls: type) -> dict[str, type | None]:
    """Field name -> its scalar type (`scalar_type`) for a record class."""
    return {f.name: scalar_type(f)[0] for f in dataclasses.fields(cls)}


def _subrecords(cls: type, items: Any) -> tuple:
    """Typed sub-records from stored dicts (unknown keys dropped); a rank's optimizers too."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = []
    for item in items or ():
        if not isinstance(item, cls):
            kept = {k: v for k, v in item.items() if k in names}
            if cls is RankRecord:
                kept["by_optimizer"] = _subrecords(OptimizerRecord, kept.get("by_optimizer"))
            item = cls(**kept)
        out.append(item)
    return tuple(out)


def config_key(row: "Mapping[str, Any] | Record") -> tuple:
    """The config key of a record, or of a record dict (JSON round-trips keep these values
    comparable); a column the dict lacks takes the value it was measured at."""
    if isinstance(row, Record):
        return row.key()
    return tuple(row[c] if c in row else _WHEN_ABSENT.get(c, _none)(row) for c in CONFIG_COLUMNS)


def _none(_row: Mapping[str, Any]) -> None:
    return None


def upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """Bring a row of an earlier schema to this one, in place (and return it): v1's JSON-text
    lists become nested lists, config columns added later take the value they were measured at."""
    if row.get("schema") == "multiopt.record/1":
        for old, new in (("opt_state_by_optimizer", "optimizers"), ("opt_state_by_rank", "ranks_state")):
            if old in row:
                text = row.pop(old)
                row[new] = json.loads(text) if isinstance(text, str) and text else (text or [])
    if row.get("schema") in SCHEMAS:
        row["schema"] = SCHEMA
    for c, when_absent in _WHEN_ABSENT.items():  # written before the column existed
        if c not in row:
            row[c] = when_absent(row)
    return row


def check_schema(row: dict[str, Any], where: str) -> None:
    """Refuse a row of an unknown schema or without its config columns; upgrade (in place) a
    row of an earlier schema. `where` names the row in the message (file:line)."""
    schema = row.get("schema")
    if schema is None:
        raise UsageError(f"{where}: no 'schema' field; not a multiopt record")
    if schema not in SCHEMAS:
        raise UsageError(f"{where}: schema {schema!r} is not one of {', '.join(SCHEMAS)}; "
                         "re-run the sweep with this version, or upgrade multiopt to read it")
    try:
        upgrade(row)
    except (json.JSONDecodeError, TypeError) as e:
        raise UsageError(f"{where}: a per-optimizer or per-rank list is not valid JSON ({e})") from None
    for new in ("optimizers", "ranks_state"):
        items = row.get(new)
        if items is not None and not (isinstance(items, list) and all(isinstance(o, dict) for o in items)):
            raise UsageError(f"{where}: {new!r} is not a list of objects")
    missing = [c for c in CONFIG_COLUMNS + ("status",) if c not in row]
    if missing:
        raise UsageError(f"{where}: record lacks {', '.join(missing)}")
    check_values(row, where)


# Byte counts beyond this are not bytes any machine holds (and overflow int64 columns).
MAX_BYTES = 1 << 62
_CONFIG_TYPES: dict[str, tuple[type | None, bool]] = {f.name: scalar_type(f) for f in _CONFIG_FIELDS}
# A sub-record's counts: its int fields, each non-negative unless declared SIGNED.
_SUB_COUNTS: dict[str, tuple[str, ...]] = {
    list_name: tuple(f.name for f in dataclasses.fields(cls) if scalar_type(f)[0] is int and not f.metadata.get(SIGNED))
    for list_name, cls in (("optimizers", OptimizerRecord), ("ranks_state", RankRecord))}


def check_values(row: Mapping[str, Any], where: str) -> None:
    """Refuse values no measurement writes: a config column of the wrong type, bytes that are
    not non-negative integers (a boolean is not a number), a time that is not a finite
    non-negative number, an unknown status. `where` names the row."""
    for c in CONFIG_COLUMNS:
        want, optional = _CONFIG_TYPES[c]
        want = want or str  # a parsed value (rules) is stored as its text
        if not (_is(row[c], want) or (optional and row[c] is None)):
            raise UsageError(f"{where}: {c} is {_show(row[c])}, expected {want.__name__}")
    if row["status"] not in STATUSES:
        raise UsageError(f"{where}: status is {_show(row['status'])}, expected one of {', '.join(STATUSES)}")
    for c in BYTE_COLUMNS:
        _check_count(row.get(c), f"{where}: {c}")
    for c in (*TIME_COLUMNS, "predicted_step_ms", "predicted_device_ms"):
        v = row.get(c)
        if v is not None and not (_is(v, float) and v >= 0):
            raise UsageError(f"{where}: {c} is {_show(v)}, expected a non-negative number or null")
    for c in SAMPLE_COLUMNS:
        v = row.get(c)
        if v is not None and not (isinstance(v, (list, tuple)) and all(_is(x, float) and x >= 0 for x in v)):
            raise UsageError(f"{where}: {c} is {_show(v)}, expected a list of non-negative numbers")
    for c in ("error", "unmodelled", "host_calib", "gpu", "predicted_check"):
        if row.get(c) is not None and not isinstance(row[c], str):
            raise UsageError(f"{where}: {c} is {_show(row[c])}, expected text or null")
    for c in WORK_COLUMNS:
        _check_count(row.get(c), f"{where}: {c}")
    for i, item in enumerate(row.get("work") or ()):
        if not isinstance(item, dict):
            raise UsageError(f"{where}: work[{i}] is {_show(item)}, expected an object")
        for c in ("flops", "bytes", "kernels"):
            _check_count(item.get(c), f"{where}: work[{i}].{c}")
    for list_name, counts in _SUB_COUNTS.items():
        for i, item in enumerate(row.get(list_name) or ()):
            for c in counts:
                _check_count(item.get(c), f"{where}: {list_name}[{i}].{c}")


def _is(value: Any, want: type) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # True is an int to Python, never a count or a size to a record
    if want is float:
        return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")
    return isinstance(value, want)


def _check_count(value: Any, what: str) -> None:
    if value is not None and not (_is(value, int) and 0 <= value <= MAX_BYTES):
        raise UsageError(f"{what} is {_show(value)}, expected a non-negative integer or null")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
