"""One record as a person reads it: `multiopt measure` and `multiopt estimate` print this.

Apart from report.py so that printing one record costs no pandas or matplotlib import
(a third of a second of `estimate`'s start-up).
"""

from __future__ import annotations

from tabulate import tabulate

from ..record import UNSTEADY_WHY, Record
from ..units import fmt_bytes, fmt_ms

_BYTE_PREFIXES = ("mem_", "peak_", "reserved_")


def _is_bytes(key: str) -> bool:
    return key.startswith(_BYTE_PREFIXES) or key.endswith("_bytes") or key == "opt_state_expected"


def record_text(record: Record) -> str:
    """Every field with human units and raw numbers, then one row per optimizer."""
    rows = []
    for k, v in record.to_dict().items():
        if k in ("optimizers", "ranks_state", "work"):
            continue
        if isinstance(v, int) and not isinstance(v, bool) and _is_bytes(k):
            rows.append((k, fmt_bytes(v), f"{v:,}"))
        elif isinstance(v, float) and k.startswith(("step_ms", "predicted_")):
            rows.append((k, fmt_ms(v), f"{v:.4f}"))
        else:
            rows.append((k, "" if v is None else v, ""))
    text = tabulate(rows, headers=["field", "value", "raw"], tablefmt="github", disable_numparse=True)
    if record.work:
        text += "\n\n" + tabulate(
            [(w.phase, f"{w.flops:,}", fmt_bytes(w.bytes), f"{w.kernels:,}",
              "-" if w.predicted_ms is None else fmt_ms(w.predicted_ms)) for w in record.work],
            headers=["phase", "FLOPs", "bytes read + written", "kernels", f"predicted on {record.gpu or '-'}"],
            tablefmt="github", disable_numparse=True,
        )
    if record.optimizers:
        text += "\n\n" + tabulate(
            [(o.name, o.optimizer, o.impl, f"{o.n_params:,}", fmt_bytes(o.state_bytes), f"{o.state_bytes:,}",
              "-" if o.expected is None else f"{o.expected:,}", fmt_bytes(o.step_temp_bytes)) for o in record.optimizers],
            headers=["optimizer", "class", "impl", "params", "state", "state bytes", "expected bytes", "step temporaries"],
            tablefmt="github", disable_numparse=True,
        )
    unsteady = unsteady_text(record)
    return text + ("\n\n" + unsteady if unsteady else "")


def unsteady_text(record: Record) -> str:
    """One line flagging a measured step that did not end where it started; "" when steady."""
    growth = record.step_growth
    if not growth:
        return ""
    more = "more" if growth > 0 else "less"
    return (f"NOT STEADY: the measured step ended with {fmt_bytes(abs(growth))} ({abs(growth):,} B) {more} allocated than it "
            f"started with: {UNSTEADY_WHY}, so these peaks may not "
            f"repeat; rerun with more warm-up steps (--warmup N{_than(record.warmup_steps)})")


def _than(warmup: int | None) -> str:
    return "" if warmup is None else f", more than this run's {warmup}"
