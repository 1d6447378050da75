"""Benchmark models and their synthetic batches, and a user's own model by import path.

Layers are named `layer1`, `layer2`, ... in every model, so one rule string
(`layer1=sgd; rest=adam`) means the same thing on each.

Built in (`resolve(name)`):

- ``simple``: the classic two-layer net (width and depth ignored);
- ``mlp``: `depth` Linear(width, width) layers;
- ``transformer``: a small decoder-only LM (`Transformer`): token + position embeddings
  (`emb`, `pos_emb`, so `*emb*` selects both), `depth` pre-LayerNorm blocks `layer1..N` of
  causal self-attention (q/k/v/out Linear projections) and a 4x GELU MLP, a final LayerNorm,
  and a head tied to `emb`. Batches are (tokens, targets) int64 sequences of `SEQ_LEN`.

Your own model (`resolve("pkg.module:factory")`, see `from_path`); a Hugging Face model from
its config (`hf:PATH`) or a timm model by name (`timm:NAME`), see `train/hf.py`.

A config's options (`for_config`): `checkpointing` (activation checkpointing: each block of
the mlp and the transformer under `torch.utils.checkpoint`, non-reentrant; a Hugging Face
model's own `gradient_checkpointing_enable`), `lora` (peft adapters, the base frozen) and
`seq` (the sequence length of a model that has one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import dataclasses
import functools
import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from . import hf  # hf: and timm: models; it imports transformers, peft and timm only when one is used

Batch = tuple[torch.Tensor, torch.Tensor]


class SimpleNet(nn.Module):
    """The classic two-layer net: Linear(10, 20), ReLU, Linear(20, 1)."""

    in_features = 10
    out_features = 1

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.layer2 = nn.Linear(20, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.relu(self.layer1(x)))


class MLP(nn.Module):
    """`depth` Linear(width, width) layers with ReLU between: depth * (width^2 + width) parameters."""

    def __init__(self, width: int, depth: int = 3, *, bias: bool = True) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise UsageError(f"MLP needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.in_features = self.out_features = width
        self.depth = depth
        # activation checkpointing: each layer (Linear, then ReLU) recomputed in the backward
        self.checkpointing = False
        for i in range(1, depth + 1):
            self.add_module(f"layer{i}", nn.Linear(width, width, bias=bias))

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, f"layer{i}")(x)
        return torch.relu(x) if i < self.depth else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = _checkpointed(self._block, i, x) if self.checkpointing and self.training else self._block(i, x)
        return x


def _checkpointed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`fn(*args)` under non-reentrant activation checkpointing: only its inputs are kept
    for the backward, which runs it again (torch's recommended mode; reentrant is legacy)."""
    return checkpoint(fn, *args, use_reentrant=False)


