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
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .lora_fit import ImportLoraError, LoraUpdate, Slices, adapted_layers, best_cp, cp_als, cp_start, tensor_slices
from .registry import method_spec, method_specs
from .saving import write_directory
from .tuner.maps import module_maps

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


def squared_errors(model: nn.Module, updates: dict[str, LoraUpdate], adapter: str = "default") -> dict[str, Tensor]:
    """|| scale P Q - U V ||_F^2 of each module, from r x r products (differentiable in the factors)."""
    errors = {}
    for path, layer in adapted_layers(model).items():
        factors = layer.adapter_factors(adapter)
        P, Q, _ = module_maps(factors, layer.lorta_slots[adapter], layer.lorta_out_order)
        target = updates[path]
        U, V = target.U.to(P.dtype), target.V.to(P.dtype)
        s = layer.lorta_scaling[adapter]
        fit2 = s * s * torch.trace((P.t() @ P) @ (Q @ Q.t()))
        cross = s * torch.trace((U.t() @ P) @ (Q @ V.t()))
        errors[path] = fit2 - 2 * cross + target.norm2
    return errors


def relative_errors(model: nn.Module, updates: dict[str, LoraUpdate]) -> tuple[dict[str, float], float]:
    """Per-module and overall ||fit - LoRA|| / ||LoRA||, in float64 with the dense updates (the final report)."""
    per_module, num, den = {}, 0.0, 0.0
    with torch.no_grad():
        for path, layer in adapted_layers(model).items():
            factors = layer.adapter_factors("default")
            P, Q, _ = module_maps(factors, layer.lorta_slots["default"], layer.lorta_out_order)
            fit = (P.double() @ Q.double()) * layer.lorta_scaling["default"]
            want = updates[path].dense()
            err, ref = float((fit - want).norm() ** 2), float(want.norm() ** 2)
            per_module[path] = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
            num, den = num + err, den + ref
    return per_module, math.sqrt(num / den) if den > 0 else math.sqrt(num)


def refine(model: nn.Module, updates: dict[str, LoraUpdate], steps: int, lr: float = 1e-2) -> list[float]:
    """Adam on the total squared error relative to the LoRA's, through the maps; keeps the best factors seen."""
    factors = model.base_model.lorta_factors["default"]
    params = [p for p in factors.parameters() if p.requires_grad]
    total = sum(u.norm2 for u in updates.values())
    history: list[float] = []
    if steps <= 0 or not params:
        return history
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    best, best_state = math.inf, None
    for step in range(steps):
        optimizer.zero_grad()
        loss = sum(squared_errors(model, updates).values()) / total
        value = float(loss.detach())
        if value < best:
            best, best_state = value, [p.detach().clone() for p in params]
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 20) == 0:
            history.append(math.sqrt(max(value, 0.0)))
    with torch.no_grad():
        for p, saved in zip(params, best_state, strict=True):
            p.copy_(saved)
    return history


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
    missing = set(updates) - set(adapted_layers(model))
    if missing:  # pragma: no cover - the targets are the LoRA's own modules
        raise ImportLoraError(f"the tensor adapter does not reach {sorted(missing)[:3]}")
    start = method_spec(method).import_start
    started = start(model, updates, seed, als_iterations) if start is not None else False
    if not started:
        _shrink_start(model, updates)
    if steps is None:  # a closed start (LoRTA's ALS, TLoRA's SVD) already solves the same least squares
        steps = 0 if started else 3000
    history = refine(model, updates, steps)
    if carried:
        own = get_peft_model_state_dict(model)
        foreign = sorted(set(carried) - set(own))
        if foreign:
            raise ImportLoraError(f"the LoRA saved {foreign[:3]}, which the tensor adapter does not hold")
        set_peft_model_state_dict(model, {**own, **carried})
    factors.float()
    per_module, overall = relative_errors(model, updates)
    tensor_params = sum(p.numel() for p in factors.parameters() if p.requires_grad)
    report = ImportReport(method, rank, per_module, overall, lora_params, tensor_params, steps, history)
    model.eval()
    return model, report


def _shrink_start(model: nn.Module, updates: dict[str, LoraUpdate]) -> None:
    """Scale the random start so that its updates have the LoRA's overall size. The update is a product of the
    trainable factors, so scaling all of them by c scales it by c^k; k is measured (c = 2), not assumed."""
    params = [p for p in model.base_model.lorta_factors["default"].parameters() if p.requires_grad]
    empty = {p: LoraUpdate(u.U[:, :0], u.V[:0]) for p, u in updates.items()}
    target = sum(u.norm2 for u in updates.values()) ** 0.5
    with torch.no_grad():
        size = float(sum(squared_errors(model, empty).values())) ** 0.5
        if size <= 0 or target <= 0 or not params:
            return
        for p in params:
            p.mul_(2.0)
        degree = math.log2(float(sum(squared_errors(model, empty).values())) ** 0.5 / size)
        factor = (target / size) ** (1 / max(degree, 1.0)) / 2.0
        for p in params:
            p.mul_(factor)


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
