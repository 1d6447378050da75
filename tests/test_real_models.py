"""Real models in one flag (issue 20): `--model hf:PATH` (tiny configs committed under
tests/fixtures/hf), `timm:NAME`, `--lora`, `--checkpointing`, `--seq`, `--task`; the loss
convention of transformers' Trainer; user errors of measure/estimate as one line, exit 2.

Most checks run on the fake probe; the tracked probe where the fake one must agree with it.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (the test extra)")

from multiopt.cli import main  # noqa: E402
from multiopt.instrument.protocol import Config, Protocol, measure  # noqa: E402
from multiopt.record import MEMORY_COLUMNS, Record  # noqa: E402
from multiopt.train import hf, models  # noqa: E402
from multiopt.train.trainer import forward_loss  # noqa: E402

from . import support

FIXTURES = support.FIXTURES / "hf"
TINY = ("llama", "qwen2", "mistral", "bert", "gpt2")
FAKE = Protocol(probe="fake", steps=0, warmup=1)
TRACKED = Protocol(probe="tracked", steps=0, warmup=1)


def hf_model(name: str) -> str:
    return f"hf:{FIXTURES / name}"


def _config(model: str, rules: str = "rest=adamw", **kw) -> Config:
    return Config(model=model, rules=rules, combo="x", **{"batch": 2, "seq": 16, **kw})


def _trainable(config: Config) -> dict[str, torch.nn.Parameter]:
    """The config's model as the suite builds it (options applied), on meta: its trainable parameters."""
    with torch.device("meta"):
        model = models.for_config(config).build(config.width, config.depth)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _adamw(params) -> int:
    """AdamW's state by its algorithm: exp_avg and exp_avg_sq (float32) and a float32 step per tensor."""
    return sum(2 * 4 * p.numel() + 4 for p in params)


def _ok(rec: Record) -> Record:
    assert rec.status == "ok", rec.error
    return rec


def _same_memory(a: Record, b: Record) -> None:
    diff = {c: (getattr(a, c), getattr(b, c)) for c in MEMORY_COLUMNS if getattr(a, c) != getattr(b, c)}
    assert not diff, diff


# --- hf:PATH builds, and its optimizer state is the arithmetic --------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_fake_ok_with_adamw_state_exact(name):
    config = _config(hf_model(name))
    rec = _ok(measure(config, FAKE))
    params = _trainable(config)
    assert rec.n_params == sum(p.numel() for p in params.values())
    assert rec.opt_state_bytes == rec.opt_state_expected == _adamw(params.values())
    assert (rec.width, rec.depth, rec.seq, rec.lora, rec.checkpointing) == (0, 0, 16, "", 0)


def test_muon_on_2d_with_embeddings_elsewhere_is_exact():
    config = _config(hf_model("llama"), "*embed*=adamw(lr=0.001); @2d=muon(lr=0.02); rest=adamw(lr=0.001)")
    rec = _ok(measure(config, FAKE))
    params = _trainable(config)
    embed = [p for n, p in params.items() if "embed" in n]
    muon = [p for n, p in params.items() if "embed" not in n and p.ndim == 2]
    rest = [p for n, p in params.items() if "embed" not in n and p.ndim != 2]
    assert embed and muon and rest
    got = {o.name: o.state_bytes for o in rec.optimizers}
    assert got == {"*embed*=adamw": _adamw(embed), "@2d=muon": sum(4 * p.numel() for p in muon),
                   "rest=adamw": _adamw(rest)}
    assert all(o.state_bytes == o.expected for o in rec.optimizers)


def test_lora_rules_see_only_the_adapters_and_lora_plus_splits_them():
    plain = _config(hf_model("llama"), lora="r=4")
    rec = _ok(measure(plain, FAKE))
    params = _trainable(plain)
    assert params and all("lora_" in n for n in params)  # the base is frozen
    assert rec.lora == "r=4,alpha=8,dropout=0" and rec.n_params > sum(p.numel() for p in params.values())
    assert rec.opt_state_bytes == _adamw(params.values())  # 8 B per trainable parameter + a step each
    assert rec.grad_bytes < rec.param_bytes // 10  # gradients only for the adapters

    plus = _config(hf_model("llama"), "*lora_B*=adamw(lr=0.001); rest=adamw(lr=0.0001)", lora="r=4")
    rec = _ok(measure(plus, FAKE))
    b = [p for n, p in params.items() if "lora_B" in n]
    a = [p for n, p in params.items() if "lora_B" not in n]
    assert {o.name: o.state_bytes for o in rec.optimizers} == {"*lora_B*=adamw": _adamw(b), "rest=adamw": _adamw(a)}


