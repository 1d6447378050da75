"""The record: one config's measurements as one flat, versioned row.

Everything downstream (JSONL store, DataFrame, report, gate) reads this schema and nothing
else, so it is defined once here. Bump `SCHEMA` when a field changes meaning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UsageError

SCHEMA = "multiopt.record/1"

# Columns that identify a config. Two records with equal values here measured the same thing.
CONFIG_COLUMNS: tuple[str, ...] = (
    "probe", "device", "model", "width", "depth", "batch", "dtype", "amp",
    "combo", "rules", "impl", "zero_grad_at", "seed", "zero", "ranks",
)

# Config columns added after records were first written: a record without one of them was
# measured at this value (`check_schema` fills it in, `config_key` reads it), so old results
# and baselines keep loading and keep their keys.
CONFIG_DEFAULTS: dict[str, Any] = {"zero": 0, "ranks": 1}

# Memory metrics in bytes, compared exactly on deterministic probes.
MEMORY_COLUMNS: tuple[str, ...] = (
    "n_params", "param_bytes", "grad_bytes", "opt_state_bytes", "opt_state_scalar_bytes",
    "opt_state_alloc_bytes", "opt_state_expected", "mem_base", "mem_step_start", "mem_after_zero_grad", "peak_zero_grad", "mem_after_forward", "peak_forward",
    "mem_after_backward", "peak_backward", "mem_after_step", "peak_step", "step_temp_bytes",
    "peak_total",
)

TIME_COLUMNS: tuple[str, ...] = (
    "step_ms_median", "step_ms_iqr", "step_ms_min", "step_ms_mean", "steps_timed",
)

STATUSES: tuple[str, ...] = ("ok", "oom", "diverged", "error")


@dataclass(frozen=True)
class Record:
    """One config's measurements. Memory in bytes (CUDA `memory_allocated` semantics), time in ms.

    Fields that a failed config never reached stay None; `status` says why.
    """

    # identity of the run
    schema: str = SCHEMA
    run_id: str = ""
    created_at: str = ""
    git_sha: str | None = None
    torch: str = ""
    device: str = "cpu"
    device_name: str = ""
    probe: str = "tracked"
    preset: str | None = None
    # config
    model: str = "mlp"
    width: int = 0
    depth: int = 0
    batch: int = 0
    dtype: str = "float32"
    amp: str = "none"
    combo: str = ""
    rules: str = ""
    impl: str = "default"
    zero_grad_at: str = "end"
    seed: int = 0
    # ZeRO-1 (torch.distributed.optim.ZeroRedundancyOptimizer around every optimizer): 0 or 1;
    # ranks = how many ranks this one config ran across (1 unless zero == 1)
    zero: int = 0
    ranks: int = 1
    # sizes (param/grad/state in allocated semantics unless said otherwise)
    n_params: int | None = None
    param_bytes: int | None = None
    grad_bytes: int | None = None
    # exact bytes of the unique storages in every optimizer's state (requested semantics),
    # of which per-tensor scalars (step, mu_product, ...); alloc = rounded to 512 per storage
    opt_state_bytes: int | None = None
    opt_state_scalar_bytes: int | None = None
    opt_state_alloc_bytes: int | None = None
    opt_state_expected: int | None = None
    # JSON list, one object per optimizer: name, rule, optimizer, n_params, n_tensors,
    # state_bytes, state_scalar_bytes, state_alloc_bytes, expected, step_temp_bytes
    opt_state_by_optimizer: str = "[]"
    # ZeRO (zero == 1): every per-rank field of the record (param/grad/state bytes, phases,
    # peaks, opt_state_by_optimizer, time) is RANK 0's; the other ranks are summarised here as a
    # JSON list, one object per rank: rank, state_bytes, state_scalar_bytes, state_alloc_bytes,
    # expected, n_params, n_param_tensors (this rank's partition), peak_total, status, error,
    # by_optimizer (name, optimizer, n_params, n_param_tensors, state_bytes per optimizer).
    # opt_state_unsharded = the sum of every rank's state_bytes = the state one process would
    # hold without ZeRO (the partitions are disjoint); the ZeRO paper's model for a rank is
    # opt_state_unsharded / ranks, which whole-parameter partitions miss by up to one tensor's
    # state. n_params stays the whole model's; per-optimizer n_params are rank 0's partition.
    # For zero == 0 opt_state_by_rank stays "[]" and opt_state_unsharded None.
    opt_state_by_rank: str = "[]"
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
    # CUDA-only (None elsewhere)
    reserved_after_step: int | None = None
    peak_reserved: int | None = None
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
        return dataclasses.asdict(self)

    def key(self) -> tuple:
        return tuple(getattr(self, c) for c in CONFIG_COLUMNS)

    def by_optimizer(self) -> list[dict[str, Any]]:
        return json.loads(self.opt_state_by_optimizer or "[]")

    def by_rank(self) -> list[dict[str, Any]]:
        return json.loads(self.opt_state_by_rank or "[]")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Record))


def config_key(row: dict[str, Any]) -> tuple:
    """The config key of a record dict (JSON round-trips keep these values comparable); a
    column the row lacks takes its `CONFIG_DEFAULTS` value."""
    return tuple(row.get(c, CONFIG_DEFAULTS.get(c)) for c in CONFIG_COLUMNS)


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; keep the file strict so every JSON reader can parse it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(record: Record | dict[str, Any]) -> str:
    d = record.to_dict() if isinstance(record, Record) else record
    return json.dumps({k: _clean(v) for k, v in d.items()}, sort_keys=False, allow_nan=False)


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file. A torn last line (a killed writer) is skipped; any other bad
    line is a UsageError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail and i == len(lines):
                return  # the writer was killed mid-line; that config is simply not recorded
            raise UsageError(f"{path}:{i}: not valid JSON ({e.msg}); is this a multiopt results file?") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
        check_schema(row, f"{path}:{i}")
        yield row


def check_schema(row: dict[str, Any], where: str) -> None:
    """Refuse a row of another schema or without its config columns; fill in (in place) the
    `CONFIG_DEFAULTS` columns a row written before they existed lacks."""
    schema = row.get("schema")
    if schema is None:
        raise UsageError(f"{where}: no 'schema' field; not a multiopt record")
    if schema != SCHEMA:
        raise UsageError(f"{where}: schema {schema!r} is not {SCHEMA!r}; re-run the sweep with this version")
    for c, default in CONFIG_DEFAULTS.items():  # written before the column existed
        row.setdefault(c, default)
    missing = [c for c in CONFIG_COLUMNS + ("status",) if c not in row]
    if missing:
        raise UsageError(f"{where}: record lacks {', '.join(missing)}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def append_jsonl(path: str | Path, records: Iterable[Record | dict[str, Any]]) -> None:
    """Append and fsync, one line per record, so a killed sweep loses at most the line being written."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(path: Path) -> None:
    """A writer killed mid-line leaves a partial last line: cut it so the file stays valid.
    Reads from the end only, so appending stays cheap however long the file grows."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos, chunk = size, 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)
