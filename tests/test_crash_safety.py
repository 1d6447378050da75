"""Crash safety (issue 14): every record kept, none twice, under kill -9, Ctrl-C, a full disk
and two writers; and the newline-less last record read the same way by --resume and the
writer. Tiny configs (width 16, batch 4, memory only), in process or forked where possible."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiopt.cli import main
from multiopt.errors import UsageError
from multiopt.record import config_key
from multiopt.run.launch import _PRELOAD
from multiopt.store import append_jsonl, iter_jsonl, read_jsonl

from .support import FIXTURES, ROOT, subprocess_env

FIXTURE = FIXTURES / "run_small" / "results.jsonl"
TINY = ["run", "--preset", "quick", "--widths", "16,32", "--batches", "4", "--combos", "sgd,adam", "--steps", "0",
        "--warmup", "0", "--no-progress", "--no-report"]
N_TINY = 4


def _lines(n: int) -> list[str]:
    return FIXTURE.read_text().splitlines()[:n]


def _assert_each_once(results: Path, n: int) -> None:
    text = results.read_text()
    assert text.endswith("\n")
    keys = [config_key(json.loads(line)) for line in text.splitlines()]
    assert len(keys) == n and len(set(keys)) == n


# --- the newline-less last record -------------------------------------------------------------


def test_whole_last_record_without_newline_is_kept_by_reader_and_writer(tmp_path):
    path = tmp_path / "results.jsonl"
    a, b, c = _lines(3)
    path.write_text(a + "\n" + b)  # b complete, its newline never written
    assert len(read_jsonl(path)) == 2  # --resume counts b as done ...
    append_jsonl(path, [json.loads(c)])
    assert path.read_text() == a + "\n" + b + "\n" + c + "\n"  # ... and the writer keeps it


def test_torn_last_line_is_dropped_by_reader_and_writer(tmp_path):
    path = tmp_path / "results.jsonl"
    a, b, c = _lines(3)
    path.write_text(a + "\n" + b[: len(b) // 2])
    assert len(read_jsonl(path)) == 1
    append_jsonl(path, [json.loads(c)])
    assert path.read_text() == a + "\n" + c + "\n"


def test_resume_after_a_newline_less_last_record_runs_each_config_once(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--no-isolate", "--out", str(out)]) == 0
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:2]))  # two records, the second without its newline
    assert main([*TINY, "--no-isolate", "--out", str(out), "--resume"]) == 0
    assert "2 of 4 configs already" in capsys.readouterr().out
    _assert_each_once(results, N_TINY)


# --- kill -9 at random points, then --resume -----------------------------------------------------


def _sweep_child(out: str, resume: bool) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")
    os._exit(main([*TINY, "--no-isolate", "--out", out, *(["--resume"] if resume else [])]))


def test_kill_9_at_random_points_then_resume_keeps_every_config_once(tmp_path):
    # forkserver: its server imports multiopt once and never computes, so each sweep is a cheap,
    # safe fork of it (a plain fork of this process, whose torch has run, can deadlock)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["multiopt.cli", "multiopt.run.sweep", "multiopt.analyze.report", *_PRELOAD])
    rng = random.Random(14)
    for trial in range(5):
        out = tmp_path / f"run{trial}"
        child = ctx.Process(target=_sweep_child, args=(str(out), False))
        child.start()
        time.sleep(rng.uniform(0.05, 1.2))  # a warm child sweeps the 4 configs in about a second
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it finished first: resuming a finished sweep must add nothing
        child.join()
        resumed = ctx.Process(target=_sweep_child, args=(str(out), (out / "results.jsonl").exists()))
        resumed.start()
        resumed.join(120)
        assert resumed.exitcode == 0, f"trial {trial}: resume exit {resumed.exitcode}"
        _assert_each_once(out / "results.jsonl", N_TINY)


# --- two writers ---------------------------------------------------------------------------------


def test_a_second_writer_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # the first `multiopt run` holds this while it runs
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc = main([*TINY, "--no-isolate", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "another multiopt run" in err
    assert not (out / "results.jsonl").exists()
    assert main([*TINY, "--no-isolate", "--out", str(out)]) == 0  # released: the next run proceeds
    _assert_each_once(out / "results.jsonl", N_TINY)


# --- Ctrl-C to the process group -------------------------------------------------------------------


def test_ctrl_c_to_the_process_group_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "run"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "multiopt", *TINY, "--widths", "16,32,48,64,80,96",
                             "--out", str(out)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "env.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the forkserver or a worker is busy now
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["multiopt run: interrupted"], err
    for row in iter_jsonl(out / "results.jsonl") if (out / "results.jsonl").exists() else ():
        assert row.status == "ok"  # what was written is whole


# --- a full disk ---------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only): writes there run out of space."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_leaves_only_whole_lines(tiny_disk):
    path = tiny_disk / "results.jsonl"
    row = json.loads(_lines(1)[0])
    written = 0
    with pytest.raises(UsageError, match="cannot write"):
        for _ in range(10_000):
            append_jsonl(path, [row])
            written += 1
    assert len(read_jsonl(path)) == written and path.read_text().endswith("\n")


def test_a_full_disk_under_a_command_is_one_line_exit_2(tiny_disk, capsys):
    (tiny_disk / "filler").write_bytes(b"x" * (60 << 10))
    rc = main(["report", str(FIXTURE.parent), "-o", str(tiny_disk / "r.md")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
