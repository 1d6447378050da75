import pytest
import torch
from torch import nn

from multiopt.errors import UsageError
from multiopt.train.multi import plan
from multiopt.train.spec import Rule, assign, format_rules, from_dicts, parse, rules_from

from .support import REPORTS


def test_parses_the_three_documented_forms():
    r = parse("layer1=sgd(lr=0.01, momentum=0.9); layer2=adam(lr=1e-3)")
    assert r == (
        Rule("layer1", "sgd", (("lr", 0.01), ("momentum", 0.9))),
        Rule("layer2", "adam", (("lr", 1e-3),)),
    )
    r = parse("@matrix=muon(lr=0.02); rest=adamw(lr=3e-4, weight_decay=0.1)")
    assert [x.selector for x in r] == ["@matrix", "rest"]
    assert r[1].options == {"lr": 3e-4, "weight_decay": 0.1}
    r = parse("*.bias=sgd(lr=0.1); rest=adam")
    assert r[1] == Rule("rest", "adam")


def test_literal_values_of_every_kind():
    (r,) = parse("x=Adam(betas=(0.9, 0.95), eps=-1e-8, amsgrad=True, foreach=None, n=3, tag='a;b=c')")
    assert r.optimizer == "adam"  # names are case-insensitive
    assert r.options == {"betas": (0.9, 0.95), "eps": -1e-8, "amsgrad": True, "foreach": None, "n": 3, "tag": "a;b=c"}
    assert isinstance(r.options["n"], int)


def test_round_trips_through_format():
    text = "layer1=sgd(lr=0.01, nesterov=True, momentum=0.9); *.bias=adam(betas=(0.8, 0.9)); rest=pkg.mod:Lion(lr=1e-4)"
    assert parse(format_rules(parse(text))) == parse(text)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("x=adam(__import__('os').system('true'))", "keywords as name=value"),
        ("x=adam(lr=os.getcwd())", "must be a literal"),
        ("x=adam(lr=1", "unbalanced"),
        ("adam", "selector=optimizer"),
        ("@tensor=sgd", "@tensor"),
        ("rest=sgd; layer1=adam", "'rest' must be the last"),
        ("x=adam(lr=1, lr=2)", "given twice"),
        ("", "no rules"),
    ],
)
def test_bad_rule_strings_name_the_problem(text, needle):
    with pytest.raises(UsageError, match=None) as e:
        parse(text)
    assert needle in str(e.value)


def test_dicts_give_the_same_rules_as_strings():
    text = "layer1=sgd(lr=0.01, momentum=0.9); rest=adam(betas=(0.9, 0.95))"
    dicts = [
        {"select": "layer1", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9},
        {"select": "rest", "optimizer": "adam", "kwargs": {"betas": [0.9, 0.95]}},
    ]
    assert from_dicts(dicts) == parse(text)
    assert rules_from(dicts) == rules_from(text) == rules_from(list(parse(text)))
    with pytest.raises(UsageError, match="needs 'select' and 'optimizer'"):
        from_dicts([{"optimizer": "sgd"}])


def _model():
    m = nn.Module()
    m.emb = nn.Embedding(10, 4)
    m.layer1 = nn.Linear(4, 4)
    m.layer2 = nn.Linear(4, 2)
    m.norm = nn.LayerNorm(2)
    return m


def _names(groups):
    return [[n for n, _ in g] for g in groups]


def test_selectors_and_first_match_wins():
    m = _model()
    groups = assign(m.named_parameters(), parse("*.bias=sgd; @matrix=muon; rest=adamw"))
    assert _names(groups) == [
        ["layer1.bias", "layer2.bias", "norm.bias"],
        ["emb.weight", "layer1.weight", "layer2.weight"],
        ["norm.weight"],
    ]
    # layer2's parameters were all taken by earlier rules: the rule claims nothing.
    with pytest.raises(UsageError, match="rule 'layer2=adam' claims no parameter"):
        assign(m.named_parameters(), parse("*.bias=sgd; @matrix=muon; layer2=adam; rest=adamw"))
    groups = assign(m.named_parameters(), parse("layer1=sgd; @vector=adam; rest=adamw"))
    assert _names(groups) == [
        ["layer1.weight", "layer1.bias"],
        ["layer2.bias", "norm.weight", "norm.bias"],
        ["emb.weight", "layer2.weight"],
    ]


def test_module_path_does_not_match_a_prefix_of_another_name():
    m = nn.Module()
    m.layer1 = nn.Linear(2, 2)
    m.layer10 = nn.Linear(2, 2)
    groups = assign(m.named_parameters(), parse("layer1=sgd; rest=adam"))
    assert _names(groups) == [["layer1.weight", "layer1.bias"], ["layer10.weight", "layer10.bias"]]


def test_unclaimed_parameters_are_listed_by_name_and_frozen_ones_ignored():
    m = _model()
    m.emb.weight.requires_grad_(False)
    with pytest.raises(UsageError) as e:
        assign(m.named_parameters(), parse("layer1=sgd"))
    msg = str(e.value)
    assert "layer2.weight, layer2.bias, norm.weight, norm.bias" in msg
    assert "emb.weight" not in msg


