"""Rules that say which optimizer owns which parameters: the grammar, and `Rules`, the
parsed value a config carries.

    layer1=sgd(lr=0.01, momentum=0.9); layer2=adam(lr=1e-3)
    @matrix=muon(lr=0.02); rest=adamw(lr=3e-4, weight_decay=0.1)
    *wte*=adamw; @2d=muon(lr=0.02); rest=adamw
    *.bias=sgd(lr=0.1); rest=adam

A rule is `selector=optimizer(kwargs)`. Selectors: a module path (`layer1`, `blocks.0`),
a glob over parameter names (`*.bias`), a kind (`@matrix`: ndim >= 2, `@2d`: ndim == 2,
`@vector`: ndim < 2), or `rest`. `@2d` is the one for Muon, which takes exactly 2-D
parameters: `@matrix` also hands it conv kernels (3-D/4-D) and ViT's cls_token. The first
matching rule wins. Keyword values are parsed as Python literals with `ast.literal_eval`:
never evaluated as code.

Pure Python (no torch), at the bottom of the layers, because `record.Config` holds a `Rules`:
the text is parsed once, where it enters (the command line, a preset, `Config(...)`), and
every stage after reads the parsed rules from the config. Which parameters a rule claims on a
model is `train.spec.assign`; which optimizer a name means is `train.optimizers`.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

from .errors import UsageError

KINDS = {"@matrix": "parameters with ndim >= 2", "@2d": "parameters with ndim == 2", "@vector": "parameters with ndim < 2"}
_GLOB_CHARS = set("*?[")


class _Shaped(Protocol):
    """What a selector looks at: a parameter's number of dimensions (its name is passed apart)."""

    @property
    def ndim(self) -> int: ...



@dataclass(frozen=True)
class Rule:
    """One `selector=optimizer(kwargs)` rule. `kwargs` is a tuple of (name, value) pairs so
    the rule stays hashable and frozen."""

    selector: str
    optimizer: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def label(self) -> str:
        """Short name that keys this rule's optimizer: `layer1=sgd`."""
        return f"{self.selector}={self.optimizer}"

    def __str__(self) -> str:
        if not self.kwargs:
            return self.label
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.label}({args})"

    def matches(self, name: str, param: _Shaped) -> bool:
        sel = self.selector
        if sel == "rest":
            return True
        if sel == "@matrix":
            return param.ndim >= 2
        if sel == "@2d":
            return param.ndim == 2
        if sel == "@vector":
            return param.ndim < 2
        if _GLOB_CHARS & set(sel):
            return fnmatch.fnmatchcase(name, sel)
        return name == sel or name.startswith(sel + ".")


def format_rules(rules: Sequence[Rule]) -> str:
    """The canonical rule string, parseable by `parse`."""
    return "; ".join(str(r) for r in rules)


def parse(text: str) -> tuple[Rule, ...]:
    """Parse a rule string; UsageError names the part that is wrong. A config's rule text is
    parsed once: later calls with the same text return the same (immutable) Rules."""
    if not isinstance(text, str):
        raise UsageError(f"rules must be a string, got {type(text).__name__}")
    return _parse_cached(text)


def canonical(text: str) -> str:
    """The canonical form of a rule string (what records store and configs are keyed by)."""
    return format_rules(parse(text))


@functools.lru_cache(maxsize=1024)
def _parse_cached(text: str) -> tuple[Rule, ...]:
    parts = [p.strip() for p in _split_top_level(text, ";")]
    parts = [p for p in parts if p]
    if not parts:
        raise UsageError("no rules given; write e.g. 'layer1=sgd(lr=0.01); rest=adam'")
    rules = tuple(_parse_rule(p) for p in parts)
    _check_selectors(rules)
    return rules


def from_dicts(items: Iterable[Mapping[str, Any]]) -> tuple[Rule, ...]:
    """Rules from a list of dicts (JSON / YAML), e.g.
    `[{"select": "layer1", "optimizer": "sgd", "lr": 0.01}, {"select": "rest", "optimizer": "adam"}]`.
    Keyword arguments go either at the top level or under "kwargs"."""
    rules = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise UsageError(f"rule #{i + 1} must be a mapping, got {type(item).__name__}")
        d = dict(item)
        selector = d.pop("select", d.pop("selector", d.pop("params", None)))
        opt = d.pop("optimizer", d.pop("opt", None))
        if not selector or not opt:
            raise UsageError(f"rule #{i + 1} {dict(item)!r} needs 'select' and 'optimizer'")
        extra = d.pop("kwargs", None) or {}
        if not isinstance(extra, Mapping):
            raise UsageError(f"rule #{i + 1}: 'kwargs' must be a mapping of keyword to value, got {type(extra).__name__}")
        kwargs = {str(k): tuple(v) if isinstance(v, list) else v for k, v in {**extra, **d}.items()}
        for k, v in kwargs.items():
            _check_finite(k, v, f"rule #{i + 1}")
        rules.append(Rule(str(selector).strip(), str(opt).strip().lower() if ":" not in str(opt) else str(opt).strip(), tuple(kwargs.items())))
    if not rules:
        raise UsageError("no rules given")
    rules_t = tuple(rules)
    _check_selectors(rules_t)
    return rules_t


