"""One benchmark per config of a multiopt preset: memory by the protocol, time by pytest-benchmark.

Run:  pytest bench --benchmark-only [--benchmark-json bench.json] [--multiopt-preset quick]
      [--multiopt-probe auto|cuda|tracked|fake] [--multiopt-filter combo=sgd,adam ...]

Then ``multiopt report bench.json`` / ``multiopt gate --current bench.json`` read it like a
run directory (see conftest.py for the options and for how untimed configs are recorded).
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import pytest
import torch

from multiopt.errors import UsageError
from multiopt.instrument.protocol import Config, Protocol, measure, model_factory, training, validate
from multiopt.record import TIME_COLUMNS


def _free(device: str) -> None:
    """Free what a config's test built; what survives (lazy imports, caches) lives as long
    as the session, so freeze it out of later collections (see conftest._multiopt_gc_frozen)."""
    gc.collect()
    gc.freeze()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _fresh_process_state(device: str) -> None:
    """Make this process look, to the memory protocol, like the fresh worker `multiopt run`
    measures each config in: no cuBLAS workspace yet (torch allocates it through the
    caching allocator on the first matmul and keeps it for the process's life, which would
    put it into a later config's mem_base). What the previous config left was freed by its
    own test (`_free`), and measure() collects garbage before it starts."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


def build_step(config: Config) -> tuple[Callable[[], None], Callable[[], None]]:
    """The config's training step on plain tensors (no probe), built by measure.py's own
    model_factory and training: same model, dtype, device, optimizers, trainer and batch. Returns the
    timed function (synchronised on CUDA) and a function that frees it all."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = model_factory(config)()
    _, trainer, batch = training(config, model, device)
    state: dict[str, Any] = {"trainer": trainer, "batch": batch}
    cuda = device.type == "cuda"

    def step() -> None:
        state["trainer"].train_step(state["batch"])
        if cuda:
            torch.cuda.synchronize(device)

    def close() -> None:
        state.clear()

    return step, close


def test_step(benchmark: Any, multiopt_config: dict, multiopt_settings: Any, multiopt_meta: dict,
              multiopt_record_only: Callable[..., None]) -> None:
    s = multiopt_settings
    config = Config(**multiopt_config)
    # Memory only: the protocol's warm-up and instrumented step are what `multiopt run`
    # does; its own timing (one step, the least it accepts) is replaced by pytest-benchmark's.
    protocol = Protocol(probe=s.probe, steps=1, limit_bytes=s.limit_bytes)
    try:
        validate(config, protocol)
    except UsageError as e:  # e.g. a combo the fake probe cannot run: as `multiopt run` refuses it
        benchmark.skipped = True
        pytest.skip(f"not measured: {e}")
    _fresh_process_state(config.device)
    record = measure(config, protocol, **multiopt_meta)
    info = record.to_dict()
    info.update({c: None for c in TIME_COLUMNS}, steps_timed=0)
    benchmark.extra_info.update(info)

    if record.status != "ok":
        reason = f"not timed: status {record.status}: {record.error}"
        multiopt_record_only(dict(info), reason)
        pytest.skip(reason)
    if s.probe == "fake":
        reason = "not timed: the fake probe estimates memory without compute (record only)"
        multiopt_record_only(dict(info), reason)
        pytest.skip(reason)

    close: Callable[[], None] = lambda: None
    try:
        step, close = build_step(config)
        benchmark.pedantic(step, rounds=s.rounds, iterations=1, warmup_rounds=s.warmup_rounds)
    except Exception as e:
        # pytest-benchmark drops a benchmark that raised from its JSON: keep the record there,
        # with the status measure() would have given it.
        oom = isinstance(e, torch.OutOfMemoryError)
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        failed = dict(info, status="oom" if oom else "error", error=text if oom else f"{type(e).__name__}: {text}")
        multiopt_record_only(failed, f"timing failed: {failed['status']}: {failed['error']}")
        if not oom:
            raise  # the protocol ran this config; failing only here is a bench bug: show it
        pytest.skip(f"timing failed: status oom: {failed['error']}")
    finally:
        close()
        _free(config.device)

    stats = getattr(benchmark, "stats", None)
    if stats:  # None when benchmarks are disabled (--benchmark-disable): nothing was timed
        st = stats.stats
        benchmark.extra_info.update(
            step_ms_median=st.median * 1e3, step_ms_iqr=st.iqr * 1e3, step_ms_min=st.min * 1e3,
            step_ms_mean=st.mean * 1e3, steps_timed=st.rounds,
        )
