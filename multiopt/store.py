"""Where records live: JSONL files (one atomic, fsynced writer), run directories and
pytest-benchmark JSON files.

Every reader raises UsageError with one line naming the file (and line) for anything that is
not a valid record file; every writer leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import UsageError
from .record import Record, check_schema


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


def write_jsonl_atomic(path: str | Path, rows: Iterable[Record | dict[str, Any]]) -> None:
    """Replace `path` with `rows`: written to a temporary file beside it, fsynced, renamed over."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_sources(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Record dicts of run directories, JSONL files and pytest-benchmark JSON files, each tagged
    with its `source`, and one env dict per source. UsageError for a missing path, a file with
    no records, corrupt JSON or a record of another schema."""
    if not paths:
        raise UsageError("no results given: name a run directory, a results .jsonl or a pytest-benchmark .json")
    rows: list[dict[str, Any]] = []
    envs: list[dict[str, Any]] = []
    for p in paths:
        src_rows, env = _read_source(Path(p))
        rows.extend(src_rows)
        envs.append(env)
    return rows, envs


def _read_source(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
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
    for r in rows:
        r["source"] = str(source)
    env = {**env, "source": str(source)}
    return rows, env


def _looks_like_jsonl(path: Path) -> bool:
    """A .json file whose first line is a whole record object: JSONL under another name."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        doc = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and "schema" in doc


def _read_env(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(env, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(env).__name__}")
    return env


def _read_benchmark_json(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise UsageError(f"{path}: no records (empty file)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); is this a pytest-benchmark --benchmark-json file?") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
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
        if row.get("status") == "ok" and isinstance(stats, dict) and stats.get("median") is not None:
            try:
                for key in ("median", "iqr", "min", "mean"):
                    v = stats.get(key)
                    row[f"step_ms_{key}"] = None if v is None else float(v) * 1000.0
                if stats.get("rounds") is not None:
                    row["steps_timed"] = int(stats["rounds"])
            except (TypeError, ValueError):
                raise UsageError(f"{where}: stats are not numbers") from None
        rows.append(row)
    machine = doc.get("machine_info") or {}
    commit = doc.get("commit_info") or {}
    cpu = machine.get("cpu") or {}
    env = {
        "created_at": doc.get("datetime"),
        "cpu": cpu.get("brand_raw") or machine.get("processor") or None,
        "python": machine.get("python_version"),
        "host": machine.get("node"),
        "git_sha": commit.get("id"),
        "git_dirty": commit.get("dirty"),
        "pytest_benchmark": doc.get("version"),
    }
    return rows, {k: v for k, v in env.items() if v is not None}
