"""Serve many tiny adapters at once: load N adapters fast, keep them stacked, add and remove them at run time.

    bank = lorta.load_adapters(peft_model, "adapters/")        # every sub-folder holding an adapter_config.json
    out = peft_model(**inputs, adapter_names=["user_17", "__base__", "user_3", ...])   # one name per row
    bank.remove("user_3"); bank.add("user_99", "adapters/user_99")
    bank.memory()["bytes_per_adapter"], bank.load_stats

The adapters are ordinary PEFT adapters of the model (`peft_model.peft_config`, `base_model.lorta_factors`), so
`set_adapter`, `save_pretrained` and `delete_adapter` keep working; the bank adds a fast loader and reports. The
base weights are never touched. Mixed batches (tuner/mixed.py) read the adapters as stacked factor tensors, one
stack per group of adapters with equal shapes, rebuilt only when an adapter is added, removed or changed.

Fast loading: the first adapter of a given layout (same method, targets and model shape) goes through PEFT's
`load_adapter`, which checks it against the model; every further adapter with that layout skips PEFT's module
walk: its factors are built on the meta device, the file's tensors are assigned into them (strictly: a missing,
unexpected or mis-shaped tensor is an error) and the wrapped layers get the template adapter's slots.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors.torch import load_file
from torch import nn

from .tuner.layer import TensorAdapterLayer
from .tuner.mixed import BASE, engine_for
from .tuner.model import TensorAdapterModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Config fields that decide where an adapter's matrices sit in the model: equal fields, equal slots.
_LAYOUT_FIELDS = (
    "peft_type",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "matrix_names",
    "layer_names",
    "model_shape",
    "target_parameters",
)

Source = str | os.PathLike | Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike]


class AdapterBank:
    """Many lorta adapters resident on one PeftModel, for mixed-adapter batches (`adapter_names=`)."""

    def __init__(self, model: nn.Module, cache_maps: bool = True) -> None:
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, TensorAdapterModel) or not hasattr(model, "peft_config"):
            raise TypeError(
                f"AdapterBank needs a PeftModel holding lorta adapters (get_peft_model with a lorta config or "
                f"PeftModel.from_pretrained); got {type(model).__name__}"
            )
        self.model = model
        self.tuner = tuner
        self.engine = engine_for(tuner.lorta_state)
        self.engine.cache_maps = cache_maps
        self.file_bytes: dict[str, int] = {}
        self.load_stats: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ contents
    @property
    def names(self) -> list[str]:
        return list(self.tuner.lorta_factors)

    def __len__(self) -> int:
        return len(self.tuner.lorta_factors)

    def __contains__(self, name: object) -> bool:
        return name in self.tuner.lorta_factors

    # ------------------------------------------------------------------------------------------- loading
    def load(self, source: Source, warm: bool = True) -> list[str]:
        """Load adapters from a folder of adapter folders, a list of folders, or a {name: folder} mapping.

        Names: the folder names (a folder that is itself an adapter is named after itself). Returns the names;
        `load_stats` records the time (total, per adapter, and the stacking/maps build when `warm`).
        """
        pairs = _sources(source)
        clash = sorted({n for n, _ in pairs if n in self.model.peft_config or n == BASE})
        if clash:
            raise ValueError(f"adapter name(s) {clash} are already loaded (or reserved); remove them first")
        start = time.perf_counter()
        fast = 0
        layers: dict[str, list[TensorAdapterLayer]] = {}
        for name, path in pairs:
            fast += self._load_one(name, Path(path), layers)
        loaded = time.perf_counter() - start
        stack = 0.0
        if warm:
            start = time.perf_counter()
            self.warm()
            stack = time.perf_counter() - start
        n = len(pairs)
        self.load_stats = {
            "adapters": n,
            "fast_path": fast,
            "load_s": loaded,
            "load_ms_per_adapter": 1e3 * loaded / max(n, 1),
            "stack_s": stack,
            "file_bytes_per_adapter": sum(self.file_bytes.get(k, 0) for k, _ in pairs) / max(n, 1),
        }
        return [n for n, _ in pairs]

    def add(self, name: str, path: str | os.PathLike) -> str:
        """Load one adapter under `name` (stacked on the next mixed call, or now with `warm()`)."""
        self.load({name: path}, warm=False)
        return name

    def remove(self, *names: str) -> None:
        """Delete adapters from the model (PEFT's delete_adapter); the base weights are untouched."""
        missing = [n for n in names if n not in self.model.peft_config]
        if missing:
            raise ValueError(f"no adapter named {missing}; loaded: {self.names[:20]}")
        for name in names:
            self.model.delete_adapter(name)
            self.file_bytes.pop(name, None)

    def warm(self) -> None:
        """Stack the factors and build every layer's maps now, so the next mixed call starts at full speed."""
        self.engine.warm([m for m in self.tuner.model.modules() if isinstance(m, TensorAdapterLayer)])

    def _load_one(self, name: str, path: Path, layers: dict[str, list[TensorAdapterLayer]]) -> bool:
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}: it is not a saved adapter")
        weights = path / WEIGHTS_NAME
        self.file_bytes[name] = weights.stat().st_size if weights.is_file() else 0
        config = _read_config(config_file)
        template = self._template_for(config)
        if template is None:
            self.model.load_adapter(str(path), adapter_name=name)
            return False
        tuner = self.tuner
        reference = tuner.lorta_factors[template]
        with torch.device("meta"):
            factors = tuner.factorization_cls(config, reference.layout)
        state = load_file(str(weights), device=str(next(reference.parameters()).device))
        state = {_factor_key(k, name): v for k, v in state.items()}
        try:
            factors.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"adapter {name!r} at {path} does not fit its config: {err}") from None
        factors.move_off_meta(next(reference.parameters()).device)
        factors.to(dtype=next(reference.parameters()).dtype).requires_grad_(False)
        config.inference_mode = True
        self.model.peft_config[name] = config
        tuner.lorta_factors[name] = factors
        scaling = config.scale_for(factors.scale_rank)
        if template not in layers:
            layers[template] = [
                m for m in tuner.model.modules() if isinstance(m, TensorAdapterLayer) and template in m.lorta_slots
            ]
        for layer in layers[template]:  # the same wiring PEFT's injection does (TensorAdapterLayer.update_layer)
            layer.update_layer(name, layer.lorta_slots[template], scaling, config.lora_dropout)
        return True

    def _template_for(self, config: Any) -> str | None:
        key = _layout_key(config)
        if key is None:
            return None
        for name in self.tuner.lorta_factors:
            existing = self.model.peft_config.get(name)
            if existing is not None and _layout_key(existing) == key:
                return name
        return None

    # ------------------------------------------------------------------------------------------ reporting
    def memory(self) -> dict[str, Any]:
        """Resident bytes: stacked factors and cached per-layer maps, in total and per adapter (see engine)."""
        report = self.engine.memory()
        sizes = [self.file_bytes[n] for n in self.names if n in self.file_bytes]
        report["file_bytes_per_adapter"] = sum(sizes) / len(sizes) if sizes else None
        report["parameters_per_adapter"] = sum(self.tuner.lorta_factors[n].num_trainable() for n in self.names) / max(
            1, len(self)
        )
        return report

    def bytes_per_adapter(self) -> float:
        """Resident bytes per adapter for mixed batches (stacked factors + cached maps)."""
        return float(self.memory()["bytes_per_adapter"])

    # ------------------------------------------------------------------------------------------- serving
    def __call__(self, adapter_names: list[str], **inputs: Any) -> Any:
        with torch.no_grad():
            return self.model(**inputs, adapter_names=adapter_names)

    def generate(self, adapter_names: list[str], **kwargs: Any) -> Any:
        return self.model.generate(**kwargs, adapter_names=adapter_names)


