"""The method registry: `METHODS`, the explicit tuple of every method's `MethodSpec` (each declared as ``SPEC``
at the end of its ``lorta/methods/<name>.py``), in the family's order for tables. Everything that lists methods
(the PEFT registration, `lorta.params`, ``lorta train``, the benchmarks, the test table) reads it from here.
A new method is its file in ``lorta/methods`` plus one entry here (docs/design.md, "Adding a method").

`register` puts a method in PEFT's type mappings. PEFT's `register_peft_method` only accepts names already in its
`PeftType` enum; on peft >= 0.21 a plain string key in the three type mappings works end to end
(docs/design.md, "Living inside PEFT").
"""

from __future__ import annotations

from typing import Any

from .methods import lorta as _lorta
from .methods import tenslora as _tenslora
from .methods import tlora as _tlora
from .spec import CliOption, MethodSpec, Recipe

__all__ = [
    "METHODS",
    "CliOption",
    "MethodSpec",
    "Recipe",
    "is_lorta_model",
    "method_spec",
    "method_specs",
    "peft_types",
    "register",
    "unregister",
]

METHODS: tuple[MethodSpec, ...] = (_lorta.SPEC, _tenslora.SPEC, _tlora.SPEC)
_extra: dict[str, MethodSpec] = {}  # methods registered at run time (`register`), after METHODS


def method_specs() -> dict[str, MethodSpec]:
    """Every method, by name: `METHODS`, then any registered since."""
    return {**{spec.name: spec for spec in METHODS}, **_extra}


def peft_types() -> frozenset[str]:
    """The peft_type of every lorta method (what a saved adapter_config.json names)."""
    return frozenset(spec.peft_type for spec in method_specs().values())


def method_spec(name: str) -> MethodSpec:
    specs = method_specs()
    if name not in specs:
        raise KeyError(f"unknown lorta method {name!r}; the methods are {', '.join(specs)}")
    return specs[name]


def register(spec: MethodSpec) -> None:
    """Make PEFT dispatch `spec.peft_type` to the method's config and tuner (`import lorta` does it for `METHODS`;
    a method declared elsewhere, e.g. in a test, is registered with this and listed by `method_specs` after them)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type] = spec.config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type] = spec.tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[spec.peft_type] = spec.tuner_cls.prefix
    if spec not in METHODS:
        _extra[spec.name] = spec


def unregister(spec: MethodSpec) -> None:
    """Undo `register` of a method that is not one of `METHODS`."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    if spec in METHODS:
        raise ValueError(f"{spec.name} is one of lorta's own methods")
    _extra.pop(spec.name, None)
    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        mapping.pop(spec.peft_type, None)


def is_lorta_model(model: Any) -> bool:
    """True when every adapter config of `model` is a lorta type."""
    configs = getattr(model, "peft_config", None)
    return bool(configs) and all(str(getattr(c, "peft_type", "")) in peft_types() for c in configs.values())
