"""A bank larger than memory: adapters on disk, a bounded resident set, loaded on first use, least recently used out.

    lorta.pack_adapters("tenants.safetensors", "adapters/", model)        # 10,000 folders -> one packed file
    bank = lorta.PagedAdapterBank(model, "tenants.safetensors", resident_limit=512)
    out = bank(["user_17", "__base__", "user_3"], input_ids=ids)          # misses are loaded, LRU ones evicted
    bank.stats                                                             # hits, misses, evictions, ms per miss

The source is a packed file (lorta.packed) or a folder of saved adapters. Adapters already on the model when the bank
is made are pinned: served, never evicted, not counted. A row is always served by the adapter it names: names are
resolved to stack slots at every call, after the misses are loaded (an evicted adapter's slot is free, and reused
only by the adapter loaded into it). An adapter whose file is torn or corrupt refuses the calls that name it, with
the reason; the others keep serving. docs/design.md, "Mixed batches", states the rules.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bank import CONFIG_NAME, AdapterBank, _sources, read_config_dict, read_weights
from .layout import ModelShape
from .packed import PackedAdapters, PackedFileError, append_packed, write_packed
from .tuner.mixed import BASE


def base_record(model: nn.Module) -> dict[str, Any]:
    """What a packed file records of the base model its adapters fit: the shape of its update tensor's modes."""
    tuner = getattr(model, "base_model", model)
    return {"model_shape": ModelShape.from_model(getattr(tuner, "model", tuner)).to_dict()}