# --- checkpointing: tracked == fake to the byte, and it saves memory -----------------------------


@pytest.fixture(scope="module")
def llama_records() -> dict[str, dict[str, Record]]:
    """The tiny Llama on both probes: plain, HF checkpointing (non-reentrant, --checkpointing)
    and HF's reentrant mode (a factory that asks for it)."""
    # activations large enough next to the weights and state to set the peak
    configs = {
        "plain": _config(hf_model("llama"), batch=4, seq=64),
        "checkpointing": _config(hf_model("llama"), batch=4, seq=64, checkpointing=1),
        "reentrant": _config("tests.realmodels:llama_reentrant", batch=4, seq=0),
    }
    return {k: {p.probe: _ok(measure(c, p)) for p in (TRACKED, FAKE)} for k, c in configs.items()}


@pytest.mark.parametrize("mode", ["plain", "checkpointing", "reentrant"])
def test_llama_tracked_equals_fake_with_and_without_checkpointing(llama_records, mode):
    _same_memory(llama_records[mode]["tracked"], llama_records[mode]["fake"])


def test_llama_checkpointing_lowers_the_peak(llama_records):
    plain, ckpt = llama_records["plain"]["tracked"], llama_records["checkpointing"]["tracked"]
    assert ckpt.checkpointing == 1 and plain.checkpointing == 0
    assert ckpt.peak_total < plain.peak_total
    assert ckpt.mem_after_forward < plain.mem_after_forward  # the activations it no longer keeps
    assert ckpt.opt_state_bytes == plain.opt_state_bytes and ckpt.param_bytes == plain.param_bytes


def test_bert_checkpointed_tracked_equals_fake():
    """BERT's bidirectional mask takes the other transformers branch (`_ignore_bidirectional_mask_sdpa`)."""
    config = _config(hf_model("bert"), checkpointing=1)
    _same_memory(_ok(measure(config, TRACKED)), _ok(measure(config, FAKE)))


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_our_models_checkpoint_per_block(model):
    base = Config(model=model, width=64, depth=3, batch=8, rules="rest=adam", combo="adam")
    plain = _ok(measure(base, TRACKED))
    ckpt_config = Config(**{**base.__dict__, "checkpointing": 1})
    ckpt = _ok(measure(ckpt_config, TRACKED))
    _same_memory(ckpt, _ok(measure(ckpt_config, FAKE)))
    if model == "transformer":  # a block keeps only its input instead of its attention and MLP activations
        assert ckpt.mem_after_forward < plain.mem_after_forward and ckpt.peak_total < plain.peak_total
    else:  # a Linear+ReLU layer keeps only its input either way: nothing to save, and nothing lost
        assert ckpt.mem_after_forward == plain.mem_after_forward and ckpt.peak_total == plain.peak_total


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = models.build("transformer", 32, 2)
    tokens, targets = models.lm_batch(model, 2)
    grads = []
    for on in (False, True):
        model.checkpointing = on
        model.zero_grad()
        models.lm_loss(model(tokens), targets).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b) for a, b in zip(*grads))


# --- the loss convention ---------------------------------------------------------------------


def test_a_loss_written_for_hf_compute_loss_func_works_unchanged():
    from tests import realmodels, realmodels_hfloss

    torch.manual_seed(0)
    model = realmodels.llama()
    batch = realmodels.make_batch(model, 2)
    want = model(**batch).loss  # HF's own ForCausalLMLoss
    got = forward_loss(model, realmodels_hfloss.loss_fn, batch)
    assert torch.allclose(got, want)
    rec = _ok(measure(_config("tests.realmodels_hfloss:llama", seq=0), FAKE))
    assert rec.opt_state_bytes == rec.opt_state_expected


def test_loss_fn_gets_the_output_unchanged_with_labels_out_of_the_keywords():
    seen = {}

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, labels=None):
            seen["labels"] = labels
            return {"logits": self.lin(x), "aux_loss": torch.tensor(0.5)}

    def loss_fn(out, labels):
        seen["out"] = out
        return (out["logits"] - labels).pow(2).mean() + out["aux_loss"]

    x, y = torch.randn(4, 3), torch.randn(4, 2)
    net = Net()
    loss = forward_loss(net, loss_fn, {"x": x, "labels": y})
    assert seen["labels"] is None and set(seen["out"]) == {"logits", "aux_loss"}  # MoE aux_loss kept
    assert torch.allclose(loss, (net.lin(x) - y).pow(2).mean() + 0.5)


