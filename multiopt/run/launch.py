"""Launchers: how each config of a sweep runs, and where its record goes the moment it exists.

A `Launcher` measures configs one by one and appends every record to a results file,
fsynced, before the next config starts (a killed sweep loses at most the config it was
running). Two kinds, one loop:

- `InProcess`: every config in this process (fastest; a crash stops the sweep);
- `Isolated`: each config in a worker forked from a forkserver that imported torch once, so
  an OOM, a crash or leaked memory in one config cannot touch the next, and no config pays
  torch's import time. Under torchrun the worker acts for its rank (`RankScope`: its device,
  and for a ZeRO config the process group its peers' workers join).

Which configs a process runs, and how the ranks' records come together, is the sweep's
business (`sweep.py`); a launcher only runs what it is given.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import importlib
import multiprocessing
import multiprocessing.forkserver
import signal
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..instrument.protocol import Protocol, failed_record, measure
from ..kinds import Probe, Status
from ..record import Config, Record
from ..store import append_jsonl
from ..units import fmt_bytes

__all__ = ["Launcher", "InProcess", "Isolated", "RankScope", "merge_zero", "make_launcher", "together"]

# What a launcher does with a measured record before keeping it: the record to keep, or None
# to keep none (a ZeRO config's ranks merge into one record, kept by rank 0).
Finish = Callable[[Config, Record], "Record | None"]


class Launcher(ABC):
    """Runs configs, appending each record to `results` the moment it exists."""

    def __init__(self, protocol: Protocol, *, meta: dict[str, Any] | None = None, progress: bool = True,
                 finish: Finish | None = None) -> None:
        self.protocol = protocol
        self.meta = dict(meta or {})
        self.progress = progress
        self.finish = finish

    @abstractmethod
    def measure_one(self, config: Config) -> Record:
        """One config's record; never raises for a failing config."""

    def start(self) -> None:
        """Called once before the first config."""

    def run(self, configs: Sequence[Config], results: Path) -> list[Record]:
        out: list[Record] = []
        bar = tqdm(total=len(configs), unit="cfg", disable=not self.progress, dynamic_ncols=True, leave=True)
        self.start()
        try:
            for config in configs:
                bar.set_description(config.label())
                record = self.measure_one(config)
                if self.finish is not None:
                    record = self.finish(config, record)
                bar.update(1)
                if record is None:
                    continue
                append_jsonl(results, [record])
                out.append(record)
                bar.set_postfix_str(_postfix(record))
        finally:
            bar.close()
        return out


class InProcess(Launcher):
    """Every config in this process."""

    def start(self) -> None:
        settle()

    def measure_one(self, config: Config) -> Record:
        return measure(config, self.protocol, **self.meta)


class Isolated(Launcher):
    """Each config in a forkserver worker; one that dies or runs past `timeout` seconds
    becomes a record with status error saying which."""

    def __init__(self, protocol: Protocol, *, timeout: float = 600.0, scope: "RankScope | None" = None,
                 **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        self.timeout = timeout
        self.scope = scope
        self._ctx: Any = None

    def start(self) -> None:
        # forkserver: the server imports torch once; each config is a cheap fork of it, and the
        # server never initialised CUDA, so workers may.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        _start_server_deaf_to_ctrl_c()

    def measure_one(self, config: Config) -> Record:
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_worker, args=(config, self.protocol, self.meta, send, self.scope), daemon=True)
        t0 = time.monotonic()
        result = None
        try:
            proc.start()
            send.close()
            if recv.poll(self.timeout):
                result = recv.recv()
        except (EOFError, OSError):
            result = None
        except BaseException:  # Ctrl-C: the worker (which ignores SIGINT) goes with us, quietly
            if proc.pid is not None:
                proc.kill()
                proc.join()
            raise
        finally:
            recv.close()
        if result is None:
            timed_out = proc.is_alive() and time.monotonic() - t0 >= self.timeout
            proc.kill()
            proc.join()
            return failed_record(config, self.protocol, Status.ERROR, self._why(proc, timed_out), **self.meta)
        proc.join()
        return Record.from_dict(result)

    def _why(self, proc: Any, timed_out: bool) -> str:
        if timed_out:
            return f"timed out after {self.timeout:g} s"
        if proc.exitcode == -9:
            return "worker died: killed by SIGKILL (the kernel's OOM killer does this when host memory runs out)"
        return f"worker died with exit code {proc.exitcode} (a crash in native code?)"


