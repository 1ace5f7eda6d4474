"""What the wrapped layers of one tuner share: one object, referenced by the tuner and every layer.

It holds the adapters' factors (the tuner's `lorta_factors`), the maps of the running forward (lorta.tuner.maps),
the shared input projections of one attention call (lorta.tuner.shared_input) and, once mixed-adapter batches are
used, their engine (lorta.tuner.mixed).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .maps import MapFrames, Maps, module_maps
from .shared_input import SharedInputCache


class TunerState:
    def __init__(self, factors: nn.ModuleDict) -> None:
        self.factors = factors
        self.inputs = SharedInputCache()
        self.frames = MapFrames()
        self.mixed: Any = None  # MixedBatchEngine, created on first use
        self.mixed_call = False  # a call with per-row adapter_names is running
        self.indices: dict = {}  # the factorisations' slot index tensors, by slot tuple (Factorization.maps_many)
        # the tuner's own bookkeeping (kept here, so nn.Module carries one hidden attribute, not seven)
        self.layers: list[Any] = []  # the wrapped layers in model order (the frame builder walks them)
        self.hooks: dict[str, list[Any]] = {}  # forward hooks by module name ("": the adapted model's own)
        self.probe: Any = None  # a weak reference to one wrapped layer (device, dtype and merge state of a forward)
        self.quantization: dict[str, Any] = {}  # PEFT's quantisation kwargs of a quantised base
        self.pending_layout: Any = None  # the layout of the adapter being injected
        self.ddp_checked: int | None = None  # the DDP wrapper already checked for reentrant checkpointing

    def maps(self, layer: Any, name: str) -> Maps:
        """(P, Q, key) of adapter `name` in `layer`: the running forward's, or built now."""
        slots = layer.lorta_slots[name]
        hit = self.frames.lookup((name, id(slots)))
        if hit is not None:
            return hit
        return module_maps(self.factors[name], slots, layer.lorta_out_order)
