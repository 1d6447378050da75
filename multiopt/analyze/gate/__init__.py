"""The regression gate: current records vs a committed baseline -> verdicts and an exit code.

`multiopt gate --baseline BASE --current CUR` compares config by config (`compare`: status,
then one check object per kind of metric: memory under a relative tolerance, step time under
a noise-widened band and against the host's own noise (`noise`), `inconclusive` where that
could explain the change), renders the verdict as markdown (`render`) and reads and writes the
files around them (`baseline`: loading, printing, `$GITHUB_STEP_SUMMARY`, `--update-baseline`).

* **configs on one side only** are always listed: missing in current FAILS the gate (a
  config that silently stopped being measured is how regressions hide); new in current is
  reported and passes (add it to the baseline with `--update-baseline`).
* **duplicate configs** on one side (a re-run appended to the same file): the last record
  wins, and the gate says so.

Exit code: 0 pass, 1 regression or missing config, 2 bad input (a `UsageError`: missing,
empty, corrupt or wrong-schema file; the CLI prints one line naming it).
"""

from .baseline import run_gate, write_baseline
from .compare import (BYTES, DEFAULT_MEM_TOL, FALLBACK_MEM_TOL, IMPROVEMENT, INCONCLUSIVE, MEMORY_METRICS, MS,
                      REGRESSION, STATUS, TIME_IQR, TIME_METRIC, UNCHANGED, Check, ConfigRef, GateResult, NotCompared,
                      Outcome, Pair, TimeCheck, ToleranceCheck, Unit, Verdict, checks, compare, parse_tolerance, short_names)
from .noise import CONFIRM, host_noise, host_shift
from .render import headline, render

__all__ = [
    "BYTES", "CONFIRM", "DEFAULT_MEM_TOL", "FALLBACK_MEM_TOL", "IMPROVEMENT", "INCONCLUSIVE", "MEMORY_METRICS", "MS", "REGRESSION", "STATUS",
    "TIME_IQR", "TIME_METRIC", "UNCHANGED", "Check", "ConfigRef", "GateResult", "NotCompared", "Outcome", "Pair",
    "TimeCheck", "ToleranceCheck", "Unit", "Verdict", "checks", "compare", "parse_tolerance", "short_names",
    "headline", "host_noise", "host_shift", "render", "run_gate", "write_baseline",
]
