"""Mixed-adapter batches: one adapter name per row, applied with batched matmuls (no loop over adapters).

`model(**inputs, adapter_names=[...])` and `model.generate(..., adapter_names=[...])` give every row its own
adapter ("__base__": the bare model), as PEFT's LoRA does; PEFT's LoRA loops over the distinct adapters of the
batch in every layer, so it slows down as their number grows. Here the hot path is the same for 1 or 4,096
adapters:

    u = bmm(x, P_rows)              x: (B, T, d_in), P_rows: (B, d_in, r') the row's adapter's input map
    y += bmm(u, Q_rows)             Q_rows: (B, r', d_out), the adapter's scale folded in

How the stacks are built (tuner/stacks.py). Adapters of one method with the same layout have factor tensors of
identical shapes: they form a *group*, whose factors live in stacks with a leading slot axis, one slot per adapter
(adding or removing one adapter writes one slot). Maps come from ONE `torch.func.vmap` over `functional_call` of the
factorisation's own code, vectorised over the adapters. Two ways to get Q_rows:

  * factored (a factorisation whose `output_key` splits Q = diag(w) @ Q0, LoRTA's q, k, v): per model call, P and Q0
    of the rows' adapters are built once (one per input key and output key: for LoRTA one A and one B ∘ C_H for
    every layer), and each layer weighs u by its w (B, r'): no per-layer gather, nothing resident but the factors;
  * cached maps (every other layer): per layer (P_all, Q_all) of all slots, a zero adapter appended for "__base__"
    rows and for rows of other groups, gathered per row; `cache_maps=False` keeps only the stacked factors and
    builds the maps of the batch's distinct adapters in each layer call instead (less memory, more work per call).

Slots whose factorisation gives equal `input_key`s share P, and within one attention call x @ P is computed once for
q, k and v.

Caching (docs/design.md, "Caches"). The engine (one per tuner, on its TunerState's caches) checks its stacks once per
forward or generate call against the current VALUES of the adapters the call uses (compared bit for bit with the
stacked copy, a few batched comparisons): an optimizer step, a `p.data.copy_`, an adapter added, removed or moved all
reach the slots and maps they touch, so a mixed batch never answers with factors that are not the current ones.

Rows are resolved once per model call (names -> per-group indices); beam search and num_return_sequences
expand each name to its row's copies (as PEFT does), and encoder rows keep the unexpanded names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .shared_input import adapter_input, add_product
from .stacks import Group, materialise, stack_signature, structure_token

BASE = "__base__"


class MixedBatchEngine:
    """The stacked adapters of one tuner, kept in step with its `lorta_factors` ModuleDict."""

    def __init__(self, factors: nn.ModuleDict, cache_maps: bool = True) -> None:
        self.factors = factors
        self.cache_maps = cache_maps
        self.groups: dict[tuple, Group] = {}  # stack signature -> group
        self.index: dict[str, Group] = {}  # adapter name -> its group
        self._members: dict[str, nn.Module] = {}  # the ModuleDict's contents at the last sync

    def __deepcopy__(self, memo: dict) -> MixedBatchEngine:  # a copied model gets a fresh, empty engine
        return MixedBatchEngine(copy.deepcopy(self.factors, memo), self.cache_maps)

    def __getstate__(self) -> dict[str, Any]:
        return {"factors": self.factors, "cache_maps": self.cache_maps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["factors"], state["cache_maps"])

    def sync(self, used: Sequence[str] | set[str] | None = None) -> None:
        """Slot the adapters added since the last call, free the removed ones, re-slot those of `used` (default:
        all) whose tensors were replaced or moved, and refresh the stacked values of `used`. The cost grows with
        the adapters added, removed or used, not with the adapters resident."""
        current = self.factors._modules
        if current != self._members:  # same names and the very same modules (Module equality is identity)
            removed = [n for n, m in self._members.items() if current.get(n) is not m]
            added = [n for n, m in current.items() if self._members.get(n) is not m]
            self._unslot(removed)
            self._slot(added)
            self._members = dict(current)
        names = list(self.index) if used is None else [n for n in used if n in self.index]
        moved = [n for n in names if structure_token(self.factors[n]) != self.index[n].tokens[n]]
        if moved:
            self._unslot(moved)
            self._slot(moved)
        by_group: dict[int, tuple[Group, list[str]]] = {}
        for name in names:
            group = self.index[name]
            by_group.setdefault(id(group), (group, []))[1].append(name)
        for group, members in by_group.values():
            group.refresh(self.factors, members)

    def _unslot(self, names: list[str]) -> None:
        by_group: dict[int, tuple[Group, list[str]]] = {}
        for name in names:
            group = self.index.pop(name)
            by_group.setdefault(id(group), (group, []))[1].append(name)
        for group, members in by_group.values():
            group.remove(members)
            if not len(group):
                del self.groups[group.signature]

    def _slot(self, names: list[str]) -> None:
        by_group: dict[tuple, list[tuple[str, nn.Module, tuple]]] = {}
        for name in names:
            factors = self.factors[name]
            materialise(factors)
            by_group.setdefault(stack_signature(factors), []).append((name, factors, structure_token(factors)))
        for signature, members in by_group.items():
            group = self.groups.get(signature)
            if group is None:
                group = self.groups[signature] = Group(signature, members[0][1])
            group.add(members)
            for name, _, _ in members:
                self.index[name] = group

    def rows(self, adapter_names: Sequence[str], expand: int = 1) -> MixedRows:
        names = adapter_names if isinstance(adapter_names, Sequence) and not isinstance(adapter_names, str) else []
        self.sync(set(names) - {BASE})
        return MixedRows(self, adapter_names, expand)

    def warm(self, layers: list[nn.Module]) -> None:
        """Build every layer's cached maps now (the layers the factored path does not serve), so the first mixed
        call does not pay for it."""
        self.sync()
        if self.cache_maps:
            for group in self.groups.values():
                for layer in layers:
                    slots = group.layer_slots(layer)
                    if slots is not None and factored_keys(group, layer, slots) is None:
                        group.layer_maps(layer)

    def memory(self) -> dict[str, Any]:
        """Resident bytes of the stacked factors and cached maps, in total and per adapter."""
        self.sync()
        factor = sum(g.nbytes()["factor_bytes"] for g in self.groups.values())
        maps = sum(g.nbytes()["map_bytes"] for g in self.groups.values())
        n = max(1, len(self.index))
        return {
            "adapters": len(self.index),
            "groups": len(self.groups),
            "slots": sum(g.capacity for g in self.groups.values()),
            "factor_bytes": factor,
            "map_bytes": maps,
            "factor_bytes_per_adapter": factor / n,
            "map_bytes_per_adapter": maps / n,
            "bytes_per_adapter": (factor + maps) / n,
        }


def engine_for(state: Any) -> MixedBatchEngine:
    """The mixed-batch engine of a tuner's TunerState (created on first use, shared by the tuner and its layers)."""
    if state.caches.mixed is None:
        state.caches.mixed = MixedBatchEngine(state.factors)
    return state.caches.mixed


