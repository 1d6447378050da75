"""Combos and grids by name: what `multiopt run --preset` and `--combos` mean."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import UsageError
from ..kinds import Probe
from ..record import Config
from ..rules import Rules
from ..train import models

# name -> rules, parsed once here (a typo in a preset fails at import, naming it)
COMBOS: dict[str, Rules] = {name: Rules(text) for name, text in {
    "sgd": "rest=sgd(lr=0.01)",
    "sgd-momentum": "rest=sgd(lr=0.01, momentum=0.9)",
    "adam": "rest=adam(lr=0.001)",
    "adamw": "rest=adamw(lr=0.001, weight_decay=0.01)",
    "adagrad": "rest=adagrad(lr=0.01)",
    "rmsprop": "rest=rmsprop(lr=0.001)",
    "adafactor": "rest=adafactor(lr=0.01)",
    "muon+adamw": "@matrix=muon(lr=0.02); rest=adamw(lr=0.0003)",
    "sgd+adam": "layer1=sgd(lr=0.01); rest=adam(lr=0.001)",
    "adam+sgd": "layer1=adam(lr=0.001); rest=sgd(lr=0.01)",
}.items()}


@dataclass(frozen=True)
class Grid:
    """The cartesian product of its lists; a preset is a union of grids."""

    widths: tuple[int, ...] = (256,)
    batches: tuple[int, ...] = (32,)
    combos: tuple[tuple[str, Rules], ...] = (("adam", COMBOS["adam"]),)  # (name, rules)
    depths: tuple[int, ...] = (3,)
    dtypes: tuple[str, ...] = ("float32",)
    amps: tuple[str, ...] = ("none",)
    impls: tuple[str, ...] = ("default",)
    zero_grad_ats: tuple[str, ...] = ("end",)
    models: tuple[str, ...] = ("mlp",)
    zeros: tuple[int, ...] = (0,)
    seed: int = 0

    def configs(self, device: str = "cpu", ranks: int = 1) -> list[Config]:
        """`ranks`: the world size a zero=1 config runs across (zero=0 configs run on one rank)."""
        out = []
        specs = {m: models.resolve(m) for m in self.models}
        for model, depth, width, batch, dtype, amp, (combo, rules), impl, zg, zero in itertools.product(
            self.models, self.depths, self.widths, self.batches, self.dtypes, self.amps, self.combos,
            self.impls, self.zero_grad_ats, self.zeros,
        ):
            # a size the model's factory does not take is 0, as its record keeps it: one config,
            # not one per width, and --resume finds the record
            width, depth = specs[model].sizes(width, depth)
            out.append(Config(model=model, width=width, depth=depth, batch=batch, dtype=dtype, amp=amp,
                              combo=combo, rules=rules, impl=impl, zero_grad_at=zg, seed=self.seed, device=device,
                              zero=zero, ranks=ranks if zero else 1))
        return dedupe(out)


def combos(names: Iterable[str]) -> tuple[tuple[str, Rules], ...]:
    out = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name not in COMBOS:
            raise UsageError(f"unknown combo {name!r}; presets: {', '.join(COMBOS)}; for your own rules use --rules")
        out.append((name, COMBOS[name]))
    return tuple(out)


def user_combo(text: str, taken: Iterable[str] = ()) -> tuple[str, Rules]:
    """`NAME::RULES` or bare RULES (named after its optimizers, e.g. `sgd+adam*`), the rules
    parsed (once: the configs made from them carry the parsed value).
    `::` cannot occur in a rule, so it never collides with `pkg.mod:Class` paths."""
    name, sep, text_rules = text.partition("::")
    if not sep:
        name, text_rules = "", text
    rules = Rules(text_rules.strip())
    if not name:
        name = "+".join(r.optimizer.rsplit(":", 1)[-1].lower() for r in rules.parsed)
        taken = set(taken)
        if name in COMBOS or name in taken:
            base, n = name + "*", 1
            name = base
            while name in taken:
                n += 1
                name = f"{base}{n}"
    return name.strip(), rules


ALL = tuple(COMBOS.items())
# Muon on the transformer's matrices, its embeddings (`emb`, `pos_emb`) on AdamW as Muon's authors advise.
_MUON_LM = ("muon+adamw-emb", Rules("*emb*=adamw(lr=0.0003); @matrix=muon(lr=0.02); rest=adamw(lr=0.0003)"))
PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: under 60 s on a 2-core CPU with the tracked probe, isolation on.
    "quick": {
        "probe": Probe.TRACKED,
        "grids": (
            Grid(widths=(64, 256), batches=(16, 64), combos=ALL, depths=(3,)),
            Grid(widths=(256,), batches=(64,), combos=combos(["sgd-momentum", "adam", "adamw"]),
                 impls=("forloop", "foreach", "fused")),
            Grid(models=("transformer",), widths=(64,), batches=(8,), depths=(2,),
                 combos=(*combos(["adam", "sgd+adam"]), _MUON_LM)),
        ),
        "steps": 30,
        "min_block_ms": 5.0,
    },
    # The README's main job: a few minutes on a CPU.
    "default": {
        "probe": "auto",
        "grids": (
            Grid(widths=(128, 512, 1024), batches=(16, 64, 256), combos=ALL, depths=(4,)),
            Grid(widths=(1024,), batches=(64,), combos=combos(["sgd-momentum", "adam", "adamw", "adagrad"]),
                 depths=(4,), impls=("forloop", "foreach", "fused")),
            Grid(widths=(1024,), batches=(64,), combos=combos(["adam", "muon+adamw", "sgd+adam"]), depths=(4,),
                 dtypes=("bfloat16",)),
            Grid(widths=(1024,), batches=(64,), combos=combos(["adam", "sgd+adam"]), depths=(4,),
                 zero_grad_ats=("start",)),
            Grid(models=("transformer",), widths=(128, 256), batches=(8, 32), depths=(2,),
                 combos=(*combos(["adam", "adafactor", "sgd+adam"]), _MUON_LM)),
        ),
        "steps": 20,
    },
    # Fake probe: sizes only, for the shape of the curves at scale.
    "wide": {
        "probe": Probe.FAKE,
        "grids": (
            Grid(widths=(1024, 2048, 4096, 8192, 16384), batches=(64, 512), depths=(8,),
                 combos=combos(["sgd", "sgd-momentum", "adam", "adamw", "muon+adamw", "sgd+adam"])),
        ),
        "steps": 0,
    },
}


def preset_configs(name: str, device: str = "cpu", ranks: int = 1) -> list[Config]:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dedupe(c for g in PRESETS[name]["grids"] for c in g.configs(device, ranks))


def dedupe(configs: Iterable[Config]) -> list[Config]:
    seen, out = set(), []
    for c in configs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def select(preset: str, *, device: str = "cpu", ranks: int = 1, widths: Sequence[int] = (),
           batches: Sequence[int] = (), depths: Sequence[int] = (), dtypes: Sequence[str] = (),
           impls: Sequence[str] = (), models: Sequence[str] = (), zeros: Sequence[int] = (),
           combos: Sequence[tuple[str, Rules]] = ()) -> list[Config]:
    """A preset's configs, or, when any list is given, one grid: the given lists, and for what
    is not given the preset's main grid (its first), so `widths=[64]` means "the main grid at
    width 64"."""
    if not (widths or batches or depths or dtypes or impls or models or zeros or combos):
        return preset_configs(preset, device, ranks)
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    base: Grid = PRESETS[preset]["grids"][0]
    grid = Grid(
        widths=tuple(widths) or base.widths, batches=tuple(batches) or base.batches,
        depths=tuple(depths) or base.depths, dtypes=tuple(dtypes) or base.dtypes,
        impls=tuple(impls) or base.impls, models=tuple(models) or base.models,
        combos=tuple(combos) or base.combos, amps=base.amps, zero_grad_ats=base.zero_grad_ats,
        zeros=tuple(zeros) or base.zeros,
    )
    return dedupe(grid.configs(device, ranks))
