"""Malformed input, as a hostile new user gives it (issue 14): every case is one stderr line,
exit 2, no traceback, and no input file changed, across every command and file type.

Each case calls `multiopt.cli.main(argv)` in this process (a subprocess per case would pay
torch's import each time); a few run as real subprocesses at the end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from multiopt.cli import main
from multiopt.record import upgrade

from .support import FIXTURES

RUN = FIXTURES / "run_small"
BENCH = FIXTURES / "bench_small.json"

# --- rule strings: each refused before any compute, in every command that takes rules ---------

BAD_RULES = [
    "rest=adam(lr='a')", "rest=adam(lr=-1)", "rest=adam(betas=(0.9,))", "rest=adam(betas=(2, 3))",
    "rest=sgd(lr=0.1, momentum=-1)", "rest=adam(foreach=1, fused=1)", "rest=adam(lr=1e999)",
    "rest=adam(betas=(0.9, 1e999))", "rest=adam(eps=-1e999)", "rest=adam(lr=float('nan'))",
    "rest=torch.optim:LBFGS", "rest=torch.optim:SparseAdam", "rest=lbfgs", "rest=sparseadam", "rest=nosuch",
    "rest=adam(nosuch=1)", "rest=adam(lr=__import__('os'))", "rest=adam(**{})", "rest=adam(1e-3)",
    "rest=adam(lr=1", "rest=adam; layer1=sgd", "@bogus=adam", "nosuchlayer=sgd; rest=adam", "rest=os:system",
    "rest=adam(lr=1, lr=2)", "rest=adam(weight_decay=-1)", "rest=muon",
    "rest=sgd(lr=0.1, momentum=0.9, nesterov=True, dampening=0.5)", "rest=adam(amsgrad='yes', lr=[1])",
    "rest=sgd(lr=(1, 2))",
]
_TINY = ["--width", "16", "--depth", "2", "--batch", "4"]


def _rule_cases() -> list[tuple[str, Callable[[Path], list[str]]]]:
    cases = []
    for r in BAD_RULES:
        cases.append((f"estimate {r}", lambda t, r=r: ["estimate", "--rules", r, *_TINY]))
        cases.append((f"train {r}", lambda t, r=r: ["train", "--rules", r, "--model", "mlp", *_TINY, "--steps", "1"]))
        cases.append((f"run {r}", lambda t, r=r: ["run", "--preset", "quick", "--widths", "16", "--batches", "4",
                                                  "--combos", "sgd", "--rules", f"mine::{r}", "--no-isolate",
                                                  "--no-progress", "--steps", "0", "--out", str(t / "out")]))
    return cases


# --- flags -------------------------------------------------------------------------------------

_RUN = ["run", "--preset", "quick", "--widths", "16", "--batches", "4", "--combos", "sgd", "--no-progress"]
BAD_FLAGS: list[list[str]] = [
    ["train", "--rules", "rest=adam", "--batch", "0"], ["train", "--rules", "rest=adam", "--batch", "-1"],
    ["train", "--rules", "rest=adam", "--width", "0"], ["train", "--rules", "rest=adam", "--depth", "-2"],
    ["train", "--rules", "rest=adam", "--steps", "-1"], ["train", "--rules", "rest=adam", "--seed", "-1"],
    ["train", "--rules", "rest=adam", "--seed", str(2**70)], ["train", "--rules", "rest=adam", "--batch", "x"],
    ["measure", "--threads", "-1"], ["measure", "--threads", "0"], ["measure", "--seed", str(2**70)],
    ["measure", "--width", "-3"], ["measure", "--limit", "lots"], ["measure", "--limit", "0"],
    ["measure", "--dtype", "float7"], ["measure", "--amp", "fp8"], ["measure", "--impl", "turbo"],
    ["measure", "--model", "nosuch"], ["measure", "--combo", "nosuch"], ["measure", "--warmup", "-1"],
    ["measure", "--model", "os:nosuch"], ["measure", "--probe", "quantum"], ["estimate", "--batch", str(2**40)],
    [*_RUN, "--timeout", "nan"], [*_RUN, "--timeout", "-1"], [*_RUN, "--timeout", "inf"], [*_RUN, "--timeout", "0"],
    [*_RUN, "--threads", "-1"], ["run", "--widths", "a,b"], ["run", "--widths", "0"], ["run", "--batches", "-1"],
    ["run", "--depths", "0"], [*_RUN, "--zero", "2"], ["run", "--combos", "nosuch"], [*_RUN, "--limit", "9" * 400],
    [*_RUN, "--steps", "-1"], ["run", "--preset", "nosuch"],
    [*_RUN, "--rules", "a::rest=sgd", "--rules", "a::rest=adam"],
    ["fit", "--budget", "4" * 400], ["fit", "--budget", "lots"], ["fit", "--budget", "0"],
    ["fit", "--budget", "1GiB", "--width", "0"], ["fit", "--budget", "1GiB", "--batch", "-1"],
    ["fit", "--budget", "1GiB", "--rules", "a::rest=sgd", "--rules", "a::rest=adam"],
    ["gate", "--baseline", str(RUN / "results.jsonl"), "--current", str(RUN), "--mem-tol", "abc"],
    ["gate", "--baseline", str(RUN / "results.jsonl"), "--current", str(RUN), "--time-tol", "-1"],
    ["gate", "--baseline", str(RUN / "results.jsonl"), "--current", str(RUN), "--time-k", "nan"],
    ["gate", "--baseline", str(RUN / "results.jsonl"), "--current", str(RUN), "--only", "both"],
    ["gate", "--baseline", "/nonexistent.jsonl", "--current", str(RUN)],
    ["report", "/nonexistent/run"], ["nosuchcommand"],
]


def _flag_cases() -> list[tuple[str, Callable[[Path], list[str]]]]:
    out = []
    for argv in BAD_FLAGS:
        needs_out = argv[0] == "run"
        out.append((" ".join(argv)[:80], lambda t, a=argv, o=needs_out: [*a, *(["--out", str(t / "o")] if o else [])]))
    return out


# --- record files ------------------------------------------------------------------------------


def _good_row() -> dict[str, Any]:
    row = json.loads((RUN / "results.jsonl").read_text().splitlines()[0])
    return upgrade(row)  # as a current-schema (v2) row, with nested optimizer lists


def _set(key: str, value: Any) -> Callable[[dict], dict]:
    return lambda r: {**r, key: value}


def _sub(list_name: str, key: str, value: Any) -> Callable[[dict], dict]:
    def f(r: dict) -> dict:
        items = [dict(o) for o in r.get(list_name) or [{"name": "x", "rank": 0}]]
        items[0][key] = value
        return {**r, list_name: items}
    return f


# Each: a name and the bytes of the whole file, made from one good row.
def _line(f: Callable[[dict], dict]) -> Callable[[dict], bytes]:
    return lambda good: (json.dumps(good) + "\n" + json.dumps(f(good)) + "\n").encode()


BAD_RECORDS: dict[str, Callable[[dict], bytes]] = {
    "non-utf8": lambda g: json.dumps(g).encode() + b"\n\xff\xfe{}\n",
    "latin1 in string": lambda g: json.dumps({**g, "model": "caf\u00e9"}).encode().replace(b"\\u00e9", b"\xe9") + b"\n",
    "5000-digit int": lambda g: json.dumps(g).encode()[:-1] + b', "peak_total2": ' + b"9" * 5000 + b"}\n",
    "100k nesting": lambda g: b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "Infinity bytes": lambda g: json.dumps({**g, "peak_total": 1}).replace('"peak_total": 1', '"peak_total": Infinity').encode() + b"\n",
    "1e400 bytes": lambda g: json.dumps({**g, "peak_total": 1}).replace('"peak_total": 1', '"peak_total": 1e400').encode() + b"\n",
    "NaN bytes": lambda g: json.dumps({**g, "peak_total": 1}).replace('"peak_total": 1', '"peak_total": NaN').encode() + b"\n",
    "NaN time": lambda g: json.dumps({**g, "step_ms_median": 1.5}).replace('"step_ms_median": 1.5', '"step_ms_median": NaN').encode() + b"\n",
    "negative bytes": _line(_set("peak_total", -1)),
    "true bytes": _line(_set("peak_total", True)),
    "string bytes": _line(_set("param_bytes", "12")),
    "float bytes": _line(_set("param_bytes", 1.5)),
    "huge bytes": _line(_set("param_bytes", 10**30)),
    "combo list": _line(_set("combo", ["sgd"])),
    "width string": _line(_set("width", "64")),
    "width true": _line(_set("width", True)),
    "seed float": _line(_set("seed", 1.5)),
    "model null": _line(_set("model", None)),
    "status null": _line(_set("status", None)),
    "status weird": _line(_set("status", "fine")),
    "error number": _line(_set("error", 5)),
    "time negative": _line(_set("step_ms_median", -1.0)),
    "time string": _line(_set("step_ms_median", "fast")),
    "steps_timed true": _line(_set("steps_timed", True)),
    "future schema": _line(_set("schema", "multiopt.record/9")),
    "no schema": _line(lambda r: {k: v for k, v in r.items() if k != "schema"}),
    "no width": _line(lambda r: {k: v for k, v in r.items() if k != "width"}),
    "optimizers string": _line(_set("optimizers", "adam")),
    "optimizers of numbers": _line(_set("optimizers", [1, 2])),
    "optimizer bytes negative": _line(_sub("optimizers", "state_bytes", -5)),
    "optimizer bytes bool": _line(_sub("optimizers", "expected", False)),
    "rank bytes string": _line(_sub("ranks_state", "peak_total", "big")),
    "array line": lambda g: json.dumps(g).encode() + b"\n[1, 2]\n",
    "garbage mid-file": lambda g: (json.dumps(g) + "\n{not json\n" + json.dumps(g) + "\n").encode(),
    "empty": lambda g: b"",
    "blank lines": lambda g: b"\n \n\n",
    "5 MB line": lambda g: b'{"schema": "' + b"x" * (5 << 20) + b'"}\n',
}


def _run_dir(t: Path, results: bytes | None = None, env: bytes | None = None) -> Path:
    """A run directory in `t`: the fixture's results and env.json, either replaced."""
    run = t / "run"
    run.mkdir()
    (run / "results.jsonl").write_bytes(results if results is not None else (RUN / "results.jsonl").read_bytes())
    (run / "env.json").write_bytes(env if env is not None else (RUN / "env.json").read_bytes())
    return run


