"""The record: one config's measurements as one flat, versioned row.

Everything downstream (JSONL store, DataFrame, report, gate) reads this schema and nothing
else, so it is defined once here. A `Record` is the `Config` it measured (the config
columns are Config's fields, declared once) plus what was measured; per-optimizer and
per-rank results are typed sub-records, stored as nested JSON lists in the row.

Schema history (readers accept every version; `upgrade` brings an old row to this one):

- ``multiopt.record/1``: per-optimizer and per-rank results as JSON *text* in
  ``opt_state_by_optimizer`` / ``opt_state_by_rank``; ``zero``/``ranks`` absent in the first
  files (ZeRO came later: 0 and 1).
- ``multiopt.record/2``: those lists as nested JSON in ``optimizers`` / ``ranks_state``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UsageError

SCHEMA = "multiopt.record/2"
SCHEMAS: tuple[str, ...] = ("multiopt.record/1", SCHEMA)

STATUSES: tuple[str, ...] = ("ok", "oom", "diverged", "error")

# The four phases of a training step, as the Trainer names them and the record stores them
# (`mem_after_<phase>`, `peak_<phase>`); execution order depends on zero_grad_at (see phase_order).
PHASES: tuple[str, ...] = ("zero_grad", "forward", "backward", "step")


def phase_order(zero_grad_at: str) -> tuple[str, ...]:
    """Execution order of the four phases for a zero_grad placement ("start" or "end")."""
    if zero_grad_at == "start":
        return ("zero_grad", "forward", "backward", "step")
    return ("forward", "backward", "step", "zero_grad")


@dataclass(frozen=True)
class Config:
    """What is measured: model, sizes, dtypes and the optimizer combo. Its fields are the
    record's config columns; `rules` holds the canonical rule text (`spec.format_rules`)."""

    device: str = "cpu"
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
    # ZeRO-1: 1 = every optimizer wrapped in ZeroRedundancyOptimizer, the config run by
    # `ranks` ranks together (torchrun); 0 = one process, ranks == 1
    zero: int = 0
    ranks: int = 1
    # the device whose numbers a CPU probe reports: "cpu" (this machine) or "cuda" (what a
    # CUDA device would report: its optimizer defaults, workspaces, caching allocator)
    target: str = "cpu"
    # FSDP2 (`fully_shard` on each block and the root): the sharding degree, 0 or 1 = none;
    # whether blocks free their unsharded parameters after forward (1, FSDP2's default) or keep
    # them until backward (0); "bf16" = MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)
    fsdp: int = 0
    reshard_after_forward: int = 1
    fsdp_mp: str = "none"

    def label(self) -> str:
        zero = f" zero/{self.ranks}" if self.zero else ""
        if self.fsdp > 1:
            zero += f" fsdp/{self.fsdp}" + ("" if self.reshard_after_forward else " keep-after-fwd") + \
                ("" if self.fsdp_mp == "none" else f" mp={self.fsdp_mp}")
        target = f" target={self.target}" if self.target != "cpu" else ""
        return (f"{self.combo} {self.model} w={self.width} d={self.depth} b={self.batch} {self.dtype} "
                f"amp={self.amp} {self.impl}{zero}{target}")

    def record_key(self, probe: str) -> tuple:
        """The key a record of this config, measured on `probe`, will have (see config_key)."""
        target = "cuda" if probe == "cuda" else self.target  # a cuda probe reports CUDA's numbers
        return config_key({**dataclasses.asdict(self), "probe": probe, "target": target})


# Columns that identify a config. Two records with equal values here measured the same thing.
CONFIG_COLUMNS: tuple[str, ...] = ("probe", *(f.name for f in dataclasses.fields(Config)))

# Config columns added after records were first written: a record without one of them was
# measured at this value (`upgrade` fills it in, `config_key` reads it), so old results and
# baselines keep loading and keep their keys.
# `target` came later too: an older record reported what its own device allocates, so its
# target is its device ("cuda" for cuda-probe records), see `_column_default`.
CONFIG_DEFAULTS: dict[str, Any] = {"zero": 0, "ranks": 1, "target": "cpu", "fsdp": 0, "reshard_after_forward": 1,
                                   "fsdp_mp": "none"}


def _column_default(row: Mapping[str, Any], column: str) -> Any:
    """The value a row written before `column` existed was measured at."""
    if column == "target":
        return "cuda" if row.get("probe") == "cuda" or str(row.get("device", "")).startswith("cuda") else "cpu"
    return CONFIG_DEFAULTS.get(column)

