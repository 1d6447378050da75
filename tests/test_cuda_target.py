"""Target cuda on the tracked probe predicts the H200 records (reports/gpu-h200, torch 2.11).

Here: every config of the quick preset (52: every combo, forloop/foreach/fused, the
transformer, Muon) on the tracked probe, and every config of the default preset (40, widths
to 4096) on the fake probe, each equal to the byte on every allocated column and on
peak_reserved; each prints its row of the error table (pytest -s). The default preset on the
tracked probe takes minutes (Muon at width 4096 in bf16 computes on a CPU): that replay is
bench/cuda_target_check.py, whose table the README shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multiopt import cli
from multiopt.errors import UsageError
from multiopt.instrument.allocator import ALLOC_MODEL
from multiopt.instrument.probes import FakeProbe, TrackedProbe
from multiopt.instrument.probes.reduce import staging_bytes
from multiopt.record import Config, Record, config_key
from multiopt.train import optimizers as registry
from multiopt.train.multi import impl_kwargs

from .support import ROOT, load_bench

check_mod = load_bench("cuda_target_check")

FAST = check_mod.h200_records("quick")
DEFAULT = check_mod.h200_records("default")


@pytest.mark.parametrize("ref", FAST, ids=[r.config().label() for r in FAST])
def test_tracked_target_cuda_equals_the_h200_record_to_the_byte(ref: Record) -> None:
    result = check_mod.check(ref)
    assert "error" not in result, result
    print(check_mod._row(result, 0.0))
    assert result["diff"] == dict.fromkeys(check_mod.ALLOCATED + check_mod.RESERVED, 0)
    assert result["target"] == "cuda" and result["alloc_model"] == ALLOC_MODEL


@pytest.mark.parametrize("ref", DEFAULT, ids=[r.config().label() for r in DEFAULT])
def test_fake_target_cuda_equals_the_h200_default_record_to_the_byte(ref: Record) -> None:
    """The default preset (widths to 4096: 64 MiB blocks, 20 MiB segments, the large pool's
    unsplit tails) on the fake probe, which sizes what `estimate` and `fit` answer with.
    Adafactor reads tensor values every step: the fake probe refuses it, saying why."""
    result = check_mod.check(ref, "fake")
    if ref.combo == "adafactor":
        assert "reads tensor values" in result["error"] and "--probe tracked" in result["error"]
        return
    assert "error" not in result, result
    print(check_mod._row(result, 0.0))
    assert result["diff"] == dict.fromkeys(check_mod.ALLOCATED + check_mod.RESERVED, 0)


def test_meta_tensors_reach_neither_the_ledger_nor_the_allocator_model() -> None:
    """A model built under torch.device("meta") or optimizers validated on meta parameters
    hold no memory: they must leave allocated, reserved and the allocator's cache untouched
    (they once left 64 MiB segments cached, +24 MiB on a width-4096 config's reserved)."""
    for probe_cls in (TrackedProbe, FakeProbe):
        with probe_cls(target="cuda") as probe:
            x = torch.ones(1024)
            before = (probe.allocated(), probe.extra())
            m = torch.empty(4096, 4096, device="meta")
            with torch.device("meta"):
                lin = torch.nn.Linear(4096, 4096)
            assert (probe.allocated(), probe.extra()) == before, probe_cls.__name__
            assert probe.peak() == before[0]
            del m, lin, x


def test_old_records_read_as_target_their_device_and_keep_their_keys() -> None:
    line = (ROOT / "reports" / "gpu-h200" / "quick" / "results.jsonl").read_text().splitlines()[0]
    row = json.loads(line)
    assert "target" not in row
    key = config_key(row)
    rec = Record.from_dict(row)
    assert rec.target == "cuda" and rec.key() == key
    cpu_row = {**row, "probe": "tracked", "device": "cpu"}
    assert Record.from_dict(cpu_row).target == "cpu"


def test_impl_default_on_target_cuda_is_torch_cuda_choice() -> None:
    adam, adafactor = registry.resolve("adam"), registry.resolve("adafactor")
    assert impl_kwargs(adam, "default", {}, "cuda") == {"foreach": True}
    assert impl_kwargs(adam, "default", {}, "cpu") == {}
    assert impl_kwargs(adam, "default", {"differentiable": True}, "cuda") == {}
    assert impl_kwargs(adafactor, "default", {}, "cuda") == {}  # torch: foreach None -> for-loop


def test_bad_alloc_conf_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rc = cli.main(["estimate", "--width", "8", "--depth", "1", "--batch", "1", "--alloc-conf", "max_split_size_mb:abc"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "max_split_size_mb" in err
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "nonsense_option:1")
    assert cli.main(["estimate", "--width", "8", "--depth", "1", "--batch", "1"]) == 2


def test_the_allocator_config_is_parsed_once_where_it_enters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The protocol holds the parsed options (text given to it is parsed at construction, once);
    the command line parses --alloc-conf (or the environment) and hands the parsed value on."""
    from multiopt.instrument.allocator import AllocatorConfig
    from multiopt.instrument.protocol import Protocol

    parsed = Protocol(alloc_conf="max_split_size_mb:64,expandable_segments:True").alloc_conf
    assert parsed == AllocatorConfig(max_split_size=64 << 20, expandable_segments=True)
    with pytest.raises(UsageError, match="max_split_size_mb"):
        Protocol(alloc_conf="max_split_size_mb:abc")
    args = cli.build_parser().parse_args(["estimate", "--alloc-conf", "max_split_size_mb:64"])
    assert cli._alloc_conf(args) == AllocatorConfig(max_split_size=64 << 20)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert cli._alloc_conf(cli.build_parser().parse_args(["estimate"])) == AllocatorConfig(expandable_segments=True)
    assert cli._alloc_conf(cli.build_parser().parse_args(["measure"])) is None  # --target cpu: no allocator model


# Reduce.cuh's setReduceConfig on an H200 (132 SMs x 2048 threads), derived by hand:
# - mean of 256 x 1024 fp32 (all dims): vectorized along input, block 512 x 1, 512 values
#   per thread >= 256 -> ctas = max(min(528, 512/16), 512/256) = 32: buffer 4 * 1 * 32 B,
#   semaphores 4 * grid.x (1) B;
# - mean of 64 x 1024: 128 values per thread < 256, no global reduction;
# - norm(g, dim=-2) of 1024 x 1024 (Adafactor's column means): output-vectorized by 4,
#   block 32 x 4, 256 values per thread, grid.x 8 -> ctas = max(min(264, 16), 1) = 16:
#   buffer 4 * 1024 outputs * 16 ctas * 32 lanes * 4 (vec) = 8 MiB, semaphores 4 * 8;
# - sum(0) of 256 x 1024 (a bias gradient): 16 values per thread, no global reduction.
STAGING = [((256, 1024), None, (128, 4)), ((64, 1024), None, (0, 0)), ((512, 16384), None, (4 * 528, 4)),
           ((1024, 1024), [-2], (4 * 1024 * 16 * 32 * 4, 32)), ((1024, 1024), [-1], (0, 0)),
           ((256, 1024), [0], (0, 0))]


@pytest.mark.parametrize("shape,dims,expected", STAGING, ids=[f"{s}-{d}" for s, d, _ in STAGING])
def test_reduction_staging_follows_set_reduce_config(shape: tuple, dims: list | None, expected: tuple) -> None:
    assert staging_bytes(torch.empty(shape, device="meta"), dims) == expected


@pytest.mark.parametrize("probe_cls", [TrackedProbe, FakeProbe])
def test_target_cuda_counts_a_reductions_staging_at_its_peak_only(probe_cls: type) -> None:
    with probe_cls(target="cuda") as probe:
        x, g = torch.ones(256, 1024), torch.ones(1024, 1024)
        before = probe.allocated()
        probe.reset_peak()
        m = x.mean()  # 512 B output block, then 128 B buffer + 4 B semaphores: 512 B blocks each
        assert probe.peak() - before == 3 * 512 and probe.allocated() - before == 512
        probe.reset_peak()
        c = torch.norm(g, dim=-2, keepdim=True)  # 4 KiB output, then 8 MiB buffer + 32 B
        assert probe.peak() - before == 512 + 4096 + (8 << 20) + 512
        assert probe.allocated() - before == 512 + 4096
        del m, c
    with TrackedProbe(target="cpu") as cpu:
        x = torch.ones(256, 1024)
        cpu.reset_peak()
        x.mean()
        assert cpu.peak() - cpu.allocated() == 512  # CPU semantics: only the output


def test_attention_under_target_cuda_is_flagged_as_not_modelled(tmp_path: Path) -> None:
    """The CPU runs its flash-attention kernel; CUDA would pick flash, memory-efficient or cuDNN
    attention, whose saved tensors and workspaces differ. A target-cuda record that ran attention
    says so, and the report and fit's answer carry the flag; an MLP and target cpu do not."""
    from multiopt.analyze.report import write_report
    from multiopt.instrument.protocol import Protocol, measure
    from multiopt.run.fit import Answer, render
    from multiopt.store import append_jsonl

    def run(model: str, target: str, probe: str = "tracked") -> Record:
        c = Config(model=model, width=64, depth=2, batch=4, combo="adam", rules="rest=adam(lr=0.001)", target=target)
        return measure(c, Protocol(probe=probe, steps=0))

    attn, fake_attn, mlp, cpu = run("transformer", "cuda"), run("transformer", "cuda", "fake"), run("mlp", "cuda"), \
        run("transformer", "cpu")
    assert [r.status for r in (attn, fake_attn, mlp, cpu)] == ["ok"] * 4
    assert attn.unmodelled == fake_attn.unmodelled == "attention (SDPA kernels)"
    assert mlp.unmodelled is None and cpu.unmodelled is None
    append_jsonl(tmp_path / "run" / "results.jsonl", [attn, mlp])
    report = write_report(tmp_path / "run").read_text()
    section = report[report.index("## Flagged: not modelled for CUDA"):].split("\n## ")[0]
    flagged_rows = [line for line in section.splitlines() if line.startswith("| ") and "SDPA" in line]
    assert len(flagged_rows) == 1 and "| transformer |" in flagged_rows[0]
    answer = Answer(combo="adam", rules="rest=adam(lr=0.001)", axis="batch", fixed=("width", 64), value=4, capped=False,
                    record=attn, over=5, over_peak=attn.peak_reserved, runs=1)
    assert "not modelled (attention (SDPA kernels))" in render([answer], 1 << 30, model="transformer", depth=2,
                                                               dtype="float32")
