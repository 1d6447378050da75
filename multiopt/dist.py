"""torch.distributed for multiopt: torchrun-sharded sweeps and ZeRO optimizer-state sharding.

Sharded sweeps. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) `multiopt run` calls
`run_sharded`: the configs still to run are dealt out, config i of that list to rank
i mod world size, each rank on its own device (`cuda:LOCAL_RANK`, or the CPU), and every
rank measures its share exactly as one process would (same isolation, same protocol), so
a record is the same whichever rank measured it. Results are never only in memory:

- each rank appends every record to its own shard, ``OUT/ranks/rank<R>.jsonl``, fsynced,
  the moment it exists (the same guarantee as a one-process sweep's results.jsonl);
- at the end rank 0 gathers every rank's records (over a gloo process group, so shards on
  node-local disks are fine) and writes ``OUT/results.jsonl`` in config order, atomically
  (temp file + rename), then env.json's run and the report; only then are the shards removed;
- a killed sweep leaves its shards; ``--resume`` (any world size) counts every record in
  results.jsonl and in the shards any rank can see as done, and the merge keeps them; a
  one-process ``--resume`` first folds the shards into results.jsonl (`fold_shards`).

ZeRO (config ``zero=1``). Each optimizer of the combo is a
`torch.distributed.optim.ZeroRedundancyOptimizer` over the parameters its rule claims, and
every rank runs the config together (same seed, same batch: the ranks hold identical
replicas, as data parallelism would after its all-reduce). ZeRO gives each rank a whole-
parameter partition of each optimizer, sorted-greedy by size, and broadcasts updated
parameters after each step. Gradients are not all-reduced (no DDP wrapper): the record
measures ZeRO-1's optimizer-state sharding, not DDP's gradient buckets. Each rank measures
its own memory; `merge_zero` makes one record of them: rank 0's numbers, plus every rank's
state in `opt_state_by_rank` and their sum in `opt_state_unsharded` (see record.py).

An isolated ZeRO config runs in one forkserver child per rank; the children form their own
process group through the launcher's TCPStore (MASTER_ADDR:MASTER_PORT) under a key prefix
unique to the run and config, so a crash in one config's group never poisons the next.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import UsageError
from .record import Record, append_jsonl, config_key, dumps, iter_jsonl

__all__ = [
    "RankEnv",
    "rank_env",
    "shard",
    "zero_multi_optimizer",
    "local_optimizer",
    "is_zero",
    "merge_zero",
    "ChildGroup",
    "run_sharded",
    "has_shards",
    "fold_shards",
]


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_env(environ: Any = None) -> RankEnv | None:
    """The launch this process is part of (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), or None."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError(
            f"RANK={environ.get('RANK')!r}, WORLD_SIZE={environ.get('WORLD_SIZE')!r}, "
            f"LOCAL_RANK={environ.get('LOCAL_RANK')!r} are not integers; launch with torchrun"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}; launch with torchrun")
    return RankEnv(rank, world, local)


def world_size() -> int:
    """Ranks of the current launch (1 outside torchrun)."""
    env = rank_env()
    return env.world_size if env else 1


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Item i goes to rank i mod world."""
    return [x for i, x in enumerate(items) if i % world == rank]


# --- ZeRO ---------------------------------------------------------------------------------


def zero_multi_optimizer(model: torch.nn.Module, rules: Any, *, impl: str = "default", group: Any = None) -> Any:
    """`MultiOptimizer.from_spec`, with each rule's optimizer wrapped in
    ZeroRedundancyOptimizer over the default (or given) process group."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from . import optimizers as registry
    from .multi import MultiOptimizer, _check_matrix_only, impl_kwargs
    from .spec import assign, rules_from

    parsed = rules_from(rules)
    specs = [registry.resolve(r.optimizer) for r in parsed]
    for rule, spec in zip(parsed, specs):
        spec.check_keywords(rule.options, where=f"rule '{rule}'")
    groups = assign(model.named_parameters(), parsed)
    children = {}
    for i, (rule, spec, params) in enumerate(zip(parsed, specs, groups)):
        if spec.matrix_only:
            _check_matrix_only(rule, spec, params, parsed[i + 1:])
        kwargs = {**rule.options, **impl_kwargs(spec, impl, rule.options)}
        try:
            children[rule.label] = ZeroRedundancyOptimizer(
                [p for _, p in params], optimizer_class=spec.cls, process_group=group, **kwargs)
        except (ValueError, TypeError) as e:
            raise UsageError(f"rule '{rule}': ZeroRedundancyOptimizer({spec.name}) refused its settings or parameters: {e}") from None
    return MultiOptimizer(children, model=model, rules=parsed)