def _record_cases() -> list[tuple[str, Callable[[Path], list[str]]]]:
    out = []
    for name, make in BAD_RECORDS.items():
        out.append((f"report {name}", lambda t, m=make: ["report", str(_run_dir(t, results=m(_good_row()))),
                                                         "-o", str(t / "rep" / "r.md")]))
        out.append((f"gate baseline {name}", lambda t, m=make: [
            "gate", "--baseline", str(_run_dir(t, results=m(_good_row())) / "results.jsonl"), "--current", str(RUN)]))
    return out


BAD_ENVS: dict[str, bytes] = {
    "non-utf8": b'{"torch": "\xff"}', "array": b"[1, 2]", "invalid": b"{torch", "nested": b'{"torch": {"v": 1}}',
    "NaN": b'{"torch": NaN}', "deep": b"[" * 100_000 + b"]" * 100_000,
}


def _env_cases() -> list[tuple[str, Callable[[Path], list[str]]]]:
    out = []
    for name, data in BAD_ENVS.items():
        out.append((f"report env {name}", lambda t, d=data: ["report", str(_run_dir(t, env=d)), "-o", str(t / "r.md")]))
        out.append((f"gate env {name}", lambda t, d=data: ["gate", "--baseline", str(RUN / "results.jsonl"),
                                                           "--current", str(_run_dir(t, env=d))]))
    return out


