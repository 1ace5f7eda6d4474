"""When the thin maps P, Q of the adapted modules are built, and for how long they may be reused.

The rule (docs/design.md, "Maps and their lifetime"): maps are never cached across a point where the factors can
change. Nothing that can edit a tensor in place is trusted to say so (an optimizer step, `p.data.copy_`, EMA or
weight averaging through `.data` leave no trace a cache could check cheaply), so reuse is bounded by scopes in which
the weights cannot change:

* a **frame** holds the maps of every adapted module of every active adapter, built in one batched pass
  (`Factorization.maps_many`: a handful of kernels instead of a dozen small ops per module). A frame is built at the
  start of each forward of the adapted model and serves that forward only;
* inside one **call** of the PeftModel (one `forward` or one `generate`), no-grad forwards share one frame: a
  generate call builds the maps once for its prefill and every decode step. Nothing outside the call can run in
  between;
* the last training forward's frame stays readable after the forward, but only to the recomputation of
  checkpointed modules during a backward (non-reentrant checkpointing must see the very same map tensors), and only
  for the modules that forward used. Forwards without autograd in between (a DPO reference pass) leave it alone.

Anything else (a direct call of a wrapped submodule, merging, torch.compile'd forwards) builds the module's maps on
the spot.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..factorization import Factorization
from ..layout import Slot

Maps = tuple[Tensor, Tensor, Hashable | None]  # (P, Q, input key) of one module
MapKey = tuple[str, int]  # (adapter name, id of the module's slot list)


def module_maps(
    factors: Factorization,
    slots: list[Slot],
    order: Tensor | None = None,
    pairs: list[tuple[Tensor, Tensor]] | None = None,
) -> Maps:
    """(P, Q, key) of a module holding one or several matrices (a fused q/k/v projection).

    Slots with one shared P (equal input keys) give P and their Q side by side, else P side by side and a
    block-diagonal Q; `order` permutes Q's columns into an interleaved fused output.
    """
    pairs = pairs if pairs is not None else [factors.maps(s) for s in slots]
    if len(slots) == 1:
        P, Q = pairs[0]
        key = factors.input_key(slots[0])
    else:
        keys = {factors.input_key(s) for s in slots}
        if len(keys) == 1 and None not in keys:
            P, Q, key = pairs[0][0], torch.cat([q for _, q in pairs], dim=1), keys.pop()
        else:
            P, Q, key = torch.cat([p for p, _ in pairs], dim=1), torch.block_diag(*[q for _, q in pairs]), None
    if order is not None:
        Q = Q.index_select(1, order if order.device == Q.device else order.to(Q.device))
    return P, Q, key


def in_backward() -> bool:
    """True while the autograd engine runs a backward (torch's own module trackers ask the same)."""
    return torch._C._current_graph_task_id() != -1


def _autocast_state(device_type: str) -> tuple:
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


@dataclass
class Frame:
    maps: dict[MapKey, Maps]
    grad: bool
    autocast: tuple
    call: int  # the call scope it was built in (0: none)
    open: bool = True
    served: set[MapKey] = field(default_factory=set)


class MapFrames:
    """The frame of the running (or last) forward of one tuner, and the call scopes around it."""

    def __init__(self) -> None:
        self.frame: Frame | None = None  # the running forward's frame (or the last one, closed)
        self.backward_frame: Frame | None = None  # the last training forward's frame
        self.depth = 0  # nested forwards of the adapted model
        self.calls = 0  # nested PeftModel calls (forward / generate)
        self.call_serial = 0  # identifies the outermost call scope

    # The maps hold autograd graphs: a copied or pickled model starts with none.
    def __deepcopy__(self, memo: dict) -> MapFrames:
        return MapFrames()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def begin_call(self) -> None:
        if self.calls == 0:
            self.call_serial += 1
        self.calls += 1

    def end_call(self) -> None:
        self.calls = max(0, self.calls - 1)
        if self.calls == 0 and self.frame is not None and not self.frame.grad:
            self.frame = None  # release the call's no-grad maps

    def begin_forward(self, build: Callable[[], dict[MapKey, Maps]] | None, device_type: str) -> None:
        """Open a frame for a forward of the adapted model (`build` None: this forward builds maps per module)."""
        self.depth += 1
        if self.depth > 1:
            return
        grad, autocast = torch.is_grad_enabled(), _autocast_state(device_type)
        frame = self.frame
        call = self.call_serial if self.calls else 0
        if (
            frame is not None
            and call
            and frame.call == call
            and not grad
            and not frame.grad
            and frame.autocast == autocast
        ):
            frame.open = True  # the same generate call: the weights cannot have changed
            return
        self.frame = Frame(build(), grad, autocast, call) if build is not None else None
        if grad and self.frame is not None:
            self.backward_frame = self.frame

    def end_forward(self) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0 and self.frame is not None:
            self.frame.open = False

    def lookup(self, key: MapKey) -> Maps | None:
        frame = self.frame
        if frame is not None and frame.open:
            hit = frame.maps.get(key)
            grad = torch.is_grad_enabled()
            if hit is None or (grad and not frame.grad):
                return None  # (no-grad maps would cut the factors out of this graph)
            if grad:  # a module run without grad (inside reentrant checkpointing) recomputes with fresh maps
                frame.served.add(key)
            return hit
        frame = self.backward_frame
        if frame is not None and key in frame.served and in_backward():
            return frame.maps[key]  # a checkpointed module of that forward is recomputed
        return None

    def drop(self) -> None:
        self.frame = self.backward_frame = None