class Rules(str):
    """Rules parsed once: the canonical rule text (what records store and configs are keyed
    by) that also carries its parsed `Rule`s (`.parsed`).

    A `str` so that everything that keeps or compares the text (the JSON record, the config
    key, a DataFrame column, a dict key) is unchanged; `Rules("rest=adam(lr=1e-3)")` is equal
    to, and hashes as, "rest=adam(lr=0.001)". Immutable: `parsed` is a tuple of frozen Rules and
    cannot be reassigned. Iterate `.parsed`, never the value itself (that walks its characters).
    """

    parsed: tuple[Rule, ...]

    def __new__(cls, text: str = "rest=adam") -> Rules:
        if type(text) is cls:
            return text  # type: ignore[return-value]
        if not isinstance(text, str):
            raise UsageError(f"rules must be a string, got {type(text).__name__}")
        return _rules_of_text(str(text))

    @classmethod
    def of(cls, spec: str | Iterable[Mapping[str, Any]] | Iterable[Rule]) -> Rules:
        """Rules from a rule string, a list of dicts (JSON / YAML) or Rule values."""
        if isinstance(spec, str):
            return cls(spec)
        return _rules_of(rules_from(spec))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Rules are immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Rules are immutable (cannot delete {name!r})")

    # pickled and copied as their text (a worker process parses it again, once)
    def __reduce__(self) -> tuple[Any, ...]:
        return (Rules, (str(self),))

    def __copy__(self) -> Rules:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Rules:
        return self


@functools.lru_cache(maxsize=1024)
def _rules_of_text(text: str) -> Rules:
    return _rules_of(parse(text))


def _rules_of(parsed: tuple[Rule, ...]) -> Rules:
    made = str.__new__(Rules, format_rules(parsed))
    object.__setattr__(made, "parsed", parsed)
    return made


def rules_from(spec: str | Iterable[Mapping[str, Any]] | Iterable[Rule]) -> tuple[Rule, ...]:
    """Accept a rule string (a `Rules` included), a list of dicts, or Rule values."""
    if isinstance(spec, Rules):
        return spec.parsed
    if isinstance(spec, str):
        return parse(spec)
    items = list(spec)
    if items and all(isinstance(r, Rule) for r in items):
        rules = tuple(items)  # type: ignore[arg-type]
        _check_selectors(rules)
        return rules
    return from_dicts(items)  # type: ignore[arg-type]


def _check_selectors(rules: Sequence[Rule]) -> None:
    seen = set()
    for r in rules:
        if r.selector.startswith("@") and r.selector not in KINDS:
            raise UsageError(f"unknown kind selector {r.selector!r} in rule '{r}'; kinds: {', '.join(KINDS)}")
        if r.label in seen:
            raise UsageError(f"rule '{r.label}' appears twice; the second would claim nothing")
        seen.add(r.label)
    for r in rules[:-1]:
        if r.selector == "rest":
            raise UsageError(f"'rest' must be the last rule: rules after '{r}' would claim nothing")


def _check_finite(key: str, value: Any, where: str) -> None:
    # 1e999 parses to inf and would train: a non-finite setting is never what a person meant
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if isinstance(v, tuple):
            _check_finite(key, v, where)
        elif isinstance(v, (float, complex)) and not all(map(math.isfinite, (v.real, v.imag))):
            raise UsageError(f"{where}: {key}={v!r} is not a finite number; give a finite value")


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on `sep` outside parentheses, brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise UsageError(f"unbalanced {'quote' if quote else 'parentheses'} in rules {text!r}")
    parts.append("".join(cur))
    return parts


def _parse_rule(part: str) -> Rule:
    selector, eq, rhs = part.partition("=")
    selector, rhs = selector.strip(), rhs.strip()
    if not eq or not selector or not rhs:
        raise UsageError(f"rule {part!r} must look like 'selector=optimizer(key=value, ...)'")
    name, paren, args = rhs.partition("(")
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise UsageError(f"rule {part!r}: {name!r} is not an optimizer name")
    kwargs: tuple[tuple[str, Any], ...] = ()
    if paren:
        if not args.rstrip().endswith(")"):
            raise UsageError(f"rule {part!r}: missing ')' after the optimizer's keywords")
        kwargs = _parse_kwargs(args.rstrip()[:-1], part)
    return Rule(selector, name if ":" in name else name.lower(), kwargs)


def _parse_kwargs(args: str, part: str) -> tuple[tuple[str, Any], ...]:
    try:
        call = ast.parse(f"f({args})", mode="eval").body
    except SyntaxError as e:
        raise UsageError(f"rule {part!r}: cannot parse keywords ({e.msg})") from None
    assert isinstance(call, ast.Call)
    if call.args:
        raise UsageError(f"rule {part!r}: write keywords as name=value, not positionally")
    out = []
    for kw in call.keywords:
        if kw.arg is None:
            raise UsageError(f"rule {part!r}: '**' is not allowed")
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError):
            raise UsageError(
                f"rule {part!r}: value of {kw.arg!r} must be a literal (number, bool, None, string, tuple), "
                f"got {ast.unparse(kw.value)!r}"
            ) from None
        if isinstance(value, list):
            value = tuple(value)
        _check_finite(kw.arg, value, f"rule {part!r}")
        out.append((kw.arg, value))
    names = [k for k, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"rule {part!r}: keyword {', '.join(sorted(dup))} given twice")
    return tuple(out)
