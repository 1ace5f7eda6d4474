"""The method registry: each ``lorta/methods/<name>.py`` declares one `MethodSpec` (``SPEC``), and everything that
lists methods (the PEFT registration, the tuners, `lorta.params`, ``lorta train``, the benchmarks, the test table)
reads it from here. A new method is one file in ``lorta/methods`` (plus its row in the test table).

This is also where lorta plugs into PEFT (with the tuner, lorta/tuner/model.py): `register` puts a method in
PEFT's type mappings, `install_atomic_save` makes `PeftModel.save_pretrained` crash-safe for lorta models.

Registration with PEFT: PEFT's `register_peft_method` only accepts names already in its `PeftType` enum; on peft
>= 0.21 a plain string key in the three type mappings works end to end (docs/design.md, "Living inside PEFT").
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .layout import TensorLayout

__all__ = ["MethodSpec", "Recipe", "install_atomic_save", "method_spec", "method_specs", "peft_types", "register"]

_MARK = "__lorta_atomic__"


@dataclass(frozen=True)
class Recipe:
    """Defaults of ``lorta train``: rank, alpha (scale = alpha / rank; None: the method has none), adapter learning
    rate, head learning rate, the adapted matrices as attention roles (None: the method's default targets), and
    how the adapter lr follows a rank other than the recipe's: ``lr * (rank / recipe rank) ** lr_rank_power``."""

    rank: int | None
    alpha: float | None
    lr: float
    head_lr: float
    targets: tuple[str, ...] | None = None
    lr_rank_power: float = 0.0  # 0: the same lr at every rank

    def lr_at(self, rank: int | None) -> float:
        """The adapter lr this recipe gives a run at ``rank`` (its own lr at its own rank, or with no rank)."""
        if rank is None or self.rank is None or self.lr_rank_power == 0.0:
            return self.lr
        return self.lr * (rank / self.rank) ** self.lr_rank_power


@dataclass(frozen=True)
class MethodSpec:
    """Everything outside a method's math that the rest of lorta needs to know about it."""

    name: str  # the CLI's and lorta.params' name ("lorta")
    title: str  # for tables ("LoRTA")
    peft_type: str
    config_cls: type
    factors_cls: type
    tuner_name: str  # the PEFT tuner class made for it ("LortaModel")
    closed_form: Callable[[TensorLayout, Any], Callable[[int], int]]  # (layout, config) -> (rank -> trainable)
    classify: Recipe  # `lorta train` on an encoder with a classification head
    causal_lm: Recipe  # `lorta train` prompt job on a causal LM (and its DPO job unless `dpo` is given)
    default_kinds: tuple[str, ...] | None = None  # default targets as matrix kinds (None: q, k, v, o)
    rank_field: str = "r"  # the config field a single rank goes to (TensLoRA: "ranks", one per mode or all)
    params_options: tuple[str, ...] = ()  # the config options lorta.params and `lorta params` take
    train_options: tuple[str, ...] = ()  # the `lorta train` options (TrainOptions fields) the method reads
    train_kwargs: Callable[[Any], dict[str, Any]] = field(default=lambda o: {})  # TrainOptions -> config kwargs
    bench_config: Callable[..., Any] | None = None  # (r, alpha, targets, shape) -> config for benchmarks/bench.py
    dpo: Recipe | None = None  # `lorta train --task dpo` (None: the causal_lm recipe)

    def config(self, rank: int | None = None, **kwargs: Any) -> Any:
        """The method's PEFT config at `rank` (None: the config's default) with `kwargs`."""
        return self.config_cls(**({self.rank_field: rank} if rank is not None else {}), **kwargs)


@functools.cache
def _discover() -> dict[str, MethodSpec]:
    from . import methods

    specs = {}
    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
        spec = getattr(importlib.import_module(f"{methods.__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, MethodSpec):
            specs[spec.name] = spec
    order = ("lorta", "tenslora", "tlora")  # the family's own order in tables; others after, by name
    return {n: specs[n] for n in sorted(specs, key=lambda n: (order.index(n) if n in order else len(order), n))}


def method_specs() -> dict[str, MethodSpec]:
    """Every method of ``lorta/methods``, by name."""
    return dict(_discover())


def peft_types() -> frozenset[str]:
    """The peft_type of every lorta method (what a saved adapter_config.json names)."""
    return frozenset(spec.peft_type for spec in _discover().values())


def method_spec(name: str) -> MethodSpec:
    specs = _discover()
    if name not in specs:
        raise KeyError(f"unknown lorta method {name!r}; the methods are {', '.join(specs)}")
    return specs[name]


def register(spec: MethodSpec, tuner_cls: type) -> None:
    """Make PEFT dispatch `spec.peft_type` to the method's config and tuner."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type] = spec.config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[spec.peft_type] = tuner_cls.prefix


def is_lorta_model(model: Any) -> bool:
    """True when every adapter config of `model` is a lorta type."""
    configs = getattr(model, "peft_config", None)
    return bool(configs) and all(str(getattr(c, "peft_type", "")) in peft_types() for c in configs.values())


def install_atomic_save() -> None:
    """Wrap PeftModel.save_pretrained once so a lorta model's save is written whole or not at all
    (lorta.saving.atomic_save); non-lorta models and non-main processes go straight to PEFT."""
    import inspect
    import os

    from peft import PeftModel

    from . import saving

    original = PeftModel.save_pretrained
    if getattr(original, _MARK, False):
        return
    positional = [
        p.name
        for p in list(inspect.signature(original).parameters.values())[2:]
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]

    @functools.wraps(original)
    def save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(positional) or not is_lorta_model(self):
            return original(self, save_directory, *args, **kwargs)
        kwargs.update(zip(positional, args, strict=False))
        if not kwargs.get("is_main_process", True) or os.path.isfile(os.fspath(save_directory)):
            return original(self, save_directory, **kwargs)
        return saving.atomic_save(original, self, save_directory, **kwargs)

    setattr(save_pretrained, _MARK, True)
    PeftModel.save_pretrained = save_pretrained