def load_adapters(model: nn.Module, source: Source, cache_maps: bool = True, warm: bool = True) -> AdapterBank:
    """An AdapterBank on `model` with the adapters of `source` loaded (see AdapterBank.load)."""
    bank = AdapterBank(model, cache_maps=cache_maps)
    bank.load(source, warm=warm)
    return bank


def _sources(source: Source) -> list[tuple[str, Path]]:
    if isinstance(source, Mapping):
        pairs = [(str(k), Path(v)) for k, v in source.items()]
    elif isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if (root / CONFIG_NAME).is_file():
            pairs = [(root.name, root)]
        elif root.is_dir():
            pairs = [(p.name, p) for p in sorted(root.iterdir()) if (p / CONFIG_NAME).is_file()]
            if not pairs:
                raise FileNotFoundError(f"{root} holds no adapter folder (a sub-folder with {CONFIG_NAME})")
        else:
            raise FileNotFoundError(f"no adapter folder at {root}")
    else:
        pairs = [(Path(p).name, Path(p)) for p in source]
    names = [n for n, _ in pairs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"adapter names {duplicated} appear twice; pass a {{name: path}} mapping instead")
    return pairs


def _read_config(path: Path) -> Any:
    data = json.loads(path.read_text())
    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(data.get("peft_type"))
    if cls is None:
        raise ValueError(f"{path}: peft_type {data.get('peft_type')!r} is not a registered PEFT method")
    known = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in data.items() if k in known})


def _layout_key(config: Any) -> str | None:
    if getattr(config, "modules_to_save", None):  # extra trainable modules: PEFT's loader handles those
        return None
    values = {}
    for field in _LAYOUT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (set, frozenset, list, tuple)) and field != "matrix_names":
            value = sorted(value)
        values[field] = value
    return json.dumps(values, sort_keys=True, default=str)


def _factor_key(key: str, name: str) -> str:
    """'base_model.lorta_factors.A' (or '...lorta_factors.<name>.A') -> 'A'."""
    if "lorta_factors." not in key:
        raise ValueError(f"unexpected tensor {key!r} in a lorta adapter file")
    key = key.split("lorta_factors.", 1)[1]
    return key[len(name) + 1 :] if key.startswith(f"{name}.") else key
