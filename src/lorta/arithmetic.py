"""Adapter arithmetic: `add_weighted_adapter` for tensor adapters, exact where the math is (docs/design.md,
"Adapter arithmetic").

`combination_type="cat"`: the weighted sum of adapters of one layout is again an adapter of that method whose rank
is the sum of their ranks. Every update is a sum over rank-one terms (CP: one column of every factor; TLoRA: one
column of A times one row of the core times one row of B), so concatenating the factors along the rank and
folding each adapter's weight times its scale into one factor per term gives

    delta_combined = sum_i w_i * delta_i

to float rounding. The combined adapter's scale is 1 (lora_alpha = r, no rsLoRA), so its own scale changes
nothing. A method whose factors do not concatenate this way (its Factorization has no `concatenate`) refuses.
"""

from __future__ import annotations

from typing import Any

import torch

_LAYOUT_FIELDS = ("model_shape", "matrix_names", "layer_names", "layers_to_transform", "layers_pattern", "bias")
COMBINATION_TYPES = ("cat",)


class AdapterCombinationError(ValueError):
    """The adapters cannot be combined as asked; the message names what differs and what to do."""


def add_weighted_adapter(
    tuner: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "cat",
) -> None:
    """Add `adapter_name` = sum_i weights[i] * adapters[i] to `tuner` (a lorta tuner), as PEFT's LoRA does."""
    _check_request(tuner, adapters, weights, adapter_name, combination_type)
    configs = [tuner.peft_config[name] for name in adapters]
    parts = [tuner.lorta_factors[name] for name in adapters]
    _check_same_layout(adapters, configs, parts)
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


def _check_request(tuner: Any, adapters: list[str], weights: list[float], name: str, combination_type: str) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise AdapterCombinationError(
            f"combination_type={combination_type!r} is not available for lorta adapters; use one of "
            f"{list(COMBINATION_TYPES)} ('cat' is exact: the combined rank is the sum of the ranks)"
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
