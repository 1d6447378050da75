"""The GitHub workflows parse and keep their essential steps."""

from __future__ import annotations

import re

import pytest

yaml = pytest.importorskip("yaml")

from .support import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"


def _load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and doc.get("jobs"), f"{name}: no jobs"
    return doc


def _on(doc: dict) -> dict:
    # YAML 1.1 reads a bare `on:` key as the boolean True
    return doc.get("on", doc.get(True))


def _steps(doc: dict) -> list[dict]:
    (job,) = doc["jobs"].values()
    return job["steps"]


def _index(steps: list[dict], pattern: str) -> int:
    hits = [i for i, s in enumerate(steps) if re.search(pattern, s.get("run", "") or "")]
    assert hits, f"no step runs {pattern!r}"
    return hits[0]


def _uses(steps: list[dict], action: str) -> list[dict]:
    return [s for s in steps if str(s.get("uses", "")).startswith(action + "@")]


@pytest.mark.parametrize("name", ["ci.yml", "gpu-bench.yml"])
def test_parses_with_triggers(name):
    doc = _load(name)
    on = _on(doc)
    assert "pull_request" in on and "push" in on
    for job in doc["jobs"].values():
        assert job.get("timeout-minutes"), "a hung job should not hold a runner for 6 hours"
        for s in job["steps"]:
            assert ("run" in s) != ("uses" in s), s


def test_ci_runner_python_and_cpu_torch_before_project():
    doc = _load("ci.yml")
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = _steps(doc)
    (py,) = _uses(steps, "actions/setup-python")
    assert str(py["with"]["python-version"]) == "3.11"
    torch_cpu = _index(steps, r"pip install \"?torch(==[0-9.]+)?\"? --index-url https://download\.pytorch\.org/whl/cpu")
    project = _index(steps, r"pip install -e \"?\.\[test\]")
    assert torch_cpu < project, "CPU torch must be installed before the project pulls torch from PyPI"
    assert _index(steps, r"(^|\s)(python -m )?pytest(\s|$)") > project


def test_ci_runs_quick_sweep_gate_and_uploads():
    steps = _steps(_load("ci.yml"))
    run = _index(steps, r"multiopt run --preset quick --probe tracked --out runs/quick")
    gate = _index(steps, r"multiopt gate --baseline reports/baselines/cpu-quick\.jsonl --current runs/quick")
    assert run < gate
    assert "continue-on-error" not in steps[gate], "the gate must be able to fail the job"
    (up,) = _uses(steps, "actions/upload-artifact")
    assert up["with"]["path"].rstrip("/") == "runs"
    assert "cancelled" in up.get("if", "") or "always" in up.get("if", ""), "upload the runs even when the gate fails"


def test_gpu_bench_self_hosted_gpu_runner():
    doc = _load("gpu-bench.yml")
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert "head.repo.full_name == github.repository" in job.get("if", ""), "never run fork PRs on self-hosted"


def test_gpu_bench_steps():
    steps = _steps(_load("gpu-bench.yml"))
    bench = _index(steps, r"pytest bench")
    text = steps[bench]["run"]
    assert "--benchmark-only" in text and "--benchmark-json bench.json" in text
    assert "--benchmark-compare" in text and "--benchmark-compare-fail=median:10%" in text
    gate = _index(steps, r"multiopt gate --baseline reports/baselines/gpu-quick\.jsonl --current bench\.json")
    report = _index(steps, r"multiopt report bench\.json -o bench-report\.md")
    assert bench < gate and bench < report
    assert "GITHUB_STEP_SUMMARY" in steps[report]["run"]
    for i in (gate, report):  # still run when pytest-benchmark's own compare failed
        assert "cancelled()" in steps[i].get("if", "")
    (up,) = _uses(steps, "actions/upload-artifact")
    assert "bench.json" in up["with"]["path"] and "bench-report.md" in up["with"]["path"]
    assert "cancelled" in up.get("if", "")
