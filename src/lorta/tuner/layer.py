"""The wrapped layer: one per adapted module, for every method of the family.

It owns no trainable parameters. It holds, per adapter, the module's slots (its coordinates in the update
tensor) and a reference to the tuner's factor bank, and each forward asks the adapter's factorisation for the
two thin maps P and Q of its slots:

    y = W x + b + scale * (dropout(x) @ P) @ Q

so the training forward costs a rank-r LoRA and autograd keeps x @ P (N x r), never a dense update.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from .. import quantized
from ..factorization import Factorization
from ..layout import Slot, module_features
from .maps import module_maps
from .mixed import mixed_forward
from .shared_input import add_product
from .state import TunerState


def nan_message(adapter: str, detail: str) -> str:
    """safe_merge's refusal, worded as PEFT's own methods word it (PEFT's tests match the first sentence)."""
    return (
        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken: {detail}; nothing was "
        "merged and the base weights are unchanged"
    )


class TensorAdapterLayer(BaseTunerLayer):
    """PEFT tuner layer for the tensor adapters (LoRTA, TensLoRA, TLoRA)."""

    # Per-adapter containers PEFT walks to find, activate and delete adapters. The dropout ModuleDict carries no
    # weights: the factors live once on the tuner (see TensorAdapterModel.lorta_factors).
    adapter_layer_names = ("lorta_dropout",)
    other_param_names = ("lorta_slots", "lorta_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.lorta_dropout = nn.ModuleDict({})
        self.lorta_slots: dict[str, list[Slot]] = {}
        self.lorta_scaling: dict[str, float] = {}
        # an interleaved fused q/k/v output's column order (layout.out_orders); a buffer, so it follows .to(device)
        self.register_buffer("lorta_out_order", None, persistent=False)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = module_features(self.get_base_layer())
        self.fan_in_fan_out = type(self.get_base_layer()).__name__ == "Conv1D"
        # PEFT's quantisation backend of a quantised base layer (None: a float layer); see lorta.quantized
        self.quantization_backend = quantized.backend_for(self.get_base_layer(), kwargs.pop("quantization", None))
        # a quantised base's storage from before the first merge, put back by unmerge (lorta.quantized)
        self.pre_merge_storage: quantized.PreMergeStorage | None = None
        self.kwargs = kwargs

    # The tuner's state (factors, maps, shared inputs) is a plain reference, not a submodule, so each factor is
    # registered, saved and counted once, on the tuner.
    def attach(self, state: TunerState) -> None:
        object.__setattr__(self, "_lorta_state", state)

    @property
    def lorta_state(self) -> TunerState:
        return self._lorta_state

    def adapter_factors(self, adapter_name: str) -> Factorization:
        """The factorisation (on the tuner) that adapter `adapter_name` of this layer reads its maps from."""
        return self._lorta_state.factors[adapter_name]

    def update_layer(
        self,
        adapter_name: str,
        slots: list[Slot],
        scaling: float,
        dropout: float,
        out_order: list[int] | None = None,
        reactivate: bool = True,
    ) -> None:
        """Wire adapter `adapter_name` into this layer. `reactivate=False` (an inference-only adapter added by a bank
        of thousands) skips PEFT's set_adapter, whose walk over every adapter of the layer costs O(adapters)."""
        if out_order is not None and self.lorta_out_order is None:
            device = quantized.compute_dtype_and_device(self.get_base_layer())[1]
            self.lorta_out_order = torch.tensor(out_order, device=device)
        self.lorta_slots[adapter_name] = slots
        self.lorta_scaling[adapter_name] = scaling
        # in the layer's train/eval mode: an adapter added to a model in eval mode drops nothing out
        self.lorta_dropout[adapter_name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        if reactivate:
            self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        bank = self._lorta_state.factors
        factors = bank[adapter_name] if adapter_name in bank else None
        if factors is not None:
            factors.move_off_meta(device or quantized.compute_dtype_and_device(self.get_base_layer())[1])

    def _active_here(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lorta_slots]

    def delta_weight(self, adapter_name: str) -> Tensor:
        """The dense update in the base weight's layout (out x in for Linear, in x out for Conv1D), scaled; built
        from the factors as they are now."""
        P, Q, _ = module_maps(self.adapter_factors(adapter_name), self.lorta_slots[adapter_name], self.lorta_out_order)
        delta = (P @ Q) * self.lorta_scaling[adapter_name]
        return delta if self.fan_in_fan_out else delta.t()

    # PEFT's LoRA conversion API (peft.convert_to_lora / save_as_lora): every lorta update is a dense delta.
    def get_delta_weight(self, adapter_name: str) -> Tensor:
        return self.delta_weight(adapter_name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return adapter_name in self.lorta_slots

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W += scale * (P @ Q)^T for each adapter; with safe_merge the result is checked before it is written.
        A quantised base weight is dequantised, updated in float32 and re-quantised; its pre-merge storage is kept
        for unmerge (lorta.quantized)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lorta_slots:
                continue
            if self.quantization_backend is not None:
                quantized.check_mergeable(self.quantization_backend, f"adapter {name!r}")
                merged = quantized.dense_weight(self) + self.delta_weight(name).float()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(nan_message(name, "its merged weight holds NaN or Inf values"))
                if self.pre_merge_storage is None:
                    self.pre_merge_storage = quantized.keep_pre_merge(base)
                quantized.write_weight(self, merged)
                self.merged_adapters.append(name)
                continue
            weight = base.weight
            delta = self.delta_weight(name).to(device=weight.device)
            if safe_merge:
                merged = weight.data.to(delta.dtype) + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(nan_message(name, "its merged weight holds NaN or Inf values"))
                weight.data.copy_(merged.to(weight.dtype))
            else:
                weight.data.add_(delta.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W -= scale * (P @ Q)^T; over a quantised base, the pre-merge storage put back bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if self.pre_merge_storage is not None:
            quantized.restore_pre_merge(self, self.pre_merge_storage)
            self.pre_merge_storage = None
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lorta_slots:
                continue
            weight = self.get_base_layer().weight
            weight.data.sub_(self.delta_weight(name).to(device=weight.device, dtype=weight.dtype))

    def _add_adapter_output(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """result + scale * (dropout(x) @ P) @ Q, x @ P shared by the matrices with the same input key."""
        state = self._lorta_state
        P, Q, key = state.maps(self, name)
        u = state.caches.inputs.project(x, P, (name, key) if key is not None else None, self.lorta_dropout[name])
        return add_product(result, u, Q, self.lorta_scaling[name])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:  # one adapter per row, vectorised over the adapters (tuner/mixed.py)
            return mixed_forward(self, x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_here():  # P and Q are (in, out) oriented for Linear and Conv1D alike
            result = self._add_adapter_output(result, x, name)
        return result

    def __repr__(self) -> str:
        return "lorta." + super().__repr__()


class Linear(nn.Module, TensorAdapterLayer):
    """A Linear or Conv1D with tensor adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        TensorAdapterLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name

    # nn.Module comes first in the MRO (as in PEFT's own layers), so the adapter forward is bound explicitly.
    forward = TensorAdapterLayer.forward
    __repr__ = TensorAdapterLayer.__repr__
