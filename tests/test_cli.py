"""`multiopt train`: the classic program, and every Core error as one line with exit code 2."""

import re

import pytest

from multiopt.cli import main


def test_train_prints_loss_and_memory_per_step(capsys):
    assert main(["train", "--rules", "layer1=sgd(lr=0.01); layer2=adam(lr=1e-3)", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "layer1=sgd: SGD, 2 tensors, 220 elements" in out
    steps = re.findall(r"step\s+(\d+)\s+loss (\S+)\s+allocated (.+?)\s+peak (.+?)\s+\(tracked probe\)", out)
    assert [s[0] for s in steps] == ["1", "2", "3"]
    assert all(float(s[1]) > 0 for s in steps)


@pytest.mark.parametrize(
    "rules, needle",
    [
        ("layer1=sgd", "no rule claims parameters layer2.weight, layer2.bias"),
        ("layer1=sgd; layer3=adam; rest=adam", "rule 'layer3=adam' claims no parameter"),
        ("layer1=sgd; rest=adamm", "unknown optimizer 'adamm'"),
        ("layer1=sgd(momentun=0.9); rest=adam", "does not take keyword 'momentun'"),
        ("layer1=muon; rest=adamw", "rule 'rest=adamw' would take it"),
        ("rest=lbfgs", "lbfgs needs a closure"),
        ("layer1=sgd(lr=os.system('x')); rest=adam", "must be a literal"),
    ],
)
def test_each_core_error_is_one_line_and_exit_2(capsys, rules, needle):
    assert main(["train", "--rules", rules, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("multiopt train: error: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rules", "rest=adam(lr=0.1, amsgrad='yes')"],
         "adam's keyword amsgrad takes a bool (True or False), like its default False; got 'yes' (str) "
         "in rule 'rest=adam(lr=0.1, amsgrad='yes')'"),
        (["--model", "tests.usermodels_frozen:embed_frozen", "--rules", "*embed*=adamw; rest=adamw"],
         "rule '*embed*=adamw' claims no parameter (the parameters it selects are all frozen (requires_grad=False): "
         "embed.weight; frozen parameters need no rule, remove it)"),
        (["--model", "tests.usermodels_frozen:all_frozen", "--rules", "rest=adamw"],
         "the model has nothing to train: all 3 of its parameters are frozen (requires_grad=False); "
         "unfreeze the ones to train (frozen parameters need no rule)"),
    ],
    ids=["bool-keyword", "selects-only-frozen", "nothing-trainable"],
)
def test_measure_refuses_bad_keywords_and_frozen_only_rules_in_one_line(capsys, args, message):
    assert main(["measure", "--probe", "fake", "--steps", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"multiopt measure: error: {message}\n"


def test_frozen_parameters_need_no_rule_on_the_command_line(capsys):
    assert main(["measure", "--probe", "fake", "--steps", "0", "--model", "tests.usermodels_frozen:embed_frozen",
                 "--width", "8", "--rules", "rest=adamw", "--json"]) == 0
    record = __import__("json").loads(capsys.readouterr().out)
    assert record["status"] == "ok" and [o["n_params"] for o in record["optimizers"]] == [8 * 4 + 4]
    # AdamW: m and v per trainable element (float32), one 4-byte step per trainable tensor
    assert record["opt_state_bytes"] == 2 * (8 * 4 + 4) * 4 + 2 * 4
