"""Real models in one flag: a Hugging Face model from its config, a timm model by name, LoRA.

- ``hf:PATH``: a directory holding ``config.json``, the file itself, or a hub id already in
  the local Hugging Face cache (nothing is ever downloaded). ``AutoConfig`` reads it; the
  ``AutoModelFor...`` class of its task builds the model (`from_config`, random weights, in
  the config's dtype): on the meta device for the fake probe, for real on the others. The
  task comes from the config's ``architectures`` (``...ForCausalLM``/``...LMHeadModel``,
  ``...ForMaskedLM``, ``...ForSequenceClassification``, ``...ForImageClassification``), or
  is named: ``hf:PATH#masked-lm`` (the CLI's ``--task``).
- Batches are synthesised from the config: ``input_ids`` (uniform over the vocabulary),
  ``attention_mask`` (all ones: no padding) and ``labels`` (the tokens, shifted by the model
  itself; a class per row for classification), ``seq`` tokens long (default
  min(512, max_position_embeddings)); images: ``pixel_values`` of the config's size. The
  loss is the output's ``.loss``.
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``, a batch of images of its
  ``pretrained_cfg["input_size"]`` and class labels, cross-entropy loss.
- LoRA (`parse_lora`, `apply_lora`): ``r=8[,alpha=8][,dropout=0][,targets=q_proj,v_proj]``
  through peft: the base model frozen, the adapters the only trainable parameters.

transformers, peft and timm come with ``pip install 'multiopt[hf]'``; without one, a model
that needs it is a one-line UsageError saying so.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, one_line

__all__ = ["TASKS", "Lora", "Parts", "apply_lora", "parse_lora", "resolve"]

#: task -> the transformers Auto class that builds it
TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "image-cls": "AutoModelForImageClassification",
}
# an architecture's class-name ending -> its task
_ENDINGS: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "seq-cls"), ("ForImageClassification", "image-cls"),
)
#: the default sequence length, unless the model's positions are fewer
DEFAULT_SEQ = 512
_INSTALL = "pip install 'multiopt[hf]'"


@dataclass(frozen=True)
class Parts:
    """What `models.ModelSpec` is made of, for an hf: or timm: model (models builds the spec:
    this module does not import it, so neither imports the other's importer)."""

    factory: Any
    batch_fn: Any
    loss_fn: Any = None
    seq: int = 0


def resolve(name: str) -> Parts:
    """`hf:PATH[#TASK]` or `timm:NAME` (cached: the config is read once)."""
    return _resolve(name.strip())


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> Parts:
    kind, _, rest = name.partition(":")
    if not rest:
        raise UsageError(f"model {name!r}: write hf:PATH (a config.json or its directory) or timm:NAME")
    if kind == "timm":
        return _timm_spec(name, rest)
    source, task = _split_task(rest)
    config = _load_config(name, source)
    task = task or _task_of(name, config)
    vision = task == "image-cls"
    seq = 0 if vision else min(DEFAULT_SEQ, _max_positions(config) or DEFAULT_SEQ)
    if not vision and not isinstance(getattr(config, "vocab_size", None), int):
        raise UsageError(f"model {name!r}: its config has no vocab_size, so no token batch can be made for task {task}")
    return Parts(_HFFactory(name, config, TASKS[task]), _HFBatch(task), None, seq)


def _split_task(rest: str) -> tuple[str, str | None]:
    """`PATH#TASK` -> (PATH, TASK); a `#` not followed by a task name belongs to the path."""
    source, sep, task = rest.rpartition("#")
    if sep and task in TASKS:
        return source, task
    if sep and source and "/" not in task and "." not in task:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return rest, None


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise UsageError(f"hf: models need transformers ({one_line(e)}); install it with {_INSTALL}") from None


def _load_config(name: str, source: str) -> Any:
    """AutoConfig from a config.json, its directory, or a hub id already cached locally."""
    transformers = _transformers()
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"model {name!r}: {path} holds no config.json")
    local = path.exists()
    try:
        if local:
            return transformers.AutoConfig.from_pretrained(str(path))
        # a hub id: only what the local cache holds, never a download
        return transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        if local:
            raise UsageError(f"model {name!r}: transformers cannot read {path} ({type(e).__name__}: {one_line(e)})") from None
        raise UsageError(
            f"model {name!r}: no file or directory {source!r} here, and no cached Hugging Face config for that id "
            f"(nothing is downloaded); give the path of a config.json, or fetch it once with "
            f"`hf download {source} config.json`") from None


def _task_of(name: str, config: Any) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        for ending, task in _ENDINGS:
            if arch.endswith(ending):
                return task
    named = f"architectures {archs}" if archs else "no architectures"
    raise UsageError(f"model {name!r}: its config names {named}, none of which says the task; "
                     f"name it: hf:PATH#TASK or --task ({', '.join(TASKS)})")


def _max_positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class _HFFactory:
    """Builds the task's model from the config, in the default dtype (the suite sets it to the
    config's), under whatever device context the caller opened (meta for the fake probe)."""

    name: str
    config: Any
    auto_class: str

    def __call__(self, **_: Any) -> nn.Module:
        cls = getattr(_transformers(), self.auto_class)
        try:
            return cls.from_config(copy.deepcopy(self.config), dtype=torch.get_default_dtype())
        except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as e:
            raise UsageError(f"model {self.name!r}: transformers cannot build it with {self.auto_class} "
                             f"({type(e).__name__}: {one_line(e)}); name another task (--task)") from None