class _ConvNet(nn.Module):
    """A 4-D conv kernel, a 3-D token (ViT's cls_token), a 2-D head and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.head = nn.Linear(4, 2)


def test_2d_selects_exactly_the_matrices():
    m = _ConvNet()
    groups = assign(m.named_parameters(), parse("@2d=muon; @matrix=adamw; rest=sgd"))
    assert [[n for n, _ in g] for g in groups] == [["head.weight"], ["cls_token", "conv.weight"],
                                                   ["conv.bias", "head.bias"]]
    assert format_rules(parse("@2d=muon; rest=adamw")) == "@2d=muon; rest=adamw"


@pytest.mark.parametrize("rules, culprit, hint", [
    # a later rule would take the 3-D token: narrow @matrix, to @2d
    ("@matrix=muon; rest=adamw", "cls_token of shape (1, 1, 4)", "narrow the selector to @2d"),
    # nothing later would: a rule for it, or @2d and a rest rule
    ("@matrix=muon; *.bias=sgd", "cls_token of shape (1, 1, 4)", "'cls_token=adamw', or narrow the selector to @2d"),
])
def test_muon_refusing_a_kernel_suggests_2d_never_matrix_again(rules, culprit, hint):
    with pytest.raises(UsageError, match="only takes 2-D") as e:
        plan(_ConvNet(), parse(rules))
    msg = str(e.value)
    assert culprit in msg and hint in msg and "e.g. @matrix" not in msg and "\n" not in msg


# --- Rules: the parsed value a Config carries ----------------------------------------------

def test_rules_are_their_canonical_text_and_carry_the_parsed_rules():
    import copy
    import json
    import pickle

    from multiopt.train.spec import Rules

    r = Rules("layer1=sgd(lr=1e-2,momentum=0.9);  rest=adam")
    assert r == "layer1=sgd(lr=0.01, momentum=0.9); rest=adam" and hash(r) == hash(str(r))
    assert r.parsed == parse("layer1=sgd(lr=0.01, momentum=0.9); rest=adam")
    assert Rules(r) is r and Rules.of(list(r.parsed)) == r
    assert json.dumps({"rules": r}) == '{"rules": "layer1=sgd(lr=0.01, momentum=0.9); rest=adam"}'
    assert pickle.loads(pickle.dumps(r)).parsed == r.parsed and copy.deepcopy(r) is r
    with pytest.raises(AttributeError, match="immutable"):
        r.parsed = ()  # type: ignore[misc]
    with pytest.raises(UsageError, match="rules must be a string"):
        Rules(3)  # type: ignore[arg-type]


def test_a_config_parses_its_rules_once_and_keeps_the_text_for_the_record_and_the_key():
    import dataclasses

    from multiopt.record import Config, config_key
    from multiopt.train.spec import Rules

    c = Config(rules="layer1=sgd(lr=1e-2); rest=adam")
    assert isinstance(c.rules, Rules) and c.rules.parsed[0] == Rule("layer1", "sgd", (("lr", 0.01),))
    assert dataclasses.replace(c, width=8).rules is c.rules  # never parsed again
    row = {**dataclasses.asdict(c), "probe": "tracked"}
    assert row["rules"] == "layer1=sgd(lr=0.01); rest=adam"
    assert c.record_key("tracked") == config_key({**row, "rules": "layer1=sgd(lr=0.01); rest=adam"})
    assert Config(rules=[{"select": "rest", "optimizer": "adam"}]).rules == "rest=adam"
    with pytest.raises(UsageError, match="'rest' must be the last rule"):
        Config(rules="rest=sgd; layer1=adam")


def test_every_committed_record_keeps_its_rules_text_through_a_config():
    """Reading a record parses its rules: the canonical text must come back unchanged, or a
    baseline's keys would move (the gate would call its configs missing)."""
    import json

    from multiopt.train.spec import Rules

    texts = {json.loads(line)["rules"] for f in REPORTS.glob("**/*.jsonl")
             for line in f.read_text().splitlines() if line.strip()}
    assert texts
    assert {t for t in texts if Rules(t) != t} == set()


# --- frozen parameters need no rule -----------------------------------------------------

def _half_frozen():
    m = _model()
    m.emb.requires_grad_(False)
    return m


def test_frozen_parameters_need_no_rule():
    groups = assign(_half_frozen().named_parameters(), parse("@matrix=muon; rest=adamw"))
    assert _names(groups) == [["layer1.weight", "layer2.weight"], ["layer1.bias", "layer2.bias", "norm.weight",
                                                                     "norm.bias"]]


def test_a_rule_that_selects_only_frozen_parameters_says_so():
    with pytest.raises(UsageError) as e:
        assign(_half_frozen().named_parameters(), parse("*emb*=adamw; rest=adamw"))
    assert str(e.value) == ("rule '*emb*=adamw' claims no parameter (the parameters it selects are all frozen "
                            "(requires_grad=False): emb.weight; frozen parameters need no rule, remove it)")


def test_a_model_with_nothing_trainable_says_so():
    m = _model().requires_grad_(False)
    with pytest.raises(UsageError) as e:
        assign(m.named_parameters(), parse("rest=adamw"))
    assert str(e.value) == ("the model has nothing to train: all 7 of its parameters are frozen "
                            "(requires_grad=False); unfreeze the ones to train (frozen parameters need no rule)")


def test_a_rule_that_claims_nothing_says_which_of_the_other_causes():
    m = _model()
    with pytest.raises(UsageError, match=r"claims no parameter \(earlier rules took the parameters it selects"):
        assign(m.named_parameters(), parse("*.bias=sgd; @matrix=muon; layer2=adam; rest=adamw"))
    with pytest.raises(UsageError, match=r"claims no parameter \(the selector matches no parameter name\)"):
        assign(m.named_parameters(), parse("layer9=sgd; rest=adamw"))


def test_a_record_keeps_rule_text_that_does_not_parse_while_a_config_refuses_it():
    from multiopt.record import Config, Record
    from multiopt.train.spec import Rules

    assert Record.from_dict({"rules": "rules-of-adam", "status": "error"}).rules == "rules-of-adam"
    assert isinstance(Record.from_dict({"rules": "rest=adam(lr=1e-3)"}).rules, Rules)
    with pytest.raises(UsageError, match="must look like 'selector=optimizer"):
        Config(rules="rules-of-adam")
