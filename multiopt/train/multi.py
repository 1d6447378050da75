"""MultiOptimizer: several optimizers, each owning part of the parameters, acting as one.

It is a `torch.optim.Optimizer`, so LR schedulers, GradScaler and step hooks accept it;
`param_groups` are the children's own dicts, so one scheduler drives every child.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import UsageError, one_line
from ..kinds import Target
from . import optimizers as registry
from .spec import Rule, Rules, assign, format_rules

IMPLS = ("default", "foreach", "fused", "forloop")


def impl_kwargs(spec: registry.OptimizerSpec, impl: str, given: Mapping[str, Any],
                target: Target | str = Target.CPU) -> dict[str, Any]:
    """Keywords that select an implementation, where the optimizer has that choice and the
    user did not already choose. `fused` on an optimizer without a fused kernel keeps torch's
    default; the record says which implementation each optimizer really used.

    `target="cuda"` with impl "default": the choice torch makes for CUDA parameters, made
    explicit so CPU parameters get it too (the descriptor's `default_impl`)."""
    if impl not in IMPLS:
        raise UsageError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if target not in Target.values():
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(Target.values())}")
    if "foreach" in given or "fused" in given:
        return {}
    if impl == "default":
        picks_foreach = default_impl(spec, Target(target)) == "foreach" and not given.get("differentiable")
        return {"foreach": True} if picks_foreach else {}
    accepted = spec.accepted_keywords() or set()
    if impl == "fused" and "fused" in accepted:
        return {"fused": True}
    if impl == "foreach" and "foreach" in accepted:
        return {"foreach": True}
    if impl == "forloop" and "foreach" in accepted:
        return {"foreach": False}
    return {}


def default_impl(spec: registry.OptimizerSpec, target: Target) -> str:
    """The implementation torch picks for the optimizer's parameters on `target` when neither
    foreach nor fused is given: the descriptor's, else asked of torch's modules (a class
    known only by import path)."""
    written = spec.descriptor.default_impl_on(target) if spec.descriptor is not None else None
    if written is not None:
        return written
    return "foreach" if target == Target.CUDA and torch_defaults_to_foreach(spec) else "forloop"


def torch_defaults_to_foreach(spec: registry.OptimizerSpec) -> bool:
    """True where torch's own step, given foreach=None, asks
    `torch.optim.optimizer._default_to_fused_or_foreach`, which picks foreach when every
    parameter is on a foreach-capable device (CUDA) and the optimizer is not differentiable.
    Read from the module of each class in the optimizer's MRO, so AdamW (whose step is Adam's)
    counts and Adafactor (foreach None -> for-loop everywhere) does not."""
    if "foreach" not in (spec.accepted_keywords() or set()):
        return False
    for cls in spec.cls.__mro__:
        if cls is torch.optim.Optimizer:
            break
        if hasattr(sys.modules.get(cls.__module__), "_default_to_fused_or_foreach"):
            return True
    return False