@dataclass(frozen=True)
class _HFBatch:
    """A synthetic batch for a Hugging Face task, made on `device` (fake under the fake probe)."""

    task: str

    def __call__(self, model: nn.Module, batch: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                 seq: int = DEFAULT_SEQ) -> dict[str, torch.Tensor]:
        config = model.config
        if self.task == "image-cls":
            size = config.image_size
            hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            pixels = torch.randn(batch, getattr(config, "num_channels", 3), *hw, dtype=dtype, device=device,
                                 generator=generator)
            return {"pixel_values": pixels, "labels": _classes(config, batch, device, generator)}
        limit = _max_positions(config)
        if limit is not None and seq > limit:
            raise UsageError(f"--seq {seq}: the model has {limit} positions (max_position_embeddings); give --seq {limit} or less")
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=generator)
        out = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}
        # causal LMs shift the labels themselves; a masked LM predicts every position here
        out["labels"] = _classes(config, batch, device, generator) if self.task == "seq-cls" else ids.clone()
        return out


def _classes(config: Any, batch: int, device: torch.device | str, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, max(int(getattr(config, "num_labels", 2)), 1), (batch,), device=device, generator=generator)


# --- timm ----------------------------------------------------------------------------------


def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        # timm imports torchvision at import time: a missing or mismatched torchvision lands here too
        raise UsageError(f"timm: models need timm and a torchvision that matches your torch ({one_line(e)}); "
                         f"install them with {_INSTALL}") from None


def _timm_spec(name: str, model_name: str) -> Parts:
    timm = _timm()
    if not timm.is_model(model_name):
        raise UsageError(f"model {name!r}: timm has no model {model_name!r} (timm.list_models('*pattern*') lists them)")
    return Parts(_TimmFactory(model_name), _timm_batch, _timm_loss)


@dataclass(frozen=True)
class _TimmFactory:
    model_name: str

    def __call__(self, **_: Any) -> nn.Module:
        return _timm().create_model(self.model_name, pretrained=False)


def _timm_batch(model: nn.Module, batch: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the model's pretrained input size (channels, height, width) and class labels."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    classes = int(getattr(model, "num_classes", 0) or cfg.get("num_classes") or 1000)
    x = torch.randn(batch, *size, dtype=dtype, device=device, generator=generator)
    return x, torch.randint(0, classes, (batch,), device=device, generator=generator)


def _timm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


# --- LoRA ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lora:
    """LoRA adapters as peft's LoraConfig takes them; `text` is the canonical form records keep."""

    r: int = 8
    alpha: float = 8.0  # peft's default lora_alpha
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # () = peft's defaults for the model type

    @property
    def text(self) -> str:
        text = f"r={self.r},alpha={self.alpha:g},dropout={self.dropout:g}"
        return text + (f",targets={','.join(self.targets)}" if self.targets else "")


def parse_lora(text: str) -> Lora:
    """`r=8[,alpha=8][,dropout=0][,targets=q_proj,v_proj]` (or just `8`): `targets` comes last
    and takes the rest of the text. One-line UsageError for anything else."""
    where = f"--lora {text!r}"
    body = text.strip()
    if not body:
        raise UsageError(f"{where}: give at least r, e.g. r=8")
    head, sep, targets_text = body.partition("targets=")
    fields: dict[str, str] = {}
    for part in [p.strip() for p in head.split(",") if p.strip()]:
        key, eq, value = part.partition("=")
        if not eq and not fields and key.isdigit():
            key, value = "r", key  # `--lora 8`
        elif not eq:
            raise UsageError(f"{where}: {part!r} is not key=value (keys: r, alpha, dropout, targets)")
        key = key.strip()
        if key not in ("r", "alpha", "dropout"):
            raise UsageError(f"{where}: unknown key {key!r} (keys: r, alpha, dropout, targets; targets comes last)")
        if key in fields:
            raise UsageError(f"{where}: {key} given twice")
        fields[key] = value.strip()
    targets = tuple(t.strip() for t in targets_text.split(",") if t.strip()) if sep else ()
    if sep and not targets:
        raise UsageError(f"{where}: targets= names no module (e.g. targets=q_proj,v_proj)")
    try:
        r = int(fields.get("r", "8"))
        alpha = float(fields.get("alpha", "8"))
        dropout = float(fields.get("dropout", "0"))
    except ValueError:
        raise UsageError(f"{where}: r is an integer, alpha and dropout numbers") from None
    if r < 1:
        raise UsageError(f"{where}: r must be >= 1")
    if not (math.isfinite(alpha) and alpha > 0):
        raise UsageError(f"{where}: alpha must be a number above 0")
    if not 0 <= dropout < 1:
        raise UsageError(f"{where}: dropout must be in [0, 1)")
    return Lora(r, alpha, dropout, tuple(dict.fromkeys(targets)))


def apply_lora(model: nn.Module, text: str, name: str = "the model") -> nn.Module:
    """`model` wrapped by peft with LoRA adapters (`parse_lora(text)`): every base parameter
    frozen (requires_grad=False), the adapters (`...lora_A...`, `...lora_B...`) trainable."""
    lora = parse_lora(text)
    try:
        peft = importlib.import_module("peft")
    except ImportError as e:
        raise UsageError(f"--lora needs peft ({one_line(e)}); install it with {_INSTALL}") from None
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.targets) or None)
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as e:
        hint = "" if lora.targets else "; name the modules to adapt: --lora r=8,targets=q_proj,v_proj"
        raise UsageError(f"--lora {lora.text}: peft cannot adapt model {name!r} ({one_line(e)}){hint}") from None
