"""The registry: what the project knows about each optimizer, one frozen `Descriptor` each.

Every torch.optim optimizer that steps on dense gradients without a closure is here by
name; any other class can be named by import path (`package.module:ClassName`), so
third-party optimizers (Lion, 8-bit Adam) work the same way. A descriptor says where the
class lives, the names it answers to, whether it is refused (and why), whether it takes only
2-D parameters, whether its step reads tensor values on the host, which implementation torch
picks for it on each target, the state its algorithm keeps (a formula: `formulas.py`) and the
work its step does per element. A class named by import path gets the descriptor of the
class it is (`torch.optim:Muon` is `muon`), or none (its state layout is unknown).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..errors import UsageError
from ..kinds import Target
from . import formulas as f

_FOREACH_ON_CUDA = ((Target.CPU, "forloop"), (Target.CUDA, "foreach"))
_FORLOOP_EVERYWHERE = ((Target.CPU, "forloop"), (Target.CUDA, "forloop"))


@dataclass(frozen=True)
class Descriptor:
    """One optimizer as the project knows it.

    `name`: its registry name (`adam`), or the import path of its class for one known only by
    path. `path`: `module:ClassName` where the class is defined (torch's as `torch.optim:X`).
    `aliases`: other names that mean it (the shorter import paths users write).
    `refused`: why it cannot run in a MultiOptimizer (None: it can). `matrix_only`: takes only
    2-D parameters. `host_reads`: why its step cannot run on fake tensors (it reads values).
    `default_impl`: (target, implementation) torch picks with impl "default" (foreach/fused
    left None): for-loop on CPU parameters, foreach on CUDA for those whose step asks
    `_default_to_fused_or_foreach`; empty when not written down (asked of torch's modules).
    `state`: the state tensors its algorithm keeps per parameter, and `shared_state` those it
    keeps once for all (None: unknown, no expected bytes). `work`: what its step does per
    parameter element (None: not counted yet).
    """

    name: str
    path: str
    aliases: tuple[str, ...] = ()
    refused: str | None = None
    matrix_only: bool = False
    host_reads: str | None = None
    default_impl: tuple[tuple[Target, str], ...] = ()
    state: f.StateFormula | None = None
    shared_state: f.SharedFormula | None = None
    work: f.WorkFormula | None = None

    @property
    def in_torch(self) -> bool:
        return self.path.startswith("torch.optim:")

    def default_impl_on(self, target: Target) -> str | None:
        """The implementation torch picks for it on `target`'s parameters, None if not written."""
        return dict(self.default_impl).get(Target(target))

    def load(self) -> type | None:
        """The class, None when this torch is too old to have it (Muon, Adafactor)."""
        module, _, qualname = self.path.partition(":")
        if self.in_torch:
            return getattr(torch.optim, qualname, None)
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj


def _torch(name: str, attr: str, state: f.StateFormula | None, impl: tuple = _FOREACH_ON_CUDA,
           **more: Any) -> Descriptor:
    return Descriptor(name, f"torch.optim:{attr}", default_impl=impl, state=state, **more)


def _third(path: str, alias: str, state: f.StateFormula, shared: f.SharedFormula | None = None) -> Descriptor:
    return Descriptor(path, path, aliases=(alias,), state=state, shared_state=shared)


# Third-party formulas were read from the installed source of the version named:
# bitsandbytes 0.50.2 (optim/optimizer.py), torchao 0.18.0 (optim/adam.py, subclass_*.py),
# pytorch-optimizer 4.1.0 (optimizer/lion.py, adan.py, soap.py), schedulefree 1.4.1.
REGISTRY: tuple[Descriptor, ...] = (
    _torch("sgd", "SGD", f.sgd, work=f.sgd_work),
    _torch("adam", "Adam", f.adam, work=f.adam_work),
    _torch("adamw", "AdamW", f.adam, work=f.adam_work),
    _torch("adamax", "Adamax", f.adamax),
    _torch("nadam", "NAdam", f.nadam),
    _torch("radam", "RAdam", f.radam),
    _torch("adagrad", "Adagrad", f.adagrad),
    _torch("adadelta", "Adadelta", f.adadelta),
    _torch("rmsprop", "RMSprop", f.rmsprop),
    _torch("rprop", "Rprop", f.rprop),
    _torch("asgd", "ASGD", f.asgd, host_reads="ASGD reads eta and mu with .item() every step"),
    # foreach None -> for-loop on every device (its step never asks torch's default)
    _torch("adafactor", "Adafactor", f.adafactor, _FORLOOP_EVERYWHERE,
           host_reads="Adafactor reads its step count with .item() every step"),
    # Muon only takes 2-D parameters; the hint tells a user where the rest should go
    _torch("muon", "Muon", f.muon, _FORLOOP_EVERYWHERE, matrix_only=True),
    _torch("lbfgs", "LBFGS", None, (), refused="lbfgs needs a closure that re-evaluates the loss several times "
           "per step, so it cannot share one step with other optimizers; train it on its own"),
    _torch("sparseadam", "SparseAdam", None, (), refused="sparseadam only accepts sparse gradients "
           "(nn.Embedding(sparse=True)), which this suite's dense benchmarks never produce; use adam or adamw"),
    _third("bitsandbytes.optim.adam:Adam8bit", "bitsandbytes.optim:Adam8bit", f.bnb(2), f.bnb_qmaps),
    _third("bitsandbytes.optim.adamw:AdamW8bit", "bitsandbytes.optim:AdamW8bit", f.bnb(2), f.bnb_qmaps),
    _third("bitsandbytes.optim.lion:Lion8bit", "bitsandbytes.optim:Lion8bit", f.bnb(1), f.bnb_qmaps),
    _third("bitsandbytes.optim.sgd:SGD8bit", "bitsandbytes.optim:SGD8bit", f.bnb(1), f.bnb_qmaps),
    _third("torchao.optim.adam:AdamW8bit", "torchao.optim:AdamW8bit", f.torchao_8bit, f.torchao_lr),
    _third("torchao.optim.adam:AdamW4bit", "torchao.optim:AdamW4bit", f.torchao_4bit, f.torchao_lr),
    _third("torchao.optim.adam:AdamWFp8", "torchao.optim:AdamWFp8", f.torchao_fp8, f.torchao_lr),
    _third("pytorch_optimizer.optimizer.lion:Lion", "pytorch_optimizer:Lion", f.lion),
    _third("pytorch_optimizer.optimizer.adan:Adan", "pytorch_optimizer:Adan", f.adan),
    _third("pytorch_optimizer.optimizer.soap:SOAP", "pytorch_optimizer:SOAP", f.soap),
    _third("schedulefree.adamw_schedulefree:AdamWScheduleFree", "schedulefree:AdamWScheduleFree",
           f.adamw_schedulefree),
    _third("schedulefree.sgd_schedulefree:SGDScheduleFree", "schedulefree:SGDScheduleFree", f.sgd_schedulefree),
)

_BY_NAME: dict[str, Descriptor] = {n: d for d in REGISTRY for n in (d.name, *d.aliases)}


def lookup(name: str) -> Descriptor | None:
    """The descriptor a registry name, alias or defining import path means; None otherwise."""
    key = name.strip()
    return _BY_NAME.get(key) or _BY_NAME.get(key.lower())


def descriptor_of(cls: type) -> Descriptor | None:
    """The descriptor of exactly this class (a subclass has its own layout: None)."""
    found = _BY_NAME.get(_path_of(cls))
    if found is not None:
        return found
    return _torch_classes().get(cls)


@functools.cache
def _torch_classes() -> dict[type, Descriptor]:
    return {cls: d for d in REGISTRY if d.in_torch and (cls := d.load()) is not None}


def _path_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@dataclass(frozen=True)
class OptimizerSpec:
    """A resolved optimizer: its registry (or import-path) name, class and descriptor (None
    for a class the registry does not know)."""

    name: str
    cls: type
    descriptor: Descriptor | None = None

    @property
    def matrix_only(self) -> bool:
        return self.descriptor is not None and self.descriptor.matrix_only

    @property
    def host_reads(self) -> str | None:
        return self.descriptor.host_reads if self.descriptor is not None else None

    def accepted_keywords(self) -> set[str] | None:
        """Keyword names the constructor takes, or None when it takes **kwargs."""
        names = set()
        for p in _parameters(self.cls):
            if p.kind is p.VAR_KEYWORD:
                return None
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
        names.discard("params")
        return names

    def check_keywords(self, kwargs: dict[str, Any], where: str = "") -> None:
        """Unknown keywords, and values of another type than the keyword's default (a bool
        default takes only a bool, a number default a number, a tuple default a tuple or list
        of its length): one UsageError line naming the keyword."""
        at = f" in {where}" if where else ""
        accepted = self.accepted_keywords()
        bad = sorted(set(kwargs) - accepted) if accepted is not None else []
        if bad:
            raise UsageError(
                f"{self.name} does not take keyword {', '.join(map(repr, bad))}{at}; "
                f"it takes: {', '.join(sorted(accepted or ()))}"
            )
        defaults = {p.name: p.default for p in _parameters(self.cls)}
        for key, value in kwargs.items():
            want = _expected_type(value, defaults.get(key, inspect.Parameter.empty))
            if want is not None:
                raise UsageError(f"{self.name}'s keyword {key} takes {want}, like its default {defaults[key]!r}; "
                                 f"got {value!r} ({type(value).__name__}){at}")

    def build(self, params: Iterable[Any], kwargs: dict[str, Any], where: str = "") -> torch.optim.Optimizer:
        self.check_keywords(kwargs, where)
        return self.cls(params, **kwargs)


def _parameters(cls: type) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())[1:]


def _expected_type(value: Any, default: Any) -> str | None:
    """What a keyword whose default is `default` takes, when `value` is not that; None when
    it fits or the default says nothing (None, no default, another kind of object)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool (True or False)"
    if isinstance(default, (int, float)):
        return None if _is_number(value) else "a number"
    if isinstance(default, tuple):
        fits = isinstance(value, (tuple, list)) and len(value) == len(default)
        if fits and not any(_expected_type(v, d) for v, d in zip(value, default)):
            return None
        return f"a tuple or list of {len(default)} values"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None


def _is_number(value: Any) -> bool:
    # lr and friends may be a tensor (torch's `float | Tensor`); True is not a number here
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or isinstance(value, torch.Tensor)


def available() -> list[str]:
    """Registered names this torch provides (refused ones left out)."""
    return [d.name for d in REGISTRY if d.in_torch and d.refused is None and d.load() is not None]


def resolve(name: str) -> OptimizerSpec:
    """Name (`adam`) or import path (`pkg.mod:Class`) -> OptimizerSpec; UsageError otherwise."""
    if ":" in name:
        return _from_import_path(name)
    key = name.strip().lower()
    desc = lookup(key)
    if desc is not None and desc.refused:
        raise UsageError(f"optimizer {name!r} is refused: {desc.refused}")
    if desc is None or not desc.in_torch:
        raise UsageError(
            f"unknown optimizer {name!r}; known: {', '.join(available())}, "
            "or an import path such as 'mypkg.optim:Lion'"
        )
    cls = desc.load()
    if cls is None:
        raise UsageError(f"optimizer {name!r} needs a newer torch than {torch.__version__} "
                         f"(torch.optim.{desc.path.partition(':')[2]})")
    return OptimizerSpec(desc.name, cls, desc)


def name_of(optimizer: torch.optim.Optimizer) -> str:
    """Registry name of an optimizer instance's class, else its import path."""
    desc = descriptor_of(type(optimizer))
    return desc.name if desc is not None else _path_of(type(optimizer))


def _from_import_path(path: str) -> OptimizerSpec:
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise UsageError(f"optimizer path {path!r} must look like 'package.module:ClassName'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import module {module_name!r} for optimizer {path!r}: {e}") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"module {module_name!r} has no {qualname!r} (optimizer {path!r})")
    if not (inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)):
        raise UsageError(f"{path!r} is not a torch.optim.Optimizer subclass")
    desc = descriptor_of(obj)
    if desc is not None and desc.refused:  # the same class by its import path, refused for the same reason
        raise UsageError(f"optimizer {path!r} is refused: {desc.refused}")
    return OptimizerSpec(path, obj, desc)
