"""Compute x @ A once for the matrices that share their input (q, k, v of one attention call).

HF attention modules call q_proj(x), k_proj(x) and v_proj(x) on the same tensor x. LoRTA gives the three the
same input map A, so within one call of the attention module the projection x @ A (and its dropout mask) is
computed once and reused. The scope is opened and closed by hooks on the attention module, so nothing is ever
reused across calls, steps or recomputations (gradient checkpointing re-enters the scope and recomputes).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn


class SharedInputCache:
    def __init__(self) -> None:
        self.depth = 0
        self.entries: dict[tuple[int, Hashable], tuple[Tensor, Tensor]] = {}

    def enter(self, *_: Any, **__: Any) -> None:
        self.depth += 1

    def exit(self, *_: Any, **__: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self.entries.clear()

    def project(self, x: Tensor, P: Tensor, key: Hashable | None, dropout: nn.Module) -> Tensor:
        """dropout(x) @ P (x cast to P's dtype outside autocast), shared within the scope for the same x and key."""
        if key is None or key[-1] is None or self.depth == 0 or torch.compiler.is_compiling():
            return _project(x, P, dropout)
        entry_key = (id(x), key)
        hit = self.entries.get(entry_key)
        if hit is not None and hit[0] is x:
            return hit[1]
        u = _project(x, P, dropout)
        self.entries[entry_key] = (x, u)  # holding x keeps its id from being reused within the scope
        return u

    def hook(self, module: nn.Module) -> list[Any]:
        """Open the scope around `module`'s forward; returns the hook handles."""
        return [
            module.register_forward_pre_hook(self.enter),
            module.register_forward_hook(self.exit, always_call=True),
        ]


def _project(x: Tensor, P: Tensor, dropout: nn.Module) -> Tensor:
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(P.dtype)
    return dropout(x) @ P
