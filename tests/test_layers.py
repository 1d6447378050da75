"""The shape of the code, held by tests (docs/DESIGN.md, "Layers" and "What the tests hold"):
import-linter's layer contracts, no import cycle, argparse only in the CLI, no function-local
import of a multiopt module outside the CLI (and only the listed lazy imports of others), no
function over 60 lines, and no string literal naming a probe, target or status outside
multiopt/kinds.py. Every failure names file:line."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import pytest

from multiopt.kinds import Probe, Status, Target

from .support import ROOT

PKG = ROOT / "multiopt"
MAX_LINES = 60

# Function-local imports of modules outside multiopt, each deliberate: (file, module) -> why
# it is not at the top of its module. A multiopt module is never imported this way outside
# cli.py (whose commands load their stage when they run, so `--help` pays no torch import).
LAZY_IMPORTS = {
    ("multiopt/instrument/probes/tracked.py", "torch._dynamo.eval_frame"):
        "a hook some torch versions lack (ImportError handled), and Dynamo's import is paid only "
        "when a tracked probe first enters",
    ("multiopt/run/launch.py", "torch.distributed"): "needed only by a rank of a torchrun launch",
    ("multiopt/run/sweep.py", "torch"): "with torch.distributed, only under torchrun",
    ("multiopt/run/sweep.py", "torch.distributed"): "needed only under torchrun; costs its import time elsewhere",
    # FSDP2 and DTensor cost about 1.5 s to import: only a config with fsdp > 1 pays it
    **{("multiopt/instrument/fsdp.py", m): "FSDP2 and DTensor (about 1.5 s of imports): only fsdp > 1 configs pay it"
       for m in ("torch.distributed.fsdp", "torch.distributed.fsdp._fully_shard", "torch.distributed.device_mesh",
                 "torch.distributed.tensor")},
    ("multiopt/instrument/fsdp.py", "torch.testing._internal.distributed.fake_pg"):
        "torch's testing internals: only the fake probe's simulated FSDP ranks need FakeStore",
    ("multiopt/instrument/fsdp.py", "torch.optim"): "torch's private _muon, absent from some torch versions "
                                                   "(ImportError handled)",
    ("multiopt/train/multi.py", "torch.distributed.optim"):
        "scripts its functional optimizers on import (most of a second): only ZeRO configs pay it",
}


# --------------------------------------------------------------------------- the sources


@lru_cache(maxsize=None)
def _sources() -> tuple[tuple[str, str, ast.Module], ...]:
    """(module name, path relative to ROOT, AST) of every module of the package."""
    out = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(ROOT)
        parts = rel.with_suffix("").parts
        name = ".".join(parts[:-1] if rel.name == "__init__.py" else parts)
        out.append((name, rel.as_posix(), ast.parse(f.read_text(encoding="utf-8"), filename=str(f))))
    return tuple(out)


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    return (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports() -> dict[str, set[str]]:
    """Module -> the multiopt modules it imports at import time (module level only)."""
    names = {name for name, _, _ in _sources()}
    graph: dict[str, set[str]] = {}
    for name, rel, tree in _sources():
        is_pkg = rel.endswith("__init__.py")
        deps: set[str] = set()
        for node in tree.body:
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, is_pkg)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in names and t != name}
        graph[name] = deps
    return graph


# --------------------------------------------------------------------------- layers and imports


def test_import_linter_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    p = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_no_import_cycle_between_modules() -> None:
    graph = _top_level_imports()
    # the package face (multiopt/__init__) re-exports from below; a package __init__ importing
    # its own children is not a cycle through them
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items() if m != "multiopt"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if d == "multiopt":
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _imported(node: ast.AST) -> list[tuple[str, bool]]:
    """(module, is a multiopt module) for an import statement or an `import_module("...")` call
    with a literal name; [] for anything else."""
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        return [("." * node.level + mod, node.level > 0 or mod.split(".")[0] == "multiopt")]
    if isinstance(node, ast.Import):
        return [(a.name, a.name.split(".")[0] == "multiopt") for a in node.names]
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        mod = node.args[0].value
        return [(mod, mod.startswith(".") or mod.split(".")[0] == "multiopt")]
    return []


def test_argparse_only_in_the_cli() -> None:
    problems = [f"{rel}:{node.lineno} imports argparse (only multiopt/cli.py knows argparse)"
                for name, rel, tree in _sources() if name != "multiopt.cli"
                for node in ast.walk(tree) for mod, _ in _imported(node) if mod.lstrip(".") == "argparse"]
    assert not problems, "\n".join(problems)


def test_no_function_local_import_of_a_multiopt_module_outside_the_cli() -> None:
    """A module imports its siblings at the top, where import-linter sees them; only cli.py
    defers (its commands). Other lazy imports are of modules outside multiopt, each listed in
    LAZY_IMPORTS with the reason it is lazy."""
    problems = []
    for name, rel, tree in _sources():
        if name == "multiopt.cli":
            continue
        for fn in _functions(tree):
            for node in ast.walk(fn):
                for mod, ours in _imported(node):
                    if ours:
                        problems.append(f"{rel}:{node.lineno} {fn.name} imports {mod} inside the function; "
                                        "import it at the top of the module")
                    elif not isinstance(node, ast.Call) and (rel, mod) not in LAZY_IMPORTS:
                        problems.append(f"{rel}:{node.lineno} {fn.name} imports {mod} inside the function; import it "
                                        "at the top, or say in LAZY_IMPORTS (tests/test_layers.py) why it is lazy")
    assert not problems, "\n".join(sorted(set(problems)))


def test_no_function_over_60_lines() -> None:
    long = [f"{rel}:{fn.lineno} {fn.name}: {fn.end_lineno - fn.lineno + 1} lines (at most {MAX_LINES})"
            for _, rel, tree in _sources() for fn in _functions(tree)
            if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
    assert not long, "\n".join(long)


# --------------------------------------------------------------------------- the closed words
#
# A string literal *names* a probe, target or status when it is a str constant equal to a
# value of kinds.Probe, kinds.Target or kinds.Status and it is
#   - compared (==, !=, in, not in) with something named for a kind, or an element of the
#     tuple/list/set it is compared with by `in`;
#   - assigned to, or annotated as the default of, something named for a kind (a variable,
#     an attribute, a subscript `row["status"]`), including a function parameter's default;
#   - passed as a keyword argument named for a kind (`probe="fake"`), or positionally to a
#     function named for one (`make_probe("fake")`, `effective_target(p, "cpu")`);
#   - the value under a dict key named for a kind (`{"status": "ok"}`), or the default of
#     `.get("target", "cpu")` / `getattr(x, "target", "cpu")`;
#   - `default=` of an argparse `add_argument("--probe" | "--target" | "--status", ...)`.
# Inside an expression, the literal may sit in a tuple/list/set, a conditional expression
# or an `or`/`and`. "Named for a kind": an identifier (variable, attribute, parameter,
# keyword, function, dict key, subscript key) one of whose `_`-separated words is probe,
# target or status (or their plurals), case-insensitively: `probe`, `self._target`,
# `PROBE_NAMES`, `row["status"]`, `effective_target`.
# Not caught, by design: device strings (`torch.device("cuda")`, `device.type == "cuda"`,
# `str(device).startswith("cuda")`), words inside messages, and a kind held in a variable
# whose name says nothing (`name == "tracked"`): name such variables for what they hold.
# Allowed: multiopt/kinds.py (where the words are defined) and the CLI's argparse `choices`.

_WORDS = set(Probe.values()) | set(Target.values()) | set(Status.values())
_KIND_WORDS = {"probe": "Probe", "probes": "Probe", "target": "Target", "targets": "Target",
               "status": "Status", "statuses": "Status"}
_ALLOWED_FILES = {"multiopt/kinds.py"}
_LOOKUPS = {"get": 0, "pop": 0, "setdefault": 0, "getattr": 1}  # name -> index of the key argument


def _kind(name: str | None) -> str | None:
    """The enum a name is named for ("Probe", "Target", "Status"), or None."""
    for word in re.split(r"_+", (name or "").lower()):
        if word in _KIND_WORDS:
            return _KIND_WORDS[word]
    return None


def _func_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _label(node: ast.AST) -> str | None:
    """What an expression is named: a variable's or attribute's name, a subscript's string key,
    the key of `.get("key")` / `getattr(x, "key")`, else a called function's name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _str(node.slice)
    if isinstance(node, ast.Call):
        at = _LOOKUPS.get(_func_name(node) or "")
        if at is not None:
            return _str(node.args[at]) if len(node.args) > at else None
        return _func_name(node)
    return None


