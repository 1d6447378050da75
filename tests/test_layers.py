"""The shape of the code, held by tests (DESIGN.md, Layout): import-linter's layer contracts,
no import cycle, argparse only in the CLI, no function-local import of a sibling module
outside the CLI, no function over 60 lines except the declarative argument parser."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "multiopt"
# Declarative tables, allowed to be long (the issue that set the limit names the parser).
LONG_ALLOWED = {("cli.py", "build_parser")}
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
    return out


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the multiopt modules it imports at import time (module level only)."""
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        is_pkg = (PKG / Path(*name.split(".")[1:]) / "__init__.py").exists() if name != "multiopt" else True
        deps: set[str] = set()
        for node in tree.body:
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, is_pkg)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_import_linter_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    p = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_no_import_cycle_between_modules() -> None:
    modules = _modules()
    graph = _top_level_imports(modules)
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


def test_argparse_only_in_the_cli_and_no_local_sibling_imports_outside_it() -> None:
    problems = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if "argparse" in names and name != "multiopt.cli":
                problems.append(f"{name} imports argparse")
        if name == "multiopt.cli":
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(fn):
                    if isinstance(sub, ast.ImportFrom) and (sub.level > 0 or (sub.module or "").startswith("multiopt")):
                        problems.append(f"{name}.{fn.name} imports {'.' * sub.level}{sub.module} inside the function")
    assert not problems, "\n".join(problems)


def test_no_function_over_60_lines() -> None:
    long = []
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and (f.name, node.name) not in LONG_ALLOWED:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


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
