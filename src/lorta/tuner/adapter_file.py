"""What lorta checks in a saved adapter before PEFT loads any of it: the weights file exists, is readable, and holds
exactly this adapter's factors with this model's shapes (names, shapes and dtypes are read from the file's header;
no tensor is loaded). A refusal leaves the model untouched.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .config import AdapterFileError

FACTOR_PREFIX = "base_model.lorta_factors."  # every factor's key in a saved adapter file


def check_adapter_file(directory: str, factors: nn.Module, peft_type: str) -> None:
    """The saved weights exist, are readable, and hold exactly this adapter's factors with this model's shapes."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    safetensors_file = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    bin_file = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(safetensors_file):
        path = safetensors_file
        try:
            from safetensors import safe_open

            with safe_open(safetensors_file, framework="pt") as handle:
                entries = {}
                for key in handle.keys():
                    part = handle.get_slice(key)
                    entries[key] = (tuple(part.get_shape()), part.get_dtype())
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise AdapterFileError(
                f"{safetensors_file} is not a readable safetensors file ({exc}): it is truncated or corrupted. "
                "Save the adapter again or copy it from its source; nothing was loaded or changed"
            ) from exc
    elif os.path.isfile(bin_file):
        path = bin_file
        try:
            tensors = torch.load(bin_file, map_location="meta", weights_only=True)
            entries = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        except Exception as exc:
            raise AdapterFileError(
                f"{bin_file} is not a readable torch file ({exc}): it is truncated or corrupted; nothing was loaded"
            ) from exc
    else:
        present = sorted(os.listdir(directory))[:12] if os.path.isdir(directory) else []
        raise AdapterFileError(
            f"no adapter weights in {directory}: expected {SAFETENSORS_WEIGHTS_NAME} (or {WEIGHTS_NAME}) next to "
            f"adapter_config.json, found {present}. Copy the weights file there or save the adapter again"
        )
    check_factor_entries(entries, factors, peft_type, f"the weights in {path}")


def check_factor_entries(
    entries: dict[str, tuple[tuple[int, ...], Any]], factors: nn.Module, peft_type: str, where: str
) -> None:
    """`entries` ({key: (shape, dtype)}) hold every factor of `factors` once, with its shape, and no other."""
    expected = {FACTOR_PREFIX + k: tuple(v.shape) for k, v in factors.state_dict().items()}
    found = {k: v for k, v in entries.items() if k.startswith(FACTOR_PREFIX)}
    problems = []
    missing = sorted(k.removeprefix(FACTOR_PREFIX) for k in set(expected) - set(found))
    unexpected = sorted(k.removeprefix(FACTOR_PREFIX) for k in set(found) - set(expected))
    if not found:
        sample = sorted(entries)[:3]
        problems.append(f"it holds no lorta factors (keys {FACTOR_PREFIX}*), its keys look like {sample}")
    else:
        if missing:
            problems.append(f"factors {missing} are missing")
        if unexpected:
            problems.append(f"factors {unexpected} are not part of this adapter")
    for key in sorted(set(expected) & set(found)):
        shape, dtype = found[key]
        name = key.removeprefix(FACTOR_PREFIX)
        if tuple(shape) != expected[key]:
            problems.append(f"{name} has shape {list(shape)} there but {list(expected[key])} on this model")
        if not _is_float_dtype(dtype):
            problems.append(f"{name} has dtype {dtype}, expected a floating-point dtype")
    if problems:
        raise AdapterFileError(
            f"{where} do not fit this {peft_type} adapter on this base model: "
            + "; ".join(problems)
            + ". The weights belong to another adapter (method, rank, modes or targets) or are damaged; nothing "
            "was loaded or changed"
        )


def _is_float_dtype(dtype: Any) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return str(dtype).upper() in {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
