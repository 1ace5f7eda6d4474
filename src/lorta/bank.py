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
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors.torch import load_file, save_file
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


class AdapterFileError(ValueError):
    """A saved adapter that cannot be loaded (missing, cut short, corrupt, or not fitting its config)."""


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
        self._by_layout: dict[str, dict[str, None]] = {}  # layout key -> adapters of that layout (an ordered set)
        self._layout_of: dict[str, str] = {}  # adapter -> its layout key
        self._fast: set[str] = set()  # adapters this bank wired in itself (evicted without PEFT's module walk)

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
        for name, path in pairs:
            fast += self._load_one(name, Path(path))
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
        active = set(self.model.active_adapters)
        for name in names:
            if name in self._fast and name not in active:
                self._evict(name)
            else:  # an adapter PEFT loaded (or the active one): PEFT's own delete picks the next active adapter
                self.model.delete_adapter(name)
            self.file_bytes.pop(name, None)
            self._fast.discard(name)
            key = self._layout_of.pop(name, None)
            if key is not None:
                self._by_layout[key].pop(name, None)

    def _evict(self, name: str) -> None:
        """What PEFT's delete_adapter does for an inactive, unmerged adapter, on the layers that hold it only."""
        for layer in self._layers():
            if name in layer.lorta_slots:
                if name in layer.merged_adapters:
                    raise ValueError(f"adapter {name!r} is merged into the weights; call unmerge_adapter() first")
                for attr in (*layer.adapter_layer_names, *layer.other_param_names):
                    del getattr(layer, attr)[name]
        del self.model.peft_config[name]
        del self.tuner.lorta_factors[name]

    def warm(self) -> None:
        """Stack the factors and build every layer's maps now, so the next mixed call starts at full speed."""
        self.engine.warm(self._layers())

    def _load_one(self, name: str, path: Path) -> bool:
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}: it is not a saved adapter")
        weights = path / WEIGHTS_NAME
        config = _read_config(config_file)
        template = self._template_for(config)
        if template is None:
            self.model.load_adapter(str(path), adapter_name=name)
            self._remember(name, config)
        else:
            state = read_weights(path, name)
            self._insert(name, config, state, template, str(path))
        self.file_bytes[name] = weights.stat().st_size if weights.is_file() else 0
        return template is not None

    def add_state(self, name: str, config: Any, state: dict[str, torch.Tensor]) -> str:
        """Add adapter `name` from its config (a lorta config, or its adapter_config.json as a dict) and its factor
        tensors ({"A": ..., "B": ...}, as `lorta.packed` stores them), without touching the disk when an adapter of
        the same layout is loaded already (else through PEFT's loader, from a temporary folder)."""
        if name in self.model.peft_config or name == BASE:
            raise ValueError(f"adapter name {name!r} is already loaded (or reserved); remove it first")
        if isinstance(config, dict):
            config = _config_from_dict(config, f"adapter {name!r}")
        template = self._template_for(config)
        if template is not None:
            self._insert(name, config, state, template, "its state")
            return name
        with tempfile.TemporaryDirectory() as tmp:  # the first adapter of a layout: PEFT checks it against the model
            config.save_pretrained(tmp)
            weights = {f"base_model.lorta_factors.{k}": v.contiguous() for k, v in state.items()}
            save_file(weights, str(Path(tmp) / WEIGHTS_NAME))
            self.model.load_adapter(tmp, adapter_name=name)
        self._remember(name, config)
        return name

    def _insert(self, name: str, config: Any, state: dict[str, torch.Tensor], template: str, where: str) -> None:
        """Wire an adapter of `template`'s layout in: nothing is registered unless its tensors fit its config."""
        tuner = self.tuner
        reference = tuner.lorta_factors[template]
        device, dtype = next(reference.parameters()).device, next(reference.parameters()).dtype
        with torch.device("meta"):
            factors = tuner.factorization_cls(config, reference.layout)
        try:
            factors.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
            factors.move_off_meta(device)
        except (RuntimeError, ValueError) as err:
            raise AdapterFileError(f"adapter {name!r} ({where}) does not fit its config: {err}") from None
        factors.to(dtype=dtype).requires_grad_(False)
        config.inference_mode = True
        self.model.peft_config[name] = config
        tuner.lorta_factors[name] = factors
        scaling = config.scale_for(factors.scale_rank)
        for layer in self._layers():  # the wiring PEFT's injection does (TensorAdapterLayer.update_layer)
            if template in layer.lorta_slots:
                layer.update_layer(name, layer.lorta_slots[template], scaling, config.lora_dropout, reactivate=False)
        self._fast.add(name)
        self._remember(name, config)

    def _layers(self) -> list[TensorAdapterLayer]:
        return self.tuner.lorta_state.book.layers

    def _remember(self, name: str, config: Any) -> None:
        key = _layout_key(config)
        if key is not None:
            self._by_layout.setdefault(key, {})[name] = None
            self._layout_of[name] = key

    def _template_for(self, config: Any) -> str | None:
        """A loaded adapter with the layout of `config` (its slots are the new adapter's), or None."""
        key = _layout_key(config)
        if key is None:
            return None
        members = self._by_layout.get(key)
        if not members:  # the first of this layout through this bank: look once through the model's adapters
            for name in self.tuner.lorta_factors:
                existing = self.model.peft_config.get(name)
                if existing is not None and _layout_key(existing) == key:
                    self._remember(name, existing)
            members = self._by_layout.get(key)
        return next(iter(members)) if members else None

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


def read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """A saved adapter's factor tensors by short key ({"A": ...}); AdapterFileError when missing, torn or corrupt."""
    weights = folder / WEIGHTS_NAME
    try:
        state = load_file(str(weights))
    except Exception as err:  # a torn or corrupt file (SafetensorError, OSError)
        raise AdapterFileError(
            f"adapter {name!r}: {weights} cannot be read ({type(err).__name__}: {err}); it is missing, cut short or "
            "corrupt: save the adapter again (save_pretrained writes it whole or not at all)"
        ) from None
    return {_factor_key(k, name): v for k, v in state.items()}


def read_config_dict(path: Path) -> dict[str, Any]:
    """An adapter_config.json as a dict; AdapterFileError when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} cannot be read as JSON ({err}); save the adapter again") from None


def _read_config(path: Path) -> Any:
    return _config_from_dict(read_config_dict(path), str(path))


def _config_from_dict(data: dict[str, Any], where: str) -> Any:
    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(data.get("peft_type")) if isinstance(data, dict) else None
    if cls is None:
        peft_type = data.get("peft_type") if isinstance(data, dict) else data
        raise AdapterFileError(f"{where}: peft_type {peft_type!r} is not a registered PEFT method (import lorta first)")
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
