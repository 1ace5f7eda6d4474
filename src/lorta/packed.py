"""Many adapters in one file: 10,000 tenants are one safetensors file, not 10,000 folders.

    base = {"model_shape": {...}, "modules": [...]}      # what the adapters were made for (the caller's dict)
    write_packed("tenants.safetensors", {"user_1": (config, {"A": a, "B": b}), ...}, base)
    append_packed("tenants.safetensors", {"user_2": (config, state)}, base)    # rewrites the file atomically
    with PackedAdapters("tenants.safetensors", base=base) as packed:            # refused if made for another base
        state = packed.state("user_1")      # only its own bytes are read, CRC-32 checked; packed.config("user_1")

The file is plain safetensors (tensors `<adapter>/<key>`, the index in `__metadata__`), so any safetensors reader
opens it. lorta writes it adapter by adapter, in file order, and reads it memory-mapped: a flipped byte fails only
its adapter, a file cut short serves every adapter before the cut. Layout: docs/design.md, "The packed adapter file".
"""

from __future__ import annotations

import json
import math
import mmap
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .saving import write_file

_FORMAT, _VERSION = "lorta.packed", "1"
_RESERVED = "__base__"  # the mixed-batch engine's bare-model row (lorta.tuner.mixed.BASE); not imported: no circle
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
_DTYPES |= {"I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_DTYPES |= {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # safetensors' names
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_ABSENT = object()  # a key one side of a base comparison lacks
_Adapters = Mapping[str, tuple[dict, Mapping[str, torch.Tensor]]]  # name -> (config dict, state)


class PackedFileError(ValueError):
    """A packed file, or one adapter in it, cannot be read; the message names the file, the adapter and the fix."""


def write_packed(path: str | os.PathLike[str], adapters: _Adapters, base: dict, overwrite: bool = False) -> Path:
    """Write `adapters` (name -> (config dict, state)) made for `base` as one file, whole or not at all. Everything
    is checked before the file is touched, so a refusal leaves an existing file as it was."""
    base_json = _json(base, "the base", "pass a dict of plain JSON values identifying the base model")
    configs: dict[str, tuple[int, str]] = {}  # canonical JSON -> (index, JSON): a config shared is stored once
    entries: dict[str, dict[str, Any]] = {}
    tensors: dict[str, tuple[str, list[int], Any]] = {}  # "<adapter>/<key>" -> (dtype name, shape, uint8 array)
    for name, item in adapters.items():
        config, state = _check(name, item)
        text = _json(config, f"the config of adapter {name!r}", "pass its adapter_config.json's content")
        index = configs.setdefault(json.dumps(json.loads(text), sort_keys=True), (len(configs), text))[0]
        crc = 0
        for key in sorted(state):
            tensor = state[key].detach().to("cpu").contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy()  # its bytes (a 0-dim tensor's too), no copy
            crc = zlib.crc32(raw, crc)
            tensors[f"{name}/{key}"] = (_NAMES[tensor.dtype], list(tensor.shape), raw)
        entries[name] = {"config": index, "keys": sorted(state), "crc32": crc}
    metadata = {"format": _FORMAT, "version": _VERSION, "base": base_json, "adapters": json.dumps(entries)}
    metadata["configs"] = "[" + ", ".join(text for _index, text in configs.values()) + "]"
    return write_file(path, lambda tmp: _write_bytes(tmp, _serialise(tensors, metadata)), overwrite)


def append_packed(path: str | os.PathLike[str], adapters: _Adapters, base: dict) -> Path:
    """Add `adapters` to the packed file at `path`: the whole file is rewritten and swapped in atomically, so the old
    file stays intact if anything fails. Refuses a name already in the file and a file made for another base."""
    with PackedAdapters(path) as packed:
        if differ := packed._differences(base):
            raise PackedFileError(
                f"{packed.path} was packed for another base ({'; '.join(differ)}); append only adapters made for "
                "the same base, or write these to a new file with write_packed"
            )
        if taken := [name for name in adapters if name in packed]:
            raise ValueError(f"{packed.path} already holds adapters {taken}; choose other names")
        merged = {name: (packed.config(name), packed.state(name)) for name in packed.names}
    return write_packed(path, {**merged, **adapters}, base, overwrite=True)


class PackedAdapters:
    """A packed file, memory-mapped and read-only: one adapter's state reads only that adapter's bytes."""

    def __init__(self, path: str | os.PathLike[str], base: dict | None = None) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as file:
            self._size = size = os.fstat(file.fileno()).st_size
            self._mmap = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            self._start, self._tensors, meta = self._header(size)
            self.base: dict = self._parse(meta, "base", dict)
            self._configs: list = self._parse(meta, "configs", list)
            self._entries: dict[str, Any] = self._parse(meta, "adapters", dict)
            self.names: list[str] = list(self._entries)
            if base is not None:
                self.check_base(base)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __enter__(self) -> PackedAdapters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the memory map (tensors already read are copies and stay valid)."""
        if self._mmap is not None:
            self._mmap.close()
        self._mmap = None

    def config(self, name: str) -> dict:
        """The adapter's config dict (a copy: changing it leaves the file's untouched)."""
        index = self._entry(name).get("config")
        if not isinstance(index, int) or not 0 <= index < len(self._configs):
            raise self._error(name, f"its config index {index!r} is not one of the file's {len(self._configs)}")
        return json.loads(json.dumps(self._configs[index]))

    def nbytes(self, name: str) -> int:
        """The adapter's tensor bytes, from the header (nothing is read)."""
        return sum(end - begin for _key, _dtype, _shape, begin, end in self._layout(name))

    def state(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The adapter's tensors, read from the mapped bytes and checked against its CRC-32: a problem with this
        adapter's bytes raises PackedFileError for it alone."""
        layout, crc, state, stored = self._layout(name), 0, {}, self._entry(name).get("crc32")
        if self._mmap is None:
            raise ValueError(f"{self.path} is closed; open it again with PackedAdapters(path)")
        with memoryview(self._mmap) as view:
            for key, dtype, shape, begin, end in layout:
                raw = bytearray(view[self._start + begin : self._start + end])  # a copy: the map can close
                crc = zlib.crc32(raw, crc)
                state[key] = torch.frombuffer(raw, dtype=dtype).view(shape) if raw else torch.empty(shape, dtype=dtype)
        if crc != stored:
            raise self._error(
                name,
                f"its bytes fail their checksum (CRC-32 {crc}, the file says {stored}): the file was changed after "
                "it was written; rewrite it with write_packed from the original adapters",
            )
        return {key: tensor.to(device) for key, tensor in state.items()}

    def check_base(self, base: dict) -> None:
        """Refuse a file packed for another base model, naming each differing key."""
        if differ := self._differences(base):
            raise PackedFileError(
                f"{self.path} was packed for another base: {'; '.join(differ)}; load it onto the model its adapters "
                "were made for, or pack the adapters for this base"
            )

    def _differences(self, base: dict) -> list[str]:
        expected = json.loads(_json(base, "the base", "pass a dict of plain JSON values identifying the base model"))
        return [f"{key}: the file has {ours}, expected {theirs}" for key, ours, theirs in _diff(self.base, expected)]

    def _header(self, size: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """Parse the safetensors header ourselves: the data offsets are all a torn file needs to serve the rest."""
        fix = "write it with lorta.packed.write_packed"
        if size < 8 or self._mmap is None:
            raise PackedFileError(f"{self.path} is not a packed adapter file ({size} bytes, no header); {fix}")
        length = int.from_bytes(self._mmap[:8], "little")
        if 8 + length > size:
            raise PackedFileError(
                f"{self.path}: its header is {length} bytes but the file has {size}: it was cut short or is not a "
                f"safetensors file; {fix}"
            )
        try:
            header = json.loads(self._mmap[8 : 8 + length])
        except ValueError as exc:
            header = f"not JSON ({exc})"
        if not isinstance(header, dict):
            what = header if isinstance(header, str) else f"a JSON {type(header).__name__}"
            raise PackedFileError(f"{self.path}: its header is not a safetensors JSON header: {what}; {fix}")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise PackedFileError(f"{self.path} is not a lorta packed adapter file (no format tag {_FORMAT!r}); {fix}")
        if meta.get("version") != _VERSION:
            raise PackedFileError(
                f"{self.path} is packed format version {meta.get('version')!r}, this lorta reads version {_VERSION}: "
                "upgrade lorta, or rewrite the file with this one's write_packed"
            )
        return 8 + length, header, meta

    def _parse(self, meta: dict[str, Any], field: str, kind: type) -> Any:
        try:
            value = json.loads(meta[field])
        except (KeyError, TypeError, ValueError):
            value = None
        if not isinstance(value, kind):
            raise PackedFileError(
                f"{self.path}: its header's {field!r} is not a JSON {kind.__name__}; rewrite it with write_packed"
            )
        return value

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._entries:
            some = ", ".join(self.names[:5]) + (", ..." if len(self.names) > 5 else "")
            raise KeyError(f"{self.path} holds no adapter {name!r}; it holds {len(self.names)} ({some})")
        entry = self._entries[name]
        if not isinstance(entry, dict):
            raise self._error(name, "its index entry is not a JSON object")
        return entry

    def _layout(self, name: str) -> list[tuple[str, torch.dtype, list[int], int, int]]:
        """(key, dtype, shape, begin, end) of each tensor in sorted-key order (the CRC's), every range checked."""
        keys, layout = self._entry(name).get("keys"), []
        if not isinstance(keys, list) or not keys:
            raise self._error(name, "its index entry lists no tensor keys")
        for key in keys:
            info = self._tensors.get(f"{name}/{key}")
            try:
                dtype, shape = _DTYPES[info["dtype"]], [int(n) for n in info["shape"]]
                begin, end = info["data_offsets"]
                sound = isinstance(begin, int) and 0 <= begin and end - begin == math.prod(shape) * dtype.itemsize
            except (KeyError, TypeError, ValueError):
                sound = False
            if not sound or min(shape, default=0) < 0:
                raise self._error(name, f"its tensor {key!r} is missing or malformed in the header ({info!r})")
            layout.append((key, dtype, shape, begin, end))
        last = self._start + max(end for *_rest, end in layout)
        if last > self._size:
            raise self._error(
                name,
                f"its data ends at byte {last} but the file has {self._size} bytes: the file was cut short; "
                "rewrite it with write_packed",
            )
        return layout

    def _error(self, name: str, what: str) -> PackedFileError:
        return PackedFileError(f"adapter {name!r} in {self.path} cannot be read: {what}")


def _check(name: object, item: object) -> tuple[Mapping, Mapping[str, torch.Tensor]]:
    """One adapter of a write: a usable name, a (config, state) pair, a non-empty state of dense tensors."""
    if not isinstance(name, str) or not name or "/" in name or name == _RESERVED:
        raise ValueError(
            f"adapter name {name!r} cannot be packed: a name is a non-empty string without '/' and not {_RESERVED!r} "
            "(the bare model's name in mixed batches); rename it"
        )
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Mapping)):
        raise ValueError(f"adapter {name!r}: pass (config dict, state) for each adapter, got {type(item).__name__}")
    config, state = item
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"adapter {name!r}: its state must be a non-empty mapping of key -> tensor")
    for key, tensor in state.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"adapter {name!r}: state key {key!r} is not a non-empty string; rename it")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            raise ValueError(f"adapter {name!r}: state[{key!r}] is {type(tensor).__name__}, not a dense tensor")
        if tensor.dtype not in _NAMES:
            raise ValueError(f"adapter {name!r}: state[{key!r}] is {tensor.dtype}; convert it to one of {list(_NAMES)}")
    return config, state


