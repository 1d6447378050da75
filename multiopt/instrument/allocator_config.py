"""The CUDA caching allocator's options: ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``)
as torch reads it, for the allocator model (allocator.py) to apply.

Parsed as ``c10/core/AllocatorConfig.cpp`` (``ConfigTokenizer``, ``AcceleratorAllocatorConfig``)
and ``c10/cuda/CUDAAllocatorConfig.cpp`` parse it: every key torch accepts is accepted (the
pinned-memory and locking keys are validated, then ignored); anything else is a `UsageError`
of one line naming where the text came from, the key and the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

kLargeBuffer = 20971520  # c10/cuda/CUDACachingAllocator.cpp: "large" allocations may be packed in 20 MiB blocks

# c10/core/AllocatorConfig.cpp constants.
MiB = 1024 * 1024
kRoundUpPowerOfTwoIntervals = 16  # intervals [1 MiB, 2 MiB), ..., [32 GiB, 64 GiB) and beyond
kRoundUpPowerOfTwoStartLog2 = 20  # 1 MiB
_PINNED_MAX_REGISTER_THREADS = 128  # CUDAAllocatorConfig::pinned_max_register_threads()

_ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
"""Read in this order, as ``AcceleratorAllocatorConfig::instance()`` does (the CUDA/HIP names
are the deprecated spellings)."""


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class AllocatorConfig:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` options that change what the caching allocator reports.

    ``roundup_power2_divisions`` may be given as one int (every interval) or as the 16
    per-interval values torch keeps (``[1 MiB, 2 MiB)`` ... ``[32 GiB, ...)``); it is stored as
    the 16-tuple. ``max_non_split_rounding_size`` defaults to kLargeBuffer (20 MiB) as in
    ``AllocatorConfig``'s constructor. ``garbage_collection_threshold`` and
    ``per_process_memory_fraction`` are kept for the record, not applied: pass the byte
    ``limit`` to `CachingAllocator` instead (the model does not know the device's total).
    """

    max_split_size: int | None = None
    max_non_split_rounding_size: int = kLargeBuffer
    roundup_power2_divisions: int | tuple[int, ...] = 0
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0
    per_process_memory_fraction: float | None = None
    backend: str = "native"

    def __post_init__(self) -> None:
        rp2 = self.roundup_power2_divisions
        if isinstance(rp2, int):
            rp2 = (rp2,) * kRoundUpPowerOfTwoIntervals
        rp2 = tuple(int(v) for v in rp2)
        if len(rp2) != kRoundUpPowerOfTwoIntervals or any(v != 0 and not _is_pow2(v) for v in rp2):
            raise UsageError(f"AllocatorConfig: roundup_power2_divisions must be an int or "
                             f"{kRoundUpPowerOfTwoIntervals} ints, each 0 or a power of 2, got {rp2!r}")
        object.__setattr__(self, "roundup_power2_divisions", rp2)
        if self.max_split_size is not None and self.max_split_size < kLargeBuffer:
            raise UsageError(f"AllocatorConfig: max_split_size must be >= {kLargeBuffer} bytes (20 MiB), "
                             f"got {self.max_split_size}")
        if self.max_non_split_rounding_size < kLargeBuffer:
            raise UsageError(f"AllocatorConfig: max_non_split_rounding_size must be >= {kLargeBuffer} "
                             f"bytes (20 MiB), got {self.max_non_split_rounding_size}")

    @classmethod
    def parse(cls, text: str, source: str = "PYTORCH_CUDA_ALLOC_CONF") -> AllocatorConfig:
        """Parse ``key:value,key:value`` as torch does (``ConfigTokenizer`` and the ``parseArgs``
        of ``AcceleratorAllocatorConfig`` and ``CUDAAllocatorConfig``).

        Every key torch accepts is accepted (the pinned-memory and locking keys are validated,
        then ignored); anything else raises `UsageError` with a one-line message naming
        ``source``, the key and the value.
        """
        return _Parser(text, source).parse()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AllocatorConfig:
        """The config torch would read from the environment: ``PYTORCH_ALLOC_CONF``, else
        ``PYTORCH_CUDA_ALLOC_CONF``, else ``PYTORCH_HIP_ALLOC_CONF``; defaults if none is set."""
        env = os.environ if environ is None else environ
        for name in _ENV_VARS:
            if name in env:
                return cls.parse(env[name], source=name)
        return cls()


