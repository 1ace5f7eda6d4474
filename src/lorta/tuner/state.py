"""What the wrapped layers of one tuner share: one object, referenced by the tuner and every layer.

It holds the adapters' factors (the tuner's `lorta_factors`), the forward's caches (`ForwardCaches`: the maps of the
running forward, lorta.tuner.maps; the shared input projections of one attention call, lorta.tuner.shared_input;
the mixed-adapter engine, lorta.tuner.mixed; docs/design.md, "Caches") and the tuner's own bookkeeping
(`TunerBookkeeping`), kept here so that nn.Module carries one hidden attribute, not a dozen.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn

from .maps import MapFrames, Maps, module_maps
from .shared_input import SharedInputCache


class ParameterSet:
    """A set of parameters by identity, holding them weakly: a replaced parameter is neither kept alive nor mistaken
    for its replacement (weakref.WeakSet compares tensors with ==, which does not give a bool). A copied model's
    set holds the copies of the parameters (deepcopy's memo maps them), a pickled one the unpickled ones."""

    def __init__(self, params: Iterable[nn.Parameter] = ()) -> None:
        self._refs: dict[int, weakref.ref] = {}
        for param in params:
            self.add(param)

    def add(self, param: nn.Parameter) -> None:
        key = id(param)
        self._refs[key] = weakref.ref(param, partial(self._forget, key))

    def _forget(self, key: int, ref: weakref.ref) -> None:
        if self._refs.get(key) is ref:  # the parameter died: its id may now be reused
            del self._refs[key]

    def __contains__(self, param: object) -> bool:
        ref = self._refs.get(id(param))
        return ref is not None and ref() is param

    def _live(self) -> list[nn.Parameter]:
        return [p for p in (ref() for ref in list(self._refs.values())) if p is not None]

    def __deepcopy__(self, memo: dict) -> ParameterSet:
        return ParameterSet(copy.deepcopy(p, memo) for p in self._live())

    def __getstate__(self) -> dict:
        return {"params": self._live()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["params"])


@dataclass(eq=False)
class ForwardCaches:
    """Every cache of the forward, each following the one rule of docs/design.md, "Caches"."""

    frames: MapFrames = field(default_factory=MapFrames)  # the maps of the running forward, by (adapter, slots)
    inputs: SharedInputCache = field(default_factory=SharedInputCache)  # x @ P within one attention call
    mixed: Any = None  # the MixedBatchEngine (stacked factors, per-layer maps), created on first mixed call
    mixed_call: bool = False  # a call with per-row adapter_names is running: no single-adapter frames
    # the factorisations' slot index tensors by slot tuple (Factorization.maps_many): functions of the layout
    # alone, which never changes under them; emptied with the layers (TensorAdapterModel._refresh_layers)
    indices: dict = field(default_factory=dict)


@dataclass(eq=False)
class TunerBookkeeping:
    """What the tuner records about the model it adapts (nothing here is read by a layer's forward)."""

    layers: list[Any] = field(default_factory=list)  # the wrapped layers in model order (the frame builder's walk)
    hooks: dict[str, list[Any]] = field(default_factory=dict)  # hook handles by module name ("": the model's own)
    probe: Any = None  # a weak reference to one wrapped layer (device, dtype and merge state of a forward)
    quantization: dict[str, Any] = field(default_factory=dict)  # PEFT's quantisation kwargs of a quantised base
    ddp_checked: int | None = None  # id of the DDP wrapper already checked for reentrant checkpointing
    # The factor parameters outside every FSDP unit (created by the tuner, or assigned by a low_cpu_mem_usage load,
    # while the layers were not sharded). fully_shard replaces the parameters it manages with new DTensor ones, so
    # a factor still in this set at a forward whose layers are sharded was left out of FSDP (_check_runtime).
    unmanaged: ParameterSet = field(default_factory=lambda: ParameterSet())


class TunerState:
    def __init__(self, factors: nn.ModuleDict) -> None:
        self.factors = factors  # the tuner's lorta_factors: one factor bank per adapter
        self.caches = ForwardCaches()
        self.book = TunerBookkeeping()

    def maps(self, layer: Any, name: str) -> Maps:
        """(P, Q, key) of adapter `name` in `layer`: the running forward's, or built now."""
        slots = layer.lorta_slots[name]
        hit = self.caches.frames.lookup(name, slots)
        if hit is not None:
            return hit
        return module_maps(self.factors[name], slots, layer.lorta_out_order)