def is_zero(optimizer: Any) -> bool:
    # Importing torch.distributed.optim costs most of a second (it scripts its functional
    # optimizers): never pay it to learn that a plain optimizer is not ZeRO.
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


def local_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the state: ZeRO's local one over this rank's partition, else itself."""
    return optimizer.optim if is_zero(optimizer) else optimizer


_BAD_FIRST = ("oom", "diverged", "error")


def merge_zero(records: Sequence[Record | dict[str, Any]]) -> Record:
    """One record for a ZeRO config from its ranks' records (index = rank): rank 0's fields,
    `opt_state_by_rank` and `opt_state_unsharded` from all. Status ok when every rank is ok;
    else the first rank that hit oom or diverged (the cause: its peers then fail in a
    collective, as errors), else the first error, named with its rank."""
    rows = [r.to_dict() if isinstance(r, Record) else dict(r) for r in records]
    out = dict(rows[0])
    per_rank = []
    for rank, r in enumerate(rows):
        opts = json.loads(r.get("opt_state_by_optimizer") or "[]")
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
    out["opt_state_by_rank"] = json.dumps(per_rank)
    states = [p["state_bytes"] for p in per_rank]
    out["opt_state_unsharded"] = sum(states) if all(s is not None for s in states) else None
    bad = [(i, r) for i, r in enumerate(rows) if r.get("status") != "ok"]
    if bad:
        for status in _BAD_FIRST:
            hit = [(i, r) for i, r in bad if r.get("status") == status]
            if hit:
                i, r = hit[0]
                out["status"] = status
                out["error"] = f"rank {i}: {r.get('error')}"
                break
    return Record.from_dict(out)


@dataclass(frozen=True)
class ChildGroup:
    """What an isolated config's child needs to act as this rank: its device, and for a
    ZeRO config the store through which the ranks' children form a process group."""

    rank: int
    world_size: int
    local_rank: int
    run_id: str
    host: str
    port: int
    timeout_s: float

    @contextmanager
    def enter(self, config: Any) -> Iterator[None]:
        import torch.distributed as dist

        if str(config.device).startswith("cuda"):
            torch.cuda.set_device(self.local_rank)
        if not getattr(config, "zero", 0):
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


# --- the sharded sweep -------------------------------------------------------------------


def _store_address() -> tuple[str, int]:
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))