@dataclass(frozen=True)
class ModelSpec:
    """How the suite builds a model, makes its batches and computes its loss.

    `loss_fn(output, target)` when batches are (inputs, targets); None when the model's
    output already is the loss, or has one (`output.loss`; see `trainer.forward_loss`).
    `takes`: the sizes (`width`, `depth`) the factory takes; it ignores the others.
    `seq`: the sequence length of its batches (`batch_fn` then takes `seq=`), 0 for a model
    without one. `lora`: the canonical LoRA text the factory applies ("" = none)."""

    name: str
    factory: Callable[..., nn.Module]
    batch_fn: Callable[..., Any]
    loss_fn: Callable[..., torch.Tensor] | None = None
    takes: tuple[str, ...] = ("width", "depth")
    seq: int = 0
    lora: str = ""

    def build(self, width: int, depth: int) -> nn.Module:
        return self.factory(width=width, depth=depth)

    def sizes(self, width: int, depth: int) -> tuple[int, int]:
        """(width, depth) as a record keeps them: 0 for a size the factory does not take, so
        records of a model that ignores it neither claim a size nor differ by one. The zoo
        takes both (`simple` too, which ignores them), so its records keep their keys."""
        return (width if "width" in self.takes else 0, depth if "depth" in self.takes else 0)

    def make_batch(self, model: nn.Module, batch: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Any:
        extra = {"seq": self.seq} if self.seq else {}
        return self.batch_fn(model, batch, dtype=dtype, device=device, generator=generator, **extra)


MODELS: dict[str, ModelSpec] = {}


def resolve(name: str) -> ModelSpec:
    """A built-in model by name, or a user's model by import path `pkg.module:factory`."""
    if not isinstance(name, str):
        raise UsageError(f"a model is named by a string, got {type(name).__name__}")
    if name in MODELS:
        return MODELS[name]
    if name.startswith(("hf:", "timm:")):
        parts = hf.resolve(name)
        return ModelSpec(name.strip(), parts.factory, parts.batch_fn, parts.loss_fn, takes=(), seq=parts.seq)
    if ":" in name:
        return from_path(name)
    raise UsageError(f"unknown model {name!r}; known: {', '.join(MODELS)}, or your own as pkg.module:factory")


def for_config(config: Any) -> ModelSpec:
    """The model of `config` (a Config: model, seq, lora, checkpointing) as a ModelSpec whose
    factory applies the options and whose batches have the config's sequence length.

    - `checkpointing` 1: activation checkpointing (`enable_checkpointing`);
    - `lora` (`hf.parse_lora` text): peft LoRA adapters, every other parameter frozen, so
      the rules see only the adapters (`rest=adamw` is enough);
    - `seq` > 0: the batches' sequence length, for a model that has one (0: its default).
    Each is a one-line UsageError on a model it does not apply to."""
    spec = resolve(config.model)
    seq, lora, ckpt = int(config.seq), str(config.lora), int(config.checkpointing)
    if ckpt not in (0, 1):
        raise UsageError(f"checkpointing is 0 or 1, got {config.checkpointing!r}")
    if seq < 0:
        raise UsageError(f"seq must be >= 0 (0: the model's default), got {seq}")
    if seq and not spec.seq:
        raise UsageError(f"--seq {seq}: model {spec.name!r} has no sequence length (it applies to hf: models)")
    if lora:
        lora = hf.parse_lora(lora).text
    if not (ckpt or lora or seq):
        return spec
    factory = _Configured(spec.name, spec.factory, bool(ckpt), lora)
    return dataclasses.replace(spec, factory=factory, seq=seq or spec.seq, lora=lora)


@dataclass(frozen=True)
class _Configured:
    """A factory, then activation checkpointing, then LoRA (peft wraps the model last, so the
    checkpointing switches are the base model's own)."""

    name: str
    factory: Callable[..., nn.Module]
    checkpointing: bool
    lora: str

    def __call__(self, **kwargs: Any) -> nn.Module:
        model = self.factory(**kwargs)
        if self.checkpointing:
            enable_checkpointing(model, self.name)
        if self.lora:
            model = hf.apply_lora(model, self.lora, self.name)
        return model


def enable_checkpointing(model: nn.Module, name: str = "the model") -> None:
    """Activation checkpointing on `model`, non-reentrant: the mlp's and transformer's blocks
    (`checkpointing = True`), a Hugging Face model's decoder layers
    (`gradient_checkpointing_enable(use_reentrant=False)`), a timm model's
    (`set_grad_checkpointing`). Any other model: a UsageError saying so."""
    if isinstance(model, (MLP, Transformer)):
        model.checkpointing = True
        return
    hf_enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if callable(hf_enable) and getattr(model, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if getattr(hf_enable, "__name__", "") == "activation_checkpointing_enable":
            hf_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf_enable(gradient_checkpointing_kwargs=kwargs)
        _no_cache(model)
        return
    timm_enable = getattr(model, "set_grad_checkpointing", None)
    if callable(timm_enable):
        timm_enable(True)
        return
    raise UsageError(f"model {name!r} ({type(model).__name__}) has no activation checkpointing the suite can switch on "
                     "(the mlp, the transformer, Hugging Face and timm models have); checkpoint inside your factory instead")


def _no_cache(model: nn.Module) -> None:
    """A Hugging Face model under checkpointing trains without a KV cache: transformers turns
    `use_cache` off at every forward (and warns each time); off from the start here."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False


def build(name: str, width: int = 64, depth: int = 3) -> nn.Module:
    return resolve(name).build(width, depth)


def make_batch(
    model: nn.Module,
    batch: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Batch:
    """A synthetic regression batch (inputs, targets) shaped for `model`."""
    x = torch.randn(batch, model.in_features, dtype=dtype, device=device, generator=generator)
    y = torch.randn(batch, model.out_features, dtype=dtype, device=device, generator=generator)
    return x, y


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error whose memory is the same on every backend.

    On CPU, `F.mse_loss(reduction="mean")` returns a 0-dim view of its batch-sized
    unreduced buffer, so the loss keeps that buffer alive until it dies; the meta kernels
    the fake probe runs allocate 4 bytes instead. Reducing explicitly gives a fresh 0-dim
    loss on every backend, so tracked and fake probes agree to the byte."""
    return F.mse_loss(output, target, reduction="none").mean()


MODELS["simple"] = ModelSpec("simple", lambda width=0, depth=0: SimpleNet(), make_batch, mse)
MODELS["mlp"] = ModelSpec("mlp", lambda width=64, depth=3: MLP(width, depth), make_batch, mse)


# --- the transformer ----------------------------------------------------------------------

VOCAB = 256
SEQ_LEN = 64


def heads_for(width: int) -> int:
    """Attention heads for a model dimension: max(1, width // 64), lowered to the nearest
    count that divides `width` (so every head has the same size)."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with explicit q/k/v/out projections (four Linear
    matrices, so `@matrix` rules route each of them) and `F.scaled_dot_product_attention`."""

    def __init__(self, width: int, heads: int, *, bias: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise UsageError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.out_proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.heads
        q = self.q_proj(x).view(b, t, h, c // h).transpose(1, 2)
        k = self.k_proj(x).view(b, t, h, c // h).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, c // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Linear(width, 4 width), GELU, Linear(4 width, width)."""

    def __init__(self, width: int, *, ratio: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width, bias=bias)
        self.fc2 = nn.Linear(ratio * width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, *, bias: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, bias=bias)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A small decoder-only language model built from torch.nn.

    Parameters, by name: `emb.weight` (vocab x width token embedding), `pos_emb` (seq_len x
    width learnt positions), `layer{i}.ln1/ln2.{weight,bias}`,
    `layer{i}.attn.{q,k,v,out}_proj.{weight,bias}`, `layer{i}.mlp.fc1/fc2.{weight,bias}`,
    `ln_f.{weight,bias}`, and `head.weight` only when `tied=False`: a tied head reuses
    `emb.weight` (`F.linear(x, emb.weight)`), so it is one parameter, counted and optimised
    once. `forward(tokens)` returns logits (batch, seq, vocab).
    """

    def __init__(self, width: int = 128, depth: int = 2, *, vocab: int = VOCAB, seq_len: int = SEQ_LEN,
                 heads: int | None = None, tied: bool = True, bias: bool = True) -> None:
        super().__init__()
        if width < 1 or depth < 1 or vocab < 1 or seq_len < 1:
            raise UsageError(f"Transformer needs width, depth, vocab and seq_len >= 1, got "
                             f"width={width}, depth={depth}, vocab={vocab}, seq_len={seq_len}")
        self.width, self.depth, self.vocab, self.seq_len = width, depth, vocab, seq_len
        self.heads = heads if heads is not None else heads_for(width)
        self.tied = tied
        self.checkpointing = False  # each block recomputed in the backward (see _checkpointed)
        self.emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Parameter(torch.empty(seq_len, width))
        for i in range(1, depth + 1):
            self.add_module(f"layer{i}", Block(width, self.heads, bias=bias))
        self.ln_f = nn.LayerNorm(width)
        self.add_module("head", None if tied else nn.Linear(width, vocab, bias=False))
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's: N(0, 0.02) for matrices and embeddings, zero biases, LayerNorm (1, 0).
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's seq_len {self.seq_len}")
        x = self.emb(tokens) + self.pos_emb[:t]
        for i in range(1, self.depth + 1):
            block = getattr(self, f"layer{i}")
            x = _checkpointed(block, x) if self.checkpointing and self.training else block(x)
        x = self.ln_f(x)
        return F.linear(x, self.emb.weight) if self.head is None else self.head(x)

    def example_batch(self, batch_size: int, *, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> Batch:
        """(tokens, targets): `batch_size` random sequences and the same shifted by one."""
        if device is None:
            device = self.emb.weight.device
        return lm_batch(self, batch_size, device=device, generator=generator)


def lm_batch(model: nn.Module, batch: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> Batch:
    """Random token sequences (int64, `dtype` does not apply: the batch_fn interface passes it):
    inputs and next-token targets, each (batch, seq_len) and contiguous."""
    vocab, seq_len = getattr(model, "vocab", VOCAB), getattr(model, "seq_len", SEQ_LEN)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device, generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over every position: logits flattened to (batch * seq, vocab)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


MODELS["transformer"] = ModelSpec("transformer", lambda width=128, depth=2: Transformer(width, depth), lm_batch, lm_loss)


# --- your own model, by import path ---------------------------------------------------------


def from_path(path: str) -> ModelSpec:
    """A user's model as a ModelSpec, from `pkg.module:factory`.

    - `factory(width=..., depth=...)` returns the nn.Module; keywords it does not take are
      not passed (a factory, or a class, with no parameters at all is fine).
    - Batches: `pkg.module:make_batch(model, batch_size)` if the module defines it, else
      `model.example_batch(batch_size)`. Either may also take `generator=`, `device=` and
      `dtype=` keywords, and gets those it takes. The batch (tensors, or tuples/lists/dicts
      of them) is then moved to the suite's device, and its floating tensors cast to the
      config's dtype; integer tensors keep theirs.
    - The factory may return a Hugging Face model built from its config (no download),
      e.g. `GPT2LMHeadModel(GPT2Config(...))`, with a make_batch returning a dict
      (`{"input_ids": ..., "labels": ...}`).
    - Loss: `pkg.module:loss_fn` if the module defines it, called as the Trainer calls a
      loss (`trainer.forward_loss`: `loss_fn(model(x), y)` for a 2-tuple batch, a dict
      batch as keywords, tuple outputs' first element or `.logits` as the output); without
      one, the model's output is the loss, or its `loss` (attribute or key).
    - Sizes: width/depth are passed only if the factory takes them, and recorded as 0
      when it does not (`ModelSpec.sizes`).

    Import failures, a missing or non-callable attribute, a factory that needs an argument
    the suite cannot give, and a factory that returns something other than an nn.Module are
    one-line UsageErrors naming the path.
    """
    return _from_path(path.strip())


@functools.lru_cache(maxsize=None)
def _from_path(path: str) -> ModelSpec:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise UsageError(f"model {path!r}: write your own model as pkg.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure while importing the user's module is theirs to fix
        raise UsageError(f"model {path!r}: cannot import {module_name!r}: {type(e).__name__}: {_one_line(e)}") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"model {path!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"model {path!r}: {attr!r} (of type {type(factory).__name__}) is not callable; name a function or class that builds the model")
    required = _required_params(factory, allowed=("width", "depth"))
    if required:
        raise UsageError(f"model {path!r}: {attr}() requires {', '.join(map(repr, required))}; the suite can only "
                         "pass width= and depth= (give the others defaults)")
    make_batch = getattr(module, "make_batch", None)
    loss_fn = getattr(module, "loss_fn", None)
    for name, fn in (("make_batch", make_batch), ("loss_fn", loss_fn)):
        if fn is not None and not callable(fn):
            raise UsageError(f"model {path!r}: {module_name}.{name} (of type {type(fn).__name__}) is not callable")
    takes = tuple(_accepted(factory, {"width": 0, "depth": 0}))
    return ModelSpec(path, _UserFactory(path, factory), _UserBatch(path, module_name, make_batch), loss_fn, takes)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return None


def _required_params(fn: Callable[..., Any], allowed: tuple[str, ...], n_positional: int = 0) -> list[str]:
    """Parameters of `fn` without a default that neither the first `n_positional` arguments
    nor keywords from `allowed` fill."""
    sig = _signature(fn)
    if sig is None:
        return []
    missing = []
    positional = n_positional
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional > 0:
            positional -= 1
            continue
        if p.default is p.empty and not (p.name in allowed and p.kind is not p.POSITIONAL_ONLY):
            missing.append(p.name)
    return missing


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords of `kwargs` that `fn` takes (all of them when it takes **kwargs)."""
    sig = _signature(fn)
    if sig is None:
        return {}
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


@dataclass(frozen=True)
class _UserFactory:
    """Calls the user's factory with the keywords it takes; checks it made an nn.Module."""

    path: str
    fn: Callable[..., Any]

    def __call__(self, **kwargs: Any) -> nn.Module:
        try:
            model = self.fn(**_accepted(self.fn, kwargs))
        except Exception as e:
            if _default_device_type() == "meta":
                raise UsageError(
                    f"model {self.path!r}: the factory fails on the meta device, which the suite uses to check rules "
                    f"before running ({type(e).__name__}: {_one_line(e)})") from None
            raise
        if not isinstance(model, nn.Module):
            raise UsageError(f"model {self.path!r}: the factory returned a {type(model).__module__}."
                             f"{type(model).__qualname__}, not a torch.nn.Module")
        return model


def _default_device_type() -> str:
    try:
        return torch.get_default_device().type
    except Exception:  # pragma: no cover - torch without get_default_device
        return "cpu"


@dataclass(frozen=True)
class _UserBatch:
    """A batch from the module's make_batch or the model's example_batch, moved to the
    suite's device with floating tensors in the config's dtype."""

    path: str
    module: str
    fn: Callable[..., Any] | None

    def __call__(self, model: nn.Module, batch: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Any:
        extra = {"dtype": dtype, "device": device, "generator": generator}
        if self.fn is not None:
            out = self.fn(model, batch, **_accepted(self.fn, extra))
        else:
            example = getattr(model, "example_batch", None)
            if not callable(example):
                raise UsageError(
                    f"model {self.path!r}: no way to make a batch; define make_batch(model, batch_size) in "
                    f"{self.module}, or an example_batch(batch_size) method on {type(model).__name__}")
            out = example(batch, **_accepted(example, extra))
        return _place(out, torch.device(device), dtype)


def _place(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Tensors in `obj` on `device`; floating ones cast to `dtype`. Sequences keep their type; mappings become dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else None)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_place(o, device, dtype) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_place(o, device, dtype) for o in obj)
    if isinstance(obj, Mapping):  # any mapping (transformers' BatchEncoding too) becomes a dict: model(**batch)
        return {k: _place(v, device, dtype) for k, v in obj.items()}
    return obj