def _bench(f: Callable[[dict], Any]) -> Callable[[], bytes]:
    def make() -> bytes:
        doc = json.loads(BENCH.read_text())
        out = f(doc)
        return out if isinstance(out, bytes) else json.dumps(doc).encode()
    return make


def _bench_set(path: tuple, value: Any) -> Callable[[dict], None]:
    def f(doc: dict) -> None:
        node = doc
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return f


BAD_BENCH: dict[str, Callable[[], bytes]] = {
    "non-utf8": lambda: BENCH.read_bytes().replace(b'"machine_info"', b'"machine_\xff"', 1),
    "machine_info list": _bench(_bench_set(("machine_info",), [1])),
    "commit_info string": _bench(_bench_set(("commit_info",), "abc")),
    "cpu list": _bench(_bench_set(("machine_info", "cpu"), ["x"])),
    "benchmarks object": _bench(_bench_set(("benchmarks",), {"a": 1})),
    "benchmark number": _bench(_bench_set(("benchmarks", 0), 3)),
    "no extra_info": _bench(_bench_set(("benchmarks", 0, "extra_info"), {})),
    "extra_info true bytes": _bench(_bench_set(("benchmarks", 0, "extra_info", "peak_total"), True)),
    "extra_info status null": _bench(_bench_set(("benchmarks", 0, "extra_info", "status"), None)),
    "stats median string": _bench(_bench_set(("benchmarks", 0, "stats", "median"), "x")),
    "stats rounds true": _bench(_bench_set(("benchmarks", 0, "stats", "rounds"), True)),
    "stats median negative": _bench(_bench_set(("benchmarks", 0, "stats", "median"), -1.0)),
    "stats 1e400": lambda: json.dumps(json.loads(BENCH.read_text())).replace('"median": ', '"median": 1e400, "x": ', 1).encode(),
    "empty": lambda: b"",
    "deep": lambda: b"[" * 100_000 + b"]" * 100_000,
    "another project": lambda: json.dumps({"benchmarks": [{"name": "t", "stats": {"median": 1.0}}]}).encode(),
}


