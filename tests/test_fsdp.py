"""FSDP2 per rank (issue 23): a tiny Llama sharded over 2 ranks. The fake probe (ranks simulated
on torch's fake process group) equals torchrun on gloo with real tensors, per rank and to the
byte; each rank's optimizer state is its shards' (the total over N plus padding, counted here
from torch.chunk); torch's FSDPMemTracker agrees per category; bad input is one line, exit 2."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from multiopt.cli import main
from multiopt.errors import UsageError
from multiopt.instrument import fsdp
from multiopt.instrument.protocol import Config, Protocol, measure, validate
from multiopt.kinds import Probe, Status
from multiopt.record import MEMORY_COLUMNS, RANK_FSDP_COLUMNS, Record
from multiopt.train import models
from multiopt.units import round_alloc

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "tests.hfllama:llama"
RULES = {"adamw": "rest=adamw", "muon+adamw": "@2d=muon; rest=adamw"}
N = 2
PROTOCOL = Protocol(probe=Probe.FAKE, steps=0, warmup=2)
# The fast tests: our MLP, width 9 (dim 0 of 9 rows: 5 on rank 0, 4 on rank 1, so padded), one
# warm-up step. A few seconds where the Llama's fake estimate takes twenty on 2 shared cores.
QUICK = Protocol(probe=Probe.FAKE, steps=0, warmup=1)


def _config(rules: str, **kw) -> Config:
    return Config(model=LLAMA, width=32, depth=2, batch=2, combo="custom", rules=rules, fsdp=N, **kw)


def _mlp(rules: str, **kw) -> Config:
    return Config(model="mlp", width=9, depth=2, batch=2, combo="custom", rules=rules, fsdp=N, **kw)


def _measured(make: Callable[[str], Config], protocol: Protocol) -> dict[str, Record]:
    out = {}
    for name, rules in RULES.items():
        rec = measure(make(rules), protocol)
        assert rec.status == Status.OK, rec.error
        out[name] = rec
    return out


@pytest.fixture(scope="module")
def fake_mlp() -> dict[str, Record]:
    return _measured(_mlp, QUICK)


@pytest.fixture(scope="module")
def fake() -> dict[str, Record]:
    pytest.importorskip("transformers", reason="needs transformers (the test extra)")
    return _measured(_config, PROTOCOL)


def _shapes(config: Config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = models.for_config(config).build(config.width, config.depth)
    return {n: p.shape for n, p in model.named_parameters()}


def _local_rows(rows: int, rank: int) -> int:
    """This rank's rows of a dim 0 of `rows`, as torch.chunk deals them (FSDP2's sharding)."""
    chunks = torch.chunk(torch.empty(rows, device="meta"), N)
    return chunks[rank].shape[0] if rank < len(chunks) else 0


def _local_numel(shape: torch.Size, rank: int) -> int:
    return _local_rows(shape[0], rank) * math.prod(shape[1:])


def _check_state_is_shards(fake: dict[str, Record], shapes: dict[str, torch.Size]) -> None:
    """Each rank's optimizer state is its shards' (total / N plus padding), counted here."""
    muon = {n for n, s in shapes.items() if len(s) == 2}
    for name, rec in fake.items():
        assert [r.rank for r in rec.ranks_state] == list(range(N))
        on_muon = muon if name == "muon+adamw" else set()
        for rank, row in enumerate(rec.ranks_state):
            # AdamW: exp_avg + exp_avg_sq (float32) per local element and a float32 step per
            # tensor; Muon: one float32 momentum buffer per local element
            want = sum(4 * _local_numel(s, rank) if n in on_muon else 8 * _local_numel(s, rank) + 4
                       for n, s in shapes.items())
            assert row.state_bytes == want, (name, rank)
        # the same optimizers on the whole model: what one process holds without FSDP
        whole = sum(4 * math.prod(s) if n in on_muon else 8 * math.prod(s) + 4 for n, s in shapes.items())
        scalars = 4 * sum(n not in on_muon for n in shapes)
        assert rec.opt_state_unsharded == whole + (N - 1) * scalars  # every rank keeps its own steps
        # rank 0 holds ceil(rows / N) of each dim 0: the elements' state over N, plus its padding
        padding = sum((_local_rows(s[0], 0) * N - s[0]) * math.prod(s[1:]) * (4 if n in on_muon else 8)
                      for n, s in shapes.items())
        assert padding > 0  # the test's models are chosen so that N does not divide them
        assert N * (rec.ranks_state[0].state_bytes - scalars) == whole - scalars + padding
        assert rec.opt_state_bytes == rec.ranks_state[0].state_bytes
        assert rec.opt_state_expected == rec.opt_state_bytes  # the registry's formula, on local shards


def _check_padded_params(rec: Record, shapes: dict[str, torch.Size]) -> None:
    # every rank's storage is padded to rank 0's chunk (FSDP2's _sharded_param_data)
    padded = sum(round_alloc(4 * _local_numel(s, 0)) for s in shapes.values())
    assert [r.param_bytes for r in rec.ranks_state] == [padded] * N
    assert rec.param_bytes == padded
    # an odd dim 0 makes rank 1 hold fewer rows than rank 0: its own kind, measured, not copied
    assert [r.same_as for r in rec.ranks_state] == [None, None]
    assert rec.ranks_state[0].reduce_scatter_backward > 0 and rec.ranks_state[0].all_gather_forward > 0


def test_each_ranks_state_is_its_shards_total_over_n_plus_padding(fake_mlp):
    _check_state_is_shards(fake_mlp, _shapes(_mlp("rest=adamw")))


def test_sharded_parameters_are_padded_shards_and_muon_gathers_its_matrix(fake_mlp):
    shapes = _shapes(_mlp("rest=adamw"))
    _check_padded_params(fake_mlp["adamw"], shapes)
    # rank 0's state less rank 1's: 1 row of each of 2 weights (9 wide) and 2 biases, 2 moments
    assert fake_mlp["adamw"].ranks_state[0].state_bytes - fake_mlp["adamw"].ranks_state[1].state_bytes == \
        2 * 4 * 2 * (9 + 1)
    (muon,) = [o for o in fake_mlp["muon+adamw"].optimizers if o.optimizer == "muon"]
    assert muon.step_temp_bytes >= round_alloc(4 * 2 * 5 * 9)  # a 9 x 9 weight, whole, padded to 2 x 5 rows


@pytest.mark.slow  # the tiny Llama's fake estimate: about 20 s on 2 shared cores
def test_llama_per_rank_state_params_and_muon_gather(fake):
    shapes = _shapes(_config("rest=adamw"))
    _check_state_is_shards(fake, shapes)
    rec = fake["adamw"]
    _check_padded_params(rec, shapes)
    # vocab 131: rank 1 holds 65 rows of embed/lm_head, rank 0 66
    assert rec.ranks_state[0].state_bytes - rec.ranks_state[1].state_bytes == 2 * 8 * 32  # 2 tensors, 1 row, 2 moments
    # unsharded parameters live in forward: at least the largest FSDP unit's whole parameters
    assert rec.ranks_state[0].unsharded_forward >= round_alloc(4 * 131 * 32)
    (muon,) = [o for o in fake["muon+adamw"].optimizers if o.optimizer == "muon"]
    # the largest 2-D parameter, whole: lm_head / embed, 131 x 32 float32, padded to 2 x 66 rows
    assert muon.step_temp_bytes >= round_alloc(4 * 2 * 66 * 32)


def test_rank_kinds_follow_torch_chunk():
    assert fsdp.shard_rows(131, 2) == (66, 65)
    assert fsdp.shard_rows(9, 8) == (2, 2, 2, 2, 1, 0, 0, 0)
    assert [t.shape[0] for t in torch.chunk(torch.empty(9), 8)] == [2, 2, 2, 2, 1]  # and 3 ranks without a chunk
    lin = torch.nn.Linear(4, 9, device="meta")  # weight 9 x 4, bias 9
    assert fsdp.rank_kinds(lin, 8) == [(0, (0, 1, 2, 3)), (4, (4,)), (5, (5, 6, 7))]


# --- torchrun on gloo equals the fake estimate, per rank ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict[str, Record]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(N), "--master-port",
           str(_free_port()), "-m", "multiopt", "run", "--models", LLAMA, "--widths", "32", "--depths", "2",
           "--batches", "2", *[a for name, r in RULES.items() for a in ("--rules", f"{name}::{r}")],
           "--fsdp", str(N), "--probe", "tracked", "--steps", "0", "--warmup", str(PROTOCOL.warmup), "--out", str(out),
           "--no-progress", "--no-report"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [Record.from_dict(json.loads(line)) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r.combo: r for r in rows}


@pytest.mark.slow  # two ranks of torchrun, two configs: about 1.5 minutes on 2 shared cores
def test_torchrun_on_gloo_equals_the_fake_estimate_per_rank_to_the_byte(tracked, fake):
    assert set(tracked) == set(RULES)
    for name, t in tracked.items():
        f = measure(t.config(), PROTOCOL)  # the record's own config, on the fake probe
        assert t.status == "ok" and f.status == "ok", (t.error, f.error)
        assert (t.probe, f.probe, t.fsdp) == ("tracked", "fake", N)
        for column in MEMORY_COLUMNS:
            assert getattr(t, column) == getattr(f, column), (name, column)
        assert len(t.ranks_state) == len(f.ranks_state) == N
        for a, b in zip(t.ranks_state, f.ranks_state):
            for column in (*RANK_FSDP_COLUMNS, "state_bytes", "state_alloc_bytes", "expected", "peak_total"):
                assert getattr(a, column) == getattr(b, column), (name, a.rank, column)
            assert [o.state_bytes for o in a.by_optimizer] == [o.state_bytes for o in b.by_optimizer]
        assert t.opt_state_unsharded == f.opt_state_unsharded


# --- torch's FSDPMemTracker on the same model and step --------------------------------------


@pytest.mark.slow  # three more steps of the model under torch's tracker
def test_fsdp_mem_tracker_agrees_per_category(fake, monkeypatch):
    """FSDPMemTracker (torch/distributed/_tools/fsdp2_mem_tracker.py) on the fake process group,
    rank 0, the same model, rules and step. On a CPU it counts exact bytes; its CUDA rule (each
    storage rounded up to 512) is applied here so it counts as our probes do. Compared after a
    whole step (zero_grad done) and at its peak: sharded parameters, optimizer state, buffers and
    inputs equal ours; the peak total equals ours; its unsharded-parameter and all-gather bytes at
    that peak are within our per-phase peaks of them (it snapshots every category at the total's
    peak, we keep each category's own peak per phase)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools import mem_tracker
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from tests.hfllama import llama, make_batch

    monkeypatch.setattr(mem_tracker._WeakRefInfo, "_calculate_mem_consumed",
                        lambda self: math.ceil(self.size * self.element_size / 512) * 512)
    rec = fake["adamw"]
    with fsdp.fake_group(0, N):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (N,))
        with FakeTensorMode():
            with torch.device("meta"):
                model = llama()
            fsdp.shard_model(model, mesh, _config(RULES["adamw"]))
            model.to_empty(device="cpu")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            batch = make_batch(model, 2, generator=torch.Generator().manual_seed(0))
            tracker = FSDPMemTracker(mod=model, optm=opt)
            tracker.track_inputs((batch,))
            with tracker:
                for _ in range(PROTOCOL.warmup + 1):  # warm-up steps, then the one the record measured
                    model(**batch).loss.backward()
                    opt.step()
                    opt.zero_grad()
                    tracker.reset_mod_stats()  # it tracks one iteration's module stats at a time
                now = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
                peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    assert now[_FSDPRefType.SHARDED_PARAM] == rec.param_bytes
    assert now[_FSDPRefType.OPT] == rec.opt_state_alloc_bytes
    assert now[_FSDPRefType.UNSHARDED_PARAM] == now[_FSDPRefType.ALL_GATHER] == now[_FSDPRefType.REDUCE_SCATTER] == 0
    # Its peak is the highest total over the steps it watched, all the same size after the
    # first (which made the state); ours is the instrumented step's: equal to the byte.
    assert peak["Total"] == rec.peak_total - rec.mem_base
    # Its categories are a snapshot at that peak (in backward); ours are each category's own peak
    # in the phase, which bound them. Buffers (rotary inv_freq) and inputs are our step's start
    # less parameters and state.
    row = rec.ranks_state[0]
    assert peak[_FSDPRefType.SHARDED_PARAM] == row.param_bytes
    assert peak[_FSDPRefType.OPT] == row.state_alloc_bytes
    assert 0 < peak[_FSDPRefType.UNSHARDED_PARAM] <= row.unsharded_backward
    assert 0 < peak[_FSDPRefType.ALL_GATHER] <= row.all_gather_backward
    assert peak[_FSDPRefType.BUFFER] + peak[_FSDPRefType.INP] == \
        rec.mem_step_start - rec.mem_base - rec.param_bytes - rec.opt_state_alloc_bytes


