"""Where records live: JSONL files (one atomic, fsynced writer), run directories and
pytest-benchmark JSON files.

Every reader raises UsageError with one line naming the file (and line) for anything that is
not a valid record file; every writer leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import UsageError
from .kinds import Status
from .record import Record, check_schema


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; keep the file strict so every JSON reader can parse it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(record: Record | dict[str, Any]) -> str:
    d = record.to_dict() if isinstance(record, Record) else record
    return json.dumps({k: _clean(v) for k, v in d.items()}, sort_keys=False, allow_nan=False)


# A record line is a few KiB; anything far beyond is not a record (and would cost seconds to parse).
MAX_LINE_CHARS = 1 << 22
MAX_FILE_CHARS = 1 << 26  # a whole JSON document (env.json, pytest-benchmark JSON)


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def parse_json(text: str, where: str, limit: int = MAX_LINE_CHARS) -> Any:
    """json.loads, strict: NaN/Infinity/1e400, integers past Python's digit limit and deep
    nesting are UsageErrors naming `where`; a syntax error stays a JSONDecodeError (the caller
    knows whether a torn line is allowed)."""
    if len(text) > limit:
        raise UsageError(f"{where}: {len(text):,} characters, over the {limit:,} a record (or a JSON file of "
                         "records) can hold; is this a multiopt file?")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except _NotFinite as e:
        raise UsageError(f"{where}: {e} is not a finite number; records hold finite numbers or null") from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits
        raise UsageError(f"{where}: a number is too large ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply to be a record") from None


def read_text(path: Path, what: str = "file") -> str:
    """A file's text as UTF-8; UsageError (file, and the line of a bad byte) otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a {what}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); is this a multiopt file?") from None


def iter_jsonl(path: str | Path) -> Iterator[Record]:
    """Records of a JSONL file, each checked (`record.check_schema`) and brought to this
    schema. A torn last line (a killed writer) is skipped; any other bad
    line is a UsageError naming the file and line. A whole record without its newline is
    kept, as `append_jsonl` keeps it."""
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}:{i}")
        except json.JSONDecodeError as e:
            if torn_tail and i == len(lines):
                return  # the writer was killed mid-line; that config is simply not recorded
            raise UsageError(f"{path}:{i}: not valid JSON ({e.msg}); is this a multiopt results file?") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
        check_schema(row, f"{path}:{i}")
        yield Record.from_dict(row)


def read_jsonl(path: str | Path) -> list[Record]:
    return list(iter_jsonl(path))


def append_jsonl(path: str | Path, records: Iterable[Record | dict[str, Any]]) -> None:
    """Append and fsync, one line per record, so a killed sweep loses at most the line being
    written. A failed write (a full disk) is truncated back: the file keeps only whole lines."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _mend_tail(path)
    data = memoryview("".join(dumps(rec) + "\n" for rec in records).encode("utf-8"))
    # unbuffered: a write that fails fails here, not again in a buffer's flush at close
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as e:
        os.ftruncate(fd, start)
        raise UsageError(f"{path}: cannot write ({e.strerror}); the file keeps its earlier records, "
                         "free space and rerun with --resume") from None
    finally:
        os.close(fd)


def _mend_tail(path: Path) -> None:
    """A writer killed mid-line leaves a partial last line: cut it so the file stays valid.
    A whole record that lost only its newline is kept (iter_jsonl counts it as done), and
    the newline is added. Reads from the end only, so appending stays cheap however long
    the file grows."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos, chunk, tail = size, 1 << 16, b""
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            piece = f.read(pos - start)
            cut = piece.rfind(b"\n")
            tail = piece[cut + 1:] + tail
            if cut >= 0:
                break
            pos = start
        keep = size - len(tail)
        if _whole_record(tail):
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(keep)


def _whole_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def write_jsonl_atomic(path: str | Path, rows: Iterable[Record | dict[str, Any]]) -> None:
    """Replace `path` with `rows`: written to a temporary file beside it, fsynced, renamed over."""
    path = Path(path)
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside `path`, fsync, rename over it: a full disk or a read-only place leaves the
    old file (or none) and is one UsageError."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass  # never created (read-only place): nothing to clean
        raise UsageError(f"{path}: cannot write ({e.strerror}); choose another place or free space") from None


@dataclass(frozen=True)
class Source:
    """The records of one file, and what it says of the machine that wrote them: a run
    directory's env.json, or a pytest-benchmark file's machine and commit info."""

    path: str  # the file the records came from (a run directory's results.jsonl)
    records: tuple[Record, ...]
    env: Mapping[str, Any] = field(default_factory=dict)


