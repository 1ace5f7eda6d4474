"""Fields every tensor adapter shares; each method's config adds its factorisation's own knobs."""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from peft import PeftConfig
from peft.utils import CONFIG_NAME

from ..layout import ModelShape


class MethodType(str):
    """A lorta method's `peft_type`: a plain string (saved as such, a key of PEFT's type mappings) that also answers
    `.value`, as the members of PEFT's own `PeftType` enum do (PEFT's code and tests read `peft_type.value`)."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str(self)


BIAS_CHOICES = ("none", "all", "lorta_only")


class AdapterConfigError(ValueError, TypeError):
    """A config field has the wrong type or value; the message names the field, what it got and what it expects.

    It is both a ValueError and a TypeError, so code catching either (PEFT's loaders do) keeps working.
    """


class AdapterFileError(ValueError):
    """A saved adapter (its directory, config JSON or weights file) is missing, unreadable or does not fit."""


@dataclass
class TensorAdapterConfig(PeftConfig):
    """Common configuration of the lorta family (LoRA-compatible names where the meaning is the same).

    `model_shape` and `matrix_names` are filled in when the adapter is created and saved with it, so that loading
    it onto a base model of another shape fails with a clear error instead of silently mis-indexing heads.
    """

    r: int = field(default=8, metadata={"help": "Rank of the tensor decomposition."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex; default: the attention matrices of the model."},
    )
    exclude_modules: list[str] | str | None = field(default=None)
    lora_alpha: float = field(default=16.0, metadata={"help": "Scale numerator: scale = alpha / r."})
    use_rslora: bool = field(default=False, metadata={"help": "Use alpha / sqrt(r) (rank-stabilised) scaling."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: the update starts at zero. False: random, for tests only."}
    )
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    target_parameters: list[str] | None = field(default=None)
    bias: str = field(
        default="none",
        metadata={
            "help": "Also train biases, as LoRA's bias option: 'none', 'all' (every bias of the model) or "
            "'lorta_only' (the biases of the adapted layers); they are saved with the adapter."
        },
    )
    model_shape: dict[str, Any] | None = field(
        default=None, metadata={"help": "Base model shape (filled on creation, checked on load)."}
    )
    matrix_names: list[str] | None = field(
        default=None, metadata={"help": "The matrices mode, in order (filled on creation, checked on load)."}
    )
    layer_names: list[str] | None = field(
        default=None,
        metadata={"help": "The layers mode: the adapted layers, in order (filled on creation, checked on load)."},
    )
    # Declared, not a hidden attribute: from_pretrained records the adapter's directory here so that the tuner can
    # check the saved weights against the model before it injects anything. It describes this Python object, not
    # the adapter, so it is never saved (to_dict drops every field marked saved=False), never a constructor argument
    # and never part of ==.
    loaded_from: str | None = field(
        default=None,
        init=False,
        repr=False,
        compare=False,
        metadata={"help": "The directory from_pretrained read this config from (not saved).", "saved": False},
    )

    def __post_init__(self) -> None:
        check_positive_int("r", self.r)
        _check_field_types(self)
        super().__post_init__()
        _check_model_shape(self.model_shape)
        if isinstance(self.target_modules, list):
            self.target_modules = sorted(set(self.target_modules))
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise AdapterConfigError(f"bias={self.bias!r} is not one of {list(BIAS_CHOICES)}")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict of the config (what adapter_config.json holds), without the fields that are never saved."""
        unsaved = {f.name for f in fields(self) if f.metadata.get("saved", True) is False}
        return {k: v for k, v in super().to_dict().items() if k not in unsaved}

    def scale_for(self, rank: int) -> float:
        """LoRA's alpha / r, or rsLoRA's alpha / sqrt(r)."""
        return float(self.lora_alpha) / (math.sqrt(rank) if self.use_rslora else rank)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's loader, plus checks of a local adapter_config.json before any model is touched.

        The JSON must parse, name a peft_type this class loads and hold no field of another lorta method; a field of
        the wrong type is reported with the file's path. The directory is kept in `loaded_from` (not saved) so that
        the tuner can check the weights file against the model before it injects anything.
        """
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        config_file = os.path.join(path, CONFIG_NAME)
        local = os.path.isfile(config_file)
        if local:
            _check_saved_config(cls, config_file)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except AdapterFileError:
            raise
        except (TypeError, ValueError) as exc:
            if not local:
                raise
            raise AdapterConfigError(f"{config_file}: {exc}. Fix that field or save the adapter again.") from exc
        if local:
            config.loaded_from = path
        return config


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterConfigError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise AdapterConfigError(f"{name} must be a positive integer, got {value}")


# ------------------------------------------------------------------------------------------ field type checks
_SINGLE_NAME_OK = {"modes"}  # LortaConfig turns a single mode name into a one-element list
_FIELD_HINTS: dict[type, dict[str, tuple[Any, str]]] = {}


def _field_hints(cls: type) -> dict[str, tuple[Any, str]]:
    """{field: (type hint, annotation text)} for the fields declared by the lorta config classes (not PEFT's)."""
    if cls not in _FIELD_HINTS:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that cannot be resolved (e.g. a user subclass): skip the generic check
            hints = {}
        declared: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if isinstance(klass, type) and issubclass(klass, TensorAdapterConfig):
                declared.update({k: str(v) for k, v in vars(klass).get("__annotations__", {}).items()})
        _FIELD_HINTS[cls] = {k: (hints[k], text) for k, text in declared.items() if k in hints}
    return _FIELD_HINTS[cls]


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple, set)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_field_types(config: TensorAdapterConfig) -> None:
    for name, (hint, text) in _field_hints(type(config)).items():
        value = getattr(config, name)
        if name in _SINGLE_NAME_OK and isinstance(value, str):
            continue
        if not _matches(value, hint):
            raise AdapterConfigError(
                f"{type(config).__name__}.{name} must be {text}, got {value!r} ({type(value).__name__})"
            )


def _check_model_shape(shape: dict[str, Any] | None) -> None:
    for key in ModelShape.SIZES:
        value = (shape or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise AdapterConfigError(
                f"model_shape[{key!r}] must be a non-negative integer (the base model's size; 0: not known), got "
                f"{value!r}"
            )


# ---------------------------------------------------------------------------------- saved adapter_config.json
def _lorta_types() -> dict[str, type]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {
        str(k): c
        for k, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()
        if isinstance(c, type) and issubclass(c, TensorAdapterConfig)
    }


def _check_saved_config(cls: type, config_file: str) -> None:
    """The JSON parses, its peft_type is one `cls` loads, and it holds no field of another lorta method."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        with open(config_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(
            f"{config_file} is not a readable JSON file ({exc}); restore it from the saved adapter or save it again"
        ) from exc
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_file} must hold a JSON object of config fields, got {type(data).__name__}")
    lorta_types = _lorta_types()
    expected = sorted(k for k, c in lorta_types.items() if c is cls) or sorted(lorta_types)
    saved = data.get("peft_type")
    if saved not in expected:
        other = PEFT_TYPE_TO_CONFIG_MAPPING.get(saved) if isinstance(saved, str) else None
        hint = (
            f"load it with {other.__name__} or PeftModel.from_pretrained, which pick the class from peft_type"
            if other is not None
            else "the file is not a lorta adapter config, or its peft_type was edited"
        )
        raise AdapterFileError(
            f"{config_file} holds a peft_type={saved!r} adapter, but {cls.__name__} loads {expected} only; {hint}"
        )
    own = set(lorta_types[saved].__dataclass_fields__)
    for other_type, other_cls in lorta_types.items():
        foreign = sorted((set(other_cls.__dataclass_fields__) - own) & set(data))
        if other_type != saved and foreign:
            raise AdapterFileError(
                f"{config_file} says peft_type={saved!r} but holds {other_cls.__name__}'s field(s) {foreign}: the "
                f"file was edited or mixed up with a {other_type} adapter; restore its original peft_type"
            )