class _Parser:
    """``ConfigTokenizer`` + ``parseArgs``: tokens split on ``, : [ ]``, whitespace dropped."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.tokens: list[str] = []
        buf = ""
        for ch in text:
            if ch in ",:[]":
                if buf:
                    self.tokens.append(buf)
                    buf = ""
                self.tokens.append(ch)
            elif not ch.isspace():
                buf += ch
        if buf:
            self.tokens.append(buf)

    def fail(self, msg: str) -> UsageError:
        return UsageError(f"{self.source}: {msg}")

    def tok(self, i: int, key: str) -> str:
        if i >= len(self.tokens):
            raise self.fail(f"{key} has no value; write {key}:VALUE")
        return self.tokens[i]

    def colon(self, i: int, key: str) -> None:
        if self.tok(i, key) != ":":
            raise self.fail(f"expected ':' after {key}, got {self.tokens[i]!r}")

    def integer(self, i: int, key: str, what: str) -> int:
        t = self.tok(i, key)
        if not t.isdigit():  # std::stoull; stricter: the whole token must be digits
            raise self.fail(f"{key} must be {what}, got {t!r}")
        return int(t)

    def number(self, i: int, key: str, what: str) -> float:
        t = self.tok(i, key)
        try:
            return float(t)
        except ValueError:
            raise self.fail(f"{key} must be {what}, got {t!r}") from None

    def boolean(self, i: int, key: str) -> bool:
        t = self.tok(i, key)
        if t not in ("True", "False"):  # ConfigTokenizer::toBool: exactly True or False
            raise self.fail(f"{key} must be True or False, got {t!r}")
        return t == "True"

    def parse(self) -> AllocatorConfig:
        kw: dict[str, Any] = {}
        toks = self.tokens
        i = 0
        while i < len(toks):
            key = toks[i]
            if key in ",:[]":
                raise self.fail(f"expected an option name, got {key!r}")
            self.colon(i + 1, key)
            i += 2
            if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
                # parseMaxSplitSize / parseMaxNonSplitRoundingSize: >= kLargeBuffer / kMB
                v = self.integer(i, key, "an integer >= 20 (MiB)")
                if v < kLargeBuffer // MiB:
                    raise self.fail(f"{key} must be an integer >= 20 (MiB), got {toks[i]!r}")
                kw["max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"] = v * MiB
            elif key == "garbage_collection_threshold":
                v = self.number(i, key, "a number in (0.0, 1.0)")
                if not 0.0 < v < 1.0:
                    raise self.fail(f"{key} must be a number in (0.0, 1.0), got {toks[i]!r}")
                kw[key] = v
            elif key == "per_process_memory_fraction":
                v = self.number(i, key, "a number in [0.0, 1.0]")
                if not 0.0 <= v <= 1.0:
                    raise self.fail(f"{key} must be a number in [0.0, 1.0], got {toks[i]!r}")
                kw[key] = v
            elif key == "roundup_power2_divisions":
                kw[key], i = self.roundup(i, key)
            elif key == "expandable_segments":
                kw[key] = self.boolean(i, key)
            elif key == "backend":
                t = self.tok(i, key)
                if t not in ("native", "cudaMallocAsync"):
                    raise self.fail(f"backend must be native or cudaMallocAsync, got {t!r}")
                kw[key] = t
            elif key in ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc",
                         "pinned_use_cuda_host_register", "pinned_use_hip_host_register",
                         "pinned_use_background_threads", "graph_capture_record_stream_reuse"):
                self.boolean(i, key)  # valid, no effect on device memory stats
            elif key == "pinned_num_register_threads":
                v = self.integer(i, key, f"a power of 2 <= {_PINNED_MAX_REGISTER_THREADS}")
                if not _is_pow2(v) or v > _PINNED_MAX_REGISTER_THREADS:
                    raise self.fail(f"{key} must be a power of 2 <= {_PINNED_MAX_REGISTER_THREADS}, "
                                    f"got {toks[i]!r}")
            elif key == "pinned_reserve_segment_size_mb":
                if self.integer(i, key, "an integer > 0 (MiB)") == 0:
                    raise self.fail(f"{key} must be an integer > 0 (MiB), got {toks[i]!r}")
            else:
                raise self.fail(f"unknown option {key!r}; options: max_split_size_mb, "
                                "max_non_split_rounding_mb, roundup_power2_divisions, expandable_segments, "
                                "garbage_collection_threshold, per_process_memory_fraction, backend, ...")
            i += 1
            if i < len(toks):
                if toks[i] != ",":
                    raise self.fail(f"expected ',' after the value of {key}, got {toks[i]!r}")
                i += 1
        return AllocatorConfig(**kw)

    def roundup(self, i: int, key: str) -> tuple[tuple[int, ...], int]:
        """parseRoundUpPower2Divisions: ``N`` (every interval) or ``[MiB:N, ..., >:N]``.
        Returns the 16 divisions and the index of the value's last token."""
        toks = self.tokens
        if self.tok(i, key) != "[":
            v = self.integer(i, key, "a power of 2 or a list [MiB:N,...,>:N]")
            if not _is_pow2(v):  # the legacy form: llvm::isPowerOf2_64 (0 is refused)
                raise self.fail(f"{key} must be a power of 2, got {toks[i]!r}")
            return (v,) * kRoundUpPowerOfTwoIntervals, i
        div = [0] * kRoundUpPowerOfTwoIntervals
        first, last_index = True, 0
        i += 1
        while True:
            t = self.tok(i, key)
            if t == "]":
                return tuple(div), i
            self.colon(i + 1, f"{key} interval {t}")
            v = self.integer(i + 2, key, "a list of MiB:N with N 0 or a power of 2")
            if v != 0 and not _is_pow2(v):
                raise self.fail(f"{key}: divisions must be 0 or a power of 2, got {toks[i + 2]!r} for {t}")
            if t == ">":  # everything above the last interval named
                for j in range(last_index + 1, kRoundUpPowerOfTwoIntervals):
                    div[j] = v
            else:
                if not t.isdigit() or not _is_pow2(int(t)):
                    raise self.fail(f"{key}: intervals must be powers of 2 (MiB) or '>', got {t!r}")
                index = min(int(t).bit_length() - 1, kRoundUpPowerOfTwoIntervals - 1)
                if first:  # the first interval also covers every smaller size
                    div[:index] = [v] * index
                    first = False
                div[index] = v
                last_index = index
            i += 3
            t = self.tok(i, key)
            if t == ",":
                i += 1
            elif t != "]":
                raise self.fail(f"{key}: expected ',' or ']' in the list, got {t!r}")
