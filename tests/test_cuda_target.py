"""Target cuda on the tracked probe predicts the H200 records (reports/gpu-h200, torch 2.11).

The fast subset here: four of the quick preset's width-64 batch-16 configs, each
equal to the byte on every allocated column and on peak_reserved. The whole replay (92
configs, minutes) is bench/cuda_target_check.py, whose table the README shows.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from multiopt import cli
from multiopt.instrument.allocator import ALLOC_MODEL
from multiopt.record import Record, config_key
from multiopt.train import optimizers as registry
from multiopt.train.multi import impl_kwargs

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("cuda_target_check", ROOT / "bench" / "cuda_target_check.py")
check_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_mod)  # type: ignore[union-attr]

FAST = [r for r in check_mod.h200_records("quick")  # foreach default, host step counters, Muon
        if r.width == 64 and r.batch == 16 and r.combo in ("sgd", "adam", "adagrad", "muon+adamw")]


@pytest.mark.parametrize("ref", FAST, ids=[r.combo for r in FAST])
def test_tracked_target_cuda_equals_the_h200_record_to_the_byte(ref: Record) -> None:
    result = check_mod.check(ref)
    assert "error" not in result, result
    print(check_mod._row(result, 0.0))
    assert result["diff"] == dict.fromkeys(check_mod.ALLOCATED + check_mod.RESERVED, 0)
    assert result["target"] == "cuda" and result["alloc_model"] == ALLOC_MODEL


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
