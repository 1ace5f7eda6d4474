"""Mixed-adapter batches: one adapter name per row, applied with batched matmuls (no loop over adapters).

`model(**inputs, adapter_names=[...])` and `model.generate(..., adapter_names=[...])` give every row its own
adapter ("__base__": the bare model), as PEFT's LoRA does; PEFT's LoRA loops over the distinct adapters of the
batch in every layer, so it slows down as their number grows. Here the hot path is the same for 1 or 256 adapters:

    u = bmm(x, P_all[idx])          x: (B, T, d_in), P_all: (n + 1, d_in, r'), idx: (B,) the row's adapter
    y += bmm(u, Q_all[idx])         Q_all: (n + 1, r', d_out), the adapter's scale folded in

How the stacks are built. Adapters of one method with the same layout have factor tensors of identical shapes:
they form a *group*, whose factors are stacked once into tensors with a leading adapter axis (n, ...). For each
wrapped layer the group's maps come from ONE `torch.func.vmap` over `functional_call(factors, stacked,
_build_maps(slots))`, i.e. the very code the single-adapter forward runs, vectorised over the adapters; a zero
adapter is appended for "__base__" rows and for rows whose adapter belongs to another group. Slots whose
factorisation gives equal `input_key`s share P (LoRTA's A: one P for every q, k, v of every layer when layers is
a mode), and within one attention call x @ P is gathered and computed once for q, k and v.

Caching (docs/design.md, "Caches"). The engine (one per tuner, on its TunerState's caches) keeps the stacked factors
and the per-layer maps from call to call, and checks them once per forward or generate call against the current
VALUES of the adapters the call uses (flattened and compared bit for bit with the stacked copy, in one comparison):
an optimizer step, a `p.data.copy_`, an adapter added or removed all rebuild the maps of the groups they touch, so a
mixed batch never answers with maps of factors that are not the current ones. `cache_maps=False` keeps only the
stacked factors and builds the maps of the batch's distinct adapters in each layer call (vectorised too): less
memory, more work per call.

Rows are resolved once per model call (names -> per-group indices); beam search and num_return_sequences
expand each name to its row's copies (as PEFT does), and encoder rows keep the unexpanded names.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .maps import module_maps
from .shared_input import adapter_input, add_product

BASE = "__base__"


# ------------------------------------------------------------------------------------------ stacked factors
def _tensors(factors: nn.Module) -> list[tuple[str, Tensor]]:
    return [*factors.named_parameters(), *factors.named_buffers()]


def _token(factors: nn.Module) -> tuple:
    """Changes whenever a factor tensor is replaced or moved: the STRUCTURE key of an adapter (its values are
    compared separately, see Group.refresh)."""
    out: list[Any] = [id(factors)]
    for module in factors.modules() if factors._modules else (factors,):  # factorisations are flat: no walk
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                out.append((id(t), t.data_ptr(), tuple(t.shape), t.dtype, t.device))
    return tuple(out)


def _signature(factors: nn.Module) -> tuple:
    """Adapters with equal signatures can be stacked and share one maps computation."""
    tensors = tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in _tensors(factors))
    slots = tuple((k, tuple(v)) for k, v in factors.layout.slots.items())
    scalars = tuple(
        sorted(
            (k, repr(v))
            for k, v in vars(factors).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple, dict))
        )
    )
    return (type(factors), tensors, slots, scalars)


class _Maps(nn.Module):
    """Lets functional_call run `module_maps` of a factorisation with swapped-in (stacked) tensors."""

    def __init__(self, factors: nn.Module) -> None:
        super().__init__()
        self.f = factors

    def forward(self, slots: list, order: Tensor | None, keys: list) -> tuple[Tensor, Tensor]:
        # The stacked tensors do not require grad, so no graph is recorded.
        with torch.enable_grad():
            P, Q, key = module_maps(self.f, slots, order)
        keys.append(key)
        return P, Q


class Group:
    """Adapters whose factors stack: their stacked state, and the per-layer maps built from it (lazily)."""

    def __init__(self, names: list[str], factors: list[nn.Module], tokens: list[tuple]) -> None:
        self.names = names
        self.tokens = tokens
        self.template = factors[0]
        self.local = {n: i for i, n in enumerate(names)}
        self.zero = len(names)  # the index of the zero adapter ("__base__" and other groups' rows)
        self.state = self._stack(factors)
        t = next(iter(self.state.values()))
        self.device, self.dtype = t.device, t.dtype
        self.maps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (P_all, Q_all, key) | None
        self.shared_P: dict[Hashable, Tensor] = {}

    @property
    def key(self) -> tuple:
        return (tuple(self.names), tuple(self.tokens))

    def _stack(self, factors: list[nn.Module]) -> dict[str, Tensor]:
        with torch.no_grad():
            return {
                k: torch.stack([dict(_tensors(f))[k].detach() for f in factors]) for k, _ in _tensors(self.template)
            }

    def refresh(self, factors: dict[str, nn.Module], used: Sequence[str] | None = None) -> None:
        """Compare the current values of the adapters of this call (`used`; default all) with the stacked ones, a
        few batched ops per factor name (none per adapter); copy in the rows that differ and drop the maps."""
        names = [n for n in self.names if used is None or n in used]
        if not names:
            return
        rows = torch.tensor([self.local[n] for n in names], device=self.device)
        members = [dict(_tensors(factors[n])) for n in names]
        with torch.no_grad():
            current = {k: torch.stack([m[k] for m in members]) for k in self.state}  # (no_grad: no graph)
            changed = None
            for key, stacked in self.state.items():
                differs = (current[key] != stacked.index_select(0, rows)).flatten(1).any(1)
                changed = differs if changed is None else changed | differs
            if not bool(changed.any()):
                return
            for key, stacked in self.state.items():
                stacked[rows[changed]] = current[key][changed]
        self.maps = weakref.WeakKeyDictionary()
        self.shared_P = {}

    def compute_maps(self, layer: nn.Module, index: Tensor | None = None) -> tuple[Tensor, Tensor, Hashable | None]:
        """(P, Q, key) of `layer` for the group's adapters (or those at `index`), scale folded into Q, unpadded."""
        slots = layer.lorta_slots[self.names[0]]
        wrapper, keys, order = _Maps(self.template), [], layer.lorta_out_order
        state = {f"f.{k}": (v if index is None else v.index_select(0, index)) for k, v in self.state.items()}
        with torch.no_grad():
            P, Q = vmap(lambda s: functional_call(wrapper, s, (slots, order, keys)))(state)
            names = self.names if index is None else [self.names[i] for i in index.tolist()]
            scale = torch.tensor([layer.lorta_scaling[n] for n in names], dtype=Q.dtype, device=Q.device)
            Q = Q * scale[:, None, None]
        return P, Q, keys[0]

    def layer_maps(self, layer: nn.Module) -> tuple[Tensor, Tensor, Hashable | None] | None:
        """Cached (P_all, Q_all, key) with the zero adapter last; None when the group does not adapt `layer`."""
        try:
            return self.maps[layer]
        except KeyError:
            pass
        slots = layer.lorta_slots.get(self.names[0])
        if slots is None:
            self.maps[layer] = None
            return None
        if any(layer.lorta_slots.get(n) != slots for n in self.names):
            raise ValueError(f"adapters {self.names} share factor shapes but not their slots in {layer!r}")
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