class FolderAdapters:
    """Adapters saved as folders under one root (each with adapter_config.json), read on demand."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no adapter folder at {self.root}")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and "/" not in name and name not in ("", ".", "..") and self._has(name)

    def _has(self, name: str) -> bool:
        return (self.root / name / CONFIG_NAME).is_file()

    @property
    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_NAME).is_file())

    def read(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        folder = self.root / name
        return read_config_dict(folder / CONFIG_NAME), read_weights(folder, name)


class _PackedSource:
    def __init__(self, packed: PackedAdapters) -> None:
        self.packed = packed
        self.root = packed.path

    def __contains__(self, name: object) -> bool:
        return name in self.packed

    @property
    def names(self) -> list[str]:
        return list(self.packed.names)

    def read(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.packed.config(name), self.packed.state(name)


class PagedAdapterBank:
    """Serve mixed batches from many more adapters than are resident: `resident_limit` adapters (and at most
    `resident_bytes` of their factors, when given) stay on the model; a call loads the ones it misses first.

    `cache_maps=False` (the default here): a miss then costs one adapter's slot, not a rebuild of every layer's
    cached maps (LoRTA's q, k, v never cache maps: their Q is built per call from the factors, see tuner/mixed.py).
    """

    def __init__(
        self,
        model: nn.Module,
        source: str | os.PathLike | PackedAdapters,
        resident_limit: int = 512,
        resident_bytes: int | None = None,
        cache_maps: bool = False,
    ) -> None:
        if resident_limit < 1 or (resident_bytes is not None and resident_bytes < 1):
            raise ValueError(f"resident_limit ({resident_limit}) and resident_bytes ({resident_bytes}) must be >= 1")
        self.bank = AdapterBank(model, cache_maps=cache_maps)
        self.model = model
        self.source = _open_source(source, model)
        self.resident_limit = resident_limit
        self.resident_bytes = resident_bytes
        self.pinned = set(model.peft_config)
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> factor bytes; least recently used first
        self.stats: dict[str, Any] = {"calls": 0, "hits": 0, "misses": 0, "evictions": 0, "load_s": 0.0}

    # ----------------------------------------------------------------------------------------------- serving
    def __call__(self, adapter_names: Sequence[str], **inputs: Any) -> Any:
        self.ensure(adapter_names)
        with torch.no_grad():
            return self.model(**inputs, adapter_names=list(adapter_names))

    def generate(self, adapter_names: Sequence[str], **kwargs: Any) -> Any:
        self.ensure(adapter_names)
        return self.model.generate(**kwargs, adapter_names=list(adapter_names))

    def ensure(self, adapter_names: Sequence[str]) -> None:
        """Make every adapter `adapter_names` names resident: load the misses, evicting the least recently used."""
        if isinstance(adapter_names, (str, bytes)):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        wanted = [n for n in dict.fromkeys(adapter_names) if n != BASE and n not in self.pinned]
        unknown = [n for n in wanted if n not in self.resident and n not in self.source]
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(map(str, unknown[:20]))}; they are neither "
                f"on the model nor in {self.source.root} (use {BASE!r} for the base model)"
            )
        if len(wanted) > self.resident_limit:
            raise ValueError(
                f"this call names {len(wanted)} distinct adapters but resident_limit is {self.resident_limit}; split "
                f"the batch into calls of at most {self.resident_limit} distinct adapters, or raise resident_limit"
            )
        self.stats["calls"] += 1
        for name in wanted:
            if name in self.resident:
                self.resident.move_to_end(name)
                self.stats["hits"] += 1
        for name in [n for n in wanted if n not in self.resident]:
            self._load(name, keep=set(wanted))

    def _load(self, name: str, keep: set[str]) -> None:
        start = time.perf_counter()
        config, state = self.source.read(name)  # PackedFileError / AdapterFileError: this adapter only
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        if self.resident_bytes is not None and nbytes > self.resident_bytes:
            raise ValueError(f"adapter {name!r} has {nbytes:,} bytes of factors, more than resident_bytes")
        self._make_room(nbytes, keep)
        self.bank.add_state(name, config, state)
        self.resident[name] = nbytes
        self.stats["misses"] += 1
        self.stats["load_s"] += time.perf_counter() - start

    def _make_room(self, nbytes: int, keep: set[str]) -> None:
        def over() -> bool:
            count = len(self.resident) + 1 > self.resident_limit
            size = self.resident_bytes is not None and sum(self.resident.values()) + nbytes > self.resident_bytes
            return count or size

        victims = (n for n in list(self.resident) if n not in keep)
        while over():
            victim = next(victims, None)
            if victim is None:
                raise ValueError(
                    f"the adapters of this call do not fit in resident_bytes={self.resident_bytes:,}; split the batch "
                    "or raise resident_bytes"
                )
            self.bank.remove(victim)
            del self.resident[victim]
            self.stats["evictions"] += 1

    # ----------------------------------------------------------------------------------------------- reporting
    def miss_ms(self) -> float:
        """Mean milliseconds per loaded adapter (read, check, insert; evictions included)."""
        return 1e3 * self.stats["load_s"] / max(1, self.stats["misses"])

    def memory(self) -> dict[str, Any]:
        report = self.bank.engine.memory()
        report.update(resident=len(self.resident), pinned=len(self.pinned), resident_limit=self.resident_limit)
        return report


def _open_source(source: Any, model: nn.Module) -> Any:
    if isinstance(source, PackedAdapters):
        source.check_base(base_record(model))
        return _PackedSource(source)
    path = Path(source)
    if path.is_dir():
        return FolderAdapters(path)
    if path.is_file():
        return _PackedSource(PackedAdapters(path, base=base_record(model)))
    raise FileNotFoundError(f"no packed adapter file or adapter folder at {path}")


def pack_adapters(
    out: str | os.PathLike,
    adapters: str | os.PathLike | Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike],
    model: nn.Module,
    append: bool = False,
    overwrite: bool = False,
) -> Path:
    """Pack saved adapter folders (a folder of them, a list, or {name: folder}) into one file for `model`'s base;
    every folder is read and checked before anything is written (`append`: add them to an existing file)."""
    entries = {}
    for name, folder in _sources(adapters):
        config, state = FolderAdapters(folder.parent).read(folder.name)
        entries[name] = (config, state)
    if append:
        return append_packed(out, entries, base_record(model))
    return write_packed(out, entries, base_record(model), overwrite=overwrite)


__all__ = ["FolderAdapters", "PackedFileError", "PagedAdapterBank", "base_record", "pack_adapters"]