# --- user errors: one line on stderr, exit 2, no card --------------------------------------------


def _run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_measure_a_batch_without_labels_is_one_line_exit_2(capsys, json_flag):
    rc, out, err = _run_cli(["estimate", "--model", "tests.realmodels_nolabels:llama", "--batch", "1",
                             "--rules", "rest=adamw", *json_flag], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "without a loss" in err and "labels" in err, err
    assert err.startswith("multiopt estimate: error: the model returned")


@pytest.mark.parametrize("argv, message", [
    (["--model", "hf:no/such-model-anywhere"], "nothing is downloaded"),
    (["--model", f"hf:{FIXTURES}"], "holds no config.json"),
    (["--model", hf_model("llama"), "--seq", "100000"], "has 128 positions"),
    (["--model", "mlp", "--seq", "16"], "has no sequence length"),
    (["--model", "mlp", "--task", "masked-lm"], "applies to hf: models"),
    (["--model", hf_model("llama"), "--task", "translation"], "choose one of causal-lm"),
    (["--model", "simple", "--checkpointing"], "no activation checkpointing"),
    (["--model", hf_model("llama"), "--lora", "r=0"], "r must be >= 1"),
    (["--model", hf_model("llama"), "--lora", "r=4,rank=3"], "unknown key 'rank'"),
    (["--model", hf_model("llama"), "--lora", "r=4,targets=nope_proj"], "peft cannot adapt"),
    (["--model", "mlp", "--lora", "r=4"], "name the modules to adapt"),
])
def test_real_model_flag_errors_are_one_line_exit_2(capsys, argv, message):
    rc, out, err = _run_cli(["estimate", "--batch", "1", "--rules", "rest=adamw", *argv], capsys)
    assert rc == 2 and out == "", err
    assert err.count("\n") == 1 and message in err, err


def test_timm_without_a_working_import_is_one_line_or_builds(capsys):
    try:
        import timm  # noqa: F401
    except ImportError:
        rc, out, err = _run_cli(["estimate", "--model", "timm:resnet18", "--batch", "1"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "torchvision" in err, err
        return
    config = Config(model="timm:resnet18", rules="@2d=muon(lr=0.02); rest=adamw", combo="x", batch=2)
    rec = _ok(measure(config, FAKE))
    assert rec.opt_state_bytes == rec.opt_state_expected


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_timm_tracked_equals_fake(name):
    pytest.importorskip("timm", reason="timm needs torchvision, which this venv does not have")
    config = Config(model=f"timm:{name}", rules="rest=adamw", combo="x", batch=1, checkpointing=1)
    _same_memory(_ok(measure(config, TRACKED)), _ok(measure(config, FAKE)))


# --- the flags end to end ----------------------------------------------------------------------


def test_estimate_json_carries_the_options(capsys):
    rc, out, err = _run_cli(["estimate", "--model", hf_model("bert"), "--task", "masked-lm", "--batch", "1",
                             "--seq", "8", "--lora", "r=2, alpha=4", "--checkpointing", "--rules", "rest=adamw",
                             "--target", "cpu", "--json"], capsys)
    assert rc == 0, err
    row = json.loads(out)
    assert row["status"] == "ok" and row["model"].endswith("bert#masked-lm")
    assert (row["seq"], row["lora"], row["checkpointing"]) == (8, "r=2,alpha=4,dropout=0", 1)


def test_run_sweeps_checkpointing(tmp_path, capsys):
    rc, out, err = _run_cli(["run", "--preset", "quick", "--models", "transformer", "--widths", "32", "--batches", "4",
                             "--depths", "2", "--combos", "sgd", "--probe", "fake", "--checkpointing", "0,1",
                             "--no-isolate", "--no-report", "--no-progress", "--out", str(tmp_path / "r")], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["checkpointing"] for r in rows) == [0, 1] and all(r["status"] == "ok" for r in rows)
    by = {r["checkpointing"]: r for r in rows}
    assert by[1]["mem_after_forward"] < by[0]["mem_after_forward"]


def test_records_written_before_the_options_read_with_their_defaults():
    rec = Record.from_dict({"model": "mlp", "status": "ok", "schema": "multiopt.record/2"})
    assert (rec.checkpointing, rec.lora, rec.seq) == (0, "", 0)


def test_lora_text_is_canonical():
    assert hf.parse_lora("8").text == "r=8,alpha=8,dropout=0"
    assert hf.parse_lora(" r=16 ,dropout=0.05, alpha=32,targets=q_proj, v_proj,q_proj").text == \
        "r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj"
