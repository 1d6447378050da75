"""Human units for bytes and times, and parsing them back (`24GiB`, `10%`)."""

from __future__ import annotations

import math
import re

from .errors import UsageError

# CUDA's caching allocator rounds every allocation up to a multiple of 512 bytes (kMinBlockSize),
# and `memory_allocated` counts the rounded size: every probe reports in those terms.
ALLOC_GRANULE = 512


def round_alloc(nbytes: int) -> int:
    """Bytes an allocation of `nbytes` occupies in `memory_allocated` terms (0 stays 0)."""
    return (nbytes + (ALLOC_GRANULE - 1)) & ~(ALLOC_GRANULE - 1)

_BINARY = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_PARSE = {
    "b": 1, "": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def fmt_bytes(n: float | int | None) -> str:
    """1536 -> '1.50 KiB'; exact bytes below 1 KiB; '-' for missing."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in _BINARY:
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


def fmt_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.0f} us"


def parse_bytes(text: str) -> int:
    """'24GiB', '1.5 GB', '512MiB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _PARSE:
        raise UsageError(f"cannot read {text!r} as a size; write e.g. 24GiB, 512MB or 4096")
    return int(float(m.group(1)) * _PARSE[m.group(2).lower()])


def parse_fraction(text: str | float) -> float:
    """'10%' or '0.1' -> 0.1."""
    s = str(text).strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a fraction; write e.g. 10% or 0.1") from None


def missing(value: object) -> bool:
    """True where a record or DataFrame cell holds no number: None, NaN, pandas' NA/NaT.
    Lists and arrays are values, not missing. The one such test in the package."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (int, str, bytes, list, tuple, dict)):
        return False
    try:  # numpy's NaN scalars and NaT compare unequal to themselves
        unequal = value != value
    except (TypeError, ValueError):
        return False
    if isinstance(unequal, bool):
        return unequal
    if type(unequal).__name__ == "NAType":  # pandas.NA != pandas.NA is NA itself
        return True
    try:
        return bool(unequal)
    except (TypeError, ValueError):  # arrays: an element-wise answer, so the value is present
        return False
