"""Adapter arithmetic: `add_weighted_adapter` for tensor adapters, exact where the math is (docs/design.md,
"Adapter arithmetic").

`combination_type="cat"`: the weighted sum of adapters of one layout is again an adapter of that method whose rank
is the sum of their ranks. Every update is a sum over rank-one terms (CP: one column of every factor; TLoRA: one
column of A times one row of the core times one row of B), so concatenating the factors along the rank and
folding each adapter's weight times its scale into one factor per term gives

    delta_combined = sum_i w_i * delta_i

to float rounding. The combined adapter's scale is 1 (lora_alpha = r, no rsLoRA), so its own scale changes
nothing. A method whose factors do not concatenate this way (its Factorization has no `concatenate`) refuses.

`combination_type="als"` (PEFT's name `"svd"` is taken as the same request, with its `svd_rank`): the weighted sum
is fitted at a target rank by least squares (lorta.lora_fit: LoRTA by CP-ALS, TLoRA by each matrix's SVD, TensLoRA
by Adam), and the relative error ||fit - sum|| / ||sum|| is reported. The sum's per-module update is kept in
factored form (the inputs' maps side by side), so no dense update is formed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .lora_fit import LoraUpdate, adapted_layers, fit_updates, relative_errors
from .tuner.maps import module_maps

_LAYOUT_FIELDS = ("model_shape", "matrix_names", "layer_names", "layers_to_transform", "layers_pattern", "bias")
COMBINATION_TYPES = ("cat", "als", "svd")  # "svd": PEFT's name for a compression to svd_rank, here "als"


class AdapterCombinationError(ValueError):
    """The adapters cannot be combined as asked; the message names what differs and what to do."""


@dataclass
class CombinationReport:
    """How close the combined adapter's update is to sum_i w_i * delta_i: ||combined - sum|| / ||sum|| per module
    and overall (float64), with its rank and trainable parameters (cat: float rounding; als: the fit's error)."""

    combination_type: str
    rank: int
    per_module: dict[str, float]
    overall: float
    parameters: int
    history: list[float] = field(default_factory=list)

    def summary(self) -> str:
        worst = max(self.per_module, key=self.per_module.get)
        return (
            f"{self.combination_type} at rank {self.rank} ({self.parameters:,} parameters): relative error "
            f"||combined - sum|| / ||sum|| overall {self.overall:.3g}, worst {self.per_module[worst]:.3g} ({worst})"
        )


def add_weighted_adapter(
    tuner: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "cat",
    svd_rank: int | None = None,
    seed: int = 0,
    als_iterations: int = 500,
    steps: int | None = None,
) -> CombinationReport:
    """Add `adapter_name` = sum_i weights[i] * adapters[i] to `tuner` (a lorta tuner), as PEFT's LoRA does: exactly
    (cat), or fitted at rank `svd_rank` (als / svd; `seed`, `als_iterations` and Adam `steps` tune the fit)."""
    _check_request(tuner, adapters, weights, adapter_name, combination_type)
    configs = [tuner.peft_config[name] for name in adapters]
    parts = [tuner.lorta_factors[name] for name in adapters]
    _check_same_layout(adapters, configs, parts)
    updates = weighted_updates(tuner, adapters, weights)
    if combination_type in ("als", "svd"):
        return _compress(
            tuner, adapters, configs, updates, adapter_name, combination_type, svd_rank, seed, als_iterations, steps
        )
    if svd_rank is not None:
        raise AdapterCombinationError(
            f"svd_rank={svd_rank} goes with combination_type='als' (or 'svd'); 'cat' is exact at the sum of the "
            "ranks. Drop svd_rank, or pass combination_type='als' to fit the sum at that rank"
        )
    if not parts[0].exact_concatenation:
        raise AdapterCombinationError(
            f"{type(parts[0]).__name__} has no exact concatenation of its factors, so add_weighted_adapter "
            "(combination_type='cat') cannot combine these adapters; export them with lorta.export_lora and combine "
            "the LoRAs with PEFT's add_weighted_adapter"
        )
    rank = sum(part.scale_rank for part in parts)
    config = parts[0].concatenated_config(configs, rank)
    combined_scale = config.scale_for(rank)
    folds = [
        float(w) * cfg.scale_for(part.scale_rank) / combined_scale
        for w, cfg, part in zip(weights, configs, parts, strict=True)
    ]
    with torch.no_grad():
        state = parts[0].concatenate(list(zip(parts, folds, strict=True)))
    tuner.peft_config[adapter_name] = config
    tuner.inject_adapter(tuner.model, adapter_name)
    factors = tuner.lorta_factors[adapter_name]
    try:
        with torch.no_grad():
            missing, unexpected = factors.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise AdapterCombinationError(
                    f"the combined factors of {adapters} do not fit a {config.peft_type} adapter of rank {rank}: "
                    f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
                )
    except Exception:
        tuner.delete_adapter(adapter_name)
        raise
    factors.requires_grad_(False)  # as PEFT's LoRA: a combined adapter is for inference until set trainable
    per_module, overall = relative_errors(tuner, updates, adapter_name)
    return CombinationReport(combination_type, rank, per_module, overall, factors.num_trainable())


def weighted_updates(tuner: Any, adapters: list[str], weights: list[float]) -> dict[str, LoraUpdate]:
    """{module path: sum_i w_i * scale_i * P_i Q_i} in factored form (float64): the P's side by side, the Q's
    stacked, so a module's update is U @ V with the ranks summed and no dense matrix formed."""
    updates = {}
    with torch.no_grad():
        for path, layer in adapted_layers(tuner, adapters[0]).items():
            U, V = [], []
            for name, weight in zip(adapters, weights, strict=True):
                P, Q, _ = module_maps(layer.adapter_factors(name), layer.lorta_slots[name], layer.lorta_out_order)
                U.append(P.double() * (float(weight) * layer.lorta_scaling[name]))
                V.append(Q.double())
            updates[path] = LoraUpdate(torch.cat(U, dim=1), torch.cat(V, dim=0))
    return updates


def _compress(
    tuner: Any,
    adapters: list[str],
    configs: list[Any],
    updates: dict[str, LoraUpdate],
    adapter_name: str,
    combination_type: str,
    rank: int | None,
    seed: int,
    als_iterations: int,
    steps: int | None,
) -> CombinationReport:
    """The weighted sum fitted at `rank` by the method's least squares (lorta.lora_fit.fit_updates)."""
    if rank is None or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterCombinationError(
            f"combination_type={combination_type!r} fits the sum at a target rank: pass svd_rank=R (a positive int), "
            f"got {rank!r}"
        )
    reference = tuner.lorta_factors[adapters[0]]
    dtype = next(iter(reference._tensors())).dtype
    config = reference.config_at_rank(configs[0], rank)
    tuner.peft_config[adapter_name] = dataclasses.replace(config, init_weights=False)  # a random start, not zeros
    try:
        torch.manual_seed(seed)
        tuner.inject_adapter(tuner.model, adapter_name)
        factors = tuner.lorta_factors[adapter_name]
        factors.double()  # the fit runs in float64 (its error terms cancel well below float32's eps)
        factors.requires_grad_(True)  # an inactive adapter's factors are frozen; the fit trains them
        steps, history = fit_updates(tuner, updates, adapter_name, seed, als_iterations, steps)
        factors.to(dtype)
    except Exception:
        if adapter_name in tuner.lorta_factors:
            tuner.delete_adapter(adapter_name)
        tuner.peft_config.pop(adapter_name, None)
        raise
    tuner.peft_config[adapter_name] = config
    factors.requires_grad_(False)
    per_module, overall = relative_errors(tuner, updates, adapter_name)
    if not math.isfinite(overall):
        tuner.delete_adapter(adapter_name)
        raise AdapterCombinationError(f"the fit of {adapters} at rank {rank} did not converge (error {overall})")
    return CombinationReport(combination_type, rank, per_module, overall, factors.num_trainable(), history)


def _check_request(tuner: Any, adapters: list[str], weights: list[float], name: str, combination_type: str) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise AdapterCombinationError(
            f"combination_type={combination_type!r} is not available for lorta adapters; use one of "
            f"{list(COMBINATION_TYPES)} ('cat' is exact: the combined rank is the sum of the ranks; 'als' fits the sum "
            "at svd_rank and reports its error)"
        )
    if not adapters or len(adapters) != len(weights):
        raise AdapterCombinationError(
            f"add_weighted_adapter needs one weight per adapter: got {len(adapters)} adapters and {len(weights)} "
            "weights"
        )
    unknown = [a for a in adapters if a not in tuner.lorta_factors]
    if unknown:
        raise AdapterCombinationError(f"no lorta adapter named {unknown}; the model holds {list(tuner.lorta_factors)}")
    if name in tuner.peft_config:
        raise AdapterCombinationError(f"an adapter named {name!r} exists already; pick another adapter_name")


def _check_same_layout(adapters: list[str], configs: list[Any], parts: list[Any]) -> None:
    """One method, one layout: the same matrices of the same layers, the same modes, factors of the same shapes
    but for their rank."""
    first, reference = configs[0], parts[0]
    for name, config, part in zip(adapters[1:], configs[1:], parts[1:], strict=True):
        if config.peft_type != first.peft_type:
            raise AdapterCombinationError(
                f"adapter {name!r} is {config.peft_type} and {adapters[0]!r} is {first.peft_type}: only adapters "
                "of one method combine (export both to LoRA with lorta.export_lora to mix methods)"
            )
        differing = [
            f for f in _LAYOUT_FIELDS if _comparable(getattr(config, f, None)) != _comparable(getattr(first, f, None))
        ]
        differing += [f for f in part.structure_fields if getattr(part, f) != getattr(reference, f)]
        names, expected = set(part.state_dict()), set(reference.state_dict())
        if names != expected:
            differing.append(f"factors {sorted(names ^ expected)}")
        if differing:
            raise AdapterCombinationError(
                f"adapters {adapters[0]!r} and {name!r} have different layouts ({', '.join(differing)}); "
                "combine adapters of the same targets, layers and modes"
            )


def _comparable(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value