# Memory metrics in bytes, compared exactly on deterministic probes.
MEMORY_COLUMNS: tuple[str, ...] = (
    "n_params", "param_bytes", "grad_bytes", "opt_state_bytes", "opt_state_scalar_bytes",
    "opt_state_alloc_bytes", "opt_state_expected", "mem_base", "mem_step_start", "mem_after_zero_grad",
    "peak_zero_grad", "mem_after_forward", "peak_forward", "mem_after_backward", "peak_backward",
    "mem_after_step", "peak_step", "step_temp_bytes", "peak_total",
)

TIME_COLUMNS: tuple[str, ...] = (
    "step_ms_median", "step_ms_iqr", "step_ms_min", "step_ms_mean", "steps_timed",
)


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
    state_gap_bytes: int | None = None
    compiled: str | None = None


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
    param_bytes: int | None = None
    grad_bytes: int | None = None
    mem_step_start: int | None = None
    peak_forward: int | None = None
    peak_backward: int | None = None
    peak_step: int | None = None
    peak_zero_grad: int | None = None
    mem_after_step: int | None = None
    unsharded_forward: int | None = None
    unsharded_backward: int | None = None
    all_gather_forward: int | None = None
    all_gather_backward: int | None = None
    reduce_scatter_backward: int | None = None
    same_as: int | None = None


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
    probe: str = "tracked"
    preset: str | None = None
    # sizes (param/grad/state in allocated semantics unless said otherwise)
    n_params: int | None = None
    param_bytes: int | None = None
    # the model's buffers (BatchNorm running stats, ...), apart from its parameters; None in
    # records written before it was measured (param_bytes then held both)
    buffer_bytes: int | None = None
    grad_bytes: int | None = None
    # exact bytes of the unique storages in every optimizer's state (requested semantics),
    # of which per-tensor scalars (step, mu_product, ...); alloc = rounded to 512 per storage
    opt_state_bytes: int | None = None
    opt_state_scalar_bytes: int | None = None
    opt_state_alloc_bytes: int | None = None
    opt_state_expected: int | None = None
    optimizers: tuple[OptimizerRecord, ...] = ()
    # ZeRO (zero == 1): every per-rank field of the record (param/grad/state bytes, phases,
    # peaks, optimizers, time) is RANK 0's; every rank is summarised in `ranks_state`.
    # opt_state_unsharded = the sum of every rank's state_bytes = the state one process would
    # hold without ZeRO (the partitions are disjoint); the ZeRO paper's model for a rank is
    # opt_state_unsharded / ranks, which whole-parameter partitions miss by up to one tensor's
    # state. n_params stays the whole model's; per-optimizer n_params are rank 0's partition.
    # For zero == 0 ranks_state stays empty and opt_state_unsharded None.
    ranks_state: tuple[RankRecord, ...] = ()
    opt_state_unsharded: int | None = None
    # memory per phase
    mem_base: int | None = None
    mem_step_start: int | None = None
    mem_after_zero_grad: int | None = None
    peak_zero_grad: int | None = None
    mem_after_forward: int | None = None
    peak_forward: int | None = None
    mem_after_backward: int | None = None
    peak_backward: int | None = None
    mem_after_step: int | None = None
    peak_step: int | None = None
    step_temp_bytes: int | None = None
    peak_total: int | None = None
    # reserved memory: the cuda probe's, or the allocator model's on a CPU probe with
    # target "cuda" (None elsewhere); alloc_model names that model and the torch rules it follows
    reserved_after_step: int | None = None
    peak_reserved: int | None = None
    alloc_model: str | None = None
    # target "cuda" on a CPU probe: what ran whose CUDA kernels allocate differently and is not
    # modelled (e.g. "attention (SDPA kernels)"); the numbers are then not CUDA's to the byte
    unmodelled: str | None = None
    # time
    step_ms_median: float | None = None
    step_ms_iqr: float | None = None
    step_ms_min: float | None = None
    step_ms_mean: float | None = None
    steps_timed: int = 0
    # outcome
    status: str = "ok"
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as stored: fields in `FIELDS` order, sub-records as lists of dicts."""
        d = dataclasses.asdict(self)
        return {k: _lists(d[k]) for k in FIELDS}

    def key(self) -> tuple:
        return tuple(getattr(self, c) for c in CONFIG_COLUMNS)

    def config(self) -> Config:
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})

    def by_optimizer(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(o) for o in self.optimizers]

    def by_rank(self) -> list[dict[str, Any]]:
        return [_lists(dataclasses.asdict(r)) for r in self.ranks_state]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        """A record from a row of any schema version (unknown fields dropped)."""
        row = upgrade(dict(d))
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in row.items() if k in names}
        kept["optimizers"] = _subrecords(OptimizerRecord, kept.get("optimizers"))
        kept["ranks_state"] = _subrecords(RankRecord, kept.get("ranks_state"))
        return cls(**kept)


# Identity first, then the config, then what was measured: the order of a stored row.
_IDENTITY = ("schema", "run_id", "created_at", "git_sha", "torch", "device", "device_name", "probe", "preset")
FIELDS: tuple[str, ...] = (*_IDENTITY, *(f.name for f in dataclasses.fields(Record) if f.name not in _IDENTITY))


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


def _lists(value: Any) -> Any:
    # asdict keeps tuples as tuples; a stored row has JSON lists, and equal rows compare equal
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def config_key(row: Mapping[str, Any]) -> tuple:
    """The config key of a record dict (JSON round-trips keep these values comparable); a
    column the row lacks takes its `CONFIG_DEFAULTS` value."""
    return tuple(row[c] if c in row else _column_default(row, c) for c in CONFIG_COLUMNS)


def upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """Bring a row of an earlier schema to this one, in place (and return it): v1's JSON-text
    lists become nested lists, config columns added later take their defaults."""
    if row.get("schema") == "multiopt.record/1":
        for old, new in (("opt_state_by_optimizer", "optimizers"), ("opt_state_by_rank", "ranks_state")):
            if old in row:
                text = row.pop(old)
                row[new] = json.loads(text) if isinstance(text, str) and text else (text or [])
        row["schema"] = SCHEMA
    for c in CONFIG_DEFAULTS:  # written before the column existed
        if c not in row:
            row[c] = _column_default(row, c)
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


# The per-rank byte columns an FSDP config adds to `ranks_state` (RankRecord); `same_as` is a rank.
RANK_FSDP_COLUMNS: tuple[str, ...] = (
    "param_bytes", "grad_bytes", "mem_step_start", "peak_forward", "peak_backward", "peak_step", "peak_zero_grad",
    "mem_after_step", "unsharded_forward", "unsharded_backward", "all_gather_forward", "all_gather_backward",
    "reduce_scatter_backward", "same_as")

# Byte counts beyond this are not bytes any machine holds (and overflow int64 columns).
MAX_BYTES = 1 << 62
_CONFIG_TYPES: dict[str, type] = {"probe": str, **{f.name: f.type for f in dataclasses.fields(Config)}}
_BYTE_COLUMNS = (*MEMORY_COLUMNS, "buffer_bytes", "reserved_after_step", "peak_reserved", "opt_state_unsharded")
_SUB_BYTES = ("n_params", "n_param_tensors", "n_tensors", "state_bytes", "state_scalar_bytes", "state_alloc_bytes",
              "expected", "step_temp_bytes", "peak_total", "rank", *RANK_FSDP_COLUMNS)


def check_values(row: Mapping[str, Any], where: str) -> None:
    """Refuse values no measurement writes: a config column of the wrong type, bytes that are
    not non-negative integers (a boolean is not a number), a time that is not a finite
    non-negative number, an unknown status. `where` names the row."""
    for c in CONFIG_COLUMNS:
        want = int if _CONFIG_TYPES[c] in (int, "int") else str
        if not _is(row[c], want):
            raise UsageError(f"{where}: {c} is {_show(row[c])}, expected {want.__name__}")
    if row["status"] not in STATUSES:
        raise UsageError(f"{where}: status is {_show(row['status'])}, expected one of {', '.join(STATUSES)}")
    for c in _BYTE_COLUMNS:
        _check_count(row.get(c), f"{where}: {c}")
    for c in TIME_COLUMNS:
        v = row.get(c)
        if v is not None and not (_is(v, float) and v >= 0):
            raise UsageError(f"{where}: {c} is {_show(v)}, expected a non-negative number or null")
    for c in ("error", "unmodelled"):
        if row.get(c) is not None and not isinstance(row[c], str):
            raise UsageError(f"{where}: {c} is {_show(row[c])}, expected text or null")
    for list_name in ("optimizers", "ranks_state"):
        for i, item in enumerate(row.get(list_name) or ()):
            for c in _SUB_BYTES:
                _check_count(item.get(c), f"{where}: {list_name}[{i}].{c}")


def _is(value: Any, want: type) -> bool:
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
