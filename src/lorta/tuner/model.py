"""The PEFT tuner shared by every method of the family: the only place that knows PEFT's internals.

A method is a `Factorization` subclass plus its config; `make_tuner` turns it into a `BaseTuner` subclass that
PEFT dispatches to through its type mappings (see `lorta.registry`).

Where the factors live: the factors of adapter `name` form ONE module, `self.lorta_factors[name]`, registered
once on the tuner, so `named_parameters`, the optimizer, DDP and the saved file each see every factor exactly
once (state-dict key `base_model.lorta_factors.A`). Each wrapped layer keeps a plain reference to the bank.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..factorization import Factorization
from ..layout import DEFAULT_TARGETS, OUT_HEADS, LayoutError, ModelShape, TensorLayout, build_layout, matrix_kind
from .config import TensorAdapterConfig
from .layer import Linear, TensorAdapterLayer
from .shared_input import SharedInputCache

_SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim")


class TensorAdapterModel(BaseTuner):
    prefix: str = "lorta_"
    tuner_layer_cls = TensorAdapterLayer
    target_module_mapping = DEFAULT_TARGETS
    uses_shared_state: bool = True
    factorization_cls: type[Factorization] = Factorization

    # ----------------------------------------------------------------------------------------------- injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Place the targets in the tensor, create the adapter's factors once, then let PEFT wrap the modules."""
        if "lorta_factors" not in self._modules:
            self.lorta_factors = nn.ModuleDict()
            object.__setattr__(self, "_lorta_cache", SharedInputCache())
            object.__setattr__(self, "_lorta_hooks", {})
        config: TensorAdapterConfig = self.peft_config[adapter_name]
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        shape = _model_shape(model, config.model_shape)
        layout = build_layout(shape, self._find_targets(model, config), config.matrix_names)

        reference = next(iter(_base(m) for m in _targets_in(model, layout))).weight
        dtype = reference.dtype
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32 if autocast_adapter_dtype else dtype
        device = torch.device("meta") if low_cpu_mem_usage else reference.device
        with torch.device(device):
            factors = self.factorization_cls(config, layout)
        factors.to(dtype=dtype)
        self.lorta_factors[adapter_name] = factors
        object.__setattr__(self, "_pending_layout", layout)
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
            )
        except Exception:
            del self.lorta_factors[adapter_name]
            raise
        finally:
            object.__setattr__(self, "_pending_layout", None)
        config.model_shape = shape.to_dict()
        config.matrix_names = list(layout.matrix_names)
        self._hook_shared_inputs(model, layout)

    def _find_targets(self, model: nn.Module, config: TensorAdapterConfig) -> dict[str, nn.Module]:
        targets = {}
        for key, module in model.named_modules():
            if key and self._check_target_module_exists(config, key):
                targets[key] = _base(module)
        if not targets:
            linear = sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise LayoutError(
                f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
                f"its Linear module names include {linear[:20]}"
            )
        return targets

    def _create_and_replace(
        self, config: TensorAdapterConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str,
    ) -> None:
        layout: TensorLayout = self._pending_layout
        slots = layout.slots[current_key]
        factors = self.lorta_factors[adapter_name]
        scaling = config.scale_for(factors.scale_rank)
        if isinstance(target, TensorAdapterLayer):
            target.update_layer(adapter_name, slots, scaling, config.lora_dropout)
            return
        new_module = Linear(target, adapter_name)
        new_module.attach(self.lorta_factors, self._lorta_cache)
        new_module.update_layer(adapter_name, slots, scaling, config.lora_dropout)
        self._replace_module(parent, target_name, new_module, target)

    def _hook_shared_inputs(self, model: nn.Module, layout: TensorLayout) -> None:
        """Open a shared-input scope around each attention module whose q, k, v are separate modules."""
        for name, slots in layout.slots.items():
            if len(slots) == 1 and slots[0].role == OUT_HEADS and "." in name:
                parent_name = name.rsplit(".", 1)[0]
                if parent_name not in self._lorta_hooks:
                    self._lorta_hooks[parent_name] = self._lorta_cache.hook(model.get_submodule(parent_name))

    def _remove_hooks(self) -> None:
        for handles in self._lorta_hooks.values():
            for handle in handles:
                handle.remove()
        self._lorta_hooks.clear()

    # ------------------------------------------------------------------- trainability of the shared factors
    def _set_factor_grads(self, names: list[str], inference_mode: bool = False) -> None:
        for name, factors in self.lorta_factors.items():
            factors.requires_grad_(name in names and not inference_mode)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        if "lorta_factors" in self._modules:
            inference = any(self.peft_config[a].inference_mode for a in self.active_adapters if a in self.peft_config)
            self._set_factor_grads(self.active_adapters, inference)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_factor_grads([adapter_name] if isinstance(adapter_name, str) else list(adapter_name), inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if enabled:
            inference = any(self.peft_config[a].inference_mode for a in self.active_adapters)
            self._set_factor_grads(self.active_adapters, inference)
        else:
            self._set_factor_grads([])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.lorta_factors[adapter_name]

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_hooks()
        return model

    @staticmethod
    def _check_target_module_exists(config: TensorAdapterConfig, key: str) -> bool:
        from peft.tuners.tuners_utils import check_target_module_exists

        return bool(check_target_module_exists(config, key))

    # ------------------------------------------------------------------------------------------- reporting
    def num_adapter_parameters(self, adapter_name: str = "default") -> int:
        """Trainable parameters of one adapter: each shared factor counted once."""
        return self.lorta_factors[adapter_name].num_trainable()


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _targets_in(model: nn.Module, layout: TensorLayout) -> list[nn.Module]:
    return [model.get_submodule(name) for name in layout.slots]


def _model_shape(model: nn.Module, recorded: dict[str, Any] | None) -> ModelShape:
    """The base model's shape; when an adapter records one, the two must agree on every mode size."""
    try:
        actual = ModelShape.from_model(model)
    except LayoutError:
        if recorded is None:
            raise
        return ModelShape.from_model(model, recorded)
    if recorded is not None:
        diffs = {k: (recorded.get(k), getattr(actual, k)) for k in _SHAPE_KEYS if recorded.get(k) is not None}
        diffs = {k: v for k, v in diffs.items() if v[0] != v[1]}
        if diffs:
            detail = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diffs.items())
            raise LayoutError(
                f"this adapter was made for a base model of another shape ({detail}); load it onto the model "
                "it was trained on"
            )
    return actual


def make_tuner(
    name: str, factorization_cls: type[Factorization], default_kinds: set[str] | None = None
) -> type[TensorAdapterModel]:
    """A PEFT tuner class for one method of the family; `default_kinds` narrows the default targets (e.g. q, v)."""
    targets = DEFAULT_TARGETS
    if default_kinds is not None:
        targets = {
            model_type: [t for t in names if matrix_kind(t)[0] in default_kinds | {"qkv"}]
            for model_type, names in DEFAULT_TARGETS.items()
        }
    attrs = {"factorization_cls": factorization_cls, "target_module_mapping": targets, "__doc__": __doc__}
    return type(name, (TensorAdapterModel,), attrs)
