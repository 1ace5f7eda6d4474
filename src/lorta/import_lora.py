"""LoRA -> tensor adapter: fit a LoRTA (or TensLoRA, TLoRA) adapter to a PEFT LoRA adapter's updates
(docs/design.md, "Export and import").

The LoRA's update of module m is dW_m = s_m * B_m A_m. The fit minimises the total squared error of the updates,

    sum_m || scale * P_m Q_m - (s_m B_m A_m)^T ||_F^2,

through the tensor adapter's own maps P_m, Q_m, so every method, architecture and fused layout is handled by
the code that runs it. Each term is evaluated from r x r products (||PQ||^2 = tr(P^T P Q Q^T), <PQ, UV> =
tr(U^T P Q V^T)): no dense d x d update is formed while fitting.

Starts: LoRTA (its three modes over attention matrices) from CP by alternating least squares of the stacked
updates dW[:, :, h, l, m] (cp_als: exact least squares over the observed slices, where GQA's K/V heads and absent
matrices leave the tensor unobserved, computed through the LoRA's own factors, never the dense tensor; TensorLy's
`parafac` is its reference in the tests); TLoRA in closed form (its frozen A, B become each update's singular
bases, C its singular values: the best rank-r fit per matrix). Both already solve the least squares; TensLoRA and
LoRTA ablations start from their random initialisation and are fitted by Adam through the maps.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .lora_fit import (
    ImportLoraError,
    LoraUpdate,
    Slices,
    adapted_layers,
    best_cp,
    cp_als,
    cp_start,
    fit_updates,
    relative_errors,
    tensor_slices,
)
from .registry import method_spec, method_specs
from .saving import write_directory

__all__ = [
    "METHODS",
    "ImportLoraError",
    "ImportReport",
    "LoraUpdate",
    "Slices",
    "best_cp",
    "cp_als",
    "cp_start",
    "import_lora",
    "lora_updates",
    "save_imported",
    "tensor_slices",
]

METHODS = tuple(method_specs())  # every method can be fitted to a LoRA


@dataclass
class ImportReport:
    """Relative errors ||fit - LoRA|| / ||LoRA|| per module and overall, with the parameter counts."""

    method: str
    rank: int
    per_module: dict[str, float]
    overall: float
    lora_params: int
    tensor_params: int
    steps: int
    history: list[float] = field(default_factory=list)

    def summary(self) -> str:
        worst = max(self.per_module, key=self.per_module.get)
        return (
            f"{self.method} rank {self.rank}: {self.tensor_params:,} parameters (the LoRA: {self.lora_params:,}); "
            f"relative error of the updates ||fit - LoRA|| / ||LoRA||: overall {self.overall:.4f}, "
            f"worst {self.per_module[worst]:.4f} ({worst})"
        )

    def table(self) -> str:
        width = max(len(m) for m in self.per_module)
        rows = [f"{'module':<{width}}  relative error"]
        rows += [f"{m:<{width}}  {e:.4f}" for m, e in self.per_module.items()]
        return "\n".join(rows + [self.summary()])


# ----------------------------------------------------------------------------------------------- reading the LoRA
def lora_updates(lora_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraUpdate]:
    """{module path: its LoRA update} of a PeftModel holding a LoRA adapter; refuses what is not a plain LoRA."""
    from peft.tuners.lora import LoraLayer

    config = lora_model.peft_config.get(adapter_name)
    kind = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    if kind != "LORA":
        raise ImportLoraError(f"import-lora takes a LoRA adapter; adapter {adapter_name!r} is {kind}")
    for option in ("use_dora", "lora_bias"):
        if getattr(config, option, False):
            raise ImportLoraError(f"the LoRA uses {option}=True, whose update is not B @ A: it cannot be imported")
    updates = {}
    base = lora_model.base_model.model
    for path, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name in getattr(layer, "lora_embedding_A", {}):
            raise ImportLoraError(f"{path} is an embedding LoRA; tensor adapters adapt Linear/Conv1D layers only")
        if adapter_name not in layer.lora_A:
            continue
        A = layer.lora_A[adapter_name].weight.detach().double()  # r x d_in
        B = layer.lora_B[adapter_name].weight.detach().double()  # d_out x r
        updates[path] = LoraUpdate(A.t().contiguous(), (B * layer.scaling[adapter_name]).t().contiguous())
    if not updates:
        raise ImportLoraError(f"adapter {adapter_name!r} adapts no Linear layer")
    return updates


def carried_tensors(lora_model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """What the LoRA file holds besides lora_A/lora_B (trained modules_to_save, biases), under PEFT's keys."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(lora_model, adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in state.items() if ".lora_" not in k}