# --- bad input ---------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_fsdp_input_is_one_line_and_exit_2(capsys, monkeypatch):
    base = ("estimate", "--model", "mlp", "--width", "9", "--depth", "2", "--batch", "2", "--rules", "rest=adamw")
    code, err = _cli(capsys, *base, "--fsdp", "200")
    assert code == 2 and len(err.splitlines()) == 1 and "larger than the parameters can shard" in err
    # 9 rows: 9 ranks hold one each; 8 would leave the last three empty (chunks of 2)
    assert "use --fsdp 9 " in err
    code, err = _cli(capsys, *base, "--fsdp", "8")
    assert code == 2 and "use --fsdp 5 " in err
    code, err = _cli(capsys, "plan", "--budget", "16MiB", "--model", "mlp", "--fsdp", "0,2")
    assert code == 2 and len(err.splitlines()) == 1 and "each degree is 1" in err
    code, err = _cli(capsys, *base, "--fsdp", "-1")
    assert code == 2 and len(err.splitlines()) == 1 and "fsdp must be" in err
    with pytest.raises(UsageError, match="does not combine with ZeRO-1"):
        validate(_mlp("rest=adamw", zero=1, ranks=2), Protocol(probe=Probe.TRACKED))
    with pytest.raises(UsageError, match="step_in_backward=0 with --fsdp"):
        validate(_mlp("rest=adamw", step_in_backward=1), QUICK)
    code, err = _cli(capsys, *base, "--fsdp", "2", "--probe", "tracked", "--steps", "0")
    assert code == 2 and len(err.splitlines()) == 1 and "launch with torchrun" in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, err = _cli(capsys, *base, "--fsdp", "2", "--probe", "tracked", "--steps", "0")
    assert code == 2 and len(err.splitlines()) == 1 and "launch of 4 ranks" in err