def read_sources(paths: Sequence[str | Path]) -> list[Source]:
    """The records of run directories, JSONL files and pytest-benchmark JSON files, one
    `Source` per path. UsageError for a missing path, a file with no records, corrupt JSON or a
    record of another schema."""
    if not paths:
        raise UsageError("no results given: name a run directory, a results .jsonl or a pytest-benchmark .json")
    return [_read_source(Path(p)) for p in paths]


def read_records(*paths: str | os.PathLike) -> list[Record]:
    """Every record of `paths` (as `read_sources` reads them), in order."""
    return [r for s in read_sources(paths) for r in s.records]


def _read_source(path: Path) -> Source:
    try:
        return _read_source_unchecked(path)
    except OSError as e:  # an unreadable directory (chmod 000) fails in is_dir/is_file
        raise UsageError(f"{e.filename or path}: cannot read ({e.strerror})") from None


def _read_source_unchecked(path: Path) -> Source:
    if path.is_dir():
        results = path / "results.jsonl"
        if not results.is_file():
            raise UsageError(f"{path}: run directory has no results.jsonl")
        rows = read_jsonl(results)
        source = results
        env = _read_env(path / "env.json")
    elif not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    elif path.suffix.lower() == ".json" and not _looks_like_jsonl(path):
        rows, env = _read_benchmark_json(path)
        source = path
    else:
        rows = read_jsonl(path)
        source = path
        env = _read_env(path.parent / "env.json") if path.name == "results.jsonl" else {}
    if not rows:
        raise UsageError(f"{source}: no records (empty file); did the sweep run?")
    return Source(str(source), tuple(rows), env)


def _looks_like_jsonl(path: Path) -> bool:
    """A .json file whose first line is a whole record object: JSONL under another name."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        doc = json.loads(first)
    except (OSError, ValueError, RecursionError):  # not JSONL: the benchmark reader says why
        return False
    return isinstance(doc, dict) and "schema" in doc


def _read_env(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    env = _read_json_object(path)
    for k, v in env.items():
        if not isinstance(v, (str, int, float, bool, type(None))):
            raise UsageError(f"{path}: {k!r} is a {type(v).__name__}; env.json holds plain values")
    return env


def _read_json_object(path: Path) -> dict[str, Any]:
    text = read_text(path)
    try:
        doc = parse_json(text, str(path), limit=MAX_FILE_CHARS)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _stats_columns(stats: dict[str, Any], where: str) -> dict[str, Any]:
    """pytest-benchmark's seconds as the record's step_ms_* columns; numbers only."""
    out: dict[str, Any] = {}
    for key in ("median", "iqr", "min", "mean"):
        v = stats.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise UsageError(f"{where}: stats {key!r} is {v!r}, not a number of seconds")
        out[f"step_ms_{key}"] = None if v is None else float(v) * 1000.0
    rounds = stats.get("rounds")
    if rounds is not None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise UsageError(f"{where}: stats 'rounds' is {rounds!r}, not a count")
        out["steps_timed"] = rounds
    return out


def _object(doc: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{path}: {key!r} is a {type(value).__name__}, expected an object; "
                         "is this a pytest-benchmark --benchmark-json file?")
    return value


def _read_benchmark_json(path: Path) -> tuple[list[Record], dict[str, Any]]:
    if not read_text(path).strip():
        raise UsageError(f"{path}: no records (empty file)")
    try:
        doc = _read_json_object(path)
    except UsageError as e:
        raise UsageError(f"{e}; is this a pytest-benchmark --benchmark-json file?") from None
    if not isinstance(doc.get("benchmarks"), list):
        raise UsageError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    rows = []
    for i, b in enumerate(doc["benchmarks"]):
        name = b.get("fullname") or b.get("name") or f"#{i}" if isinstance(b, dict) else f"#{i}"
        where = f"{path}: benchmark {name}"
        if not isinstance(b, dict) or not isinstance(b.get("extra_info"), dict) or not b["extra_info"]:
            raise UsageError(f"{where}: no extra_info record; was it written by multiopt's bench suite?")
        row = dict(b["extra_info"])
        check_schema(row, where)
        stats = b.get("stats")
        # a failed config's timing (if any) is not a step time: keep its record's None
        if row.get("status") == Status.OK and isinstance(stats, dict) and stats.get("median") is not None:
            row.update(_stats_columns(stats, where))
        rows.append(Record.from_dict(row))
    machine = _object(doc, "machine_info", path)
    commit = _object(doc, "commit_info", path)
    cpu = _object(machine, "cpu", path)
    env = {
        "created_at": doc.get("datetime"),
        "cpu": cpu.get("brand_raw") or machine.get("processor") or None,
        "python": machine.get("python_version"),
        "host": machine.get("node"),
        "git_sha": commit.get("id"),
        "git_dirty": commit.get("dirty"),
        "pytest_benchmark": doc.get("version"),
    }
    return rows, {k: v for k, v in env.items() if isinstance(v, (str, int, float))}
