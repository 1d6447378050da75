"""Fake probe: the tracked probe's accounting over FakeTensorMode tensors.

Fake tensors have shapes, dtypes and storages of the right size but no data, so a step of a
model far larger than this machine costs milliseconds and the byte counts match what the
tracked probe would report for real tensors. Only CPU fake tensors: CUDA-device fake
tensors need a CUDA build of torch.

Where a library branches on tensor *values*, fake tensors (which have none) can take another
branch than real ones, and allocate other tensors. The one such branch met in practice is
transformers' attention-mask skip (`_ValueBranches`): the fake probe answers it as for a batch
without padding or packing, which is what the suite's synthetic batches are.

The tracking mode is entered *above* FakeTensorMode, so every op the model runs reaches the
ledger first and FakeTensorMode second; fake-mode internals (constant propagation on small
tensors such as an optimizer's `step`) run below the ledger and are not counted twice.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, NoReturn

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

from ...errors import UsageError
from ...kinds import Probe as ProbeName, Target
from ..allocator import AllocatorConfig
from .target import Workspaces
from .tracked import LedgerProbe, Sizer


class FakeProbe(LedgerProbe):
    """Sizes only: estimates per-phase allocated/peak of configs too big to run."""

    name = ProbeName.FAKE
    computes = False

    def __init__(self, device: torch.device | str | None = None, limit_bytes: int | None = None,
                 target: str = Target.CPU, alloc_config: AllocatorConfig | None = None,
                 workspaces: Workspaces = Workspaces()) -> None:
        super().__init__(device, limit_bytes, target, alloc_config, workspaces, sizers=_real_storage_sizers())
        # Real tensors made outside (e.g. a user's input batch) may meet fake ones.
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._branches = _ValueBranches()

    @property
    def fake_mode(self) -> FakeTensorMode:
        return self._fake_mode

    def __enter__(self) -> "FakeProbe":
        self._check_not_active()
        self._fake_mode.__enter__()
        try:
            self._ledger.__enter__()
        except BaseException:
            self._fake_mode.__exit__(None, None, None)
            raise
        self._started()
        self._branches.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stopping():
            self._branches.remove()
            try:
                self._ledger.__exit__(*exc)
            finally:
                self._fake_mode.__exit__(*exc)

    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Build on the meta device (no memory, no init cost), then give every parameter and
        buffer fake CPU storage inside the tracked fake mode, so each one is counted."""
        # Meta tensors hold no memory anywhere: build with every dispatch mode (ours, the
        # fake mode, anyone's) off, so they are neither counted nor turned into fakes.
        with _disable_current_modes(), torch.device("meta"):
            model = factory()
        with self._tracking():
            _materialize(model, self.device)
        if self._active:
            self._branches.install()  # the factory may have imported transformers just now
        return model

    def paused(self) -> NoReturn:  # type: ignore[override]
        raise UsageError(
            "the fake probe cannot be paused for timing: fake tensors do no compute, so there "
            "is nothing to time; time with the tracked or cuda probe"
        )


