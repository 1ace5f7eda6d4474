"""Quantised base layers: how lorta reads, and writes back, the weight of a bitsandbytes 8-bit / 4-bit, torchao or
HQQ layer (docs/design.md, "Quantised bases").

The adapter itself never touches the quantised weight in training: the base layer computes `W x` with its own
kernel and lorta adds `scale · (x P) Q` in the factors' dtype. Merging is the one place that needs the weight: it
is dequantised, the update added in float32, and the sum re-quantised in the layer's own format, through PEFT's
quantisation backends (`peft.utils.quantization_utils`, the extension point PEFT gives its methods); the layer's
pre-merge storage is kept, so unmerging puts the base back bit for bit (`PreMergeStorage`). A backend that
cannot re-quantise (GPTQ, AWQ, AQLM, EETQ, a torchao layer quantised without a config to re-quantise with) makes
merging fail with the backend's name and what to do instead; nothing is ever merged by casting a float update into
an integer weight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class QuantizedMergeError(RuntimeError):
    """Merging into this quantised base layer is not possible; the message names the backend and the alternative."""


def quantization_kwargs(model: nn.Module) -> dict[str, Any]:
    """What a backend needs from the whole model (torchao: the callable that re-quantises a layer)."""
    from peft.utils.quantization_utils import get_quantization_kwargs

    return get_quantization_kwargs(model)


def _plain_float(base_layer: nn.Module) -> bool:
    """A torch Linear or transformers Conv1D with an ordinary float weight: no quantisation library to ask."""
    weight = getattr(base_layer, "weight", None)
    return (
        (type(base_layer) is nn.Linear or type(base_layer).__name__ == "Conv1D")
        and type(weight) in (nn.Parameter, torch.Tensor)
        and weight.dtype.is_floating_point
    )


def backend_for(base_layer: nn.Module, kwargs: dict[str, Any] | None = None) -> Any:
    """PEFT's quantisation backend of `base_layer`, or None for a plain float layer."""
    if _plain_float(base_layer):
        return None
    from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend, resolve_quantization_backend

    try:
        return resolve_quantization_backend(base_layer, **(kwargs or {}))
    except ValueError:  # a torchao layer without the quantisation config that re-quantises it
        return ForwardOnlyQuantizationBackend(
            "torchao (quantised with quantize_ directly, so there is no config to re-quantise a merged weight with)"
        )