def _start_server_deaf_to_ctrl_c() -> None:
    """Start the forkserver with SIGINT ignored: Python keeps an inherited SIG_IGN, so a Ctrl-C
    to the process group while the server imports torch prints no traceback from it, and
    its workers inherit the same. This process alone answers Ctrl-C (exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        multiprocessing.forkserver.ensure_running()  # signal handlers belong to the main thread
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, old)


def make_launcher(protocol: Protocol, *, isolate: bool, timeout: float = 600.0, **kwargs: Any) -> Launcher:
    if isolate:
        return Isolated(protocol, timeout=timeout, **kwargs)
    kwargs.pop("scope", None)
    return InProcess(protocol, **kwargs)


def _worker(config: Config, protocol: Protocol, meta: dict[str, Any], conn: Any, scope: "RankScope | None") -> None:
    # Everything inherited from the server is long-lived: keep it out of the collector, so
    # the protocol's gc.collect() scans only this config's objects (and pages stay shared).
    gc.freeze()
    # Ctrl-C reaches the whole process group: the parent stops the sweep and kills this
    # worker; a KeyboardInterrupt traceback from here would only bury its one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        record = measure(config, protocol, **meta) if scope is None else _measure_as_rank(config, protocol, meta, scope)
        conn.send(record.to_dict())
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent stopped listening (Ctrl-C): nobody is left to read a record or a traceback
    finally:
        conn.close()


def _measure_as_rank(config: Config, protocol: Protocol, meta: dict[str, Any], scope: "RankScope") -> Record:
    entered = scope.enter(config)
    try:
        entered.__enter__()
    except Exception as e:  # joining the ranks' group failed: a record like any failure
        why = (str(e).strip().splitlines() or [""])[0]
        return failed_record(config, protocol, Status.ERROR, f"rank {scope.rank} could not join the "
                             f"config's process group: {type(e).__name__}: {why}", **meta)
    try:
        return measure(config, protocol, **meta)
    finally:
        try:
            entered.__exit__(None, None, None)
        except Exception:
            pass  # leaving the group cannot change what was measured


# Imported once by the forkserver; torch._dynamo alone costs over a second (the tracked
# probe keeps dynamo out of the optimizers' steps), which every config would pay otherwise.
_PRELOAD = ["multiopt.instrument.protocol", "multiopt.instrument.probes.tracked",
            "multiopt.instrument.probes.fake", "torch._dynamo"]


def settle() -> None:
    """For a process that measures from here on: import what a first measurement imports
    (`_PRELOAD`; torch._dynamo is loaded by FakeTensorMode and every torch.optim constructor),
    then move everything alive into the collector's permanent generation. What exists now
    outlives every config, so each protocol's gc.collect() scans only its own objects (0.2 s
    a run otherwise: most of a small fake run)."""
    for name in _PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def _postfix(r: Record) -> str:
    if r.status != Status.OK:
        return f"last: {r.status}"
    return f"last peak {fmt_bytes(r.peak_total)}"


@dataclass(frozen=True)
class RankScope:
    """What an isolated config's worker needs to act as this rank: its device, and for a
    ZeRO config the store through which the ranks' children form a process group."""

    rank: int
    world_size: int
    local_rank: int
    run_id: str
    host: str
    port: int
    timeout_s: float
    probe: str = Probe.TRACKED

    @contextmanager
    def enter(self, config: Any) -> Iterator[None]:
        import torch.distributed as dist

        if str(config.device).startswith("cuda"):
            torch.cuda.set_device(self.local_rank)
        if not together(config, self.probe):
            yield
            return
        key = hashlib.sha1(repr(config).encode()).hexdigest()[:16]
        timeout = _dt.timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout)
        backend = "nccl" if str(config.device).startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=dist.PrefixStore(f"multiopt/{self.run_id}/{key}", store),
                                rank=self.rank, world_size=self.world_size, timeout=timeout)
        try:
            yield
        finally:
            dist.destroy_process_group()


def together(config: Any, probe: str) -> bool:
    """Whether every rank of the launch runs `config` together in one process group: ZeRO, and
    FSDP on a probe with real tensors (the fake probe simulates FSDP's ranks in one process)."""
    return bool(getattr(config, "zero", 0)) or (getattr(config, "fsdp", 0) > 1 and probe != Probe.FAKE)


_BAD_FIRST = (Status.OOM, Status.DIVERGED, Status.ERROR)


def merge_zero(records: Sequence[Record | dict[str, Any]]) -> Record:
    """One record for a ZeRO config from its ranks' records (index = rank): rank 0's fields,
    `ranks_state` and `opt_state_unsharded` from all. Status ok when every rank is ok;
    else the first rank that hit oom or diverged (the cause: its peers then fail in a
    collective, as errors), else the first error, named with its rank."""
    rows = [r.to_dict() if isinstance(r, Record) else Record.from_dict(r).to_dict() for r in records]
    out = dict(rows[0])
    per_rank = []
    for rank, r in enumerate(rows):
        opts = r.get("optimizers") or []
        per_rank.append({
            "rank": rank,
            "state_bytes": r.get("opt_state_bytes"),
            "state_scalar_bytes": r.get("opt_state_scalar_bytes"),
            "state_alloc_bytes": r.get("opt_state_alloc_bytes"),
            "expected": r.get("opt_state_expected"),
            "n_params": sum(o["n_params"] for o in opts) if opts else None,
            "n_param_tensors": sum(o.get("n_param_tensors", 0) for o in opts) if opts else None,
            "peak_total": r.get("peak_total"),
            "status": r.get("status"),
            "error": r.get("error"),
            "by_optimizer": [{k: o.get(k) for k in ("name", "optimizer", "n_params", "n_param_tensors", "state_bytes")}
                             for o in opts],
        })
    out["ranks_state"] = per_rank
    states = [p["state_bytes"] for p in per_rank]
    out["opt_state_unsharded"] = sum(states) if all(s is not None for s in states) else None
    bad = [(i, r) for i, r in enumerate(rows) if r.get("status") != Status.OK]
    if bad:
        for status in _BAD_FIRST:
            hit = [(i, r) for i, r in bad if r.get("status") == status]
            if hit:
                i, r = hit[0]
                out["status"] = status
                out["error"] = f"rank {i}: {r.get('error')}"
                break
    return Record.from_dict(out)


