"""pytest-benchmark suite over a multiopt preset: `pytest bench --benchmark-only`.

One test per config of the preset (default ``quick``). Each test

1. measures memory once with the protocol (`multiopt.instrument.protocol.measure`, the tracked, cuda
   or fake probe), exactly as `multiopt run` does for the same config;
2. puts every Record field into ``benchmark.extra_info``, so
   ``multiopt.analyze.frame.load("bench.json")`` rebuilds the record (its step times come from
   pytest-benchmark's ``stats``);
3. times ``Trainer.train_step`` on plain tensors (no probe) with
   ``benchmark.pedantic(rounds=N, iterations=1, warmup_rounds=W)``, synchronising CUDA.

Configs that cannot be timed (the fake probe computes nothing; a record whose status is
oom/diverged/error) are skipped with the reason, and their records still reach the
``--benchmark-json`` file: pytest-benchmark writes only what it timed, so at the end of the
session this conftest adds a *record-only* entry per such config (``extra_info`` = the
record, ``stats`` = null; frame.load then keeps the record's empty times), writing the file
itself when nothing was timed at all. As `multiopt run`, a failed config is recorded and the
run goes on; the gate judges it. Record-only entries go to the JSON file only, never to
pytest-benchmark's storage (``--benchmark-autosave``/``--benchmark-save``), whose
``--benchmark-compare`` and ``pytest-benchmark compare`` need stats in every entry.
A config whose timed steps fail after the protocol ran it is recorded the same way (status
oom or error); an OOM there is skipped, any other exception fails the test (a bench bug).
A config the protocol refuses for this probe (`validate`) is skipped, unrecorded.

The memory columns equal `multiopt run`'s for the same configs to the byte
(tests/test_bench_suite.py checks it on the tracked and fake probes). To keep it so although
every config runs in this one process (a sweep forks a fresh worker per config), each test
frees what it built and, on CUDA, drops the cuBLAS workspace before measuring. Step times
differ in kind from the sweep's on CUDA: pytest-benchmark times host wall clock around a
synchronised step, the sweep CUDA events; gate bench.json against a baseline made from a
bench.json. ``machine_info["multiopt"]`` holds `multiopt.env.collect()` (torch, CUDA,
cuDNN, device name, GPU count, threads, git sha, probe, preset).

Options (also ``pytest bench --help``):

- ``--multiopt-preset NAME`` (env ``MULTIOPT_PRESET``; default ``quick``);
- ``--multiopt-probe auto|cuda|tracked|fake`` (env ``MULTIOPT_PROBE``; default: the
  preset's probe, resolved with `multiopt.instrument.probes.resolve_probe`);
- ``--multiopt-filter KEY=V1,V2`` (repeatable; a config is kept when, for every KEY, its
  value is one of the Vs; KEY is a Config field: combo, width, batch, depth, impl, ...);
- ``--multiopt-rounds N`` (default: the preset's timed steps, at least 1) and
  ``--multiopt-warmup-rounds W`` (default 3, the protocol's warm-up);
- ``--multiopt-limit BYTES``: the protocol's memory limit, as ``multiopt run --limit``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

# `pytest bench` from a checkout must use this checkout's multiopt, installed or not.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DEFAULT_PRESET = "quick"
DEFAULT_WARMUP_ROUNDS = 3

_SETTINGS = pytest.StashKey["Settings"]()
_ENV = pytest.StashKey[dict]()


@dataclasses.dataclass(frozen=True)
class Settings:
    """What this bench session runs: resolved once per pytest session."""

    preset: str
    probe: str
    device: str
    rounds: int
    warmup_rounds: int
    filters: tuple[tuple[str, tuple[str, ...]], ...]
    limit_bytes: int | None
    run_id: str


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("multiopt", "multiopt benchmark suite")
    group.addoption("--multiopt-preset", default=None, metavar="NAME",
                    help=f"preset whose configs are benchmarked (env MULTIOPT_PRESET; default {DEFAULT_PRESET})")
    group.addoption("--multiopt-probe", default=None, metavar="PROBE",
                    help="memory probe: auto | cuda | tracked | fake (env MULTIOPT_PROBE; default: the preset's)")
    group.addoption("--multiopt-filter", action="append", default=[], metavar="KEY=V1,V2",
                    help="keep configs whose KEY (a Config field: combo, width, batch, impl, ...) is one of the "
                         "values; repeatable, all must hold")
    group.addoption("--multiopt-rounds", type=int, default=None, metavar="N",
                    help="timed rounds per config (default: the preset's timed steps)")
    group.addoption("--multiopt-limit", default=None, metavar="BYTES",
                    help="memory limit per config for the protocol, e.g. 2GiB (over it: status oom), as "
                         "`multiopt run --limit`")
    group.addoption("--multiopt-warmup-rounds", type=int, default=None, metavar="W",
                    help=f"untimed warm-up rounds per config (default {DEFAULT_WARMUP_ROUNDS})")


def _settings(config: pytest.Config) -> Settings:
    if _SETTINGS in config.stash:
        return config.stash[_SETTINGS]
    from multiopt.errors import UsageError
    from multiopt.instrument.protocol import Config
    from multiopt.instrument.probes import resolve_probe
    from multiopt.run.presets import PRESETS
    from multiopt.units import parse_bytes

    preset = config.getoption("--multiopt-preset") or os.environ.get("MULTIOPT_PRESET") or DEFAULT_PRESET
    if preset not in PRESETS:
        raise pytest.UsageError(f"--multiopt-preset: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    probe_arg = config.getoption("--multiopt-probe") or os.environ.get("MULTIOPT_PROBE") or PRESETS[preset]["probe"]
    try:
        probe, device = resolve_probe(probe_arg)
    except UsageError as e:
        raise pytest.UsageError(f"--multiopt-probe: {e}") from None
    fields = {f.name for f in dataclasses.fields(Config)}
    filters = []
    for text in config.getoption("--multiopt-filter"):
        key, sep, values = text.partition("=")
        key = key.strip()
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or key not in fields or not vals:
            raise pytest.UsageError(
                f"--multiopt-filter {text!r}: expected KEY=V1[,V2...] with KEY one of {', '.join(sorted(fields))}")
        filters.append((key, vals))
    rounds = config.getoption("--multiopt-rounds")
    if rounds is None:
        rounds = max(int(PRESETS[preset].get("steps") or 0), 1)
    warmup = config.getoption("--multiopt-warmup-rounds")
    if warmup is None:
        warmup = DEFAULT_WARMUP_ROUNDS
    if rounds < 1 or warmup < 0:
        raise pytest.UsageError("--multiopt-rounds must be >= 1 and --multiopt-warmup-rounds >= 0")
    limit = config.getoption("--multiopt-limit")
    try:
        limit_bytes = parse_bytes(limit) if limit else None
    except UsageError as e:
        raise pytest.UsageError(f"--multiopt-limit: {e}") from None
    s = Settings(preset=preset, probe=probe, device=device, rounds=rounds, warmup_rounds=warmup,
                 filters=tuple(filters), limit_bytes=limit_bytes, run_id=uuid.uuid4().hex[:12])
    config.stash[_SETTINGS] = s
    return s


def _env(config: pytest.Config) -> dict[str, Any]:
    """multiopt.env.collect() for this session's device, probe and preset (computed once)."""
    if _ENV not in config.stash:
        from multiopt import env as envmod

        s = _settings(config)
        config.stash[_ENV] = envmod.collect(s.device, s.probe, s.preset)
    return config.stash[_ENV]