def features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a quantised linear layer that is not an nn.Linear (HQQ), else None."""
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int) and backend_for(module) is not None:
        return fin, fout
    return None


def compute_dtype_and_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The float dtype the layer computes in (for the factors) and its device, whatever its weight's storage."""
    weight = getattr(module, "weight", None)
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(weight, torch.Tensor):
        dtype = weight.dtype if weight.dtype.is_floating_point else dtype
        device = weight.device
    else:
        tensors = [*module.parameters(), *module.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
    return (dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32), device


def check_mergeable(backend: Any, where: str) -> None:
    if backend is not None and not backend.supports_merge:
        raise QuantizedMergeError(
            f"{where}: cannot merge into a {backend.backend_name} base layer, whose weights lorta cannot re-quantise. "
            "Keep the adapter unmerged (its forward works over this base), or load the base model unquantised (or "
            "dequantise it, e.g. model.dequantize()), attach the adapter with PeftModel.from_pretrained and merge "
            "there; nothing was merged"
        )


def unpack_cpu_inference_layout(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference packing of a 4-bit weight; True when the weight was packed.

    bitsandbytes (0.50, CPUs with AVX512-BF16) repacks a Linear4bit weight into an inference layout on its first
    forward in eval mode, and from then on computes it with a kernel that has no backward: a later training step
    gets no gradient through that layer (so adapters before it do not train) and the packed data no longer
    dequantises to the weight's shape. lorta unpacks the weights of an adapted model once and turns the repacking
    off (`keep_trainable_layout`); with double quantisation that one round trip re-rounds the quantised absmax.
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return True


def keep_trainable_layout(model: nn.Module) -> int:
    """Unpack every bitsandbytes 4-bit weight of `model` from its CPU inference layout and keep bitsandbytes from
    repacking it (the packed kernel has no backward); returns how many were packed."""
    packed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and getattr(module, "weight", None) is not None:
            packed += unpack_cpu_inference_layout(module)
            module.support_avx512bf16_for_cpu = False
    return packed


def dense_weight(layer: Any) -> torch.Tensor:
    """The base layer's weight as a float32 tensor in its own layout (quantised weights dequantised)."""
    base = layer.get_base_layer()
    backend = layer.quantization_backend
    if backend is None:
        return base.weight.detach().float()
    unpack_cpu_inference_layout(base)
    return backend.get_base_weight(base).detach().float()


def write_weight(layer: Any, weight: torch.Tensor) -> None:
    """Store a float weight back into the base layer, re-quantised in its own format."""
    base = layer.get_base_layer()
    backend = layer.quantization_backend
    if backend is None:
        base.weight.data.copy_(weight.to(base.weight.dtype))
        return
    dtype = compute_dtype_and_device(base)[0]
    bias = getattr(base, "bias", None)
    backend.set_base_weight(layer, weight.to(dtype))
    new_base = layer.get_base_layer()
    if new_base is not base and bias is not None and getattr(new_base, "bias", None) is None:
        new_base.bias = bias  # PEFT's HQQ backend builds the re-quantised layer without the old one's bias


@dataclass
class PreMergeStorage:
    """A quantised base layer's own storage as it was before the first merge into it.

    Unmerging re-quantises nothing: it puts these objects back, so the base comes back bit for bit (re-quantising
    W + delta - delta would drift by up to a quantisation step each round trip). Every PEFT quantisation backend
    stores a merged weight by replacing objects (bitsandbytes and torchao a new weight, HQQ a new layer), so keeping
    references is enough; `digests` catch the one thing that would break that, an in-place write.
    """

    module: nn.Module  # the base layer object (HQQ's merge replaces it whole)
    weight: torch.Tensor | None  # its quantised weight (bitsandbytes' and torchao's merges replace it)
    weight_attrs: dict[str, Any]  # the weight's attributes (bitsandbytes' quant_state and flags, which a merge edits)
    state_attrs: dict[str, Any]  # bitsandbytes 8-bit's layer state (CB, SCB), which a merge resets
    digests: list[tuple[torch.Tensor, bytes]] = field(repr=False)  # each kept tensor and a hash of its bytes

    @property
    def nbytes(self) -> int:
        """Bytes this record keeps alive beside the merged layer: its tensors' storages, each counted once, less the
        bias, which a merge does not replace."""
        bias = getattr(self.module, "bias", None)
        seen: dict[int, int] = {}
        for tensor, _ in self.digests:
            if tensor is not bias:
                storage = tensor.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def _tensors_of(*objects: Any) -> list[torch.Tensor]:
    """The tensors an object holds directly (attributes, and one level of nested quantisation state)."""
    found: list[torch.Tensor] = []
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif obj is not None and hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
            for value in vars(obj).values():
                if isinstance(value, torch.Tensor):
                    found.append(value)
                elif type(value).__name__ == "QuantState":  # bitsandbytes' double-quantised absmax
                    found.extend(_tensors_of(value))
    return found


def _digest(tensor: torch.Tensor) -> bytes:
    """A hash of a tensor's bytes (a write through `.data` does not bump its version counter, so compare content)."""
    raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(raw, digest_size=16).digest()


def _flattened(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Plain tensors only: a tensor subclass (torchao's quantised weights) is replaced by the tensors it holds."""
    plain: list[torch.Tensor] = []
    for tensor in tensors:
        data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
        if hasattr(data, "__tensor_flatten__"):
            names, _ = data.__tensor_flatten__()
            plain.extend(_flattened([getattr(data, name) for name in names]))
        else:
            plain.append(tensor)
    return plain


def keep_pre_merge(base: nn.Module) -> PreMergeStorage:
    """Record `base`'s quantised storage before a merge replaces it."""
    weight = getattr(base, "weight", None)
    weight = weight if isinstance(weight, torch.Tensor) else None
    state = getattr(base, "state", None)
    state = state if state is not None and hasattr(state, "__dict__") and not isinstance(state, nn.Module) else None
    weight_attrs = dict(vars(weight)) if weight is not None else {}
    tensors = [*base.parameters(), *base.buffers()] + _tensors_of(weight, *weight_attrs.values(), state)
    if weight is not None:
        tensors.append(weight)
    unique = {id(t): t for t in _flattened(tensors)}
    return PreMergeStorage(
        module=base,
        weight=weight,
        weight_attrs=weight_attrs,
        state_attrs=dict(vars(state)) if state is not None else {},
        digests=[(t, _digest(t)) for t in unique.values()],
    )


def check_restorable(stored: PreMergeStorage, where: str) -> None:
    """Refuse to unmerge when the kept storage was written in place: it would no longer be the base."""
    changed = [tuple(t.shape) for t, digest in stored.digests if _digest(t) != digest]
    if changed:
        raise QuantizedMergeError(
            f"{where}: cannot unmerge: the {len(changed)} quantised tensor(s) kept from before the merge (shapes "
            f"{changed}) were written in place since, so the base weights cannot be restored exactly. Reload the "
            "base model and attach the adapter again with PeftModel.from_pretrained; nothing was unmerged"
        )


def restore_pre_merge(layer: Any, stored: PreMergeStorage) -> None:
    """Put a merged quantised layer's pre-merge storage back (after checking nothing wrote into it in place)."""
    check_restorable(stored, "the adapted layer")
    device = compute_dtype_and_device(layer.get_base_layer())[1]
    module = stored.module
    layer.base_layer = module
    if stored.weight is not None:
        vars(stored.weight).clear()
        vars(stored.weight).update(stored.weight_attrs)
        if "weight" in module._parameters:
            module._parameters["weight"] = stored.weight
        else:  # torchao's merge deleted the parameter and set a new one
            if hasattr(module, "weight"):
                delattr(module, "weight")
            module.weight = stored.weight
    state = getattr(module, "state", None)
    if stored.state_attrs and state is not None:
        vars(state).clear()
        vars(state).update(stored.state_attrs)
    if compute_dtype_and_device(module)[1] != device:  # the model was moved after the merge
        module.to(device)
