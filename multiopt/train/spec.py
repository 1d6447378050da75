"""Which parameters each rule claims on a model (first match wins).

The rule grammar and the parsed `Rules` value live in `multiopt.rules` (below the record,
which holds them); they are re-exported here, where training code has always found them.
Frozen parameters (`requires_grad=False`) need no rule: no optimizer ever sees them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from ..errors import UsageError
from ..rules import KINDS, Rule, Rules, canonical, format_rules, from_dicts, parse, rules_from

__all__ = ["KINDS", "Rule", "Rules", "assign", "canonical", "format_rules", "from_dicts", "parse", "rules_from"]

_FROZEN = "frozen (requires_grad=False)"


def assign(named_params: Iterable[tuple[str, nn.Parameter]], rules: Sequence[Rule]) -> list[list[tuple[str, nn.Parameter]]]:
    """First-match-wins assignment of trainable parameters to rules, one list per rule.

    Raises UsageError for a trainable parameter no rule claims (all listed by name), for a
    rule that claims nothing (saying why: earlier rules took its parameters, its parameters
    are frozen, or its selector matches no name) and for a model with nothing to train."""
    groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in rules]
    unclaimed, frozen = [], []
    for name, p in named_params:
        if not p.requires_grad:
            frozen.append((name, p))
            continue
        for i, rule in enumerate(rules):
            if rule.matches(name, p):
                groups[i].append((name, p))
                break
        else:
            unclaimed.append(name)
    if frozen and not unclaimed and not any(groups):
        raise UsageError(f"the model has nothing to train: all {len(frozen)} of its parameters are {_FROZEN}; "
                         "unfreeze the ones to train (frozen parameters need no rule)")
    if unclaimed:
        raise UsageError(
            f"no rule claims parameter{'s' if len(unclaimed) > 1 else ''} {', '.join(unclaimed)}; "
            "add a rule for them or end the rules with 'rest=OPTIMIZER'"
        )
    for rule, group in zip(rules, groups):
        if not group:
            raise UsageError(f"rule '{rule}' claims no parameter ({_why_empty(rule, groups, frozen)})")
    return groups


def _why_empty(rule: Rule, groups: Sequence[Sequence[tuple[str, nn.Parameter]]],
               frozen: Sequence[tuple[str, nn.Parameter]]) -> str:
    """Why a rule got no parameter: the trainable ones it selects went to earlier rules, or
    the ones it selects are all frozen, or it selects no name at all."""
    if any(rule.matches(n, p) for group in groups for n, p in group):
        return "earlier rules took the parameters it selects; move it before them or narrow theirs"
    hit = [n for n, p in frozen if rule.matches(n, p)]
    if hit:
        shown = ", ".join(hit[:4]) + (f", ... (+{len(hit) - 4})" if len(hit) > 4 else "")
        return f"the parameters it selects are all {_FROZEN}: {shown}; frozen parameters need no rule, remove it"
    return "the selector matches no parameter name"