def factored_keys(group: Group, layer: nn.Module, slots: list) -> tuple[Hashable, Hashable] | None:
    """(input key, output key) when the group's maps in `layer` split as ((x @ P0) * w) @ Q0 (one matrix, no
    reordered fused output: Factorization.factored_keys); None: the layer takes the cached-maps path."""
    if len(slots) != 1 or layer.lorta_out_order is not None:
        return None
    return group.template.factored_keys(slots[0])


# ------------------------------------------------------------------------------------------------- rows
class RowIndex:
    """One group's slot per row of a batch: `idx` (B,) with the zero adapter for rows outside the group; `slots`
    the same with those rows pointed at a real slot (their weight is masked to zero), `single` the one slot when
    every row uses it."""

    def __init__(self, group: Group, local: list[int]) -> None:
        self.idx = torch.tensor(local, dtype=torch.long, device=group.device)
        inside = self.idx != group.zero
        everywhere = bool(inside.all())
        self.mask = None if everywhere else inside.to(group.dtype)[:, None]
        self.single = everywhere and len(set(local)) == 1
        self.slots = self.idx if everywhere else torch.where(inside, self.idx, self.idx[inside][:1])
        if self.single:
            self.slots = self.slots[:1]


class MixedRows:
    """The adapter of every row of one model call, resolved once into per-group index tensors."""

    def __init__(self, engine: MixedBatchEngine, adapter_names: Sequence[str], expand: int = 1) -> None:
        if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        names = list(adapter_names)
        unknown = sorted({str(n) for n in names if n != BASE and n not in engine.index})
        if unknown:
            known = sorted(engine.index)
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; loaded adapters: "
                f"{known[:20]}{' ...' if len(known) > 20 else ''} (use {BASE!r} for the base model)"
            )
        self.engine = engine
        self.names = names
        self.expand = max(1, int(expand))
        per_group: dict[int, tuple[Group, list[int]]] = {}
        for row, name in enumerate(names):
            if name == BASE:
                continue
            group = engine.index[name]
            if id(group) not in per_group:
                per_group[id(group)] = (group, [group.zero] * len(names))
            per_group[id(group)][1][row] = group.local[name]
        # group, its slot per row, the one slot when every row uses it (plain matmuls, no gather)
        self._plan: list[tuple[Group, list[int], int | None]] = []
        for group, local in per_group.values():
            self._plan.append((group, local, local[0] if len(set(local)) == 1 else None))
        self._by_batch: dict[int, list[tuple[Group, Tensor, int | None, RowIndex]]] = {}
        self.per_call: dict[tuple, Any] = {}  # values built once per model call (gathered P, factored P and Q0)

    def names_for(self, batch: int) -> list[str]:
        """The row names for a batch of `batch` rows (expanded for beams), for PEFT's modules_to_save wrappers."""
        return self.names if batch == len(self.names) else [n for n in self.names for _ in range(self.expand)]

    def once(self, key: tuple, build: Callable[[], Any]) -> Any:
        """build(), once per model call and key."""
        value = self.per_call.get(key)
        if value is None:
            value = self.per_call[key] = build()
        return value

    def resolve(self, batch: int) -> list[tuple[Group, Tensor, int | None, RowIndex]]:
        plan = self._by_batch.get(batch)
        if plan is not None:
            return plan
        n = len(self.names)
        if batch == n:
            repeat = 1
        elif self.expand > 1 and batch == n * self.expand:
            repeat = self.expand
        else:
            hint = f" (or {n * self.expand} with num_beams / num_return_sequences = {self.expand})"
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs: got {n} adapter names "
                f"for a batch of {batch} rows; pass one name per row{hint if self.expand > 1 else ''}"
            )
        plan = []
        for group, local, uniform in self._plan:
            local = [i for i in local for _ in range(repeat)]
            index = RowIndex(group, local)
            plan.append((group, index.idx, uniform, index))
        self._by_batch[batch] = plan
        return plan


