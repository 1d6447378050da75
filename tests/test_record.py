"""The JSONL store: a torn last line is never accepted and never blocks the next append."""

import pytest

from multiopt.errors import UsageError
from multiopt.record import Record
from multiopt.store import append_jsonl, read_jsonl


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