def impl_of(optimizer: torch.optim.Optimizer) -> str:
    """The implementation an optimizer's step will use (torch picks foreach by default only on CUDA)."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if group.get("fused"):
        return "fused"
    foreach = group.get("foreach")
    if foreach is None and "foreach" in group:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        foreach = bool(params) and all(p.is_cuda for p in params)
    if foreach:
        return "foreach"
    return "forloop"


class MultiOptimizer(torch.optim.Optimizer):
    """Several optimizers as one: `step()`, `zero_grad()`, `param_groups`, `state_dict()`.

    Build it from rules with `MultiOptimizer.from_spec(model, rules)`, or wrap optimizers
    built by hand: `MultiOptimizer({"sgd": opt1, "adam": opt2}, model=model)` (the model is
    only used to name parameters in messages and in `describe()`).
    """

    def __init__(
        self,
        optimizers: Mapping[str, torch.optim.Optimizer] | Sequence[torch.optim.Optimizer],
        *,
        model: nn.Module | None = None,
        rules: Rules | Sequence[Rule] | None = None,
    ) -> None:
        # Deliberately not calling Optimizer.__init__: it would copy the parameters into new
        # param_groups, and a scheduler writing there would never reach the children.
        if isinstance(optimizers, Mapping):
            children = OrderedDict((str(k), v) for k, v in optimizers.items())
        else:
            children = OrderedDict()
            for opt in optimizers:
                base = registry.name_of(opt)
                key, n = base, 1
                while key in children:
                    n += 1
                    key = f"{base}#{n}"
                children[key] = opt
        if not children:
            raise UsageError("MultiOptimizer needs at least one optimizer")
        for key, opt in children.items():
            if not isinstance(opt, torch.optim.Optimizer):
                raise UsageError(f"{key!r} is a {type(opt).__name__}, not a torch.optim.Optimizer")
        self._children = children
        self.rules: tuple[Rule, ...] | None = Rules.of(rules).parsed if rules is not None else None
        self._names = _param_names(model)
        self._check_disjoint()
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#MultiOptimizer.zero_grad"
        self._patch_step_function()

    # --- construction from rules -------------------------------------------------------

    @classmethod
    def from_spec(
        cls,
        model: nn.Module,
        rules: str | Iterable[Mapping[str, Any]] | Iterable[Rule],
        *,
        impl: str = "default",
        zero: bool = False,
        process_group: Any = None,
        target: Target | str = Target.CPU,
    ) -> "MultiOptimizer":
        """One optimizer per rule over the parameters it claims (first match wins).

        `zero=True` wraps each rule's optimizer in `ZeroRedundancyOptimizer` over the default
        (or the given) process group: ZeRO-1 optimizer-state sharding, one partition per rank.
        `target="cuda"`: impl "default" resolved as torch resolves it for CUDA parameters."""
        children: OrderedDict[str, torch.optim.Optimizer] = OrderedDict()
        parsed = Rules.of(rules).parsed
        for rule, spec, group in plan(model, parsed):
            kwargs = {**rule.options, **impl_kwargs(spec, impl, rule.options, target)}
            params = [p for _, p in group]
            try:
                if zero:
                    children[rule.label] = _zero_optimizer(params, spec.cls, process_group, kwargs)
                else:
                    children[rule.label] = spec.cls(params, **kwargs)
            except Exception as e:  # the constructor is the optimizer author's code: any refusal is theirs
                wrapper = f"ZeroRedundancyOptimizer({spec.name})" if zero else spec.name
                raise UsageError(f"rule '{rule}': {wrapper} refused its settings or parameters: "
                                 f"{type(e).__name__}: {one_line(e)}") from None
        return cls(children, model=model, rules=parsed)

    # --- acting as one optimizer ----------------------------------------------------------

    @property
    def optimizers(self) -> "OrderedDict[str, torch.optim.Optimizer]":
        """The children by name (the rule label, `layer1=sgd`, when built from rules)."""
        return self._children

    def __getitem__(self, key: str) -> torch.optim.Optimizer:
        return self._children[key]

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self._children.values())

    def __len__(self) -> int:
        return len(self._children)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for opt in self._children.values() for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        merged: dict[torch.Tensor, Any] = {}
        for opt in self._children.values():
            merged.update(opt.state)
        return merged

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise UsageError("MultiOptimizer.step takes no closure (closure optimizers such as LBFGS are refused)")
        for opt in self._children.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._children.values():
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise UsageError("add parameter groups to one of MultiOptimizer.optimizers[...], not to the MultiOptimizer")

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "rules": format_rules(self.rules) if self.rules is not None else None,
            "optimizers": {k: opt.state_dict() for k, opt in self._children.items()},
            "params": {k: self._names_of(opt) for k, opt in self._children.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load every child's state; refuse, saying what differs, a dict from other rules."""
        if not isinstance(state_dict, dict) or "optimizers" not in state_dict:
            raise UsageError("not a MultiOptimizer state dict (no 'optimizers' key)")
        mine, theirs = list(self._children), list(state_dict["optimizers"])
        if mine != theirs:
            raise UsageError(
                f"state dict is for optimizers {theirs}, this MultiOptimizer has {mine}"
                + (f" (saved rules: {state_dict.get('rules')!r}; current: {format_rules(self.rules)!r})" if self.rules else "")
            )
        saved_params = state_dict.get("params") or {}
        for key, opt in self._children.items():
            names = self._names_of(opt)
            saved = saved_params.get(key)
            if saved is not None and list(saved) != names:
                missing = [n for n in names if n not in saved]
                extra = [n for n in saved if n not in names]
                raise UsageError(
                    f"optimizer {key!r} owned other parameters when saved: "
                    f"now also {missing or 'nothing'}, saved also {extra or 'nothing'}"
                )
        for key, opt in self._children.items():
            opt.load_state_dict(state_dict["optimizers"][key])

    # --- describing -----------------------------------------------------------------------

    def assignment(self) -> "OrderedDict[str, list[str]]":
        """Which parameter (by name) went to which optimizer."""
        return OrderedDict((k, self._names_of(opt)) for k, opt in self._children.items())

    def describe(self) -> str:
        lines = []
        for key, opt in self._children.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            numel = sum(p.numel() for p in params)
            names = self._names_of(opt)
            shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
            lines.append(f"{key}: {type(opt).__name__}, {len(params)} tensors, {numel:,} elements: {shown}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        inner = "\n".join("  " + line for line in self.describe().splitlines())
        return f"MultiOptimizer(\n{inner}\n)"

    def _names_of(self, opt: torch.optim.Optimizer) -> list[str]:
        return [self._names.get(id(p), f"<{tuple(p.shape)}>") for g in opt.param_groups for p in g["params"]]

    def _check_disjoint(self) -> None:
        owner: dict[int, str] = {}
        for key, opt in self._children.items():
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in owner and owner[id(p)] != key:
                        name = self._names.get(id(p), f"of shape {tuple(p.shape)}")
                        raise UsageError(
                            f"parameter {name} is in both {owner[id(p)]!r} and {key!r}; "
                            "each parameter must belong to exactly one optimizer (torch would silently keep two states)"
                        )
                    owner[id(p)] = key


def plan(model: nn.Module, rules: Rules | Sequence[Rule]) -> list[tuple[Rule, registry.OptimizerSpec, list]]:
    """Each rule with its optimizer class and the (name, parameter) pairs it claims, every
    check that needs no optimizer instance done: unknown optimizers, bad keywords, rules that
    claim nothing, unclaimed parameters, matrix-only optimizers on other shapes. Works on a
    meta-device model, so a config is validated before anything is allocated."""
    rules = rules.parsed if isinstance(rules, Rules) else tuple(rules)
    specs = [registry.resolve(r.optimizer) for r in rules]
    for rule, spec in zip(rules, specs):
        spec.check_keywords(rule.options, where=f"rule '{rule}'")
    groups = assign(model.named_parameters(), rules)
    for i, (rule, spec, group) in enumerate(zip(rules, specs, groups)):
        if spec.matrix_only:
            _check_matrix_only(rule, spec, group, rules[i + 1 :])
        _try_construct(rule, spec, group)
    return list(zip(rules, specs, groups))


def _try_construct(rule: Rule, spec: registry.OptimizerSpec, group: list) -> None:
    """Build the rule's optimizer over meta-device parameters of the real shapes, so a value
    the constructor refuses (lr=-1, betas=(0.9,)) is a one-line error before any compute."""
    meta = [nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta")) for _, p in group]
    kwargs = rule.options
    try:
        spec.cls(meta, **kwargs)
        return
    except Exception as e:  # any exception: the constructor is the optimizer author's code
        why = f"{type(e).__name__}: {one_line(e)}"
    culprits = [k for k in kwargs if _builds(spec, meta, {j: v for j, v in kwargs.items() if j != k})]
    named = f" keyword {', '.join(f'{k}={kwargs[k]!r}' for k in culprits)}" if culprits else " settings"
    raise UsageError(f"rule '{rule}': {spec.name} refused its{named} ({why}); fix or remove it")


def _builds(spec: registry.OptimizerSpec, params: list, kwargs: dict[str, Any]) -> bool:
    try:
        spec.cls(params, **kwargs)
    except Exception:  # which keyword is at fault: the one whose removal lets it build
        return False
    return True


def _zero_optimizer(params: list, cls: type, process_group: Any, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    # torch.distributed.optim costs most of a second to import (it scripts its functional
    # optimizers): only ZeRO configs pay it.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=process_group, **kwargs)


def is_zero(optimizer: Any) -> bool:
    """Whether `optimizer` is a ZeroRedundancyOptimizer, without importing torch.distributed.optim
    to learn that a plain optimizer is not one."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


def local_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the state: ZeRO's local one over this rank's partition, else itself."""
    return optimizer.optim if is_zero(optimizer) else optimizer


def _param_names(model: nn.Module | None) -> dict[int, str]:
    if model is None:
        return {}
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}


def _check_matrix_only(rule: Rule, spec: registry.OptimizerSpec, group: list, later: Sequence[Rule]) -> None:
    for name, p in group:
        if p.ndim != 2:
            takers = [r for r in later if r.matches(name, p) and not registry.resolve(r.optimizer).matrix_only]
            # @2d claims exactly the 2-D parameters, so it is the narrowing to suggest; a rule
            # whose selector is @2d never gets here
            hint = (
                f"rule '{takers[0]}' would take it if '{rule.selector}' did not claim it; narrow the selector to "
                f"@2d (ndim == 2)"
                if takers
                else f"add a rule before '{rule}' for it, e.g. '{name}=adamw', or narrow the selector to @2d "
                "(ndim == 2) and end with e.g. 'rest=adamw'"
            )
            raise UsageError(
                f"{spec.name} (rule '{rule}') only takes 2-D parameters, but claims {name} of shape {tuple(p.shape)}; {hint}"
            )