def expand_size(kwargs: dict[str, Any], model: nn.Module) -> int:
    """How many copies of each input row `generate` makes: max(num_beams, num_return_sequences), as HF does."""
    generation_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(generation_config, "num_beams", None)) or 1
    returns = kwargs.get("num_return_sequences", getattr(generation_config, "num_return_sequences", None)) or 1
    return max(int(beams), int(returns))


# ----------------------------------------------------------------------------------------------- forward
def check_mixed_allowed(training: bool, merged: bool) -> None:
    """Per-row adapters need eval mode and unmerged weights (PEFT's LoRA refuses with these words)."""
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first")
    if merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first"
        )


def mixed_forward(layer: nn.Module, x: Tensor, adapter_names: Any, *args: Any, **kwargs: Any) -> Tensor:
    """The wrapped layer's forward with one adapter per row; `adapter_names` is a list or a MixedRows."""
    check_mixed_allowed(layer.training, layer.merged)
    state = layer.lorta_state
    rows = adapter_names if isinstance(adapter_names, MixedRows) else engine_for(state).rows(adapter_names)
    plan = rows.resolve(x.shape[0])
    result = layer.base_layer(x, *args, **kwargs)
    if not plan:
        return result
    batch, d_in = x.shape[0], x.shape[-1]
    x3 = x.reshape(batch, -1, d_in)
    for group, idx, uniform, index in plan:
        slots = group.layer_slots(layer)
        if slots is None:
            continue
        keys = factored_keys(group, layer, slots)
        if keys is not None:
            res3 = _factored(rows, group, index, layer, slots[0], keys, x, result.reshape(batch, -1, result.shape[-1]))
            result = res3.view(result.shape)
            continue
        if rows.engine.cache_maps:
            P_all, Q_all, key = group.layer_maps(layer)
        else:
            P_all, Q_all, key, idx, uniform = _batch_maps(group, layer, idx, uniform)

        def project(
            P_all: Tensor = P_all, idx: Tensor = idx, uniform: int | None = uniform, key: Hashable | None = key
        ) -> Tensor:
            xc = adapter_input(x3, P_all.dtype)
            if uniform is not None:  # every row uses one adapter: plain matmuls on its maps, no gather
                return xc @ P_all[uniform]
            P_rows = (
                P_all.index_select(0, idx)
                if key is None
                else rows.once(("P", id(P_all), batch), lambda: P_all.index_select(0, idx))
            )
            return torch.bmm(xc, P_rows)

        # q, k, v of one attention call with equal input keys: x @ P once (the scope clears it after the call)
        shared_key = ("mixed", key) if key is not None else None
        u = state.caches.inputs.shared(x, shared_key, project, held=(rows, P_all))
        Q = Q_all[uniform] if uniform is not None else Q_all.index_select(0, idx)  # the scale is folded into Q
        res3 = add_product(result.reshape(batch, -1, result.shape[-1]), u, Q)
        result = res3.view(result.shape)
    return result