class MixedBatchEngine:
    """The stacked adapters of one tuner, kept in step with its `lorta_factors` ModuleDict."""

    def __init__(self, factors: nn.ModuleDict, cache_maps: bool = True) -> None:
        self.factors = factors
        self.cache_maps = cache_maps
        self.groups: list[Group] = []
        self.index: dict[str, tuple[int, int]] = {}  # adapter name -> (group, row in the group's stack)
        self._state: tuple | None = None
        self._sigs: dict[str, tuple[tuple, tuple]] = {}  # name -> (token, signature)

    def __deepcopy__(self, memo: dict) -> MixedBatchEngine:  # a copied model gets a fresh, empty engine
        return MixedBatchEngine(copy.deepcopy(self.factors, memo), self.cache_maps)

    def __getstate__(self) -> dict[str, Any]:
        return {"factors": self.factors, "cache_maps": self.cache_maps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["factors"], state["cache_maps"])

    def sync(self, used: Sequence[str] | None = None) -> None:
        """Regroup when adapters were added, removed or replaced; refresh the stacked values of the adapters `used`
        by this call (default: all) that changed."""
        items = list(self.factors.items())
        state = tuple((n, _token(f)) for n, f in items)
        if state == self._state:
            for group in self.groups:
                group.refresh(self.factors, used)
            return
        entries: dict[tuple, list[tuple[str, nn.Module, tuple]]] = {}
        for name, f in items:
            token = _token(f)
            cached = self._sigs.get(name)
            if cached is None or cached[0] != token:
                _materialise(f)  # lazily built buffers (TLoRA's seed-only projections) exist before stacking
                token = _token(f)
                cached = (token, _signature(f))
                self._sigs[name] = cached
            entries.setdefault(cached[1], []).append((name, f, token))
        self._sigs = {n: v for n, v in self._sigs.items() if n in self.factors}
        old = {g.key: g for g in self.groups}
        groups = []
        for members in entries.values():
            names, mods, tokens = [m[0] for m in members], [m[1] for m in members], [m[2] for m in members]
            kept = old.get((tuple(names), tuple(tokens)))
            if kept is not None:
                kept.refresh(self.factors, used)
            groups.append(kept or Group(names, mods, tokens))
        self.groups = groups
        self.index = {n: (gi, i) for gi, g in enumerate(groups) for i, n in enumerate(g.names)}
        self._state = tuple((n, _token(f)) for n, f in self.factors.items())

    def rows(self, adapter_names: Sequence[str], expand: int = 1) -> MixedRows:
        names = adapter_names if isinstance(adapter_names, Sequence) and not isinstance(adapter_names, str) else []
        self.sync(set(names))
        return MixedRows(self, adapter_names, expand)

    def warm(self, layers: list[nn.Module]) -> None:
        """Build every layer's maps now, so the first mixed call does not pay for it."""
        self.sync()
        if self.cache_maps:
            for group in self.groups:
                for layer in layers:
                    group.layer_maps(layer)

    def memory(self) -> dict[str, Any]:
        """Resident bytes of the stacked factors and cached maps, in total and per adapter."""
        self.sync()
        factor = sum(g.nbytes()["factor_bytes"] for g in self.groups)
        maps = sum(g.nbytes()["map_bytes"] for g in self.groups)
        n = max(1, len(self.index))
        return {
            "adapters": len(self.index),
            "groups": len(self.groups),
            "factor_bytes": factor,
            "map_bytes": maps,
            "factor_bytes_per_adapter": factor / n,
            "map_bytes_per_adapter": maps / n,
            "bytes_per_adapter": (factor + maps) / n,
        }