def _agree(env: RankEnv, fn: Any) -> Any:
    """Run `fn` on rank 0 and hand every rank its result; a UsageError there is raised on
    every rank (so no rank waits forever in a collective the others never reach)."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if env.is_main:
        try:
            box[0] = ("ok", fn())
        except UsageError as e:
            box[0] = ("usage", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "usage":
        raise UsageError(value)
    return value


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


def _write_atomic(path: Path, rows: Sequence[Record | dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_sharded(
    configs: Sequence[Any],
    out: Path,
    protocol: Any,
    *,
    env: RankEnv,
    preset: str | None = None,
    resume: bool = False,
    isolate: bool = True,
    timeout: float = 600.0,
    report: bool = True,
    progress: bool = True,
) -> int:
    """`multiopt run` under torchrun (see the module docstring). Every rank calls it with the
    same, already validated configs; rank 0 writes results.jsonl, env.json and the report."""
    import uuid

    import torch.distributed as dist

    from . import env as envmod
    from .sweep import Runner, config_key_of

    results = out / "results.jsonl"
    shard_dir = out / "ranks"
    mine = shard_dir / f"rank{env.rank}.jsonl"
    cuda = any(str(c.device).startswith("cuda") for c in configs)
    if cuda:
        torch.cuda.set_device(env.local_rank)
    # Ranks wait for each other at the end for as long as the longest share may take.
    pg_timeout = _dt.timedelta(seconds=timeout * max(len(configs), 1) + 600)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", timeout=pg_timeout)
    try:
        def check_out() -> None:
            out.mkdir(parents=True, exist_ok=True)
            if not resume and (results.exists() or _shard_rows(shard_dir)):
                held = results if results.exists() else shard_dir
                raise UsageError(f"{held} already holds results; pass --resume to continue that sweep, or another --out")

        _agree(env, check_out)
        shard_dir.mkdir(parents=True, exist_ok=True)
        if not resume and mine.exists():
            mine.unlink()  # an empty shard a rank-0-less disk kept from an earlier launch
        # Done = every record in results.jsonl (rank 0) and in any shard any rank can see.
        seen = _shard_rows(shard_dir) + (list(iter_jsonl(results)) if env.is_main and results.exists() else [])
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, seen)
        prior: dict[tuple, dict[str, Any]] = {}
        for rows in gathered:
            for r in rows:
                prior.setdefault(config_key(r), r)
        todo = [c for c in configs if config_key_of(c, protocol.probe) not in prior]
        device = configs[0].device if configs else "cpu"

        def make_meta() -> dict[str, Any]:
            e = envmod.collect(device, protocol.probe, preset, protocol.threads)
            e.update(world_size=env.world_size, backend="gloo" + ("+nccl" if cuda else ""))
            (out / "env.json").write_text(json.dumps(e, indent=2) + "\n")
            return {"run_id": uuid.uuid4().hex[:12], "git_sha": e["git_sha"], "preset": preset,
                    "device_name": e["device_name"]}

        meta = _agree(env, make_meta)
        if env.is_main and resume and len(todo) < len(configs):
            print(f"resuming: {len(configs) - len(todo)} of {len(configs)} configs already recorded in {out}")
        plain = shard([c for c in todo if not c.zero], env.rank, env.world_size)
        zeros = [c for c in todo if c.zero]
        host, port = _store_address()
        child = ChildGroup(env.rank, env.world_size, env.local_rank, meta["run_id"], host, port, timeout)

        def finish(config: Any, record: Record) -> Record | None:
            if not config.zero:
                return record
            ranks: list[Any] = [None] * env.world_size
            dist.all_gather_object(ranks, record.to_dict())
            # only rank 0 keeps (and appends to its shard) the one merged record
            return merge_zero(ranks) if env.is_main else None

        runner = Runner(mine, protocol, isolate=isolate, timeout=timeout, meta=meta,
                        progress=progress and env.is_main, child=child, finish=finish)
        t0 = time.monotonic()
        records = runner.run(plain + zeros)
        everything: list[Any] = [None] * env.world_size
        dist.all_gather_object(everything, [r.to_dict() for r in records])
        rc = 0
        if env.is_main:
            new = [r for rows in everything for r in rows]
            order = {config_key_of(c, protocol.probe): i for i, c in enumerate(configs)}
            merged: dict[tuple, dict[str, Any]] = dict(prior)
            for r in new:
                merged[config_key(r)] = r
            rows = sorted(merged.values(), key=lambda r: order.get(config_key(r), len(order)))
            _write_atomic(results, rows)
            failed = [r for r in new if r.get("status") != "ok"]
            print(f"{len(new)} configs on {env.world_size} ranks in {time.monotonic() - t0:.1f} s "
                  f"({len(failed)} not ok) -> {results}")
            for r in failed:
                print(f"  {r['status']}: {r['combo']} w={r['width']} b={r['batch']} {r['impl']}"
                      f"{' zero' if r.get('zero') else ''}: {r.get('error')}")
        dist.barrier()  # results.jsonl holds every shard's records (seen at the start or run now)
        for p in shard_dir.glob("rank*.jsonl"):
            p.unlink(missing_ok=True)
        dist.barrier()
        try:
            shard_dir.rmdir()
        except OSError:
            pass  # already gone (shared disk), or a foreign file in it: leave it
        if env.is_main:
            if report:
                from .report import write_report

                print(f"report: {write_report([out], out / 'report.md')}")
        return rc
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
