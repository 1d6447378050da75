"""The JSONL store (a torn last line is never accepted and never blocks the next append) and
the record's columns (declared once, on the fields)."""

import json
import shutil
import subprocess
import sys

import pytest

from multiopt import record
from multiopt.errors import UsageError
from multiopt.record import Record
from multiopt.store import append_jsonl, read_jsonl

from .support import REPORTS, ROOT


@pytest.mark.parametrize("torn", ['{"schema": "multiopt.rec', "x" * 200_000])  # short, and longer than a read chunk
def test_a_torn_tail_is_skipped_on_read_and_cut_on_append(tmp_path, torn):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [Record(combo="a"), Record(combo="b")])
    with open(path, "a") as f:
        f.write(torn)
    assert [r.combo for r in read_jsonl(path)] == ["a", "b"]
    append_jsonl(path, [Record(combo="c")])
    assert [r.combo for r in read_jsonl(path)] == ["a", "b", "c"]
    text = path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3  # the torn line is gone, not kept mid-file


def test_a_file_that_is_only_a_torn_line_becomes_the_new_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"torn')
    append_jsonl(path, [Record(combo="d")])
    assert [r.combo for r in read_jsonl(path)] == ["d"]


def test_a_bad_line_before_the_end_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [Record(combo="a")])
    with open(path, "a") as f:
        f.write("not json\n")
    append_jsonl(path, [Record(combo="b")])
    with pytest.raises(UsageError, match=r"r\.jsonl:2: not valid JSON"):
        read_jsonl(path)


# --- the columns: declared once, on the fields -----------------------------------------------------

BASELINES = sorted((REPORTS / "baselines").glob("*.jsonl"))


def test_every_config_column_is_in_the_key_the_series_and_the_names_unless_its_role_says_otherwise():
    plain = [c for c in record.CONFIG_COLUMNS if c not in ("combo", "rules", "width", "batch", "probe", "device")]
    assert {"zero", "ranks", "target"} <= set(plain)
    assert set(record.KEY_COLUMNS) == set(record.CONFIG_COLUMNS) - {"rules"}
    assert set(record.SERIES_COLUMNS) == set(plain) | {"probe", "device"}
    assert set(record.NAME_COLUMNS) == set(record.CONFIG_COLUMNS)
    assert set(record.GATED_COLUMNS) < set(record.BYTE_COLUMNS) and "opt_state_expected" not in record.GATED_COLUMNS
    assert record.STATUSES == ("ok", "oom", "diverged", "error") and record.SCHEMA == "multiopt.record/3"


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.name)
def test_committed_baselines_load_and_key_as_their_rows_say(path):
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = read_jsonl(path)
    assert len(records) == len(lines) > 0
    for rec, row in zip(records, lines):
        assert rec.key() == record.config_key(row)
        want = {c: row.get(c, record.CONFIG_DEFAULTS.get(c)) for c in record.CONFIG_COLUMNS}
        if "target" not in row:  # written before it existed: the record's own device
            want["target"] = "cuda" if row["probe"] == "cuda" else "cpu"
        assert dict(zip(record.CONFIG_COLUMNS, rec.key())) == want
        assert rec.schema == record.SCHEMA and rec.peak_total == row["peak_total"]


_NEW_FIELD = '''
import json, sys
from multiopt import record
from multiopt.analyze import frame
from multiopt.store import read_jsonl
for cols in ("CONFIG_COLUMNS", "KEY_COLUMNS", "SERIES_COLUMNS", "NAME_COLUMNS"):
    assert "grad_clip" in getattr(record, cols), cols
old = read_jsonl(sys.argv[1])  # written before the field existed: read at its default
assert old and all(r.grad_clip == 0 for r in old) and all(r.key()[record.CONFIG_COLUMNS.index("grad_clip")] == 0 for r in old)
assert record.config_key(json.loads(open(sys.argv[1]).readline())) == old[0].key()
import dataclasses
d = frame.records_to_frame([old[0], old[0], dataclasses.replace(old[0], grad_clip=8)])
assert list(frame.series_labels(d))[2].endswith("(grad_clip=8)"), list(frame.series_labels(d))
bad = {**old[0].to_dict(), "grad_clip": "eight"}
try:
    record.check_values(bad, "x")
except ValueError as e:
    assert "grad_clip" in str(e)
else:
    raise AssertionError("a str in an int config column passed")
print("ok")
'''


def test_a_new_config_field_with_a_default_needs_nothing_else(tmp_path):
    """Adding `grad_clip: int = 0` to Config (in a copy of the package) makes it a config, key,
    series and name column, reads older records at 0 and type-checks stored rows."""
    pkg = tmp_path / "multiopt"
    shutil.copytree(ROOT / "multiopt", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    text = (pkg / "record.py").read_text()
    anchor = "\n    def label(self) -> str:"
    assert text.count(anchor) == 1
    (pkg / "record.py").write_text(text.replace(anchor, "\n    grad_clip: int = 0\n" + anchor))
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", _NEW_FIELD, str(BASELINES[0])], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr
