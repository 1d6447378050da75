"""Sweeps: configs through a launcher into OUT/results.jsonl, with env.json beside it.

One path for one process and for torchrun ranks; what differs is a `Team`:

- `Solo`: one process runs every config and appends to results.jsonl;
- `Ranks` (under torchrun: RANK, WORLD_SIZE, LOCAL_RANK set): the configs still to run are
  dealt out, config i of that list to rank i mod world size, each rank on its own device
  (`cuda:LOCAL_RANK`, or the CPU), measured exactly as one process would (same isolation,
  same protocol), so a record is the same whichever rank measured it. Each rank appends to
  its own shard, ``OUT/ranks/rank<R>.jsonl``, fsynced, the moment a record exists; at the end
  rank 0 gathers every rank's records (over a gloo process group, so shards on node-local
  disks are fine) and writes results.jsonl in config order, atomically, and only then are the
  shards removed. A killed sweep leaves its shards; ``--resume`` (any world size) counts every
  record in results.jsonl and in the shards as done; a one-process ``--resume`` first folds
  the shards into results.jsonl (`fold_shards`).

ZeRO (config ``zero=1``): every rank runs the config together (same seed, same batch: the
ranks hold identical replicas, as data parallelism would after its all-reduce), each in an
isolated worker that joins a process group of its own through the launcher's TCPStore
(MASTER_ADDR:MASTER_PORT) under a key unique to the run and config, so a crash in one
config's group never poisons the next; `launch.merge_zero` makes one record of the ranks'.

The shared tail (refuse to overwrite without --resume, skip what is recorded, env.json, run
metadata) is `sweep` itself; the report is written by the command, not here.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import env as envmod
from ..errors import UsageError
from ..instrument.fsdp import merge_ranks
from ..instrument.protocol import Protocol, validate
from ..kinds import Probe, Status
from ..record import Config, Record, config_key
from ..store import append_jsonl, iter_jsonl, write_jsonl_atomic, write_text_atomic
from .launch import RankScope, make_launcher, merge_zero, together

__all__ = ["SweepResult", "sweep", "fold_shards", "has_shards", "shard"]


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did: the records measured now (every rank's) and where they went."""

    out: Path
    results: Path
    records: tuple[Record, ...]
    already: int  # configs found recorded (--resume)
    total: int
    seconds: float
    ranks: int = 1

    @property
    def failed(self) -> tuple[Record, ...]:
        return tuple(r for r in self.records if r.status != Status.OK)

    def summary(self) -> list[str]:
        """The lines a person reads after a sweep: counts, time, and every failure named by
        its whole config."""
        where = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        lines = [f"{len(self.records)} configs{where} in {self.seconds:.1f} s ({len(self.failed)} not ok) -> {self.results}"]
        lines += [f"  {r.status}: {r.config().label()}: {r.error}" for r in self.failed]
        return lines


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Item i goes to rank i mod world."""
    return [x for i, x in enumerate(items) if i % world == rank]


def sweep(configs: Sequence[Config], out: Path, protocol: Protocol, *, preset: str | None = None,
          resume: bool = False, isolate: bool = True, timeout: float = 600.0,
          progress: bool = True) -> SweepResult | None:
    """Run `configs` into OUT/results.jsonl (+ env.json). Returns what was done, on the main
    process (None on the other ranks of a torchrun launch). UsageError before any config
    runs for a bad config or an OUT that holds results without `resume`."""
    for c in configs:
        validate(c, protocol)
    launch = envmod.rank_env()
    cuda = any(c.device.startswith("cuda") for c in configs)
    team: Team = Solo(out) if launch is None else Ranks(out, launch, timeout * max(len(configs), 1) + 600, cuda,
                                                        protocol.probe)
    with team:
        team.agree(lambda: team.check_out(resume))
        prior = team.recorded(resume)
        todo = [c for c in configs if c.record_key(protocol.probe) not in prior]
        device = configs[0].device if configs else "cpu"
        meta = team.agree(lambda: _write_env(out, device, protocol, preset, team.world))
        if team.is_main and resume and len(todo) < len(configs):
            print(f"resuming: {len(configs) - len(todo)} of {len(configs)} configs already in {team.results}")
        launcher = make_launcher(protocol, isolate=isolate, timeout=timeout, meta=meta,
                                 progress=progress and team.is_main, scope=team.scope(meta["run_id"], timeout),
                                 finish=team.finish)
        t0 = time.monotonic()
        mine = launcher.run(team.share(todo), team.append_to)
        records = team.collect(mine, prior, configs, protocol.probe)
        seconds = time.monotonic() - t0
    if not team.is_main:
        return None
    return SweepResult(out, team.results, tuple(records), len(configs) - len(todo), len(configs), seconds, team.world)


def _write_env(out: Path, device: str, protocol: Protocol, preset: str | None, world: int) -> dict[str, Any]:
    """env.json of the run, and the metadata every record of it carries."""
    env = envmod.collect(device, protocol.probe, preset, protocol.threads)
    if world > 1:
        env.update(world_size=world, backend="gloo" + ("+nccl" if device.startswith("cuda") else ""))
    write_text_atomic(out / "env.json", json.dumps(env, indent=2) + "\n")
    return {"run_id": uuid.uuid4().hex[:12], "git_sha": env["git_sha"], "preset": preset,
            "device_name": env["device_name"]}


# --- teams: who runs which config, and how the records come together ------------------------


class Team:
    """One process, or the ranks of a torchrun launch, running one sweep into OUT."""

    world = 1
    is_main = True

    def __init__(self, out: Path) -> None:
        self.out = out
        self.results = out / "results.jsonl"
        self.append_to = self.results
        self.finish: Callable[[Config, Record], Record | None] | None = None

    def __enter__(self) -> "Team":
        """Hold OUT/.lock (an OS lock: the kernel drops it when this process dies, however it
        dies) so a second sweep into OUT refuses instead of writing every config twice."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UsageError(f"{self.out}: another multiopt run is writing there now; wait for it, or choose "
                             "another --out") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.close()  # releases the lock

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the main process and give every process its result."""
        return fn()

    def check_out(self, resume: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            return
        if self.results.exists():
            raise UsageError(f"{self.results} already holds results; pass --resume to continue that sweep, or another --out")
        if has_shards(self.out):
            raise UsageError(f"{self.out / 'ranks'} already holds results of a sharded sweep; pass --resume to "
                             "continue it, or another --out")

    def recorded(self, resume: bool) -> dict[tuple, dict[str, Any]]:
        """Records already written, by config key."""
        if resume:
            fold_shards(self.out)  # a killed torchrun sweep's per-rank records join results.jsonl
        rows = list(iter_jsonl(self.results)) if resume and self.results.exists() else []
        return {config_key(r): r for r in rows}

    def scope(self, run_id: str, timeout: float) -> RankScope | None:
        return None

    def share(self, todo: list[Config]) -> list[Config]:
        return todo

    def collect(self, mine: list[Record], prior: dict[tuple, dict[str, Any]], configs: Sequence[Config],
                probe: str) -> list[Record]:
        return mine


class Solo(Team):
    """One process runs every config, appending to results.jsonl."""


class Ranks(Team):
    """The ranks of a torchrun launch share the configs (see the module docstring)."""

    def __init__(self, out: Path, launch: envmod.RankEnv, wait_s: float, cuda: bool, probe: str = Probe.TRACKED) -> None:
        super().__init__(out)
        self.probe = probe
        self.launch = launch
        self.world = launch.world_size
        self.is_main = launch.is_main
        self.shards = out / "ranks"
        self.append_to = self.shards / f"rank{launch.rank}.jsonl"
        self.finish = self._merge_zero
        # Ranks wait for each other at the end for as long as the longest share may take.
        self._wait = _dt.timedelta(seconds=wait_s)
        self._owns_group = False
        self._cuda = cuda

    def __enter__(self) -> "Ranks":
        # torch.distributed is needed only under torchrun, and costs its import time elsewhere
        import torch
        import torch.distributed as dist

        self._dist = dist
        if self._cuda:
            torch.cuda.set_device(self.launch.local_rank)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group("gloo", timeout=self._wait)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._owns_group and self._dist.is_initialized():
            self._dist.destroy_process_group()

    def agree(self, fn: Callable[[], Any]) -> Any:
        """A UsageError on rank 0 is raised on every rank (so no rank waits forever in a
        collective the others never reach)."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("value", fn())
            except UsageError as e:
                box[0] = ("usage", str(e))
        self._dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "usage":
            raise UsageError(value)
        return value

    def recorded(self, resume: bool) -> dict[tuple, dict[str, Any]]:
        """Done = every record in results.jsonl (rank 0) and in any shard any rank can see."""
        self.shards.mkdir(parents=True, exist_ok=True)
        if not resume and self.append_to.exists():
            self.append_to.unlink()  # an empty shard a rank-0-less disk kept from an earlier launch
        seen = _shard_rows(self.shards)
        if self.is_main and self.results.exists():
            seen += list(iter_jsonl(self.results))
        gathered: list[Any] = [None] * self.world
        self._dist.all_gather_object(gathered, seen)
        prior: dict[tuple, dict[str, Any]] = {}
        for rows in gathered:
            for r in rows:
                prior.setdefault(config_key(r), r)
        return prior

    def scope(self, run_id: str, timeout: float) -> RankScope:
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
        return RankScope(self.launch.rank, self.world, self.launch.local_rank, run_id, host, port, timeout, self.probe)

    def share(self, todo: list[Config]) -> list[Config]:
        alone = [c for c in todo if not together(c, self.probe)]
        return shard(alone, self.launch.rank, self.world) + [c for c in todo if together(c, self.probe)]

    def _merge_zero(self, config: Config, record: Record) -> Record | None:
        if not together(config, self.probe):
            return record
        ranks: list[Any] = [None] * self.world
        self._dist.all_gather_object(ranks, record.to_dict())
        # only rank 0 keeps (and appends to its shard) the one merged record
        if not self.is_main:
            return None
        return merge_ranks(ranks) if config.fsdp > 1 else merge_zero(ranks)

    def collect(self, mine: list[Record], prior: dict[tuple, dict[str, Any]], configs: Sequence[Config],
                probe: str) -> list[Record]:
        everything: list[Any] = [None] * self.world
        self._dist.all_gather_object(everything, [r.to_dict() for r in mine])
        new = [Record.from_dict(r) for rows in everything for r in rows]
        if self.is_main:
            order = {c.record_key(probe): i for i, c in enumerate(configs)}
            merged = dict(prior)
            merged.update((r.key(), r.to_dict()) for r in new)
            write_jsonl_atomic(self.results, sorted(merged.values(), key=lambda r: order.get(config_key(r), len(order))))
        self._dist.barrier()  # results.jsonl holds every shard's records (seen at the start or run now)
        for p in self.shards.glob("rank*.jsonl"):
            p.unlink(missing_ok=True)
        self._dist.barrier()
        try:
            self.shards.rmdir()
        except OSError:
            pass  # already gone (shared disk), or a foreign file in it: leave it
        return new


def _shard_rows(shard_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if shard_dir.is_dir():
        for p in sorted(shard_dir.glob("rank*.jsonl")):
            rows.extend(iter_jsonl(p))
    return rows


def has_shards(out: Path) -> bool:
    """Whether OUT/ranks holds records of a sharded sweep that never merged them."""
    return bool(_shard_rows(out / "ranks"))


def fold_shards(out: Path) -> int:
    """One process resuming a killed sharded sweep: append the shards' records that
    results.jsonl lacks to it, then remove the shards. Returns how many were added."""
    shard_dir = out / "ranks"
    rows = _shard_rows(shard_dir)
    if not rows:
        return 0
    results = out / "results.jsonl"
    have = {config_key(r) for r in iter_jsonl(results)} if results.exists() else set()
    new: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if config_key(r) not in have:
            new.setdefault(config_key(r), r)
    append_jsonl(results, list(new.values()))
    for p in shard_dir.glob("rank*.jsonl"):
        p.unlink()
    try:
        shard_dir.rmdir()
    except OSError:
        pass
    return len(new)
