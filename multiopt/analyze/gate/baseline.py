"""Baseline I/O: the `multiopt gate` command around the pure compare and render.

Reads the baseline and current records (run directories, JSONL, pytest-benchmark JSON:
`store.read_records`), prints the markdown to stdout and appends it to the job summary
(`--summary`, else `$GITHUB_STEP_SUMMARY` when set), and with `--update-baseline` writes the
current records as the new baseline, atomically, after printing the verdict against the old
one: accepting new numbers is an explicit act. A baseline that does not exist yet is created.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TextIO

from ...errors import UsageError
from ...record import Record
from ...store import read_records, write_jsonl_atomic
from .compare import checks, compare
from .render import render

Paths = str | os.PathLike


def write_baseline(path: Paths, records: Iterable[Record]) -> int:
    """Replace `path` with `records` as JSONL, atomically. Returns the record count."""
    path = Path(path)
    rows = list(records)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the baseline ({e.strerror})") from None
    write_jsonl_atomic(path, rows)
    return len(rows)


def _append_summary(path: Paths, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise UsageError(f"{path}: cannot write the summary ({e.strerror})") from None


def run_gate(baseline: Paths, current: Paths | Sequence[Paths], *, mem_tol: float | None = None,
             time_tol: float = 0.10, time_k: float = 3.0, update_baseline: bool = False, only: str | None = None,
             summary: Paths | None = None, stdout: TextIO | None = None,
             environ: Mapping[str, str] | None = None) -> int:
    """The `multiopt gate` command. Returns the exit code (0 pass, 1 regression or missing
    config); bad input raises UsageError. The markdown goes to `stdout` and is appended to
    `summary`, or, when that is None, to `$GITHUB_STEP_SUMMARY` when that is set."""
    out = stdout if stdout is not None else sys.stdout
    env = os.environ if environ is None else environ
    currents = [current] if isinstance(current, (str, os.PathLike)) else list(current)
    if not currents:
        raise UsageError("--current: give at least one results file or run directory")
    using = checks(mem_tol, time_tol, time_k)  # bad settings are refused before any file is read
    cur_label = ", ".join(str(p) for p in currents)

    if update_baseline and not Path(baseline).exists():
        n = write_baseline(baseline, read_records(*currents))
        print(f"multiopt gate: no baseline at {baseline}; wrote {n} records from {cur_label} as the new baseline", file=out)
        return 0

    old, new = read_records(baseline), read_records(*currents)
    result = dataclasses.replace(compare(old, new, only=only, using=using), baseline_label=str(baseline),
                                 current_label=cur_label)
    text = render(result)
    print(text, file=out, end="")
    target = summary if summary is not None else env.get("GITHUB_STEP_SUMMARY") or None
    if target:
        _append_summary(target, text)
    if not update_baseline:
        return result.exit_code
    n = write_baseline(baseline, new)
    msg = (f"multiopt gate: baseline updated: wrote {n} records from {cur_label} to {baseline} "
           f"(the verdict above is against the old baseline; commit the new file)")
    print(msg, file=out)
    if target:
        _append_summary(target, msg)
    return 0
