"""Trainer: one training step = zero_grad, forward, backward, (unscale, clip), step.

It knows nothing about measuring; instruments watch it through phase hooks
(`register_phase_hook`), called before and after each phase.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError
from .multi import MultiOptimizer, local_optimizer

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PhaseHook = Callable[[str, str], None]  # (phase, "before" | "after")


class _UnreadScaler(torch.amp.GradScaler):
    """A GradScaler that never reads whether gradients overflowed (`.item()` on its found_inf
    tensors): it steps every optimizer. Scaling, unscaling and update() run as usual."""

    def _maybe_opt_step(self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any],
                        *args: Any, **kwargs: Any) -> Any:
        return optimizer.step(*args, **kwargs)


class Trainer:
    """Train `model` with one optimizer, a MultiOptimizer, or a list of optimizers.

    amp: None, "fp16" (autocast + one GradScaler for every optimizer) or "bf16" (autocast).
    grad_accum: micro-batches per optimizer step; each `train_step` call is one micro-batch.
    zero_grad_at: "end" frees gradients right after the step; "start" keeps them until the
    next iteration begins, which changes the peak (gradients live through the forward).
    assume_finite (fp16): step every optimizer as if no gradient overflowed, without reading
    the scaler's inf checks: for tensors that hold no values (the fake probe), measuring the
    step an overflow-free iteration takes.

    Batches and losses follow `forward_loss` (Hugging Face conventions included). Optimizers
    with a train/eval mode (schedulefree) are put in train mode here, every child of a
    MultiOptimizer included: they refuse to step otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor] | None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        amp: str | None = None,
        grad_accum: int = 1,
        clip_norm: float | None = None,
        schedulers: Sequence[Any] = (),
        zero_grad_at: str = "end",
        assume_finite: bool = False,
        step_in_backward: bool = False,
    ) -> None:
        if amp in ("none", ""):
            amp = None
        if amp is not None and amp not in AMP_DTYPES:
            raise UsageError(f"amp must be None, 'fp16' or 'bf16', got {amp!r}")
        if zero_grad_at not in ("end", "start"):
            raise UsageError(f"zero_grad_at must be 'end' or 'start', got {zero_grad_at!r}")
        if grad_accum < 1:
            raise UsageError(f"grad_accum must be >= 1, got {grad_accum}")
        if step_in_backward:
            _check_step_in_backward(amp, clip_norm, grad_accum)
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = MultiOptimizer(list(optimizer), model=model)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.amp = amp
        self.grad_accum = grad_accum
        self.clip_norm = clip_norm
        self.schedulers = list(schedulers)
        self.zero_grad_at = zero_grad_at
        self.step_in_backward = bool(step_in_backward)
        first = next(model.parameters(), None)
        self.device_type = first.device.type if first is not None else "cpu"
        scaler = _UnreadScaler if assume_finite else torch.amp.GradScaler
        self.scaler = scaler(self.device_type) if amp == "fp16" else None
        self._hooks: OrderedDict[int, PhaseHook] = OrderedDict()
        self._micro = 0
        # step_in_backward: the parameters in the order the last backward stepped them (`step_with`)
        self._stepped: list[torch.Tensor] = []
        self.steps = 0
        # only the optimizers: the model's mode (dropout on or off) stays the caller's choice
        _set_mode(self.children, "train")

    @property
    def children(self) -> list[torch.optim.Optimizer]:
        if isinstance(self.optimizer, MultiOptimizer):
            return list(self.optimizer.optimizers.values())
        return [self.optimizer]

    def train(self) -> None:
        """Model and every optimizer with a mode (schedulefree's train()/eval()) in train mode."""
        self.model.train()
        _set_mode(self.children, "train")

    def eval(self) -> None:
        """Model and every optimizer with a mode in eval mode (schedulefree: the averaged weights)."""
        self.model.eval()
        _set_mode(self.children, "eval")

    def register_phase_hook(self, hook: PhaseHook) -> RemovableHandle:
        """`hook(phase, when)` runs before and after each phase; remove it with the handle."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        for hook in list(self._hooks.values()):
            hook(name, "before")
        yield
        for hook in list(self._hooks.values()):
            hook(name, "after")

    def train_step(self, batch: Any) -> torch.Tensor:
        """One micro-batch; steps the optimizers on every `grad_accum`-th call. Returns the
        (unscaled, detached) loss."""
        if self.zero_grad_at == "start" and self._micro == 0:
            with self._phase("zero_grad"):
                self.optimizer.zero_grad(set_to_none=True)
        with self._phase("forward"):
            with self._autocast():
                loss = self._loss(batch)
        with self._phase("backward"):
            scaled = loss / self.grad_accum if self.grad_accum > 1 else loss
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            with self._stepping_in_backward():
                scaled.backward()
            del scaled
        self._after_backward()
        return loss.detach()

    def step_with(self, make_grad: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """`train_step` with `make_grad(p)` (a gradient for parameter p) in place of forward and
        backward: the optimizers' side of a step alone, phases and all. A planner takes the
        model's side from another run (instrument/program.py `spliced`, `repeated`). Every
        trainable parameter gets its gradient first; with step_in_backward, one at a time, each
        stepped and freed as a backward's hook would, in the order the last backward did."""
        if self.step_in_backward and not self._stepped:
            raise UsageError("step_with with step_in_backward steps the parameters in the order a backward did: "
                             "run a train_step first")
        if self.zero_grad_at == "start" and self._micro == 0:
            with self._phase("zero_grad"):
                self.optimizer.zero_grad(set_to_none=True)
        with self._phase("backward"):
            if self.step_in_backward:
                owner = self._owners()
                for p in self._stepped:
                    p.grad = make_grad(p)
                    self._step_one(p, owner)
            else:
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.grad = make_grad(p)
        self._after_backward()

    def _after_backward(self) -> None:
        """The end of a micro-batch: every `grad_accum`-th, the step and (at end) zero_grad."""
        self._micro += 1
        if self._micro == self.grad_accum:
            self._micro = 0
            with self._phase("step"):
                self._step()
            self.steps += 1
            if self.zero_grad_at == "end":
                with self._phase("zero_grad"):
                    self.optimizer.zero_grad(set_to_none=True)

    def _loss(self, batch: Any) -> torch.Tensor:
        return forward_loss(self.model, self.loss_fn, batch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.amp])

    @contextlib.contextmanager
    def _stepping_in_backward(self) -> Iterator[None]:
        """step_in_backward: for the length of one backward, each trainable parameter's
        owner steps it as soon as its gradient is complete, then the gradient is freed."""
        if not self.step_in_backward:
            yield
            return
        owner = self._owners()
        stepped: list[torch.Tensor] = []

        def hook(p: torch.Tensor) -> None:
            if self._step_one(p, owner):
                stepped.append(p)

        handles = [p.register_post_accumulate_grad_hook(hook) for p in self.model.parameters() if p.requires_grad]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._stepped = stepped

    def _owners(self) -> dict[int, Any]:
        return {id(p): opt for opt in self.children for g in opt.param_groups for p in g["params"]}

    @staticmethod
    def _step_one(p: torch.Tensor, owner: dict[int, Any]) -> bool:
        """step_in_backward: `p`'s owner steps it, then its gradient is freed. False: no owner."""
        opt = owner.get(id(p))
        if opt is None:
            return False  # a parameter no optimizer holds keeps its gradient, as without the option
        opt.step()  # every other parameter's gradient is None now: this one alone steps
        p.grad = None
        return True

    def _step(self) -> None:
        if self.step_in_backward:  # every parameter already stepped inside backward
            for sched in self.schedulers:
                sched.step()
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            # One scaler for every optimizer, as PyTorch documents for several optimizers:
            # unscale each, clip once over all, step each (an optimizer whose gradients hold
            # inf/nan is skipped), then update() once, so every optimizer in this iteration is
            # unscaled by the same factor.
            if self.clip_norm is not None:
                for opt in self.children:
                    self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
            for opt in self.children:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
            self.optimizer.step()
        for sched in self.schedulers:
            sched.step()

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "micro": self._micro,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("schedulers", [])) != len(self.schedulers):
            raise UsageError(
                f"checkpoint has {len(state.get('schedulers', []))} schedulers, this trainer has {len(self.schedulers)}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for sched, sd in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(sd)
        if (state.get("scaler") is None) != (self.scaler is None):
            raise UsageError("checkpoint and trainer disagree on amp='fp16' (GradScaler state)")
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._micro = int(state.get("micro", 0))
        self.steps = int(state.get("steps", 0))

    def save(self, path: str | Path) -> None:
        """Model, every optimizer, schedulers and scaler in one file."""
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        """Load a checkpoint written by `save` (weights_only=True: no code is unpickled)."""
        try:
            state = torch.load(path, weights_only=True, map_location=self.device_type)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such checkpoint") from None
        except Exception as e:  # torch refuses a pickle payload (UnpicklingError) or a file that is no checkpoint
            first = (str(e).strip().splitlines() or [""])[0]
            raise UsageError(f"{path}: not a checkpoint torch.load(weights_only=True) accepts ({type(e).__name__}: "
                             f"{first[:200]}); load only checkpoints written by Trainer.save") from None
        if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
            raise UsageError(f"{path}: not a Trainer checkpoint (no 'model' and 'optimizer'); write it with Trainer.save")
        self.load_state_dict(state)


def _check_step_in_backward(amp: str | None, clip_norm: float | None, grad_accum: int) -> None:
    """What step_in_backward cannot do, one line each (see Trainer)."""
    if amp == "fp16":
        raise UsageError("step_in_backward cannot run with fp16 AMP: its GradScaler unscales and checks every "
                         "gradient for inf/nan before any optimizer steps; use bf16 AMP or none")
    if clip_norm is not None:
        raise UsageError("step_in_backward cannot clip gradients: the norm needs every gradient, which it frees "
                         "one by one; drop clip_norm or step after backward")
    if grad_accum != 1:
        raise UsageError(f"step_in_backward steps on every backward, so it cannot accumulate gradients "
                         f"(grad_accum={grad_accum}); use grad_accum=1")


def _set_mode(optimizers: Sequence[Any], mode: str) -> None:
    # ZeRO wraps the optimizer that has the mode; the wrapper itself has none.
    for opt in optimizers:
        switch = getattr(local_optimizer(opt), mode, None)
        if callable(switch):
            switch()


def forward_loss(model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None, batch: Any) -> torch.Tensor:
    """The loss of one batch, the way the Trainer (and so every measurement) computes it.

    - A Mapping batch is passed as keywords, `model(**batch)` (Hugging Face: input_ids,
      attention_mask, labels, ...); a 2-tuple/list with a `loss_fn` is (inputs, targets);
      anything else is the model's one argument.
    - A `loss_fn` gets the model's output *unchanged* (a tensor, a tuple, a ModelOutput with
      `.logits` and, for mixture-of-experts models, `.aux_loss`), as transformers' Trainer
      hands its `compute_loss_func(outputs, labels, num_items_in_batch=...)`: for a Mapping
      batch the `labels` are taken out of the keywords first (so the model does not compute
      a loss of its own) and passed as the second argument, `loss_fn(outputs, labels)`; a
      Mapping without labels calls `loss_fn(outputs)`. A 2-tuple batch calls
      `loss_fn(model(inputs), targets)`, a single-argument batch `loss_fn(model(batch))`.
    - Without a `loss_fn`, a tensor output is the loss, else the output's `loss` (attribute or
      key), which Hugging Face models compute when the batch holds `labels`."""
    if isinstance(batch, Mapping):
        if loss_fn is None:
            return _to_loss(model(**batch))
        inputs = dict(batch)
        if "labels" not in inputs:
            return loss_fn(model(**inputs))
        labels = inputs.pop("labels")
        return loss_fn(model(**inputs), labels)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and loss_fn is not None:
        return loss_fn(model(batch[0]), batch[1])
    out = model(batch)
    return _to_loss(out) if loss_fn is None else loss_fn(out)


def _to_loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise UsageError(
            f"the model returned a {type(out).__name__} without a loss and no loss_fn was given; return the loss, "
            "give the batch 'labels' (Hugging Face models then compute .loss), or define loss_fn next to the factory")
    return loss
