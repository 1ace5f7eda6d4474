"""The one place lorta wraps a PEFT function: `PeftModel.save_pretrained`, made crash-safe for lorta models.

`install` (run once by ``import lorta``) replaces ``PeftModel.save_pretrained`` with a wrapper that sends a lorta
model's save through `lorta.saving.atomic_save` (written whole or not at all) and calls PEFT's own method,
unchanged, for everything else: a model with a non-lorta adapter, a non-main process, a path that is a file, or
positional arguments beyond PEFT's signature. tests/test_structure.py checks that a plain PEFT LoRA model saves
the same bytes with and without ``import lorta``.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from . import saving
from .registry import is_lorta_model

__all__ = ["install"]

_MARK = "__lorta_atomic__"


def install() -> None:
    """Wrap PeftModel.save_pretrained once (idempotent)."""
    from peft import PeftModel

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
