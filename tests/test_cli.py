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