# ----------------------------------------------------------------------------------------------- the fit
def adapter_config(method: str, rank: int, lora_config: Any, targets: list[str], **kwargs: Any) -> Any:
    """The tensor adapter's config: the LoRA's modules, head and bias; scale alpha / r = 1 (the fit sets sizes)."""
    if method not in method_specs():
        raise ImportLoraError(f"method={method!r} is not one of {list(method_specs())}")
    spec = method_spec(method)
    common = dict(
        target_modules=sorted(targets),
        lora_alpha=float(rank),
        task_type=lora_config.task_type,
        modules_to_save=lora_config.modules_to_save,
        base_model_name_or_path=lora_config.base_model_name_or_path,
        bias={"none": "none", "all": "all", "lora_only": "lorta_only"}[lora_config.bias],
        init_weights=False,
    )
    if spec.import_check is not None:
        spec.import_check(kwargs)
    return spec.config_cls(r=rank, **common, **kwargs)


def import_lora(
    lora_model: nn.Module,
    method: str = "lorta",
    rank: int = 16,
    steps: int | None = None,
    seed: int = 0,
    als_iterations: int = 500,
    **config_kwargs: Any,
) -> tuple[nn.Module, ImportReport]:
    """Fit a tensor adapter to a PeftModel's LoRA adapter "default"; returns (the PeftModel of the base with the
    tensor adapter, the report). The LoRA model is consumed: its LoRA layers are unloaded from the base."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    updates = lora_updates(lora_model)
    carried = carried_tensors(lora_model)
    lora_config = lora_model.peft_config["default"]
    lora_params = sum(u.U.numel() + u.V.numel() for u in updates.values())
    config = adapter_config(method, rank, lora_config, list(updates), **config_kwargs)
    base = lora_model.unload()
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    factors = model.base_model.lorta_factors["default"]
    factors.double()  # the fit runs in float64: its error terms cancel to well below float32's eps
    missing = set(updates) - set(adapted_layers(model.base_model))
    if missing:  # pragma: no cover - the targets are the LoRA's own modules
        raise ImportLoraError(f"the tensor adapter does not reach {sorted(missing)[:3]}")
    steps, history = fit_updates(model.base_model, updates, "default", seed, als_iterations, steps)
    if carried:
        own = get_peft_model_state_dict(model)
        foreign = sorted(set(carried) - set(own))
        if foreign:
            raise ImportLoraError(f"the LoRA saved {foreign[:3]}, which the tensor adapter does not hold")
        set_peft_model_state_dict(model, {**own, **carried})
    factors.float()
    per_module, overall = relative_errors(model.base_model, updates)
    tensor_params = sum(p.numel() for p in factors.parameters() if p.requires_grad)
    report = ImportReport(method, rank, per_module, overall, lora_params, tensor_params, steps, history)
    model.eval()
    return model, report


def save_imported(
    model: nn.Module, out_dir: str | os.PathLike[str], report: ImportReport | None = None, overwrite: bool = False
) -> Path:
    """save_pretrained (plus import_report.json) into a folder written whole or not at all (an existing one only
    with overwrite)."""

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        if report is not None:
            Path(tmp, "import_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")

    return write_directory(out_dir, write, overwrite=overwrite)
