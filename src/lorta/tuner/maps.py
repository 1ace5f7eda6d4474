"""When the thin maps P, Q of the adapted modules are built, and for how long they may be reused.

The rule (docs/design.md, "Maps and their lifetime" and "Caches"): maps are never cached across a point where the
factors can change. Nothing that can edit a tensor in place is trusted to say so (an optimizer step, `p.data.copy_`,
EMA or weight averaging through `.data` leave no trace a cache could check cheaply), so reuse is bounded by scopes in
which the weights cannot change:

* a **frame** holds the maps of every adapted module of every active adapter, built in one batched pass
  (`Factorization.maps_many`: a handful of kernels instead of a dozen small ops per module). A frame is built at the
  start of each forward of the adapted model and serves that forward only;
* inside one **call** of the PeftModel (one `forward` or one `generate`), no-grad forwards share one frame: a
  generate call builds the maps once for its prefill and every decode step. Nothing outside the call can run in
  between;
* the last training forward's frame stays readable after the forward, but only to the recomputation of
  checkpointed modules during its backward (non-reentrant checkpointing must see the very same map tensors), and
  only for the modules that forward used. That backward window is marked by public autograd hooks
  (`_watch_backward`). Forwards without autograd in between (a DPO reference pass) leave it alone.

Anything else (a direct call of a wrapped submodule, merging, torch.compile'd forwards) builds the module's maps on
the spot.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import register_multi_grad_hook

from ..factorization import Factorization
from ..layout import Slot

Maps = tuple[Tensor, Tensor, Hashable | None]  # (P, Q, input key) of one module
MapKey = tuple[str, int]  # (adapter name, id of the module's slot list, which the entry holds)


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


def _autocast_state(device_type: str) -> tuple:
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


@dataclass(eq=False)
class Frame:
    maps: dict[MapKey, tuple[list[Slot], Maps]]  # by (adapter, id of the slot list): the list (held) and its maps
    grad: bool  # built with autograd on
    autocast: tuple  # the autocast state it was built under
    call: int  # the call scope it was built in (0: none)
    open: bool = True  # its forward (or no-grad call) is running
    served: set[MapKey] = field(default_factory=set)  # the entries its forward used with autograd on
    in_backward: bool = False  # a backward through its forward's outputs runs and still needs the served maps
    hooks: list[Any] = field(default_factory=list)  # the handles of the hooks marking that window

    def release(self) -> None:
        """Remove the window's hooks (a map can be a factor itself: a leaf would keep them for good)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        self.in_backward = False

    def get(self, name: str, slots: list[Slot]) -> Maps | None:
        entry = self.maps.get((name, id(slots)))
        return entry[1] if entry is not None and entry[0] is slots else None


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

    def begin_forward(
        self, build: Callable[[], dict[MapKey, tuple[list[Slot], Maps]]] | None, device_type: str
    ) -> None:
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
            self._set_backward_frame(self.frame)

    def end_forward(self, outputs: Any = None) -> None:
        """Close the forward's frame; a training forward's served maps stay readable during its backward only."""
        self.depth = max(0, self.depth - 1)
        if self.depth == 0 and self.frame is not None:
            self.frame.open = False
            if self.frame is self.backward_frame:
                _watch_backward(self.frame, outputs)

    def lookup(self, name: str, slots: list[Slot]) -> Maps | None:
        frame = self.frame
        if frame is not None and frame.open:
            hit = frame.get(name, slots)
            grad = torch.is_grad_enabled()
            if hit is None or (grad and not frame.grad):
                return None  # (no-grad maps would cut the factors out of this graph)
            if grad:  # a module run without grad (inside reentrant checkpointing) recomputes with fresh maps
                frame.served.add((name, id(slots)))
            return hit
        frame = self.backward_frame
        if frame is not None and frame.in_backward and (name, id(slots)) in frame.served:
            return frame.get(name, slots)  # a checkpointed module of that forward is recomputed
        return None

    def _set_backward_frame(self, frame: Frame | None) -> None:
        if self.backward_frame is not None and self.backward_frame is not frame:
            self.backward_frame.release()
        self.backward_frame = frame

    def drop(self) -> None:
        self._set_backward_frame(None)
        self.frame = None


def _watch_backward(frame: Frame, outputs: Any) -> None:
    """Mark the backward window of a closed training frame with public autograd hooks (no engine internals).

    The window opens when a backward reaches the forward's outputs (the first gradient of any of them) and closes
    when that backward has computed the gradients of every map the forward served, which is after the last
    recomputation of a checkpointed module that reads them. A retained graph's second backward opens it again.
    Nothing but the autograd engine runs inside it, so the factors cannot change while it is open; a direct call of
    a wrapped submodule, before, after or without the backward, finds it closed and builds fresh maps. Outputs that
    carry no gradient (a loss made from something else) leave the window open from the end of the forward.
    """
    maps = {id(t): t for key in frame.served for t in frame.maps[key][1][:2] if t.requires_grad}
    if not maps:
        return  # nothing the backward could need
    ref = weakref.ref(frame)  # the hooks live on the graph: they must not keep the frame alive

    def mark(value: bool) -> Callable[[Any], None]:
        def hook(_: Any) -> None:
            alive = ref()
            if alive is not None:
                alive.in_backward = value

        return hook

    frame.hooks.append(register_multi_grad_hook(list(maps.values()), mark(False), mode="all"))
    starts = [t for t in _tensors(outputs) if t.requires_grad]
    if starts:
        frame.hooks.append(register_multi_grad_hook(starts, mark(True), mode="any"))
    else:
        frame.in_backward = True


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors of a forward's output (a tensor, or tuples, lists and dicts of them: ModelOutput is a dict)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
