"""The adapter of a run: its PEFT config, the wrapped model, its counts, and where it is saved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ...registry import method_spec, method_specs
from .options import (
    ADAPTER_METHODS,
    HEAD_MODULES,
    REFERENCE_LORA_RANK,
    TrainOptions,
    UsageError,
    default_targets,
    target_modules,
)


def _check_targets_match(model: nn.Module, targets: Sequence[str]) -> None:
    """Every --targets name must match a Linear-like module (exactly or as a dotted suffix): PEFT only fails when
    none matches, so a typo next to a valid name would silently adapt less than asked."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UsageError(
                f"--targets {target!r} matches no linear module of this {model.config.model_type} model; "
                f"its linear modules end in: {', '.join(leaves)}"
            )


def peft_config(o: TrainOptions, task_type: str, model_type: str) -> Any:
    """The PEFT config of an adapter method."""
    import peft

    common: dict[str, Any] = {"lora_alpha": o.alpha, "lora_dropout": o.dropout, "task_type": task_type}
    targets = target_modules(o.targets, model_type)
    if targets is not None:
        common["target_modules"] = targets
    if o.method in method_specs():
        spec = method_spec(o.method)
        return spec.config(o.rank, **spec.train_kwargs(o.method_options, o), **common)
    common.setdefault("target_modules", default_targets(model_type))
    if o.method == "vera":  # seeded random projections, saved with the adapter (PEFT's default)
        common.pop("lora_alpha")
        return peft.VeraConfig(r=o.rank, vera_dropout=common.pop("lora_dropout"), projection_prng_key=o.seed, **common)
    return peft.LoraConfig(r=o.rank, **common)


def is_head(name: str) -> bool:
    return any(part in HEAD_MODULES for part in name.split("."))


def prepare_model(model: nn.Module, o: TrainOptions, task_type: str) -> nn.Module:
    """Wrap an adapter method with PEFT, or set requires_grad for full / head-only training. A quantised base first
    goes through PEFT's prepare_model_for_kbit_training (float32 norms, input gradients), as for QLoRA."""
    if o.quantize is not None:
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if o.method in ADAPTER_METHODS:
        import peft

        import lorta  # noqa: F401  (registers the lorta methods with PEFT)

        config = peft_config(o, task_type, model.config.model_type)
        if o.targets is not None:
            _check_targets_match(model, config.target_modules)
        return peft.get_peft_model(model, config)
    for name, param in model.named_parameters():
        param.requires_grad_(o.method == "full" or is_head(name))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(adapter, head) trainable parameters; each shared tensor counted once. Full training counts every weight
    outside the head as 'adapter'."""
    adapter = head = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            if is_head(name):
                head += param.numel()
            else:
                adapter += param.numel()
    return adapter, head


def lora_reference_parameters(model_path: Path, rank: int = REFERENCE_LORA_RANK) -> int:
    """Trainable parameters of PEFT LoRA at ``rank`` on LoRTA's default targets (q, k, v, o), counted exactly by
    lorta.params on a meta-device copy of the model (no weights are read)."""
    from ...params import lora_count
    from ..catalogue import model_config

    config = model_config(str(model_path))
    return lora_count(config, rank, default_targets(config.model_type))


def saved_path(out: Path, o: TrainOptions) -> Path:
    """Adapters: ``out/adapter`` (for PeftModel.from_pretrained); full: ``out/model``; head-only:
    ``out/head.safetensors``."""
    if o.method in ADAPTER_METHODS:
        return out / "adapter"
    return out / ("model" if o.method == "full" else "head.safetensors")


def save_trained(model: nn.Module, tokenizer: Any, out: Path, o: TrainOptions) -> Path:
    """Write what the run trained to :func:`saved_path`."""
    path = saved_path(out, o)
    if o.method in ADAPTER_METHODS:
        model.save_pretrained(path, selected_adapters=["default"])
    elif o.method == "full":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))
    return path


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen weights (quantised storage as stored: int8, packed 4-bit plus their scales)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.requires_grad or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def adapted_modules(model: nn.Module) -> list[str]:
    """The distinct target names the adapter was put on (PEFT's config, as PEFT resolved it)."""
    config = model.peft_config[model.active_adapter]
    modules = config.target_modules
    return sorted(modules) if isinstance(modules, (set, list, tuple)) else [str(modules)]


def adapter_only(model: nn.Module) -> int:
    """Trainable parameters of the 'default' adapter of a PeftModel (excluding TRL's frozen reference copy)."""
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "num_adapter_parameters"):
        return int(tuner.num_adapter_parameters("default"))
    return sum(p.numel() for n, p in model.named_parameters() if ".default." in n and p.requires_grad)
