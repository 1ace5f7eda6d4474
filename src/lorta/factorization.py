"""A factorisation is plain data (its factors) plus the thin maps each adapted matrix needs (docs/design.md).

Every method of the family reduces, for one adapted matrix, to an input map P (d_in x r') and an output map Q
(r' x d_out) built from the shared factors:

    delta(x) = scale * (dropout(x) @ P) @ Q          merge: W += scale * (P @ Q)^T

Applying them costs exactly a rank-r' LoRA; building them costs O(r' * d_out) per matrix. The dense update is
never formed in the forward pass. A factorisation holds no cache of its maps: when and how often they are built
is the tuner's business (lorta.tuner.maps).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .layout import EXTRA_FREE, EXTRA_IN, EXTRA_OUT, EXTRA_ROLES, IN_HEADS, OUT_HEADS, Slot, TensorLayout


class Factorization(nn.Module):
    """Base class: subclasses register their factors as flat parameters/buffers and write their math once.

    A method with head-structured matrices declares ``batched = True`` and implements `head_side` (the maps of G
    slots with one role and the same heads, batched) and `extra_maps` (an extra matrix's maps); `maps` of one
    slot is `head_side` of a group of one. A method with other structure (TLoRA) overrides `maps` and, for a
    batched forward, `maps_many`.
    """

    batched: ClassVar[bool] = False
    model_input: ClassVar[str | None] = None  # the factor every model-dim input side reads (LoRTA's A)

    def __init__(self, config, layout: TensorLayout) -> None:
        super().__init__()
        self.layout = layout
        self.scale_rank: int = config.r  # the r of scale = alpha / r
        # Copies of each factor: one where the layers (matrices) mode is a mode of the tensor, else one per adapted
        # layer (matrix); set by `_group_counts`.
        self.layer_groups = self.matrix_groups = 1
        self.extra_names: dict[int, str] = {}  # matrix index -> an extra matrix's own side factor
        self.free_inputs: dict[int, str] = {}  # matrix index -> a free extra's own input factor

    def maps(self, slot: Slot) -> tuple[Tensor, Tensor]:
        """(P, Q) for one adapted matrix, unscaled."""
        if slot.role in EXTRA_ROLES:
            return self.extra_maps(slot)
        P, Q = _pq(slot.role, *self.head_side(slot.role, slot.head_slice, slot_index(self, [slot])))
        return P[0], Q[0]

    def head_side(self, role: str, heads: slice, index: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The maps of G head-structured slots: (model-side factor (G, d, r'), head side (G, n_heads, d_h, r')), as
        in `head_maps`. `index` holds the slots' group, layer and matrix indices ("gl", "gm", "l", "m")."""
        raise NotImplementedError

    def extra_maps(self, slot: Slot) -> tuple[Tensor, Tensor]:
        """(P, Q) of an extra (non-attention) matrix."""
        raise NotImplementedError

    def input_key(self, slot: Slot) -> Hashable | None:
        """Slots with equal keys have the same P, so x @ P can be computed once for them (None: never shared): the
        model input of one (layer group, matrix group) is every q, k, v's P there, a free extra's own input its."""
        if self.model_input is None:
            return None
        if slot.role in (OUT_HEADS, EXTRA_IN):
            return (self.model_input, *self._groups(slot))
        if slot.role == EXTRA_FREE:
            return (self.free_inputs[slot.matrix], self._groups(slot)[0])
        return None

    def factored_keys(self, slot: Slot) -> tuple[Hashable, Hashable] | None:
        """(input key, output key) when the slot's maps split as P = P0 diag(w), Q = Q0 (or P = P0, Q = diag(w) Q0)
        with P0 = input_basis and Q0^T = output_basis, bases shared by every slot whose key (on either side) is
        equal; None: no such split. A mixed batch then builds each basis once per call and weighs x @ P0 by w per
        slot (docs/design.md, "Mixed batches")."""
        return None

    def input_basis(self, slot: Slot) -> Tensor:
        """P0 (d_in, r') of the slots sharing the input key."""
        raise NotImplementedError

    def output_basis(self, slot: Slot) -> Tensor:
        """Q0^T (d_out, r'), a basis of the output side (as input_basis is of the input side)."""
        raise NotImplementedError

    def slot_weights(self, slot: Slot) -> Tensor:
        """w (r',) of one slot: (x @ P) @ Q = ((x @ P0) * w) @ Q0."""
        raise NotImplementedError

    def slots_weights(self, slots: list[Slot]) -> Tensor:
        """`slot_weights` of many slots, (len(slots), r'): a mixed call builds every layer's weights at once."""
        return torch.stack([self.slot_weights(s) for s in slots])

    def reset(self, init_weights: bool) -> None:
        raise NotImplementedError

    def fit_start(self, tuner: nn.Module, updates: dict, seed: int, iterations: int, adapter: str) -> bool:
        """Set these factors (float64) to a closed-form least-squares fit of `updates` ({module path: LoraUpdate},
        lorta.lora_fit) and return True, or return False for a shrunk random start refined by Adam. Used by
        import-lora and by add_weighted_adapter's compression."""
        return False

    @torch.no_grad()
    def move_off_meta(self, device: torch.device) -> None:
        """low_cpu_mem_usage loading assigns the saved tensors; give any others real storage, then rebuild them."""
        missing = [n for n, p in self.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"the adapter file has no values for factors {missing}; it is incomplete or corrupted")
        for name, buffer in list(self.named_buffers()):
            if buffer.is_meta:  # not in the file by design (e.g. TLoRA's seed-only projections): rebuilt on use
                setattr(self, name, torch.empty_like(buffer, device=device))

    def maps_many(self, slots: list[Slot], indices: dict | None = None) -> list[tuple[Tensor, Tensor]]:
        """(P, Q) of many slots, equal to `maps` slot by slot.

        Head-structured slots with the same role and heads form a group of G matrices whose maps come from one
        `group_maps` call and are handed out by `unbind`; extra matrices are built one by one. `indices`: the
        caller's memo of the groups' index tensors (they depend on the layout only, never on factor values).
        """
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(slots)
        groups: dict[tuple[str, int, int], list[int]] = {}
        for i, slot in enumerate(slots):
            if not self.batched or slot.role in EXTRA_ROLES:
                out[i] = self.maps(slot)
            else:
                groups.setdefault((slot.role, slot.n_heads, slot.head_stride), []).append(i)
        for (role, n_heads, stride), members in groups.items():
            index = slot_index(self, [slots[i] for i in members], indices)
            P, Q = _pq(role, *self.group_maps(role, slice(0, n_heads * stride, stride), index))
            for i, pair in zip(members, zip(P.unbind(0), Q.unbind(0), strict=True), strict=True):
                out[i] = pair
        return out  # type: ignore[return-value]

    def group_maps(self, role: str, heads: slice, index: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`head_side` of a batched forward's group of slots (one call per group)."""
        return self.head_side(role, heads, index)

    def _group_counts(self, layers_in_tensor: bool, matrices_in_tensor: bool) -> tuple[int, int]:
        """(layer groups, matrix groups): how many copies of each factor the method keeps (see `_groups`)."""
        self.layer_groups = 1 if layers_in_tensor else self.layout.num_layers
        self.matrix_groups = 1 if matrices_in_tensor else self.layout.num_matrices
        return self.layer_groups, self.matrix_groups

    def _groups(self, slot: Slot) -> tuple[int, int]:
        """The (layer group, matrix group) of a slot's factors (0 where that mode is a mode of the tensor)."""
        return (slot.layer if self.layer_groups > 1 else 0, slot.matrix if self.matrix_groups > 1 else 0)

    @torch.no_grad()
    def _init_inputs(self) -> None:
        """The input factors as PEFT LoRA's A, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the model input over d, each
        free extra's own input over its input size."""
        model_input = getattr(self, self.model_input) if self.model_input else None
        inputs = [(model_input, self.layout.model_dim)] if model_input is not None else []
        for m, name in self.free_inputs.items():
            inputs.append((getattr(self, name), self.layout.free_sizes[self.layout.matrix_names[m]][0]))
        for factor, fan_in in inputs:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(factor, -bound, bound)

    # Adapter arithmetic (lorta.arithmetic): attributes that must agree for adapters to combine, the combined
    # adapter's config, and its factors from the parts' (each with the weight folded into one factor per term).
    structure_fields: ClassVar[tuple[str, ...]] = ()

    def config_at_rank(self, config: Any, rank: int) -> Any:
        """`config` at rank `rank` with scale 1 (lora_alpha = r, no rsLoRA): a combined or compressed adapter's."""
        return dataclasses.replace(config, r=rank, lora_alpha=rank, use_rslora=False, init_weights=True)

    def concatenated_config(self, configs: list[Any], rank: int) -> Any:
        """The config of the sum of `configs`' adapters: rank `rank` (the sum of theirs), scale 1."""
        return self.config_at_rank(configs[0], rank)

    exact_concatenation: ClassVar[bool] = False  # True where `concatenate` is implemented

    def concatenate(self, parts: list[tuple[Factorization, float]]) -> dict[str, Tensor]:
        """The factors of sum_i w_i * delta_i (each part's weight already divided by the combined scale)."""
        raise NotImplementedError

    def _tensors(self) -> list[Tensor]:
        return [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


def concat_ranks(parts: list[tuple[Factorization, float]], folded: tuple[str, ...]) -> dict[str, Tensor]:
    """Rank-last factors concatenated along the rank, each part's weight multiplied into the factors `folded`
    (every rank-one term reads exactly one of them)."""
    states = [(part.state_dict(), weight) for part, weight in parts]
    return {
        key: torch.cat([state[key] * weight if key in folded else state[key] for state, weight in states], dim=-1)
        for key in states[0][0]
    }


def slot_index(factors: Factorization, slots: list[Slot], memo: dict | None = None) -> dict[str, Tensor]:
    """Group / layer / matrix index tensors of some slots, on the factors' device; memoised in `memo` (owned by
    the caller) per slot tuple."""
    device = next(iter(factors._tensors())).device
    key = (tuple(id(s) for s in slots), device)
    hit = memo.get(key) if memo is not None else None
    if hit is None:
        groups = [factors._groups(s) for s in slots]
        columns = {
            "gl": [g[0] for g in groups],
            "gm": [g[1] for g in groups],
            "l": [s.layer for s in slots],
            "m": [s.matrix for s in slots],
        }
        hit = (slots, {k: torch.tensor(v, device=device) for k, v in columns.items()})  # slots held: ids stay theirs
        if memo is not None:
            memo[key] = hit
    return hit[1]


def _pq(role: str, model_factor: Tensor, side: Tensor) -> tuple[Tensor, Tensor]:
    """(P, Q) of G head-structured slots, (G, d_in, r') and (G, r', d_out), from `head_side`'s two factors."""
    G, n_heads, d_h, rank = side.shape
    if role == OUT_HEADS:
        return model_factor, side.permute(0, 3, 1, 2).reshape(G, rank, n_heads * d_h)
    return side.reshape(G, n_heads * d_h, rank), model_factor.transpose(1, 2)


def head_maps(role: str, model_factor: Tensor, head_basis: Tensor, core: Tensor) -> tuple[Tensor, Tensor]:
    """P and Q of a matrix from its model-side factor, its head-side basis and the core weights of its heads.

    model_factor: (d, ra), the model-dimension side (a free extra's own input factor). head_basis: (n_heads, d_h,
    rb), the head side of each of the matrix's heads (an extra matrix: one "head" of its own size). core: (n_heads,
    ra) for CP (a diagonal core, ra == rb) or (n_heads, ra, rb) for Tucker.
    Heads on the output (q, k, v, extra_in, extra_free):  Q[i, h*d_h + e] = sum_j core[h, i, j] * head_basis[h, e, j],
                                                          P = model_factor.
    Heads on the input (o, extra_out):                    P[h*d_h + e, i] = the same sum, Q = model_factor^T.
    """
    n_heads, d_h, _ = head_basis.shape
    if core.dim() == 2:
        side = head_basis * core[:, None, :]  # (n_heads, d_h, r)
    else:
        side = torch.einsum("hij,hej->hei", core, head_basis)  # (n_heads, d_h, ra)
    if role in (OUT_HEADS, EXTRA_IN, EXTRA_FREE):
        return model_factor, side.permute(2, 0, 1).reshape(side.shape[-1], n_heads * d_h)
    if role in (IN_HEADS, EXTRA_OUT):
        return side.reshape(n_heads * d_h, side.shape[-1]), model_factor.t()
    raise ValueError(f"unknown matrix role {role!r}")


def gather_groups(factor: Tensor, index: dict[str, Tensor]) -> Tensor:
    """factor[gl_g, gm_g] for every slot g of a group: (G, ...); a broadcast view when both group axes are 1."""
    if factor.shape[0] == factor.shape[1] == 1:
        return factor.view(factor.shape[2:]).expand(len(index["l"]), *factor.shape[2:])
    return factor[index["gl"], index["gm"]]
