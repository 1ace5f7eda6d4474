"""Stacked factors for mixed-adapter batches: adapters of equal factor shapes share stacks, one slot each.

A group's stacks hold every factor tensor with a leading slot axis (capacity, ...). An adapter added to the group
takes a free slot (a removed adapter's, else a new one: the stacks grow by a quarter), so adding or removing one
adapter writes one slot, never restacks the others: a bank of thousands of adapters adds and evicts in O(1).
docs/design.md, "Mixed batches", gives the rules.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .maps import module_maps


def factor_tensors(factors: nn.Module) -> list[tuple[str, Tensor]]:
    if not factors._modules:  # factorisations are flat: read their own dicts (the per-call check reads thousands)
        held = (*factors._parameters.items(), *factors._buffers.items())
        return [(k, t) for k, t in held if t is not None]
    return [*factors.named_parameters(), *factors.named_buffers()]


def structure_token(factors: nn.Module) -> tuple:
    """Changes whenever a factor tensor is replaced or moved: the STRUCTURE key of an adapter (its values are
    compared separately, see Group.refresh)."""
    out: list[Any] = [id(factors)]
    for module in factors.modules() if factors._modules else (factors,):  # factorisations are flat: no walk
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                out.append((id(t), t.data_ptr(), tuple(t.shape), t.dtype, t.device))
    return tuple(out)


def stack_signature(factors: nn.Module) -> tuple:
    """Adapters with equal signatures can be stacked and share one maps computation."""
    tensors = tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in factor_tensors(factors))
    slots = tuple((k, tuple(v)) for k, v in factors.layout.slots.items())
    scalars = tuple(
        sorted(
            (k, repr(v))
            for k, v in vars(factors).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple, dict))
        )
    )
    return (type(factors), tensors, slots, scalars)


def materialise(factors: nn.Module) -> None:
    """Lazily built buffers (TLoRA's seed-only projections) exist before stacking."""
    slots = next(iter(factors.layout.slots.values()), None)
    if slots is not None:
        with torch.no_grad():
            module_maps(factors, slots)


class _Call(nn.Module):
    """Lets functional_call run a method of a factorisation with swapped-in (stacked) tensors."""

    def __init__(self, factors: nn.Module) -> None:
        super().__init__()
        self.f = factors

    def forward(self, method: str, *args: Any) -> Any:
        with torch.enable_grad():  # the stacked tensors do not require grad, so no graph is recorded
            if method == "module_maps":
                P, Q, key = module_maps(self.f, *args[:2])
                args[2].append(key)
                return P, Q
            return getattr(self.f, method)(*args)


class Group:
    """Adapters whose factors stack: the stacks (one slot per adapter), and per-layer maps built from them."""

    def __init__(self, signature: tuple, template: nn.Module) -> None:
        self.signature = signature
        self.template = template  # any member: only its structure is read (its tensors are swapped out)
        self.slot_names: list[str | None] = []
        self.local: dict[str, int] = {}  # adapter name -> its slot
        self.tokens: dict[str, tuple] = {}
        self._free: list[int] = []  # a heap: the lowest free slot is taken first, so slots stay dense
        self.state: dict[str, Tensor] = {}
        self._factored: dict | None = None
        self._added: list[str] = []  # every adapter ever slotted here, in order (layer_slots checks the new ones)
        # layer -> (the members' slots | None, how many of `_added` were checked against them)
        self.checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        t = factor_tensors(template)[0][1]
        self.device, self.dtype = t.device, t.dtype
        self.drop_maps()

    # ------------------------------------------------------------------------------------------- slots
    @property
    def capacity(self) -> int:
        return len(self.slot_names)

    @property
    def zero(self) -> int:
        """The index of the zero adapter in the maps ("__base__" rows and other groups' rows): after the slots."""
        return self.capacity

    def __len__(self) -> int:
        return len(self.local)

    def add(self, members: Iterable[tuple[str, nn.Module, tuple]]) -> None:
        """Put adapters into free slots (growing the stacks once for all of them) and write their values."""
        members = list(members)
        short = len(members) - len(self._free)
        if short > 0:
            self._grow(max(short, self.capacity // 4))
        with torch.no_grad():
            for name, factors, token in members:
                slot = heapq.heappop(self._free)
                self.slot_names[slot], self.local[name], self.tokens[name] = name, slot, token
                self._added.append(name)
                for key, value in factor_tensors(factors):
                    self.state[key][slot] = value.detach()
        self.drop_maps()

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            slot = self.local.pop(name)
            self.tokens.pop(name)
            self.slot_names[slot] = None
            heapq.heappush(self._free, slot)
            with torch.no_grad():  # a freed slot holds zeros: nothing of the old adapter stays resident
                for stacked in self.state.values():
                    stacked[slot].zero_()
        self.drop_maps()

    def _grow(self, extra: int) -> None:
        old = self.capacity
        with torch.no_grad():
            for key, value in factor_tensors(self.template):
                grown = value.new_zeros(old + extra, *value.shape)
                if old:
                    grown[:old] = self.state[key]
                self.state[key] = grown
        self.slot_names += [None] * extra
        for slot in range(old, old + extra):
            heapq.heappush(self._free, slot)

    def refresh(self, factors: nn.ModuleDict, used: Iterable[str]) -> None:
        """Compare the current values of the adapters of this call with their slots (a few batched ops per factor
        name, none per adapter); copy in the slots that differ and drop the maps."""
        names = [n for n in used if n in self.local]
        if not names:
            return
        rows = torch.tensor([self.local[n] for n in names], device=self.device)
        members = [dict(factor_tensors(factors[n])) for n in names]
        with torch.no_grad():
            current = {k: torch.stack([m[k] for m in members]) for k in self.state}
            changed = None
            for key, stacked in self.state.items():
                differs = (current[key] != stacked.index_select(0, rows)).flatten(1).any(1)
                changed = differs if changed is None else changed | differs
            if not bool(changed.any()):
                return
            for key, stacked in self.state.items():
                stacked[rows[changed]] = current[key][changed]
        self.drop_maps()

    def drop_maps(self) -> None:
        self.maps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (P_all, Q_all, key) | None
        self.shared_P: dict[Hashable, Tensor] = {}

    # ------------------------------------------------------------------------------------------- maps
    def gather(self, index: Tensor) -> dict[str, Tensor]:
        """The stacked tensors of the slots `index` (the stacks themselves when `index` is every slot in order)."""
        if len(index) == self.capacity and bool((index == torch.arange(self.capacity, device=index.device)).all()):
            return self.state
        return {k: v.index_select(0, index) for k, v in self.state.items()}

    def call(self, method: str, index: Tensor, *args: Any, state: dict[str, Tensor] | None = None) -> Any:
        """`template.method(*args)` for the adapters in slots `index` (whose tensors `state` holds, when the caller
        gathered them already), vectorised over them (one vmap)."""
        state = {f"f.{k}": v for k, v in (state if state is not None else self.gather(index)).items()}
        wrapper = _Call(self.template)
        with torch.no_grad():
            return vmap(lambda s: functional_call(wrapper, s, (method, *args)))(state)

    def factored_slots(self) -> dict:
        """Every slot of the layout whose maps split (Factorization.factored_keys), by slot -> its column."""
        if self._factored is None:
            slots = [s for v in self.template.layout.slots.values() for s in v if self.template.factored_keys(s)]
            self._factored = {s: j for j, s in enumerate(dict.fromkeys(slots))}
        return self._factored

    def scales(self, layer: nn.Module, index: Tensor) -> Tensor:
        """Each slot's scale in `layer` (0 for a free slot)."""
        names = [self.slot_names[i] for i in index.tolist()]
        values = [layer.lorta_scaling[n] if n is not None else 0.0 for n in names]
        return torch.tensor(values, dtype=self.dtype, device=self.device)

    def compute_maps(self, layer: nn.Module, index: Tensor | None = None) -> tuple[Tensor, Tensor, Hashable | None]:
        """(P, Q, key) of `layer` for the slots `index` (default: all), scale folded into Q, unpadded."""
        if index is None:
            index = torch.arange(self.capacity, device=self.device)
        slots, keys = layer.lorta_slots[next(iter(self.local))], []
        P, Q = self.call("module_maps", index, slots, layer.lorta_out_order, keys)
        return P, Q * self.scales(layer, index)[:, None, None], keys[0]

    def layer_slots(self, layer: nn.Module) -> list | None:
        """The slots of this group's adapters in `layer` (None: the group does not adapt it)."""
        slots, seen = self.checked.get(layer, (None, 0))
        if seen == len(self._added):
            return slots
        if seen == 0:
            slots = layer.lorta_slots.get(next(iter(self.local)))
        # only the adapters added since this layer was last checked (a bank's miss must not re-check thousands)
        if any(layer.lorta_slots.get(n) != slots for n in self._added[seen:] if n in self.local):
            raise ValueError(f"adapters {sorted(self.local)[:8]} share factor shapes but not their slots in {layer!r}")
        self.checked[layer] = (slots, len(self._added))
        return slots

    def layer_maps(self, layer: nn.Module) -> tuple[Tensor, Tensor, Hashable | None] | None:
        """Cached (P_all, Q_all, key) with the zero adapter last; None when the group does not adapt `layer`."""
        try:
            return self.maps[layer]
        except KeyError:
            pass
        if self.layer_slots(layer) is None:
            self.maps[layer] = None
            return None
        P, Q, key = self.compute_maps(layer)
        P = torch.cat([P, P.new_zeros(1, *P.shape[1:])])
        Q = torch.cat([Q, Q.new_zeros(1, *Q.shape[1:])])
        if key is not None:  # equal input keys mean equal P (Factorization.input_key): store it once
            P = self.shared_P.setdefault(key, P)
        self.maps[layer] = (P, Q, key)
        return self.maps[layer]

    def nbytes(self) -> dict[str, int]:
        seen: dict[int, int] = {}
        for entry in list(self.maps.values()):
            if entry is not None:
                for t in entry[:2]:
                    seen[t.data_ptr()] = t.numel() * t.element_size()
        factors = sum(t.numel() * t.element_size() for t in self.state.values())
        return {"factor_bytes": factors, "map_bytes": sum(seen.values())}
