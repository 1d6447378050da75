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


# --- keyword values checked against the type of the optimizer's default (issue 20) ---------

@pytest.mark.parametrize(
    "rules, message",
    [
        ("rest=adam(lr=0.1, amsgrad='yes')",
         "adam's keyword amsgrad takes a bool (True or False), like its default False; got 'yes' (str) "
         "in rule 'rest=adam(lr=0.1, amsgrad='yes')'"),
        ("rest=adam(amsgrad=1)", "adam's keyword amsgrad takes a bool (True or False), like its default False; got 1 (int)"),
        ("rest=adam(betas=(0.9,))", "adam's keyword betas takes a tuple or list of 2 values, like its default "
                                    "(0.9, 0.999); got (0.9,) (tuple)"),
        ("rest=adam(betas=(0.9, 'x'))", "keyword betas takes a tuple or list of 2 values"),
        ("rest=sgd(lr=True)", "sgd's keyword lr takes a number, like its default 0.001; got True (bool)"),
        ("rest=sgd(lr='0.1')", "sgd's keyword lr takes a number"),
    ],
)
def test_a_keyword_value_of_another_type_than_its_default_is_refused(rules, message):
    with pytest.raises(UsageError) as e:
        MultiOptimizer.from_spec(SimpleNet(), rules)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1


def test_keyword_values_of_the_defaults_type_are_accepted():
    # an int where the default is a float (or the reverse: SGD's momentum default is 0),
    # a list for a tuple, None where the default is None
    mo = MultiOptimizer.from_spec(SimpleNet(), "layer1=sgd(lr=1, momentum=0.9); "
                                               "rest=adam(betas=[0.8, 0.9], amsgrad=True, foreach=None, eps=1)")
    assert mo["rest=adam"].param_groups[0]["betas"] == (0.8, 0.9)
    assert mo["layer1=sgd"].param_groups[0]["lr"] == 1


# --- the registry ---------------------------------------------------------------------------

def test_every_descriptor_is_found_by_its_names_and_its_class():
    from multiopt.train import optimizers as registry

    names = [n for d in registry.REGISTRY for n in (d.name, *d.aliases)]
    assert len(names) == len(set(names))
    for name in registry.available():
        spec = registry.resolve(name)
        assert spec.descriptor is registry.lookup(name) is registry.descriptor_of(spec.cls)
        assert spec.descriptor.state is not None, name
        assert registry.name_of(spec.cls([nn.Parameter(torch.zeros(2, 2))])) == name
    assert {d.name for d in registry.REGISTRY if d.refused} == {"lbfgs", "sparseadam"}
    assert {d.name for d in registry.REGISTRY if d.host_reads} == {"asgd", "adafactor"}


def test_a_class_named_by_import_path_gets_its_descriptor():
    """`torch.optim:Muon` is Muon: matrix-only like `muon` (the name-keyed tables missed it)."""
    from multiopt.train import optimizers as registry

    assert registry.resolve("torch.optim:Muon").matrix_only
    assert registry.resolve("torch.optim.adam:Adam").descriptor is registry.lookup("adam")
    with pytest.raises(UsageError, match="only takes 2-D parameters, but claims layer1.bias"):
        MultiOptimizer.from_spec(SimpleNet(), "layer1=torch.optim:Muon; rest=adamw")
    with pytest.raises(UsageError, match="'torch.optim:LBFGS' is refused: lbfgs needs a closure"):
        registry.resolve("torch.optim:LBFGS")


def test_the_default_impl_written_per_target_is_the_one_torch_picks():
    """Each torch descriptor's `default_impl` against torch's own modules (what a class known
    only by import path is asked), and against the step torch really takes on CPU."""
    from multiopt.kinds import Target
    from multiopt.train import optimizers as registry
    from multiopt.train.multi import torch_defaults_to_foreach

    for name in registry.available():
        spec = registry.resolve(name)
        asked = "foreach" if torch_defaults_to_foreach(spec) else "forloop"
        assert spec.descriptor.default_impl_on(Target.CUDA) == asked, name
        assert spec.descriptor.default_impl_on(Target.CPU) == "forloop", name
        p = nn.Parameter(torch.zeros(4, 4))
        assert impl_of(spec.cls([p])) == "forloop", name


def test_work_per_element_for_sgd_momentum_sgd_adam_and_adamw():
    from multiopt.train import optimizers as registry
    from multiopt.train.formulas import Work

    def work(name, **options):
        opt = registry.resolve(name).cls([nn.Parameter(torch.zeros(2))], **options)
        return registry.lookup(name).work(opt.param_groups[0])

    assert work("sgd", lr=0.1) == Work(kernels=1, reads=2, writes=1, flops=2)
    assert work("sgd", lr=0.1, momentum=0.9) == Work(kernels=3, reads=5, writes=3, flops=5)
    assert work("adam") == Work(kernels=7, reads=11, writes=7, flops=13)
    assert work("adamw") == Work(kernels=8, reads=12, writes=8, flops=14)  # + param.mul_(1 - lr * wd)
    assert work("adam", fused=True) is None  # one fused pass: not these counts
    assert registry.lookup("rmsprop").work is None  # not counted yet
