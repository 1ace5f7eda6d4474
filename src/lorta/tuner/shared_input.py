"""Compute x @ P once for the matrices that share their input (q, k, v of one attention call), and add the
adapter's product to the base output in one fused kernel.

HF attention modules call q_proj(x), k_proj(x) and v_proj(x) on the same tensor x. LoRTA gives the three the
same input map A, so within one call of the attention module the projection x @ A (and its dropout mask) is
computed once and reused, in the single-adapter forward and in mixed-adapter batches alike. The scope is opened
and closed by hooks on the attention module, so nothing is ever reused across calls, steps or recomputations
(gradient checkpointing re-enters the scope and recomputes). docs/design.md, "Caches", states the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor, nn


class SharedInputCache:
    """x @ P within one call of an attention module (docs/design.md, "Caches"): the scope is opened by a forward
    pre-hook and emptied by an always_call forward hook; an entry is keyed by the identity of x (and of any other
    tensors it was computed from, `held`) and holds them, so no other tensor can take their id while it lives."""

    def __init__(self) -> None:
        self.depth = 0  # nested scopes (the attention module called within itself)
        self.entries: dict[tuple[Hashable, ...], tuple[tuple[Any, ...], Tensor]] = {}  # key -> (held objects, value)

    def enter(self, *_: Any, **__: Any) -> None:
        self.depth += 1

    def exit(self, *_: Any, **__: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self.entries.clear()

    def shared(
        self, x: Tensor, key: Hashable | None, compute: Callable[[], Tensor], held: tuple[Any, ...] = ()
    ) -> Tensor:
        """compute(), a product of x (and of `held`), computed once within the scope for the same x, held objects
        and key (None: not shared)."""
        if key is None or self.depth == 0 or torch.compiler.is_compiling():
            return compute()
        sources = (x, *held)
        entry_key = (*map(id, sources), key)
        hit = self.entries.get(entry_key)
        if hit is not None and all(a is b for a, b in zip(hit[0], sources, strict=True)):
            return hit[1]
        u = compute()
        self.entries[entry_key] = (sources, u)  # holding the sources keeps their ids from being reused
        return u

    def project(self, x: Tensor, P: Tensor, key: Hashable | None, dropout: nn.Module) -> Tensor:
        """dropout(x) @ P, shared within the scope for the same x and key."""
        return self.shared(x, key, lambda: _project(x, P, dropout))

    def hook(self, module: nn.Module) -> list[Any]:
        """Open the scope around `module`'s forward; returns the hook handles."""
        return [
            module.register_forward_pre_hook(self.enter),
            module.register_forward_hook(self.exit, always_call=True),
        ]


def adapter_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x as the adapter's maps take it: in their dtype, unless autocast decides the matmul's dtype."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


def _project(x: Tensor, P: Tensor, dropout: nn.Module) -> Tensor:
    return dropout(adapter_input(x, P.dtype)) @ P


def add_product(result: Tensor, u: Tensor, Q: Tensor, scale: float = 1.0, inplace: bool = False) -> Tensor:
    """result + scale * u @ Q, the add fused into the product (addmm; baddbmm for a batch of Q, one per row)
    when the dtypes agree; float32 adapters over a half-precision base add a cast copy instead. `inplace`: add
    into `result` (a base layer's fresh output, outside autograd), saving a copy of it.

    result: (..., d_out) and u: (..., r) with Q: (r, d_out); or result: (B, T, d_out), u: (B, T, r), Q: (B, r, d_out).
    """
    fused = u.dtype == result.dtype == Q.dtype
    if inplace and fused and result.is_contiguous():
        if Q.dim() == 3:
            return result.baddbmm_(u, Q, alpha=scale)
        result.view(-1, result.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), Q, alpha=scale)
        return result
    if Q.dim() == 3:
        if fused:
            return torch.baddbmm(result, u, Q, alpha=scale)
        return result + (torch.bmm(u, Q) * scale).to(result.dtype)
    if fused:
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), u.reshape(-1, u.shape[-1]), Q, alpha=scale)
        return flat.view(result.shape)
    return result + ((u @ Q) * scale).to(result.dtype)
