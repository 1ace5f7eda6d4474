"""What a method declares about itself: its `MethodSpec` (and the `Recipe`s of ``lorta train``).

Each ``lorta/methods/<name>.py`` ends with one ``SPEC = MethodSpec(...)``; ``lorta.registry.METHODS`` is the
tuple of them. Everything outside ``methods/`` that treats methods differently (the PEFT registration, parameter
counts, ``lorta params`` and ``lorta train`` options, run names, benchmarks) reads
a field of the spec and never a method's name. This module imports nothing of lorta, so a method file can import
it and the registry can import the method files, with no circle.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CliOption", "MethodSpec", "Recipe", "positive_int"]


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
class CliOption:
    """A method's own command-line option: ``--flag`` into `dest` (a config field for ``lorta params``, a key of
    ``TrainOptions.method_options`` for ``lorta train``), with argparse's ``type``, ``choices`` and ``help``, and
    the value it has when not given (argparse itself always defaults to None, so a given option can be told from
    a default one)."""

    flag: str
    dest: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None

    def argparse_kwargs(self) -> dict[str, Any]:
        shown = ",".join(self.default) if isinstance(self.default, tuple) else self.default
        text = self.help if shown in (None, "") or "(default" in self.help else f"{self.help} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": self.dest, "help": text, "default": None}
        if self.type is not None:
            kwargs["type"] = self.type
        if self.choices is not None:
            kwargs["choices"] = self.choices
        return kwargs


def positive_int(text: str) -> int:
    """An argparse type: a positive integer; `1_000_000` and `1,000,000` are accepted."""
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _no_tags(values: Mapping[str, Any]) -> list[str]:
    return []


def _no_kwargs(values: Mapping[str, Any], options: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MethodSpec:
    """Everything outside a method's math that the rest of lorta needs to know about it."""

    name: str  # the CLI's and lorta.params' name ("lorta")
    title: str  # for tables ("LoRTA")
    peft_type: str
    config_cls: type
    factors_cls: type
    tuner_cls: type  # its PEFT tuner, a TensorAdapterModel subclass ("LortaModel")
    closed_form: Callable[[Any, Any], Callable[[int], int]]  # (layout, config) -> (rank -> trainable)
    classify: Recipe  # `lorta train` on an encoder with a classification head
    causal_lm: Recipe  # `lorta train` prompt job on a causal LM (and its DPO job unless `dpo` is given)
    rank_field: str = "r"  # the config field a single rank goes to (TensLoRA: "ranks", one per mode or all)
    params_options: tuple[str, ...] = ()  # the config options lorta.params and `lorta params` take
    cli_options: tuple[CliOption, ...] = ()  # `lorta params` flags of those options
    train_flags: tuple[CliOption, ...] = ()  # its own `lorta train` options (TrainOptions.method_options)
    # (its train_flags' values, the TrainOptions) -> config kwargs
    train_kwargs: Callable[[Mapping[str, Any], Any], dict[str, Any]] = _no_kwargs
    run_tags: Callable[[Mapping[str, Any]], list[str]] = _no_tags  # its non-default options, for run names/labels
    # a train flag that sets a learning rate -> the factors (attribute names) that train at it
    factor_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bench_config: Callable[..., Any] | None = None  # (r, alpha, targets, shape) -> config for the benchmarks
    bench_rank: int = 16  # the rank benchmarks/export_bench.py times
    import_check: Callable[[dict[str, Any]], None] | None = None  # rejects config kwargs import-lora cannot honour
    dpo: Recipe | None = None  # `lorta train --task dpo` (None: the causal_lm recipe)

    @property
    def tuner_name(self) -> str:
        return self.tuner_cls.__name__

    def train_values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The value of each of its train flags: the given one, else the flag's default."""
        return {flag.dest: given.get(flag.dest, flag.default) for flag in self.train_flags}

    def factor_lrs(self, values: Mapping[str, Any]) -> dict[str, float]:
        """Factor name -> learning rate, for the factor groups whose lr option is set in `values`."""
        return {
            factor: values[dest]
            for dest, factors in self.factor_groups.items()
            if values.get(dest) is not None
            for factor in factors
        }

    def config(self, rank: int | None = None, **kwargs: Any) -> Any:
        """The method's PEFT config at `rank` (None: the config's default) with `kwargs`."""
        return self.config_cls(**({self.rank_field: rank} if rank is not None else {}), **kwargs)