def test_records_without_fsdp_read_as_unsharded():
    row = Record(width=8).to_dict()
    for c in ("fsdp", "reshard_after_forward", "fsdp_mp"):
        row.pop(c)
    rec = Record.from_dict(row)
    assert (rec.fsdp, rec.reshard_after_forward, rec.fsdp_mp) == (0, 1, "none")


# --- plan: the sharding degree as an axis -----------------------------------------------------


def test_plan_offers_the_sharding_degree_as_an_axis():
    """`plan --fsdp 1,2` on the fake probe: a weight-heavy MLP (AdamW's state twice the weights)
    fits a larger batch per rank sharded over 2 than whole; each answer is the boundary (every
    rank within the budget at its batch, batch + 1 out of memory); an optimizer sized by formula
    (Adafactor reads values) is refused under FSDP with the reason, before any run."""
    from dataclasses import replace

    from multiopt.run import plan as planning
    from multiopt.units import parse_bytes

    budget = parse_bytes("16MiB")
    base = Config(model="mlp", width=512, depth=3, target="cpu")
    fsdp_axis = planning.field_axis("fsdp", "--fsdp", (1, 2))
    p = planning.plan(base, [planning.combo_axis(planning.preset_combos(["adamw"])), fsdp_axis], budget, confirm="all")
    rows = {(r.values["combo"], r.values["fsdp"]): r for r in p.rows}
    whole, sharded = rows["adamw", "1"], rows["adamw", "2"]
    assert whole.confirmed and sharded.confirmed and sharded.batch > whole.batch > 1
    assert sharded.record.fsdp == 2 and len(sharded.record.ranks_state) == 2
    assert all(r.peak_total <= budget for r in sharded.record.ranks_state)
    # the sharded weights are half the whole ones on every rank (512 rows split evenly)
    assert sharded.record.param_bytes * 2 == whole.record.param_bytes
    over = measure(replace(sharded.config, batch=sharded.batch + 1), replace(QUICK, limit_bytes=budget))
    assert over.status == Status.OOM
    assert "--fsdp 2" in planning.reproduce(p, sharded)
    refused = planning.plan(base, [planning.combo_axis(planning.preset_combos(["adafactor"])),
                                   planning.field_axis("fsdp", "--fsdp", (2,))], budget)
    (row,) = refused.refused
    assert "adafactor sized by formula on the whole model only" in row.why and refused.runs == 0