def _factored(
    rows: MixedRows,
    group: Group,
    index: RowIndex,
    layer: nn.Module,
    slot: Any,
    keys: tuple[Hashable, Hashable],
    x: Tensor,
    result: Tensor,
) -> Tensor:
    """result + ((x @ P0_row) * w_row) @ Q0_row: P0 and Q0 of the rows' adapters built once per call and key (shared
    by every layer with that key), w per layer; `index.single`: one adapter for every row, plain matmuls."""
    in_key, out_key = keys
    batch = result.shape[0]
    # the rows' factors, gathered once per call; P0 and Q0 by key (equal keys: equal bases, whichever side asks)
    state = rows.once(("state", id(group), batch), lambda: group.gather(index.slots))

    def basis(method: str, key: Hashable) -> Tensor:
        value = rows.once(("basis", id(group), key, batch), lambda: group.call(method, index.slots, slot, state=state))
        return value[0] if index.single else value

    P, Q0 = basis("input_basis", in_key), basis("output_basis", out_key).transpose(-1, -2)
    columns = group.factored_slots()  # every layer's weights in one vmapped call: (rows, slots, r)
    weights = rows.once(
        ("w", id(group), batch), lambda: group.call("slots_weights", index.slots, list(columns), state=state)
    )
    w = weights[:, columns[slot]] * group.scales(layer, index.slots)[:, None]

    def project() -> Tensor:
        xc = adapter_input(x.reshape(batch, -1, x.shape[-1]), P.dtype)
        return xc @ P if index.single else torch.bmm(xc, P)

    # q, k, v of one attention call read the same x: x @ P once (the scope clears it after the call)
    u = layer.lorta_state.caches.inputs.shared(x, ("factored", id(group), in_key), project, held=(rows, P))
    if index.single:
        return add_product(result, u * w[0].to(u.dtype), Q0, inplace=not torch.is_grad_enabled())
    if index.mask is not None:  # rows outside the group (or "__base__") get a zero weight
        w = w * index.mask
    return add_product(result, u * w[:, None, :].to(u.dtype), Q0, inplace=not torch.is_grad_enabled())


def _batch_maps(
    group: Group, layer: nn.Module, idx: Tensor, uniform: int | None
) -> tuple[Tensor, Tensor, Hashable | None, Tensor, int | None]:
    """cache_maps=False: the maps of the batch's distinct adapters only, built now in one vmapped call."""
    used, inverse = torch.unique(idx, return_inverse=True)
    real = used[used != group.zero]
    P, Q, key = group.compute_maps(layer, real)
    if len(real) < len(used):  # the zero adapter sorts last
        P = torch.cat([P, P.new_zeros(1, *P.shape[1:])])
        Q = torch.cat([Q, Q.new_zeros(1, *Q.shape[1:])])
    return P, Q, None, inverse, (0 if uniform is not None else None)


# ---------------------------------------------------------------------------------------- the model's hook
@contextmanager
def mixed_batch_hooks(
    state: Any,
    model: nn.Module,
    training: bool,
    layers: Sequence[nn.Module],
    kwargs: dict[str, Any],
) -> Iterator[None]:
    """PEFT's `_enable_peft_forward_hooks` for the lorta tuner: hand the resolved rows to every wrapped layer
    (`layers`) and the row names to every modules_to_save wrapper of `model` (PEFT's own per-name loop).

    Names are checked and resolved once here (not per layer); the pre-hooks live only for this call.
    """
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    check_mixed_allowed(training, any(layer.merged for layer in layers))
    if state is None:
        raise ValueError("Cannot pass `adapter_names`: this model holds no lorta adapter")
    rows = engine_for(state).rows(adapter_names, expand_size(kwargs, model))
    wrappers = _auxiliary_wrappers(model)
    handles = []
    state.caches.mixed_call = True  # no single-adapter map frames in this call
    try:
        inject_rows, inject_names = partial(_inject_rows, rows=rows), partial(_inject_names, rows=rows)
        handles += [m.register_forward_pre_hook(inject_rows, with_kwargs=True) for m in layers]
        handles += [m.register_forward_pre_hook(inject_names, with_kwargs=True) for m in wrappers]
        yield
    finally:
        state.caches.mixed_call = False
        for handle in handles:
            handle.remove()


def _auxiliary_wrappers(model: nn.Module) -> list[nn.Module]:
    """PEFT's modules_to_save / trainable-token wrappers in `model`; the walk skips the wrapped layers' per-adapter
    `lorta_dropout` containers, which hold one module per adapter (thousands, in a bank)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, AuxiliaryTrainingWrapper):
            found.append(module)
        stack += [m for name, m in module._modules.items() if m is not None and name != "lorta_dropout"]
    return found


def _inject_rows(module: nn.Module, args: tuple, kwargs: dict[str, Any], rows: MixedRows) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = rows
    return args, kwargs


def _inject_names(module: nn.Module, args: tuple, kwargs: dict[str, Any], rows: MixedRows) -> tuple[tuple, dict]:
    x = args[0] if args else next(iter(kwargs.values()))
    kwargs["adapter_names"] = rows.names_for(x.shape[0])
    return args, kwargs