def _bench_cases() -> list[tuple[str, Callable[[Path], list[str]]]]:
    out = []
    for name, make in BAD_BENCH.items():
        def write(t: Path, make=make) -> Path:
            p = t / "bench.json"
            p.write_bytes(make())
            return p
        out.append((f"report bench {name}", lambda t, w=write: ["report", str(w(t)), "-o", str(t / "r.md")]))
        if name in ("non-utf8", "extra_info true bytes", "machine_info list"):  # gate reads through the same reader
            out.append((f"gate bench {name}", lambda t, w=write: ["gate", "--baseline", str(RUN / "results.jsonl"),
                                                                  "--current", str(w(t))]))
    return out


# --- output places and user code ----------------------------------------------------------------


def _place_cases() -> list[tuple[str, Callable[[Path], list[str]]]]:
    def file_in_way(t: Path) -> Path:
        (t / "afile").write_text("x")
        return t / "afile"

    return [
        ("report -o under a file", lambda t: ["report", str(RUN), "-o", str(file_in_way(t) / "r.md")]),
        ("report -o a directory", lambda t: ["report", str(RUN), "-o", str(t)]),
        ("run --out a file", lambda t: [*_RUN, "--out", str(file_in_way(t))]),
        ("run --out under a file", lambda t: [*_RUN, "--out", str(file_in_way(t) / "sub")]),
        ("gate --summary a directory", lambda t: ["gate", "--baseline", str(RUN / "results.jsonl"), "--current",
                                                  str(RUN), "--summary", str(t), "--only", "memory"]),
    ]


def _user_code_cases() -> list[tuple[str, Callable[[Path], list[str]]]]:
    train = ["train", "--rules", "rest=sgd", "--width", "8", "--batch", "2", "--steps", "1"]
    return [
        (f"train {name}", lambda t, name=name: [*train, "--model", f"tests.usermodels_raising:{name}"])
        for name in ("factory_raises", "forward_raises", "forward_text")
    ] + [("measure broken module", lambda t: ["measure", "--model", "tests.usermodels_broken:factory", "--steps", "0"])]


CASES = (_rule_cases() + _flag_cases() + _record_cases() + _env_cases() + _bench_cases() + _place_cases()
         + _user_code_cases())


def _snapshot(*roots: Path) -> dict[str, str]:
    files = [p for root in roots for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_at_least_200_cases():
    assert len(CASES) >= 200


@pytest.mark.parametrize("build", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_exit_2(build, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    argv = build(tmp_path)
    before = _snapshot(tmp_path, FIXTURES)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], err
    assert "Traceback" not in err
    after = _snapshot(tmp_path, FIXTURES)
    assert {k: v for k, v in after.items() if k in before} == before  # no input changed


@pytest.mark.parametrize("argv", [  # a handful only: each pays an interpreter's start
    ["measure", "--threads", "-1"],
    ["train", "--rules", "rest=adam(lr=-1)", "--width", "8"],
])
def test_malformed_input_in_a_real_process(argv, run_cli):
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_checkpoint_torch_refuses_is_one_line(tmp_path):
    import argparse

    import torch

    from multiopt.errors import UsageError
    from multiopt.train.multi import MultiOptimizer
    from multiopt.train.trainer import Trainer

    path = tmp_path / "evil.pt"  # a class torch's weights-only unpickler will not rebuild
    torch.save({"model": argparse.Namespace(x=1)}, path)
    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model, torch.nn.functional.mse_loss, MultiOptimizer.from_spec(model, "rest=sgd"))
    with pytest.raises(UsageError) as e:
        trainer.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_forward_returning_a_tuple_trains_on_its_first_element(capsys):
    """Not malformed since the Hugging Face conventions: the loss_fn gets the tuple unchanged and
    takes its first element (loss_fn(out) = mean(out[0]^2) here)."""
    rc = main(["train", "--rules", "rest=sgd", "--width", "8", "--batch", "2", "--steps", "1",
               "--model", "tests.usermodels_raising:forward_tuple"])
    out = capsys.readouterr().out
    assert rc == 0 and "step    1  loss" in out