def _unreduced_loss_nbytes(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    """ATen's mse_loss / smooth_l1_loss / soft_margin_loss (CPU and CUDA) write the
    elementwise loss into a buffer and reduce it *into that same buffer*: the 0-dim result
    keeps the whole broadcast(input, target) buffer as its storage, for as long as the
    loss lives. The meta kernels allocate 4 bytes; real devices hold numel x itemsize."""
    shape = torch.broadcast_shapes(args[0].shape, args[1].shape)
    numel = 1
    for n in shape:
        numel *= int(n)
    return max(out.untyped_storage().nbytes(), numel * out.element_size())


def _real_storage_sizers() -> dict[Any, Sizer]:
    """Ops whose real kernels return a storage larger than their fake twins (checked by
    tests/test_probes.py against real tensors, so a torch that changes this fails loudly)."""
    aten = torch.ops.aten
    return {
        aten.mse_loss.default: _unreduced_loss_nbytes,
        aten.smooth_l1_loss.default: _unreduced_loss_nbytes,
        aten.soft_margin_loss.default: _unreduced_loss_nbytes,
    }


def _materialize(model: nn.Module, device: torch.device) -> None:
    """`model.to_empty(device)` done by hand, under the active fake mode.

    `to_empty` cannot be used: the meta->fake conversion of its `empty_like(meta_param)`
    input leaves a weakref on the meta parameter (FakeTensorConverter's memo), and
    `Module._apply` must then *swap* the tensors (meta and fake are not shallow-copy
    compatible), which torch refuses for a tensor with a weakref. Making each new tensor
    with `torch.empty_strided` needs no input tensor at all. Tied parameters stay tied.
    """
    done: dict[int, torch.Tensor] = {}

    def fresh(t: torch.Tensor) -> torch.Tensor:
        new = done.get(id(t))
        if new is None:
            new = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            done[id(t)] = new
        return new

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = fresh(p)  # type: ignore[assignment]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fresh(b)


class _ValueBranches:
    """transformers' value-dependent attention-mask branches, answered on fake tensors as a
    batch without padding or packing answers them on real ones.

    transformers skips materialising the (batch, 1, seq, seq) attention mask when it can read
    that no token is padding (`_ignore_causal_mask_sdpa`, `_ignore_bidirectional_mask_sdpa`)
    and that the positions hold one sequence per row (`find_packed_sequence_indices`); on a
    FakeTensor it cannot read, treats it as tracing, and builds the mask. With activation
    checkpointing the mask is then an input every checkpointed layer keeps for its
    recomputation, so the fake probe counted a mask the real run never made (a 4-layer Llama:
    peak 16,708,096 B fake vs 15,790,592 B tracked). While the probe is active these three
    functions are wrapped: on a FakeTensor they run the same reductions the real path runs
    (so the same temporaries are counted) without reading them, and answer as for an all-ones
    padding mask and consecutive positions; on anything else they are the originals. Module
    attributes are swapped back when the probe exits. A batch with real padding is sized as if
    it had none (documented in the README)."""

    MODULE = "transformers.masking_utils"

    def __init__(self) -> None:
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        module = sys.modules.get(self.MODULE)
        if module is None or self._saved:
            return
        # the reduction each real path reads: fast_all (sum == numel) and Tensor.all
        wrappers = {"find_packed_sequence_indices": _unpacked,
                    "_ignore_causal_mask_sdpa": functools.partial(_unpadded, lambda m: m.sum() == m.numel()),
                    "_ignore_bidirectional_mask_sdpa": functools.partial(_unpadded, lambda m: m.all())}
        for name, wrap in wrappers.items():
            original = getattr(module, name, None)
            if callable(original):
                self._saved[name] = original
                setattr(module, name, functools.wraps(original)(functools.partial(wrap, original=original)))

    def remove(self) -> None:
        module = sys.modules.get(self.MODULE)
        saved, self._saved = self._saved, {}
        if module is not None:
            for name, original in saved.items():
                setattr(module, name, original)


def _unpacked(position_ids: torch.Tensor, *, original: Callable[..., Any]) -> torch.Tensor | None:
    """`find_packed_sequence_indices`: the sequence ids as the original computes them, then
    the reduction the real path reads (`(ids[:, -1] == 0).all()`), unread: consecutive
    positions, so one sequence per row, so None."""
    ids = original(position_ids)
    if not isinstance(ids, FakeTensor):
        return ids
    (ids[:, -1] == 0).all()
    return None


def _unpadded(reduce: Callable[[torch.Tensor], torch.Tensor], padding_mask: torch.Tensor | None, *args: Any,
              original: Callable[..., Any], **kwargs: Any) -> bool:
    """`_ignore_{causal,bidirectional}_mask_sdpa`: on a fake padding mask, the reduction the
    real path runs over it (unread), then the original's answer for an all-ones mask of the
    same shape, computed on a real tensor outside every mode (a few bytes, never counted)."""
    if not isinstance(padding_mask, FakeTensor):
        return original(padding_mask, *args, **kwargs)
    reduce(padding_mask)  # for its temporaries, unread
    with _disable_current_modes():
        ones = torch.ones(padding_mask.shape, dtype=torch.bool)
        return bool(original(ones, *args, **kwargs))
