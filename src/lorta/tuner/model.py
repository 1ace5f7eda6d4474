"""The PEFT tuner shared by every method of the family: the only place that knows PEFT's internals.

A method is a `Factorization` subclass plus its config; its tuner is a two-line `TensorAdapterModel` subclass in
its method file (``factorization_cls`` and, for narrower default targets, ``target_module_mapping``) that PEFT
dispatches to through its type mappings (see `lorta.registry`).

Where the factors live: the factors of adapter `name` form ONE module, `self.lorta_factors[name]`, registered
once on the tuner, so `named_parameters`, the optimizer, DDP and the saved file each see every factor exactly
once (state-dict key `base_model.lorta_factors.A`). Each wrapped layer keeps a plain reference to the bank.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..architectures import DEFAULT_TARGETS, multihead_message, multihead_projections, structural_targets
from ..factorization import Factorization
from ..layout import OUT_HEADS, LayoutError, ModelShape, Slot, TensorLayout, build_layout
from ..quantized import (
    check_mergeable,
    check_restorable,
    compute_dtype_and_device,
    dense_weight,
    keep_trainable_layout,
    quantization_kwargs,
)
from .adapter_file import check_adapter_file, check_factor_entries
from .config import TensorAdapterConfig
from .layer import Linear, TensorAdapterLayer, nan_message
from .maps import MapKey, Maps, module_maps
from .mixed import mixed_batch_hooks
from .state import TunerState

_UPCAST = (torch.float16, torch.bfloat16)


class DistributedSetupError(RuntimeError):
    """A distributed wrapper would train the shared factors with unsynchronised (silently wrong) gradients."""


class TensorAdapterModel(BaseTuner):
    prefix: str = "lorta_"
    tuner_layer_cls = TensorAdapterLayer
    target_module_mapping = DEFAULT_TARGETS
    default_kinds: tuple[str, ...] = ("q", "k", "v", "o")  # what the default targets adapt (the mapping's kinds)
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
            object.__setattr__(self, "_lorta_state", TunerState(self.lorta_factors))  # a reference, not a submodule
        config: TensorAdapterConfig = self.peft_config[adapter_name]
        source, config.loaded_from = config.loaded_from, None  # from_pretrained's directory: checked once, here
        self._derive_default_targets(model, config)
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        try:
            shape = ModelShape.of_adapted(model, config.model_shape)
            layout = build_layout(shape, self._find_targets(model, config), config.matrix_names, config.layer_names)
        except LayoutError as exc:
            raise LayoutError(f"{exc} (adapter at {source})" if source else str(exc)) from exc

        # As PEFT's own layers: the factors take the base layers' dtype, and PeftModel upcasts them to float32
        # afterwards unless autocast_adapter_dtype=False (see _cast_adapter_dtype).
        dtype, device = compute_dtype_and_device(next(iter(_base(m) for m in _targets_in(model, layout))))
        device = torch.device("meta") if low_cpu_mem_usage else device
        state = self._lorta_state
        state.book.quantization = quantization_kwargs(model) if _quantized(model) else {}
        keep_trainable_layout(model)  # bitsandbytes' CPU inference packing of 4-bit weights has no backward
        with torch.device(device):
            factors = self.factorization_cls(config, layout)
        factors.to(dtype=dtype)
        if source is not None:  # validate the saved weights against this model before anything is modified
            check_adapter_file(source, factors, config.peft_type)
        for param in factors.parameters():
            state.book.unmanaged.add(param)  # see _check_runtime: FSDP replaces the parameters it manages
        self.lorta_factors[adapter_name] = factors  # _create_and_replace reads the layout from here
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except Exception:
            del self.lorta_factors[adapter_name]
            raise
        config.model_shape = shape.to_dict()
        config.matrix_names = list(layout.matrix_names)
        config.layer_names = list(layout.layer_names)
        self._refresh_layers()
        self._hook_shared_inputs(model, layout)
        probe = next((m for m in model.modules() if isinstance(m, TensorAdapterLayer)), None)
        state.book.probe = weakref.ref(probe) if probe is not None else None
        if "" not in state.book.hooks:  # PeftModel.forward calls the transformers model directly, not the tuner
            tuner = weakref.ref(self)
            state.book.hooks[""] = [
                model.register_forward_pre_hook(lambda *_: _before_forward(tuner)),
                model.register_forward_hook(lambda _, __, out: _after_forward(tuner, out), always_call=True),
            ]

    def _find_targets(self, model: nn.Module, config: TensorAdapterConfig) -> dict[str, nn.Module]:
        targets = {}
        for key, module in model.named_modules():
            if key and self._check_target_module_exists(config, key):
                targets[key] = _base(module)
        if blind := sorted(set(targets) & set(multihead_projections(model))):
            raise LayoutError(multihead_message(blind))
        if not targets:
            linear = sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise LayoutError(
                f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
                f"its Linear module names include {linear[:20]}"
            )
        return targets

    def _create_and_replace(
        self,
        config: TensorAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        factors = self.lorta_factors[adapter_name]  # registered by inject_adapter before PEFT calls this
        layout: TensorLayout = factors.layout
        slots = layout.slots[current_key]
        order = layout.out_orders.get(current_key)
        scaling = config.scale_for(factors.scale_rank)
        if isinstance(target, TensorAdapterLayer):
            target.update_layer(adapter_name, slots, scaling, config.lora_dropout, order)
            return
        new_module = Linear(target, adapter_name, quantization=self._lorta_state.book.quantization)
        new_module.attach(self._lorta_state)
        new_module.update_layer(adapter_name, slots, scaling, config.lora_dropout, order)
        self._replace_module(parent, target_name, new_module, target)

    def _hook_shared_inputs(self, model: nn.Module, layout: TensorLayout) -> None:
        """Open a shared-input scope around each attention module whose q, k, v are separate modules."""
        for name, slots in layout.slots.items():
            if len(slots) == 1 and slots[0].role == OUT_HEADS and "." in name:
                parent_name = name.rsplit(".", 1)[0]
                hooks = self._lorta_state.book.hooks
                if parent_name not in hooks:
                    hooks[parent_name] = self._lorta_state.caches.inputs.hook(model.get_submodule(parent_name))

    def _remove_hooks(self) -> None:
        for handles in self._lorta_state.book.hooks.values():
            for handle in handles:
                handle.remove()
        self._lorta_state.book.hooks.clear()
        self._lorta_state.caches.frames.drop()

    def _refresh_layers(self) -> None:
        """The wrapped layers, in model order (the frame builder walks them; a list, so copies follow the model)."""
        layers = [m for m in self.model.modules() if isinstance(m, TensorAdapterLayer)]
        self._lorta_state.book.layers = layers
        self._lorta_state.caches.frames.drop()
        self._lorta_state.caches.indices.clear()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's contract: float16/bfloat16 adapter weights become float32 unless autocast_adapter_dtype=False."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        factors = self.lorta_factors[adapter_name] if "lorta_factors" in self._modules else None
        if autocast_adapter_dtype and factors is not None:
            for tensor in (*factors.parameters(), *factors.buffers()):
                if tensor.dtype in _UPCAST:
                    tensor.data = tensor.data.float()

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
        self._refresh_layers()

    # ------------------------------------------------------------------------------------ validation guards
    def _check_runtime(self) -> None:
        """Refuse setups that would silently compute wrong results: a cheap check of one layer and each bank."""
        probe = self._lorta_state.book.probe if "_lorta_state" in self.__dict__ else None
        layer = probe() if probe is not None else None
        if layer is None or "lorta_factors" not in self._modules:
            return
        weight = getattr(layer.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor):  # a quantised layer without a weight tensor (HQQ)
            return
        sharded_layers = _is_dtensor(weight)
        unmanaged = self._lorta_state.book.unmanaged
        for name in self.active_adapters:
            bank = self.lorta_factors[name] if name in self.lorta_factors else None
            param = next(bank.parameters(), None) if bank is not None else None
            if param is None:
                continue
            if _is_dtensor(param):
                raise DistributedSetupError(
                    f"the factors of adapter {name!r} are sharded (DTensor) but were not gathered before the forward:"
                    " call fully_shard on the root module (the PeftModel) after its layers, not on "
                    "base_model.lorta_factors alone; or train with DistributedDataParallel"
                )
            if not sharded_layers and param not in unmanaged:
                for unsharded in bank.parameters():  # e.g. loaded with low_cpu_mem_usage (assigned parameters)
                    unmanaged.add(unsharded)
            elif sharded_layers and param in unmanaged:
                raise DistributedSetupError(
                    f"the adapted layers' weights are sharded (DTensor) but the factors of adapter {name!r} "
                    "(base_model.lorta_factors, shared by every layer) are outside every FSDP unit, so their "
                    "gradients would not be averaged across ranks. With FSDP2, call fully_shard(peft_model) on the "
                    "root after sharding the layers (Accelerate does this), or use DistributedDataParallel; "
                    "tensor-parallel base weights are not supported"
                )
            if not sharded_layers and not weight.is_meta and param.device != weight.device:
                raise LayoutError(
                    f"the factors of adapter {name!r} are on {param.device} but the adapted layers' base weights are"
                    f" on {weight.device}: the factors live on the tuner (base_model.lorta_factors), outside the "
                    "transformers model, so move the whole PeftModel (peft_model.to(device)), not only its base model"
                )
        if torch.is_grad_enabled():
            self._check_ddp_checkpointing()

    def _check_ddp_checkpointing(self) -> None:
        """DDP (without static_graph) + reentrant checkpointing reduces the shared factors' gradient too early."""
        try:
            from torch.nn.parallel import DistributedDataParallel
        except ImportError:  # pragma: no cover
            return
        ddp = DistributedDataParallel._get_active_ddp_module()
        state = self._lorta_state
        if ddp is None or getattr(ddp, "static_graph", False) or state.book.ddp_checked == id(ddp):
            return
        for module in self.model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(module, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
                raise DistributedSetupError(
                    "DistributedDataParallel with reentrant gradient checkpointing (use_reentrant=True) would "
                    "all-reduce the shared lorta factors' gradient after the first recomputed layer and drop the "
                    "rest. Use gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default), "
                    "or DistributedDataParallel(..., static_graph=True) (Trainer: ddp_static_graph=True)"
                )
        state.book.ddp_checked = id(ddp)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        if safe_merge:
            self._check_merge_is_finite(adapter_names)
        super().merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Unmerge every layer, or none: a quantised layer whose kept storage cannot be put back refuses first."""
        for key, module in self.model.named_modules():
            if isinstance(module, TensorAdapterLayer) and module.pre_merge_storage is not None:
                check_restorable(module.pre_merge_storage, key)
        super().unmerge_adapter()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "cat",
        svd_rank: int | None = None,
        **fit_options: Any,
    ) -> Any:
        """PEFT's adapter arithmetic: add `adapter_name` = sum_i weights[i] * adapters[i], exactly (cat) or fitted
        at `svd_rank` (als / svd); returns its lorta.arithmetic.CombinationReport (the error against the sum)."""
        from ..arithmetic import add_weighted_adapter

        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, **fit_options)

    def _check_mergeable(self, adapter_names: list[str] | None) -> None:
        """Every adapted layer's base can take the merge (a quantised one must be re-quantisable), before any is
        merged: a refusal never leaves a half-merged model."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for key, module in self.model.named_modules():
            if isinstance(module, TensorAdapterLayer) and any(n in module.lorta_slots for n in names):
                check_mergeable(module.quantization_backend, f"{key} (adapters {list(names)})")

    def _check_merge_is_finite(self, adapter_names: list[str] | None) -> None:
        """safe_merge is all or nothing: check every factor, then every merged weight, before writing any."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for name in names:
            bank = self.lorta_factors[name] if name in self.lorta_factors else None
            for key, tensor in (bank.state_dict() if bank is not None else {}).items():
                bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
                if bad:
                    raise ValueError(nan_message(name, f"its factor {key!r} holds {bad} NaN or Inf value(s)"))
        with torch.no_grad():
            for key, module in self.model.named_modules():
                if not isinstance(module, TensorAdapterLayer):
                    continue
                todo = [a for a in names if a in module.lorta_slots and a not in module.merged_adapters]
                if not todo:
                    continue
                weight = dense_weight(module)  # float32 (dequantised for a quantised base)
                stored = module.get_base_layer().weight.dtype if module.quantization_backend is None else weight.dtype
                if stored == torch.float64:
                    weight = module.get_base_layer().weight.detach().clone()
                for name in todo:
                    weight = weight + module.delta_weight(name).to(device=weight.device, dtype=weight.dtype)
                if not torch.isfinite(weight.to(stored)).all():
                    raise ValueError(
                        nan_message(", ".join(todo), f"merging it into {key} gives NaN or Inf in its {stored} weight")
                    )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check the loaded factors' names and shapes before PEFT's load_state_dict writes any of them."""
        tuner = model.base_model if isinstance(getattr(model, "base_model", None), TensorAdapterModel) else model
        banks = tuner._modules.get("lorta_factors") if isinstance(tuner, TensorAdapterModel) else None
        if banks is not None and adapter_name in banks:
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
            where = f"the weights loaded for adapter {adapter_name!r}"
            check_factor_entries(shapes, banks[adapter_name], config.peft_type, where)
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Unloading puts a wrapped layer's own base layer back whole; PEFT's version would re-assign its `weight`,
        which a quantised layer such as HQQ's does not have."""
        if new_module is getattr(child, "base_layer", None):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        merge = kwargs.get("merge", args[0] if args else True)
        safe_merge = kwargs.get("safe_merge", args[2] if len(args) > 2 else False)
        adapter_names = kwargs.get("adapter_names", args[3] if len(args) > 3 else None)
        if merge:
            self._check_mergeable(adapter_names)
        if merge and safe_merge:
            self._check_merge_is_finite(adapter_names)
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_hooks()
        for layer in self.lorta_state.book.layers:  # unloaded: nothing will be unmerged, so free the kept storage
            layer.pre_merge_storage = None
        return model

    @staticmethod
    def _check_target_module_exists(config: TensorAdapterConfig, key: str) -> bool:
        from peft.tuners.tuners_utils import check_target_module_exists

        return bool(check_target_module_exists(config, key))

    # ------------------------------------------------------------------------------------ maps of a forward
    batched_maps: bool = True
    """Build all modules' maps in one vectorised pass per forward (False: every module builds its own)."""

    def _begin_forward(self) -> None:
        """Open the forward's map frame (lorta.tuner.maps): one batched pass over every adapted module."""
        state = self._lorta_state
        probe = state.book.probe
        layer = probe() if probe is not None else None
        device_type = compute_dtype_and_device(layer.get_base_layer())[1].type if layer is not None else "cpu"
        skip = (
            not self.batched_maps
            or torch.compiler.is_compiling()
            or layer is None
            or layer.disable_adapters
            or layer.merged
            or state.caches.mixed_call
        )
        state.caches.frames.begin_forward(None if skip else self._frame_maps, device_type)

    def _frame_maps(self) -> dict[MapKey, tuple[list[Slot], Maps]]:
        maps: dict[MapKey, tuple[list[Slot], Maps]] = {}
        for name in self.active_adapters:
            factors = self.lorta_factors[name] if name in self.lorta_factors else None
            if factors is None:
                continue
            state = self._lorta_state
            modules = [(m, m.lorta_slots[name]) for m in state.book.layers if name in m.lorta_slots]
            slots = [slot for _, module_slots in modules for slot in module_slots]
            pairs = iter(factors.maps_many(slots, state.caches.indices))
            for layer, slots in modules:
                pair = [next(pairs) for _ in slots]
                maps[(name, id(slots))] = (slots, module_maps(factors, slots, layer.lorta_out_order, pair))
        return maps

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PeftModel's forward/generate context: one call scope (its no-grad forwards share their maps) and, with
        per-row `adapter_names`, the mixed-batch routing (tuner/mixed.py)."""
        state = self.__dict__.get("_lorta_state")
        if state is None:
            yield
            return
        state.caches.frames.begin_call()
        try:
            with mixed_batch_hooks(
                state if "lorta_factors" in self._modules else None,
                self.model,
                self.training,
                state.book.layers,
                kwargs,
            ):
                yield
        finally:
            state.caches.frames.end_call()

    @property
    def lorta_state(self) -> TunerState:
        """What this tuner's wrapped layers share: the factors, the forward's maps, the mixed-batch engine."""
        return self._lorta_state

    def _derive_default_targets(self, model: nn.Module, config: TensorAdapterConfig) -> None:
        """No targets, a model type the table lacks: its attention projections by name (none: an error naming a fix)."""
        model_type = self.get_model_config(model).get("model_type")
        if config.target_modules is None and model_type not in (*self.target_module_mapping, "custom"):
            targets = structural_targets(model, self.default_kinds, model_type or "")
            config.target_modules = set(targets) if isinstance(targets, list) else targets
            config.exclude_modules = config.exclude_modules or multihead_projections(model) or None

    # ------------------------------------------------------------------------------------------- reporting
    def num_adapter_parameters(self, adapter_name: str = "default") -> int:
        """Trainable parameters of one adapter: each shared factor counted once."""
        return self.lorta_factors[adapter_name].num_trainable()


def _quantized(model: nn.Module) -> bool:
    """Whether transformers loaded `model` through a quantiser (torchao needs its config to re-quantise)."""
    return getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _targets_in(model: nn.Module, layout: TensorLayout) -> list[nn.Module]:
    return [model.get_submodule(name) for name in layout.slots]


def _before_forward(tuner: weakref.ref) -> None:
    """Forward pre-hook of the adapted transformers model (holds the tuner weakly)."""
    instance = tuner()
    if instance is not None:
        instance._check_runtime()
        instance._begin_forward()


def _after_forward(tuner: weakref.ref, outputs: Any) -> None:
    instance = tuner()
    if instance is not None:
        instance._lorta_state.caches.frames.end_forward(outputs)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)