def pytest_configure(config: pytest.Config) -> None:
    _settings(config)  # bad options are a usage error before anything is collected


# --------------------------------------------------------------------------- configs


def config_id(c: Any) -> str:
    """Readable, unique test id: ``sgd+adam-w64-b16-d3-default``, plus every field that
    differs from the usual (model, dtype, amp, zero_grad_at, seed)."""
    parts = [c.combo]
    if c.model != "mlp":
        parts.append(c.model)
    parts += [f"w{c.width}", f"b{c.batch}", f"d{c.depth}"]
    if c.dtype != "float32":
        parts.append(c.dtype)
    if c.amp != "none":
        parts.append(f"amp-{c.amp}")
    parts.append(c.impl)
    if c.zero_grad_at != "end":
        parts.append(f"zg-{c.zero_grad_at}")
    if c.seed != 0:
        parts.append(f"seed{c.seed}")
    return "-".join(parts)


def selected_configs(s: Settings) -> list:
    from multiopt.run.presets import preset_configs

    configs = preset_configs(s.preset, s.device)
    for key, values in s.filters:
        configs = [c for c in configs if str(getattr(c, key)) in values]
    return configs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "multiopt_config" not in metafunc.fixturenames:
        return
    s = _settings(metafunc.config)
    configs = selected_configs(s)
    # The parameter is the config as a plain dict, so pytest-benchmark's JSON `params`
    # holds readable values rather than an object repr.
    metafunc.parametrize("multiopt_config", [dataclasses.asdict(c) for c in configs],
                         ids=[config_id(c) for c in configs])