def _json(value: object, what: str, fix: str) -> str:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, not {type(value).__name__}; {fix}")
    try:
        return json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable ({exc}); {fix}") from None


def _diff(ours: Any, theirs: Any, path: str = "") -> Iterator[tuple[str, str, str]]:
    """The dotted keys where two JSON values differ (recursing into dicts), with each side's value as JSON."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in [*ours, *(k for k in theirs if k not in ours)]:
            yield from _diff(ours.get(key, _ABSENT), theirs.get(key, _ABSENT), f"{path}.{key}" if path else key)
    elif (mine := _show(ours)) != (other := _show(theirs)):  # JSON text: 1, 1.0 and true differ
        yield path or "(the whole base)", mine, other


def _show(value: Any) -> str:
    return "no such key" if value is _ABSENT else json.dumps(value, sort_keys=True)


def _serialise(tensors: dict[str, tuple[str, list[int], Any]], metadata: dict[str, str]) -> bytes:
    """safetensors' bytes with the data in the order given (adapter by adapter) and without gaps, which it refuses."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # spaces, as safetensors pads: the data starts 8-byte aligned
    return b"".join([len(text).to_bytes(8, "little"), text, *(raw for _dtype, _shape, raw in tensors.values())])


def _write_bytes(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as file:
        file.write(data)