def _words(node: ast.AST | None) -> Iterator[ast.Constant]:
    """The literals of `node` that are kind words (through tuples, lists, sets, `x if c else y`
    and `or`/`and`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _WORDS:
        yield node
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for e in node.elts:
            yield from _words(e)
    elif isinstance(node, ast.IfExp):
        yield from _words(node.body)
        yield from _words(node.orelse)
    elif isinstance(node, ast.BoolOp):
        for v in node.values:
            yield from _words(v)


Hit = tuple[ast.Constant, str, str]  # (the literal, the enum to use, how it names it)


def _compare_hits(n: ast.Compare) -> Iterator[Hit]:
    sides = [n.left, *n.comparators]
    for a, b, op in zip(sides, sides[1:], n.ops):
        if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
            for lit, other in ((a, b), (b, a)):
                kind = _kind(_label(other))
                if kind:
                    yield from ((w, kind, f"compared with {_label(other)}") for w in _words(lit))


def _assign_hits(n: ast.Assign | ast.AnnAssign | ast.AugAssign) -> Iterator[Hit]:
    targets = n.targets if isinstance(n, ast.Assign) else [n.target]
    for t in targets:
        for name in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
            kind = _kind(_label(name))
            if kind:
                yield from ((w, kind, f"assigned to {_label(name)}") for w in _words(n.value))


def _call_hits(n: ast.Call) -> Iterator[Hit]:
    fname = _func_name(n) or ""
    flag = _str(n.args[0]) if fname == "add_argument" and n.args else None
    for k in n.keywords:
        if k.arg == "choices":
            continue  # the CLI's choices lists are allowed
        kind = _kind(k.arg) or (_kind(flag.lstrip("-")) if flag and k.arg == "default" else None)
        if kind:
            yield from ((w, kind, f"passed as {k.arg}=") for w in _words(k.value))
    at = _LOOKUPS.get(fname)
    if at is not None:  # the default of a lookup by a kind's key
        kind = _kind(_label(n))
        if kind and len(n.args) > at + 1:
            yield from ((w, kind, f"the default of {fname}({_label(n)!r})") for w in _words(n.args[at + 1]))
    elif _kind(fname):
        for a in n.args:
            yield from ((w, _kind(fname), f"passed to {fname}()") for w in _words(a))


def _def_hits(n: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> Iterator[Hit]:
    a = n.args
    positional = [*a.posonlyargs, *a.args]
    pairs = [*zip(positional[len(positional) - len(a.defaults):], a.defaults), *zip(a.kwonlyargs, a.kw_defaults)]
    for arg, default in pairs:
        kind = _kind(arg.arg)
        if kind and default is not None:
            yield from ((w, kind, f"the default of {arg.arg}") for w in _words(default))


def _dict_hits(n: ast.Dict) -> Iterator[Hit]:
    for k, v in zip(n.keys, n.values):
        kind = _kind(_str(k))
        if kind:
            yield from ((w, kind, f"under the key {_str(k)!r}") for w in _words(v))


def kind_literals(tree: ast.AST) -> list[Hit]:
    """Every literal in `tree` that names a probe, target or status (see above)."""
    hits: list[Hit] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            hits += _compare_hits(n)
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and n.value is not None:
            hits += _assign_hits(n)
        elif isinstance(n, ast.Call):
            hits += _call_hits(n)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            hits += _def_hits(n)
        elif isinstance(n, ast.Dict):
            hits += _dict_hits(n)
    return hits


def _member(kind: str, word: str) -> str:
    enum = {"Probe": Probe, "Target": Target, "Status": Status}[kind]
    return f"{kind}.{enum(word).name}" if word in enum.values() else f"a {kind} member ({word!r} is none)"


_CAUGHT = '''
def f(probe="fake", *, target: str = "cpu"):
    if probe == "tracked" or cfg.target != "cuda" or row["status"] in ("ok", "oom"):
        return make_probe("fake"), effective_target(probe, "cpu")
    self.status = "error" if bad else "ok"
    fields.update(status="diverged")
    p.add_argument("--target", default="cuda", choices=["cpu", "cuda"])
    return {"probe": "tracked"}, r.get("status") == "ok", getattr(p, "target", "cpu")
PROBE_NAMES = ("cuda", "tracked")
'''
_NOT_CAUGHT = '''
dev = torch.device("cuda")
if device.type == "cuda" or str(device).startswith("cuda") or name == "tracked":
    raise UsageError("use probe='tracked' or target cuda")
p.add_argument("--target", choices=["cpu", "cuda"])
x = {"cuda": 1, "error": msg}
'''


def test_the_literal_check_catches_what_it_defines_and_nothing_else() -> None:
    """The definition above, on examples: each naming use is one hit, device strings none."""
    caught = sorted((w.lineno, w.value) for w, _, _ in kind_literals(ast.parse(_CAUGHT)))
    assert caught == [(2, "cpu"), (2, "fake"), (3, "cuda"), (3, "ok"), (3, "oom"), (3, "tracked"),
                      (4, "cpu"), (4, "fake"), (5, "error"), (5, "ok"), (6, "diverged"), (7, "cuda"),
                      (8, "cpu"), (8, "ok"), (8, "tracked"), (9, "cuda"), (9, "tracked")]
    assert kind_literals(ast.parse(_NOT_CAUGHT)) == []


# MUST PASS AFTER THE ISSUE-19 MERGE. A normal test, not xfail: on a branch of that issue it
# may fail only on files another branch converts in parallel (records/store/analyze,
# train/protocol/probes/run/cli); once they are merged, nothing may be left.
def test_no_string_literal_names_a_probe_target_or_status_outside_kinds() -> None:
    """A probe, target or status is written as its enum member (multiopt/kinds.py), never as a
    string: renaming or adding one is then one edit, and a typo is an AttributeError."""
    problems = sorted({
        (rel, w.lineno, f"{rel}:{w.lineno} {w.value!r} {how}: write {_member(kind, w.value)} (multiopt/kinds.py)")
        for _, rel, tree in _sources() if rel not in _ALLOWED_FILES
        for w, kind, how in kind_literals(tree)
    })
    assert not problems, f"{len(problems)} literal(s) naming a kind:\n" + "\n".join(p for _, _, p in problems)


# --------------------------------------------------------------------------- the face


def test_the_package_face() -> None:
    import multiopt
    from multiopt.instrument import profile, protocol
    from multiopt.train import multi, trainer

    for name in ("MultiOptimizer", "Trainer", "profile", "measure", "Config", "Protocol"):
        assert hasattr(multiopt, name), name
    assert (multiopt.MultiOptimizer, multiopt.Trainer, multiopt.profile, multiopt.measure, multiopt.Protocol) == (
        multi.MultiOptimizer, trainer.Trainer, profile.profile, protocol.measure, protocol.Protocol)
    assert set(multiopt.__all__) == set(multiopt._FACE) and set(multiopt.__all__) <= set(dir(multiopt))
    with pytest.raises(AttributeError, match="no attribute 'Trainr'"):
        multiopt.Trainr  # noqa: B018


_NO_TORCH = """
import sys
import multiopt
from multiopt import cli
for argv in (["--help"], ["estimate", "--help"], ["gate", "--help"], ["run", "--widths", "x"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print("torch" in sys.modules, "pandas" in sys.modules)
"""


def test_the_face_and_the_command_line_import_torch_only_when_a_command_runs() -> None:
    """`import multiopt`, `--help` and a bad flag answer in milliseconds: no torch, no pandas
    (the face's names are imported on first use)."""
    p = subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "False False"