@pytest.fixture(scope="session", autouse=True)
def _multiopt_gc_frozen() -> Any:
    """Everything alive when the suite starts (torch, pytest, the collected items) outlives
    every config: freeze it, so the protocol's gc.collect() per config scans only that
    config's objects (0.2 s a collection otherwise, several per config), as a sweep's
    forkserver does. torch._dynamo is imported first, as the sweep preloads it: the first
    optimizer step would import it (100k+ objects) otherwise. Each test freezes again what
    outlives it (lazy imports, caches), see test_sweep_bench._free."""
    import gc
    import importlib

    for name in ("multiopt.instrument.protocol", "multiopt.instrument.probes.tracked", "multiopt.instrument.probes.fake", "torch._dynamo"):
        importlib.import_module(name)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def multiopt_settings(request: pytest.FixtureRequest) -> Settings:
    return _settings(request.config)


@pytest.fixture(scope="session")
def multiopt_meta(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Identity fields every record of this session gets (as `multiopt run` gives its own)."""
    s = _settings(request.config)
    env = _env(request.config)
    return {"run_id": s.run_id, "git_sha": env["git_sha"], "preset": s.preset, "device_name": env["device_name"]}


# --------------------------------------------------------------------------- record-only entries

_RECORD_ONLY = pytest.StashKey[list]()
_JSON_BEFORE = pytest.StashKey[object]()


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: None instead, as multiopt.store.dumps writes them."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@pytest.fixture
def multiopt_record_only(request: pytest.FixtureRequest, benchmark: Any) -> Any:
    """``add(record_dict, reason)``: this test's config goes into the --benchmark-json file
    as a record without timing (see the module docstring)."""

    def add(record: dict[str, Any], reason: str) -> None:
        request.config.stash.setdefault(_RECORD_ONLY, []).append({
            "group": benchmark.group, "name": benchmark.name, "fullname": benchmark.fullname,
            "params": benchmark.params, "param": benchmark.param, "extra_info": _json_safe(record),
            "options": {"multiopt_not_timed": reason}, "stats": None,
        })

    return add


def _json_path(config: pytest.Config) -> Path | None:
    """--benchmark-json as a path: pytest-benchmark 5 gives a path, older releases an open
    file (argparse.FileType)."""
    value = config.getoption("benchmark_json", None)
    if value is None:
        return None
    return Path(value.name if hasattr(value, "write") else value)


def _file_state(path: Path | None) -> object:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return st and (st.st_mtime_ns, st.st_size, st.st_ino)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_JSON_BEFORE] = _file_state(_json_path(session.config))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Add the record-only entries to the --benchmark-json file. pytest-benchmark's own
    sessionfinish (a hook wrapper) has written it by now, if it timed anything."""
    config = session.config
    entries = config.stash.get(_RECORD_ONLY, [])
    path = _json_path(config)
    if not entries or path is None:
        return
    raw = config.getoption("benchmark_json", None)
    if hasattr(raw, "flush") and not getattr(raw, "closed", True):
        raw.flush()
    import json

    state = _file_state(path)
    if state is not None and state != config.stash.get(_JSON_BEFORE, None):
        doc = json.loads(Path(path).read_text(encoding="utf-8"))  # written by this session
    else:  # nothing was timed, so pytest-benchmark wrote nothing: the same document, by its hooks
        hook = config.hook
        machine_info = hook.pytest_benchmark_generate_machine_info(config=config)
        hook.pytest_benchmark_update_machine_info(config=config, machine_info=machine_info)
        commit_info = hook.pytest_benchmark_generate_commit_info(config=config)
        hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
        doc = hook.pytest_benchmark_generate_json(config=config, benchmarks=[], include_data=True,
                                                  machine_info=machine_info, commit_info=commit_info)
    order = {item.nodeid: i for i, item in enumerate(session.items)}
    benches = list(doc.get("benchmarks") or []) + entries
    benches.sort(key=lambda b: order.get(b.get("fullname"), len(order)))  # stable: test order
    doc["benchmarks"] = benches
    Path(path).write_text(json.dumps(doc, indent=4, default=lambda o: f"UNSERIALIZABLE[{o!r}]") + "\n",
                          encoding="utf-8")


# --------------------------------------------------------------------------- pytest-benchmark hooks


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """torch, CUDA, cuDNN, device name, GPU count, CPU threads, multiopt git sha, probe and
    preset (multiopt.env.collect), under ``machine_info["multiopt"]``."""
    machine_info["multiopt"] = dict(_env(config))


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_compare_machine_info(config: pytest.Config, benchmarksession: Any, machine_info: dict,
                                          compared_benchmark: dict) -> None:
    """Before pytest-benchmark compares machine_info with a saved run: drop what changes on
    every commit (the git sha) from both sides, so that only a real machine change warns."""
    for info in (machine_info, compared_benchmark.get("machine_info") or {}):
        sub = info.get("multiopt")
        if isinstance(sub, dict):
            sub.pop("git_sha", None)
