import pytest
import torch
from torch import nn

from multiopt.errors import UsageError
from multiopt.train.models import MLP, SimpleNet
from multiopt.train.multi import MultiOptimizer, impl_of


def _step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, model.in_features, generator=g)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_from_spec_routes_parameters_and_describes_them():
    torch.manual_seed(0)
    m = SimpleNet()
    mo = MultiOptimizer.from_spec(m, "layer1=sgd(lr=0.01); layer2=adam(lr=1e-3)")
    assert list(mo.optimizers) == ["layer1=sgd", "layer2=adam"]
    assert isinstance(mo.optimizers["layer1=sgd"], torch.optim.SGD)
    assert isinstance(mo["layer2=adam"], torch.optim.Adam)
    assert mo.assignment() == {"layer1=sgd": ["layer1.weight", "layer1.bias"], "layer2=adam": ["layer2.weight", "layer2.bias"]}
    text = repr(mo)
    assert "layer1=sgd: SGD, 2 tensors, 220 elements: layer1.weight, layer1.bias" in text
    assert "layer2=adam: Adam, 2 tensors, 21 elements" in text


def test_param_groups_are_the_childrens_own_dicts_so_one_scheduler_drives_all():
    m = SimpleNet()
    mo = MultiOptimizer.from_spec(m, "layer1=sgd(lr=0.1); layer2=adam(lr=0.01)")
    assert mo.param_groups[0] is mo["layer1=sgd"].param_groups[0]
    sched = torch.optim.lr_scheduler.StepLR(mo, step_size=1, gamma=0.5)
    _step(m, mo)
    sched.step()
    assert mo["layer1=sgd"].param_groups[0]["lr"] == pytest.approx(0.05)
    assert mo["layer2=adam"].param_groups[0]["lr"] == pytest.approx(0.005)


def test_wraps_hand_built_optimizers_and_refuses_shared_parameters():
    m = SimpleNet()
    a = torch.optim.SGD(m.layer1.parameters(), lr=0.1)
    b = torch.optim.Adam(m.layer2.parameters())
    mo = MultiOptimizer([a, b], model=m)
    assert list(mo.optimizers) == ["sgd", "adam"]
    c = torch.optim.Adam([m.layer1.weight, m.layer2.bias])
    with pytest.raises(UsageError, match=r"parameter layer1\.weight is in both 'sgd' and 'adam#2'"):
        MultiOptimizer([a, b, c], model=m)


@pytest.mark.parametrize(
    "rules, needle",
    [
        ("layer1=sgd", "no rule claims parameters layer2.weight, layer2.bias"),
        ("layer1=sgd; layer3=adam; rest=adam", "rule 'layer3=adam' claims no parameter"),
        ("layer1=sgdd; rest=adam", "unknown optimizer 'sgdd'"),
        ("layer1=sgd(momentun=0.9); rest=adam", "does not take keyword 'momentun'"),
        ("rest=lbfgs", "closure"),
        ("rest=sparseadam", "sparse"),
        ("layer1=sgd(lr=-1); rest=adam", "rule 'layer1=sgd(lr=-1)'"),
        ("rest=nosuchpkg.mod:Lion", "cannot import module 'nosuchpkg.mod'"),
    ],
)
def test_errors_name_the_culprit(rules, needle):
    with pytest.raises(UsageError) as e:
        MultiOptimizer.from_spec(SimpleNet(), rules)
    assert needle in str(e.value)


def test_muon_on_a_bias_says_which_rule_should_take_it():
    with pytest.raises(UsageError) as e:
        MultiOptimizer.from_spec(SimpleNet(), "layer1=muon; rest=adamw")
    msg = str(e.value)
    assert "layer1.bias" in msg and "(20,)" in msg and "rule 'rest=adamw' would take it" in msg


def test_import_path_optimizers_work():
    mo = MultiOptimizer.from_spec(SimpleNet(), "layer1=torch.optim:SGD(lr=0.1); rest=adam")
    assert type(mo["layer1=torch.optim:SGD"]) is torch.optim.SGD


def test_state_dict_round_trip_and_mismatch_says_what_differs():
    torch.manual_seed(0)
    m = SimpleNet()
    mo = MultiOptimizer.from_spec(m, "layer1=sgd(lr=0.1, momentum=0.9); layer2=adam")
    _step(m, mo)
    sd = mo.state_dict()
    m2 = SimpleNet()
    mo2 = MultiOptimizer.from_spec(m2, "layer1=sgd(lr=0.1, momentum=0.9); layer2=adam")
    mo2.load_state_dict(sd)
    buf = mo2["layer1=sgd"].state[m2.layer1.weight]["momentum_buffer"]
    assert torch.equal(buf, mo["layer1=sgd"].state[m.layer1.weight]["momentum_buffer"])
    other = MultiOptimizer.from_spec(SimpleNet(), "layer1=sgd(lr=0.1); rest=adam")
    with pytest.raises(UsageError) as e:
        other.load_state_dict(sd)
    assert "['layer1=sgd', 'layer2=adam']" in str(e.value) and "['layer1=sgd', 'rest=adam']" in str(e.value)
    swapped = MultiOptimizer.from_spec(SimpleNet(), "layer1=sgd(lr=0.1); *.weight=adam; rest=adam")
    with pytest.raises(UsageError, match="state dict is for optimizers"):
        swapped.load_state_dict(sd)


def test_state_dict_with_same_labels_but_other_parameters_is_refused():
    m = MLP(4, 3)
    mo = MultiOptimizer.from_spec(m, "layer1=sgd; rest=adam")
    sd = mo.state_dict()
    sd["params"]["rest=adam"] = ["layer2.weight", "layer2.bias"]
    with pytest.raises(UsageError, match="owned other parameters"):
        MultiOptimizer.from_spec(MLP(4, 3), "layer1=sgd; rest=adam").load_state_dict(sd)


def test_impl_is_applied_where_the_optimizer_offers_it():
    m = MLP(4, 2)
    assert {impl_of(o) for o in MultiOptimizer.from_spec(m, "layer1=sgd; rest=adam", impl="fused")} == {"fused"}
    assert {impl_of(o) for o in MultiOptimizer.from_spec(m, "layer1=sgd; rest=adam", impl="foreach")} == {"foreach"}
    assert {impl_of(o) for o in MultiOptimizer.from_spec(m, "layer1=sgd; rest=adam", impl="forloop")} == {"forloop"}
    # torch's own default on CPU is the for-loop
    assert {impl_of(o) for o in MultiOptimizer.from_spec(m, "layer1=sgd; rest=adam")} == {"forloop"}
    # the user's explicit choice wins over impl
    mo = MultiOptimizer.from_spec(m, "layer1=sgd(foreach=False); rest=adam", impl="foreach")
    assert [impl_of(o) for o in mo] == ["forloop", "foreach"]
    with pytest.raises(UsageError, match="unknown impl"):
        MultiOptimizer.from_spec(m, "rest=sgd", impl="cuda-graph")
