"""Deployment: a tensor adapter written as what serving engines load (docs/design.md, "Export and import").

Every adapted module's update is `scale * (P @ Q)^T` with P: d_in x r', Q: r' x d_out, so it IS a rank-r' LoRA:
lora_A = P^T, lora_B = scale * Q^T, with lora_alpha = r (LoRA's scaling alpha / r is then 1). The export takes that
path from the factors: no dense update, no SVD, exact up to the rounding of the maps themselves. The tensor
adapter stays the artifact of record; the LoRA folder is derived from it.

`engine` picks the rules the folder must obey (ENGINES): "peft" writes the smallest exact LoRA (per-module ranks
through `rank_pattern` where they differ); "vllm" and "sglang" write one rank for every module (zero-padded, which
changes nothing), fill in the sibling projections an engine reads together, and refuse what the engine cannot
serve with the rule named, before anything is written.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .engines import ENGINES, GGUF_ARCHITECTURES, EngineRules
from .saving import write_directory, write_file
from .tuner.adapter_file import FACTOR_PREFIX
from .tuner.layer import TensorAdapterLayer
from .tuner.maps import module_maps

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_BIAS = {"none": "none", "all": "all", "lorta_only": "lora_only"}


class ExportError(ValueError):
    """The adapter cannot be written in the requested form; the message names the rule and the way out."""


@dataclass
class LoraExport:
    """One adapter as a PEFT LoRA: its config fields and its state dict (PEFT's key names), ready to write."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    ranks: dict[str, int] = field(default_factory=dict)  # module path -> rank as written


# ------------------------------------------------------------------------------------------- the exact LoRA
def lora_matrices(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[Tensor, Tensor]]:
    """{module path: (lora_A, lora_B)} of one adapter, from its factors: A = P^T (r' x d_in), B = scale * Q^T
    (d_out x r'), so that B @ A is the module's update in nn.Linear's (out, in) orientation."""
    base = _transformers_model(model)
    found: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for path, layer in base.named_modules():
            if not isinstance(layer, TensorAdapterLayer) or adapter_name not in layer.lorta_slots:
                continue
            factors = layer.adapter_factors(adapter_name)
            P, Q, _ = module_maps(factors, layer.lorta_slots[adapter_name], layer.lorta_out_order)
            scale = layer.lorta_scaling[adapter_name]
            found[path] = (P.t().contiguous(), (Q * scale).t().contiguous())
    if not found:
        raise ExportError(f"adapter {adapter_name!r} adapts no module of this model: there is nothing to export")
    return found


def lora_export(model: nn.Module, adapter_name: str = "default", engine: str = "peft") -> LoraExport:
    """The exact LoRA of one adapter under `engine`'s rules (ENGINES); raises ExportError naming a broken rule."""
    rules = _engine(engine)
    config = _adapter_config(model, adapter_name)
    base = _transformers_model(model)
    matrices = lora_matrices(model, adapter_name)
    _check_rules(rules, base, config, matrices)
    if rules.sibling_groups:
        matrices = _with_siblings(base, matrices, rules.sibling_groups)
    ranks = {path: a.shape[0] for path, (a, _) in matrices.items()}
    rank, rank_pattern = _ranks(rules, ranks)
    if rules.uniform_rank:
        matrices = {path: _pad(a, b, rank) for path, (a, b) in matrices.items()}
        ranks = dict.fromkeys(matrices, rank)

    tensors: dict[str, Tensor] = {}
    for path, (a, b) in matrices.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.detach().clone()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.detach().clone()
    tensors.update(_carried_tensors(model, adapter_name))

    conv1d = [type(_base_layer(base.get_submodule(p))).__name__ == "Conv1D" for p in matrices]
    fields = {
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: the adapter's scale is in lora_B
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": _target_modules(base, list(matrices), exact=not rules.uniform_rank),
        "fan_in_fan_out": bool(conv1d) and all(conv1d),
        "bias": _BIAS[config.bias],
        "modules_to_save": _list_or_none(config.modules_to_save),
        "lora_dropout": config.lora_dropout,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "use_rslora": False,
    }
    return LoraExport(fields, tensors, ranks)


def export_lora(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    adapter_name: str | list[str] | None = None,
    engine: str = "peft",
    overwrite: bool = False,
) -> Path:
    """Write adapter(s) of a PeftModel as standard PEFT LoRA folders that plain PEFT (and `engine`) load.

    As `PeftModel.save_pretrained`: "default" (or the only adapter named) goes to `out_dir`, any other adapter to
    `out_dir/<name>`. Everything is checked and built before the folder is written whole (never half-written);
    an existing `out_dir` is replaced only with `overwrite=True`.
    """
    names = _adapter_names(model, adapter_name)
    exports = {name: lora_export(model, name, engine) for name in names}
    root = names[0] if len(names) == 1 else "default"

    def write(tmp: str) -> None:
        for name, export in exports.items():
            folder = Path(tmp) if name == root else Path(tmp) / name
            folder.mkdir(parents=True, exist_ok=True)
            write_lora(export, folder)

    return write_directory(out_dir, write, overwrite=overwrite)


def write_lora(export: LoraExport, folder: Path) -> None:
    """adapter_config.json (through PEFT's LoraConfig, so every field is PEFT's) and adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(**export.config)
    config.save_pretrained(str(folder))
    save_file(
        {k: t.contiguous() for k, t in export.tensors.items()}, str(folder / WEIGHTS_NAME), metadata={"format": "pt"}
    )


# ------------------------------------------------------------------------------------------- GGUF (llama.cpp)
GGUF_NAME = "adapter_model.gguf"


def gguf_tensors(model: nn.Module, adapter_name: str = "default") -> tuple[str, int, dict[str, Tensor]]:
    """(llama.cpp architecture, rank, {GGUF tensor name: array}) of one adapter: the exact LoRA of one rank, named
    as llama.cpp names the base tensors ("blk.3.attn_q.weight.lora_a"), with q's and k's lora_B rows in the order
    llama.cpp's conversion gives the base weights."""
    gguf = _gguf()
    export = lora_export(model, adapter_name, engine="llama.cpp")
    base = _transformers_model(model)
    config = base.config
    arch_name, reorder_qk = GGUF_ARCHITECTURES[config.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {
        "q_proj": config.num_attention_heads,
        "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    }
    tensors: dict[str, Tensor] = {}
    prefix = "base_model.model."
    for key, value in export.tensors.items():
        path, _, kind = key.removeprefix(prefix).rpartition(".lora_")
        gguf_name = names.get_name(path)
        if gguf_name is None:
            raise ExportError(
                f"llama.cpp has no tensor for {path} in its {arch_name!r} architecture; export "
                "--format lora or --format merged instead"
            )
        leaf = path.rsplit(".", 1)[-1]
        if kind == "B.weight" and reorder_qk and leaf in heads:
            value = value[_interleaved_rope_rows(value.shape[0], heads[leaf])]
        tensors[f"{gguf_name}.weight.lora_{kind[0].lower()}"] = value
    return arch_name, export.config["r"], tensors


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        from .extras import MissingDependencyError

        raise MissingDependencyError(
            "--format gguf writes through the gguf package, which is not installed; "
            "pip install 'gguf>=0.10' (or pip install 'lorta[cli]')"
        ) from exc
    return gguf


def _interleaved_rope_rows(rows: int, heads: int) -> Tensor:
    """The row order that turns HF's rotate-half RoPE layout (per head: all first halves, then all second halves)
    into GGML's interleaved pairs (per head: x0, x(d/2), x1, x(d/2+1), ...): row h*d + 2j + s reads h*d + s*d/2 + j."""
    head_dim = rows // heads
    index = torch.arange(rows).view(heads, 2, head_dim // 2)
    return index.transpose(1, 2).reshape(rows)


def export_gguf(
    model: nn.Module, out: str | os.PathLike[str], adapter_name: str = "default", overwrite: bool = False
) -> Path:
    """Write one adapter as a llama.cpp LoRA adapter (GGUF, float32): `out` is the .gguf file, or a folder that
    gets `adapter_model.gguf`. llama.cpp loads it onto a GGUF of the same base (`llama-cli -m base.gguf --lora
    out.gguf`); its scale alpha / rank is 1, the adapter's own scale being in lora_b."""
    gguf = _gguf()
    arch_name, rank, tensors = gguf_tensors(model, adapter_name)

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path, arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        for name, value in tensors.items():
            writer.add_tensor(name, value.detach().float().cpu().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    target = Path(out)
    if target.suffix.lower() == ".gguf":
        return write_file(target, write, overwrite=overwrite)
    return write_directory(target, lambda tmp: write(os.path.join(tmp, GGUF_NAME)), overwrite=overwrite)


# ------------------------------------------------------------------------------------------- merged model
def merged_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The base model's state dict with the adapter merged (W + scale * (P @ Q)^T, as merge_and_unload writes it)
    and its trained modules_to_save and biases in place; the model itself is left untouched."""
    base = _transformers_model(model)
    _adapter_config(model, adapter_name)
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
        raise ExportError(
            "the base model is quantised, and a merged export writes float weights: load the base unquantised and "
            "export from that (lorta export --format merged does), or export --format lora"
        )
    merged = dict(base.state_dict())
    for path, layer in base.named_modules():
        if not isinstance(layer, TensorAdapterLayer):
            continue
        others = [a for a in layer.merged_adapters if a != adapter_name]
        if others:
            raise ExportError(f"{path} has adapter(s) {others} merged into its weight: unmerge() them first")
        if adapter_name in layer.lorta_slots and adapter_name not in layer.merged_adapters:
            weight = layer.get_base_layer().weight
            delta = layer.delta_weight(adapter_name).detach().to(weight.device)
            merged[f"{path}.base_layer.weight"] = (weight.detach().to(delta.dtype) + delta).to(weight.dtype)
    return _unwrap_keys(merged, adapter_name)


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    adapter_name: str = "default",
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write a plain transformers model folder (safetensors) equal to `merge_and_unload()` of `adapter_name`,
    without modifying `model`; `tokenizer` (optional) is saved beside it."""
    base = _transformers_model(model)
    state = merged_state_dict(model, adapter_name)

    def write(tmp: str) -> None:
        _save_plain(base, tmp, state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_directory(out_dir, write, overwrite=overwrite)


def _save_plain(base: nn.Module, folder: str, state: dict[str, Tensor]) -> None:
    """save_pretrained of the unwrapped model: the config (without PEFT's bookkeeping) and the merged weights."""
    base.save_pretrained(folder, state_dict=state, safe_serialization=True)


def _unwrap_keys(state: dict[str, Tensor], adapter_name: str) -> dict[str, Tensor]:
    """State-dict keys of the model with PEFT's wrappers taken out: `x.base_layer.w` -> `x.w`; a modules_to_save
    wrapper's trained copy (`x.modules_to_save.<adapter>.w`) replaces `x.w`, its original is dropped."""
    out: dict[str, Tensor] = {}
    trained = f".modules_to_save.{adapter_name}."
    for key, value in state.items():
        if ".modules_to_save." in key:
            if trained in key:
                out[key.replace(trained, ".")] = value
            continue
        if ".original_module." in key:
            plain = key.replace(".original_module.", ".")
            out.setdefault(plain, value)
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


# ------------------------------------------------------------------------------------------- the rules
def _engine(engine: str) -> EngineRules:
    if engine not in ENGINES:
        raise ExportError(f"engine={engine!r} is not one of {sorted(ENGINES)}")
    return ENGINES[engine]


def _check_rules(rules: EngineRules, base: nn.Module, config: Any, matrices: dict[str, Any]) -> None:
    def refuse(rule: str, fix: str) -> None:
        raise ExportError(f"{rules.name} ({rules.version}) {rule}; {fix}")

    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if rules.model_types is not None and model_type not in rules.model_types:
        refuse(
            f"takes adapters here for the model types {sorted(rules.model_types)}, not {model_type!r}",
            "export --format lora (llama.cpp's convert_lora_to_gguf.py converts that for its other "
            "architectures), or --format merged",
        )
    architectures = set(getattr(base.config, "architectures", None) or ()) | {type(base).__name__}
    refused = sorted(architectures & rules.refused_architectures)
    if refused:
        refuse(
            f"serves {refused[0]} without LoRA support",
            "serve it with PEFT (engine='peft') or merge it into the base (lorta export --format merged)",
        )
    if config.bias != "none" and not rules.bias:
        refuse(
            f"does not load adapter biases (this adapter trains bias={config.bias!r})",
            "train with bias='none', or serve with PEFT, or export --format merged",
        )
    saved = set(_list_or_none(config.modules_to_save) or ())
    present = {p.rsplit(".", 1)[-1] for p, _ in _trained_modules(base)} & saved
    if rules.modules_to_save is not None and present - rules.modules_to_save:
        allowed = f"only {sorted(rules.modules_to_save)}" if rules.modules_to_save else "none"
        refuse(
            f"loads {allowed} of the fully trained modules (modules_to_save), and this adapter trains "
            f"{sorted(present)}",
            "serve with PEFT, or export --format merged",
        )
    if rules.module_names is not None:
        bad = sorted({p.rsplit(".", 1)[-1] for p in matrices} - rules.module_names)
        if bad:
            refuse(
                f"adapts only the modules {sorted(rules.module_names)}, not {bad}",
                "adapt only those (target_modules), serve with PEFT, or export --format merged",
            )
    if rules.needs_layer_index:
        bad = [p for p in matrices if not re.search(r"(^|\.)layers\.\d+\.", p)]
        if bad:
            refuse(
                f"finds a module's layer by 'layers.<n>.' in its name, which {bad[0]} lacks",
                "serve with PEFT, or export --format merged",
            )


def _ranks(rules: EngineRules, ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(r, rank_pattern): the most common rank and the modules that differ, or one rank the engine allows."""
    if not rules.uniform_rank:
        rank = Counter(ranks.values()).most_common(1)[0][0]
        return rank, {re.escape(p): r for p, r in ranks.items() if r != rank}
    rank = max(ranks.values())
    if rules.ranks is not None:
        allowed = [r for r in rules.ranks if r >= rank]
        if not allowed:
            raise ExportError(
                f"{rules.name} ({rules.version}) serves LoRA ranks up to {max(rules.ranks)}, and this adapter needs "
                f"rank {rank} at {max(ranks, key=ranks.get)}; lower the adapter's rank or serve with PEFT"
            )
        rank = allowed[0]
    return rank, {}


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A and zero columns of B up to `rank`: B @ A is unchanged."""
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    a = torch.cat([a, a.new_zeros(extra, a.shape[1])])
    return a, torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def _with_siblings(
    base: nn.Module, matrices: dict[str, tuple[Tensor, Tensor]], groups: tuple[tuple[str, ...], ...]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Add a zero LoRA for each missing projection of a group the engine reads together (q/k/v, gate/up)."""
    out = dict(matrices)
    modules = dict(base.named_modules())
    for path, (a, b) in matrices.items():
        parent, _, leaf = path.rpartition(".")
        for group in groups:
            if leaf not in group:
                continue
            for sibling in group:
                other = f"{parent}.{sibling}" if parent else sibling
                if other in out or other not in modules:
                    continue
                d_out, d_in = _linear_shape(modules[other])
                out[other] = (a.new_zeros(a.shape[0], d_in), b.new_zeros(d_out, a.shape[0]))
    return dict(sorted(out.items()))


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    from .layout import module_features

    d_in, d_out = module_features(_base_layer(module))
    return d_out, d_in


def _target_modules(base: nn.Module, paths: list[str], exact: bool) -> list[str]:
    """Module suffix names (what every engine reads), or the exact paths where the names would also match modules
    the adapter leaves alone (e.g. layers_to_transform), so plain PEFT creates no LoRA the file does not hold."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if not exact:
        return names
    wanted = set(paths)
    matched = {n for n, m in base.named_modules() if n and n.rsplit(".", 1)[-1] in names and _is_linear(m)}
    return names if matched == wanted else sorted(wanted)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(_base_layer(module), nn.Linear) or type(_base_layer(module)).__name__ == "Conv1D"


# ------------------------------------------------------------------------------------------- plumbing
def _transformers_model(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model
    raise ExportError(f"expected a PeftModel holding lorta adapters, got {type(model).__name__}")


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _adapter_config(model: nn.Module, adapter_name: str) -> Any:
    from .registry import peft_types

    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ExportError(f"the model has no adapter {adapter_name!r}; it has {sorted(configs)}")
    config = configs[adapter_name]
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind not in peft_types():
        raise ExportError(
            f"adapter {adapter_name!r} is {kind}, not a lorta adapter "
            f"({sorted(peft_types())}): save it with save_pretrained"
        )
    return config


def _adapter_names(model: nn.Module, adapter_name: str | list[str] | None) -> list[str]:
    _transformers_model(model)
    configs = model.peft_config
    if adapter_name is None:
        names = list(configs)
    elif isinstance(adapter_name, str):
        names = [adapter_name]
    else:
        names = list(adapter_name)
    if not names:
        raise ExportError("no adapter named: pass adapter_name (the model has none)")
    for name in names:
        _adapter_config(model, name)
    if len(names) > 1 and "default" not in names:
        raise ExportError(
            f"several adapters {names} go to <out_dir>/<name> beside a 'default' one at <out_dir> "
            "(as save_pretrained lays them out); export them one at a time instead"
        )
    return names


def _trained_modules(base: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in base.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]


def _carried_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """What the lorta file holds besides its factors (trained biases, modules_to_save): PEFT writes those under the
    same keys for LoRA, since LoRA adapts the same modules."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    carried = {k: v.detach().clone() for k, v in state.items() if not k.startswith(FACTOR_PREFIX)}
    leftover = [k for k in carried if "lorta" in k]
    if leftover:  # pragma: no cover - a factor stored outside the bank would be lost silently
        raise ExportError(f"cannot export tensors {leftover[:3]}: they are neither factors nor LoRA-compatible")
    return carried


def _list_or_none(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else sorted(value)