def _materialise(factors: nn.Module) -> None:
    slots = next(iter(factors.layout.slots.values()), None)
    if slots is not None:
        with torch.no_grad():
            module_maps(factors, slots)


def engine_for(state: Any) -> MixedBatchEngine:
    """The mixed-batch engine of a tuner's TunerState (created on first use, shared by the tuner and its layers)."""
    if state.caches.mixed is None:
        state.caches.mixed = MixedBatchEngine(state.factors)
    return state.caches.mixed


# ------------------------------------------------------------------------------------------------- rows
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
        per_group: dict[int, list[int]] = {}
        for row, name in enumerate(names):
            if name == BASE:
                continue
            gi, local = engine.index[name]
            if gi not in per_group:
                per_group[gi] = [engine.groups[gi].zero] * len(names)
            per_group[gi][row] = local
        # group, local indices, the one adapter when every row uses it (plain matmuls, no gather)
        self._plan: list[tuple[Group, list[int], int | None]] = []
        for gi, local in per_group.items():
            used = set(local)
            group = engine.groups[gi]
            uniform = local[0] if len(used) == 1 else None
            self._plan.append((group, local, uniform))
        self._by_batch: dict[int, list[tuple[Group, Tensor, int | None]]] = {}
        self.gathered: dict[tuple[int, int], Tensor] = {}  # per-call gathers of shared P (id(P_all), batch)

    def names_for(self, batch: int) -> list[str]:
        """The row names for a batch of `batch` rows (expanded for beams), for PEFT's modules_to_save wrappers."""
        return self.names if batch == len(self.names) else [n for n in self.names for _ in range(self.expand)]

    def resolve(self, batch: int) -> list[tuple[Group, Tensor, int | None]]:
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
            idx = torch.tensor(local, dtype=torch.long, device=group.device)
            plan.append((group, idx.repeat_interleave(repeat) if repeat > 1 else idx, uniform))
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
    for group, idx, uniform in plan:
        if rows.engine.cache_maps:
            maps = group.layer_maps(layer)
            if maps is None:
                continue
            P_all, Q_all, key = maps
        else:
            if layer.lorta_slots.get(group.names[0]) is None:
                continue
            P_all, Q_all, key, idx, uniform = _batch_maps(group, layer, idx, uniform)

        def project(
            P_all: Tensor = P_all, idx: Tensor = idx, uniform: int | None = uniform, key: Hashable | None = key
        ) -> Tensor:
            xc = adapter_input(x3, P_all.dtype)
            if uniform is not None:  # every row uses one adapter: plain matmuls on its maps, no gather
                return xc @ P_all[uniform]
            return torch.bmm(xc, _gather_P(rows, P_all, idx, key, batch))

        # q, k, v of one attention call with equal input keys: x @ P once (the scope clears it after the call)
        shared_key = ("mixed", key) if key is not None else None
        u = state.caches.inputs.shared(x, shared_key, project, held=(rows, P_all))
        Q = Q_all[uniform] if uniform is not None else Q_all.index_select(0, idx)  # the scale is folded into Q
        res3 = add_product(result.reshape(batch, -1, result.shape[-1]), u, Q)
        result = res3.view(result.shape)
    return result


def _gather_P(rows: MixedRows, P_all: Tensor, idx: Tensor, key: Hashable | None, batch: int) -> Tensor:
    """P_all[idx]; a shared P (equal input keys) is gathered once per model call and batch size."""
    if key is None:
        return P_all.index_select(0, idx)
    gathered = rows.gathered.get((id(P_all), batch))
    if gathered is None:
        gathered = rows.gathered[(id(P_all), batch)] = P_all.index_select(0, idx)
    return gathered


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
    wrappers: Sequence[nn.Module],
    kwargs: dict[str, Any],
) -> Iterator[None]:
    """PEFT's `_enable_peft_forward_hooks` for the lorta tuner: hand the resolved rows to every wrapped layer
    (`layers`) and the row names to every modules_to_save wrapper (`wrappers`, PEFT's own per-name loop).

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


def _inject_rows(module: nn.Module, args: tuple, kwargs: dict[str, Any], rows: MixedRows) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = rows
    return args, kwargs


def _inject_names(module: nn.Module, args: tuple, kwargs: dict[str, Any], rows: MixedRows) -> tuple[tuple, dict]:
    x = args[0] if args else next(iter(kwargs.values()))
    kwargs["adapter_names"] = rows.names_for(x.shape[0])
    return args, kwargs
