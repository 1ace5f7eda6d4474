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

from .layout import EXTRA_IN, EXTRA_OUT, IN_HEADS, OUT_HEADS, Slot, TensorLayout


class MapScope:
    """The maps of one training forward, keyed by module (id of its slot list), with the factors' stamp."""

    def __init__(self, maps: dict[int, tuple[Tensor, Tensor, Hashable | None]], stamp: tuple) -> None:
        self.maps = maps
        self.stamp = stamp
        self.open = True
        self.served: set[int] = set()


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

        In a training forward the maps come from the model-wide scope (`open_scope`) when one is open, else they
        are built for this module alone. Without autograd (evaluation, generation) the maps are cached, so a
        decode step costs exactly LoRA's two thin products. The cache is dropped by any forward with autograd (a
        training step may follow: fused optimizers update in place without bumping a tensor's version) and by
        train()/eval(); a factor replaced or updated in place through the version counter (load_state_dict,
        copy_) also invalidates it.
        """
        if torch.is_grad_enabled():
            self.__dict__.pop("_maps_cache", None)
            hit = self._from_scope(slots)
            return hit if hit is not None else self._build_maps(slots)
        stamp = self._stamp()
        cache = self.__dict__.setdefault("_maps_cache", {})
        hit = cache.get(id(slots))
        if hit is not None and hit[0] == stamp and hit[1] is slots:
            return hit[2]
        maps = self._build_maps(slots)
        cache[id(slots)] = (stamp, slots, maps)
        return maps

    def open_scope(self) -> None:
        """Build the maps of every adapted module at once (`maps_many`) and serve them until `close_scope`.

        Called by a forward pre-hook on the adapted model in training forwards: one vectorised pass (a handful of
        kernels, one autograd node each) replaces the per-module index/multiply ops that make a step launch-bound
        on a GPU. The maps are the same tensors the modules would build; only their bookkeeping is batched.
        """
        modules = list(self.layout.slots.values())
        pairs = iter(self.maps_many([slot for slots in modules for slot in slots]))
        maps = {id(slots): self._combine(slots, [next(pairs) for _ in slots]) for slots in modules}
        self.__dict__["_scope"] = MapScope(maps, self._stamp())

    def close_scope(self) -> None:
        """End the forward's scope; its maps stay available to the recomputation of checkpointed modules."""
        scope = self.__dict__.get("_scope")
        if scope is not None:
            scope.open = False

    def _from_scope(self, slots: list[Slot]) -> tuple[Tensor, Tensor, Hashable | None] | None:
        """The scope's maps for a module: while the forward runs, or when a checkpointed module that used them is
        recomputed during the backward (non-reentrant checkpointing must see the very same tensors again)."""
        scope = self.__dict__.get("_scope")
        hit = scope.maps.get(id(slots)) if scope is not None else None
        if hit is None:
            return None
        if scope.open:
            scope.served.add(id(slots))
            return hit
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and id(slots) in scope.served and scope.stamp == self._stamp():
            return hit
        return None

    def maps_many(self, slots: list[Slot]) -> list[tuple[Tensor, Tensor]]:
        """(P, Q) of many slots, equal to `maps` slot by slot.

        Head-structured slots with the same role and heads form a group of G matrices whose maps come from one
        batched `group_maps` call (when the method has one) and are handed out by `unbind`; extra matrices are
        built one by one.
        """
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(slots)
        groups: dict[tuple[str, int, int], list[int]] = {}
        batched = type(self).group_maps is not Factorization.group_maps
        for i, slot in enumerate(slots):
            if not batched or slot.role in (EXTRA_IN, EXTRA_OUT):
                out[i] = self.maps(slot)
            else:
                groups.setdefault((slot.role, slot.n_heads, slot.head_stride), []).append(i)
        for (role, n_heads, stride), members in groups.items():
            index = self._slot_index([slots[i] for i in members])
            model_factor, side = self.group_maps(role, slice(0, n_heads * stride, stride), index)
            G, n_heads, d_h, rank = side.shape
            if role == OUT_HEADS:
                P, Q = model_factor, side.permute(0, 3, 1, 2).reshape(G, rank, n_heads * d_h)
            else:
                P, Q = side.reshape(G, n_heads * d_h, rank), model_factor.transpose(1, 2)
            for i, pair in zip(members, zip(P.unbind(0), Q.unbind(0), strict=True), strict=True):
                out[i] = pair
        return out  # type: ignore[return-value]

    def group_maps(self, role: str, heads: slice, index: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Batched maps of G slots: (model-side factor (G, d, r'), head side (G, n_heads, d_h, r')), as in
        `head_maps`. `index` holds the slots' group, layer and matrix indices ("gl", "gm", "l", "m")."""
        raise NotImplementedError

    def _groups(self, slot: Slot) -> tuple[int, int]:
        """The (layer group, matrix group) of a slot's factors (0 where that mode is shared)."""
        raise NotImplementedError

    def _slot_index(self, slots: list[Slot]) -> dict[str, Tensor]:
        """Group / layer / matrix index tensors of some slots, on the factors' device (cached per slot tuple)."""
        device = next(iter(self._tensors())).device
        cache = self.__dict__.setdefault("_index_cache", {})
        key = (tuple(id(s) for s in slots), device)
        hit = cache.get(key)
        if hit is None:
            groups = [self._groups(s) for s in slots]
            columns = {
                "gl": [g[0] for g in groups], "gm": [g[1] for g in groups],
                "l": [s.layer for s in slots], "m": [s.matrix for s in slots],
            }
            hit = cache[key] = (slots, {k: torch.tensor(v, device=device) for k, v in columns.items()})
        return hit[1]

    def train(self, mode: bool = True) -> Factorization:
        self.__dict__.pop("_maps_cache", None)
        self.__dict__.pop("_scope", None)
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
        return self._combine(slots, [self.maps(s) for s in slots])

    def _combine(self, slots: list[Slot], pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Hashable | None]:
        """One module's (P, Q, key) from its slots' maps: shared P with side-by-side Q, else block-diagonal."""
        if len(slots) == 1:
            P, Q = pairs[0]
            return P, Q, self.input_key(slots[0])
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


def gather_groups(factor: Tensor, index: dict[str, Tensor]) -> Tensor:
    """factor[gl_g, gm_g] for every slot g of a group: (G, ...); a broadcast view when both group axes are 1."""
    if factor.shape[0] == factor.shape[1] == 1:
        return factor.view(factor.shape[2:]).expand(len(index["l"]), *factor.shape[2:])
    return factor[index["gl"], index["gm"]]
