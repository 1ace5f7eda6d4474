"""A factorisation is plain data (its factors) plus the two thin maps each adapted matrix needs.

Every method of the family reduces, for one adapted matrix, to an input map P (d_in x r') and an output map Q
(r' x d_out) built from the shared factors (DESIGN.md §2):

    delta(x) = scale * (dropout(x) @ P) @ Q          merge: W += scale * (P @ Q)^T

Applying them costs exactly a rank-r' LoRA; building them costs O(r' * d_out) per matrix. The dense update is
never formed in the forward pass.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor, nn

from .layout import EXTRA_IN, IN_HEADS, OUT_HEADS, Slot, TensorLayout


class Factorization(nn.Module):
    """Base class: subclasses register their factors as flat parameters/buffers and implement `maps`."""

    def __init__(self, config, layout: TensorLayout) -> None:
        super().__init__()
        self.layout = layout
        self.scale_rank: int = config.r  # the r of scale = alpha / r

    def maps(self, slot: Slot) -> tuple[Tensor, Tensor]:
        """(P, Q) for one adapted matrix, unscaled."""
        raise NotImplementedError

    def input_key(self, slot: Slot) -> Hashable | None:
        """Slots with equal keys have the same P, so x @ P can be computed once for them (None: never shared)."""
        return None

    def reset(self, init_weights: bool) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def move_off_meta(self, device: torch.device) -> None:
        """low_cpu_mem_usage loading assigns the saved tensors; give any others real storage, then rebuild them."""
        missing = [n for n, p in self.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"the adapter file has no values for factors {missing}; it is incomplete or corrupted")
        for name, buffer in list(self.named_buffers()):
            if buffer.is_meta:  # not in the file by design (e.g. TLoRA's seed-only projections): rebuilt on use
                setattr(self, name, torch.empty_like(buffer, device=device))

    def combined_maps(self, slots: list[Slot]) -> tuple[Tensor, Tensor, Hashable | None]:
        """(P, Q, key) of a module holding one or several matrices (a fused q|k|v projection).

        Without autograd (evaluation, generation) the maps are cached, so a decode step costs exactly LoRA's two
        thin products. The cache is dropped by any forward with autograd (a training step may follow: fused
        optimizers update in place without bumping a tensor's version) and by train()/eval(); a factor replaced
        or updated in place through the version counter (load_state_dict, copy_) also invalidates it.
        """
        if torch.is_grad_enabled():
            self.__dict__.pop("_maps_cache", None)
            return self._build_maps(slots)
        stamp = self._stamp()
        cache = self.__dict__.setdefault("_maps_cache", {})
        hit = cache.get(id(slots))
        if hit is not None and hit[0] == stamp and hit[1] is slots:
            return hit[2]
        maps = self._build_maps(slots)
        cache[id(slots)] = (stamp, slots, maps)
        return maps

    def train(self, mode: bool = True) -> Factorization:
        self.__dict__.pop("_maps_cache", None)
        return super().train(mode)

    def _stamp(self) -> tuple:
        """Changes whenever any factor's values can have changed, or autocast would build the maps differently."""
        tensors = self._tensors()
        kind = tensors[0].device.type
        autocast = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind)
        return (autocast, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))

    def _tensors(self) -> list[Tensor]:
        return [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]

    def _build_maps(self, slots: list[Slot]) -> tuple[Tensor, Tensor, Hashable | None]:
        if len(slots) == 1:
            P, Q = self.maps(slots[0])
            return P, Q, self.input_key(slots[0])
        pairs = [self.maps(s) for s in slots]
        keys = {self.input_key(s) for s in slots}
        if len(keys) == 1 and None not in keys:
            return pairs[0][0], torch.cat([q for _, q in pairs], dim=1), keys.pop()
        P = torch.cat([p for p, _ in pairs], dim=1)
        return P, torch.block_diag(*[q for _, q in pairs]), None

    def delta_weight(self, slots: list[Slot]) -> Tensor:
        """The dense update P @ Q (d_in x d_out), for merging only."""
        P, Q, _ = self.combined_maps(slots)
        return P @ Q

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


def head_maps(role: str, model_factor: Tensor, head_basis: Tensor, core: Tensor) -> tuple[Tensor, Tensor]:
    """P and Q of a head-structured matrix.

    model_factor: (d, ra), the model-dimension side. head_basis: (n_heads, d_h, rb), the head side of each of the
    matrix's heads. core: (n_heads, ra) for CP (a diagonal core, ra == rb) or (n_heads, ra, rb) for Tucker.
    Heads on the output (q, k, v, extra_in):  Q[i, h*d_h + e] = sum_j core[h, i, j] * head_basis[h, e, j], P = A.
    Heads on the input (o, extra_out):        P[h*d_h + e, i] = the same sum, Q = A^T.
    """
    n_heads, d_h, _ = head_basis.shape
    if core.dim() == 2:
        side = head_basis * core[:, None, :]  # (n_heads, d_h, r)
    else:
        side = torch.einsum("hij,hej->hei", core, head_basis)  # (n_heads, d_h, ra)
    if role in (OUT_HEADS, EXTRA_IN):
        return model_factor, side.permute(2, 0, 1).reshape(side.shape[-1], n_heads * d_h)
    if role in (IN_HEADS,) or role == "extra_out":
        return side.reshape(n_heads * d_h, side.shape[-1]), model_factor.t()
    raise ValueError(f"unknown matrix role {role!r}")
