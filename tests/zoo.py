"""Tiny random models of any transformers model type: its default config shrunk by attribute name (2 layers,
width 16, 4 heads, ...), so a sweep over model types needs no hand-written config per type; the inputs its forward
takes; and the checks one adapter on it must pass (check_adapter). Used by tests/test_every_architecture.py (which
writes docs/architectures.md) and tests/test_derived_targets.py."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from tolerance import assert_close, assert_differs

from lorta.methods import lorta_num_params, tenslora_num_params, tlora_num_params

# config attribute -> tiny value, applied wherever the attribute exists (nested sub-configs too).
SIZES: dict[str, int] = {
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "num_layers",
            "n_layer",
            "n_layers",
            "encoder_layers",
            "decoder_layers",
            "num_decoder_layers",
        ),
        2,
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ),
        4,
    ),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "embedding_size"), 16),
    **dict.fromkeys(
        (
            "intermediate_size",
            "d_ff",
            "n_inner",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "ffn_dim",
            "hidden_dim",
            "ffn_hidden_size",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "intermediate_size_mlp",
        ),
        32,
    ),
    **dict.fromkeys(("head_dim", "d_kv", "d_head", "kv_channels", "attention_head_dim"), 4),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 2),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk"), 1),
    "vocab_size": 97,
    "image_size": 8,
    "patch_size": 4,
    "rotary_dim": 4,
    "num_mel_bins": 8,
    "max_source_positions": 8,
}
SUB_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder", "qformer_config")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


def shrink(config: Any) -> Any:
    """`config` with every size attribute it has set to its tiny value (those it refuses to set are left)."""
    for key, value in SIZES.items():
        try:
            current = getattr(config, key, None)
            if isinstance(current, int) and not isinstance(current, bool):
                setattr(config, key, value)
        except Exception:  # a derived property (Falcon's head_dim), a per-layer attribute (Gemma 4), a refusal
            continue
    for key in TOKEN_IDS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= SIZES["vocab_size"]:
            setattr(config, key, 1)
    for sub in SUB_CONFIGS:
        child = getattr(config, sub, None)
        if child is not None and hasattr(child, "to_dict"):
            shrink(child)
    return config


def tiny_model(model_type: str, config_kwargs: dict | None = None, **overrides: Any) -> torch.nn.Module:
    """A random-initialised tiny model of `model_type` (float32, eval mode, seed 0). `config_kwargs` go to the
    config's constructor (for sizes it derives at init, as Gemma 4's per-layer head dims); `overrides` are set
    after the shrink ("text_config__x": a sub-config's attribute)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = shrink(AutoConfig.for_model(model_type, **(config_kwargs or {})))
    for key, value in overrides.items():
        target = config
        *path, leaf = key.split("__")  # "text_config__num_key_value_heads": a sub-config's attribute
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes = MODEL_MAPPING[type(config)]  # Funnel maps to (FunnelModel, FunnelBaseModel): the first
        model_class = classes[0] if isinstance(classes, (tuple, list)) else classes
        return model_class._from_config(config).eval()


def language_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The language model of a multimodal model (None for others): the part its default adapter adapts."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, "language_model", None)


def inputs_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inputs a forward of `model` takes (the language model's alone for a multimodal model)."""
    g = torch.Generator().manual_seed(1)
    lm = language_model(model)
    config = (lm or model).config
    ids = torch.randint(3, min(30, getattr(config, "vocab_size", 30) or 30), (2, 6), generator=g)
    params = inspect.signature((lm or model).forward).parameters
    main = getattr(lm or model, "main_input_name", "input_ids")
    inputs: dict[str, torch.Tensor] = {}
    if main == "input_ids" or "input_ids" in params and lm is not None:
        inputs["input_ids"] = ids
    vision = getattr(config, "vision_config", None) or config
    if "pixel_values" in params and lm is None and (main == "pixel_values" or hasattr(config, "vision_config")):
        size = getattr(vision, "image_size", 8)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(2, channels, size, size, generator=g)
    if main == "input_values":  # raw audio: enough samples for the convolutional feature encoder
        inputs["input_values"] = torch.randn(2, 8000, generator=g)  # 24 frames: more than SpecAugment's mask of 10
    if main == "input_features":
        inputs["input_features"] = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output tensor (last hidden state, logits) of `model`, or of its language model."""
    out = (language_model(model) or model)(**inputs)
    for key in ("last_hidden_state", "logits", "text_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def check_adapter(
    build: Callable[[], torch.nn.Module],
    make_config: Callable[[], Any],
    tmp: Path,
    terms: int,
    run: Callable[[torch.nn.Module], torch.Tensor] | None = None,
) -> PeftModel:
    """The checks of one adapter on the model `build()` makes (the same random weights each call): the identity
    at step 0, 4 Adam steps move it, save/load and merge are exact (to `terms` rounding steps), and its count is
    the method's closed form. `run(model)`: the output compared (default: `forward` on `inputs_for`). Returns the
    trained PeftModel."""
    if run is None:
        inputs = inputs_for(build())
        run = partial(forward, inputs=inputs)
    with torch.no_grad():
        base_out = run(build())
    model = get_peft_model(build(), make_config())
    with torch.no_grad():
        assert_close(run(model), base_out, terms, msg="identity at step 0")
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    target = torch.randn_like(base_out, generator=torch.Generator().manual_seed(2))
    for _ in range(4):
        optimizer.zero_grad()
        (run(model) - target).pow(2).mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = run(model)
    assert_differs(trained, base_out, terms, msg="the adapter trains")
    model.save_pretrained(tmp)
    loaded = PeftModel.from_pretrained(build(), tmp).eval()
    with torch.no_grad():
        assert_close(run(loaded), trained, terms, msg="save/load")
        loaded.merge_adapter()
        assert_close(run(loaded), trained, terms, msg="merged")
    assert_count(model)
    return model


def assert_count(model: PeftModel) -> None:
    """The trainable count is the method's closed form at this tensor's sizes, and those sizes are the model's:
    one slot per (layer, matrix) PEFT wrapped, the layers mode counting the adapted layers only."""
    factors = model.base_model.lorta_factors["default"]
    layout, config = factors.layout, model.peft_config["default"]
    wrapped = [n for n, m in model.base_model.model.named_modules() if hasattr(m, "lorta_slots")]
    assert sorted(layout.slots) == sorted(wrapped)
    owners = {n: [x for x in config.layer_names if not x or n.startswith(f"{x}.")] for n in wrapped}
    assert all(len(v) == 1 for v in owners.values()), owners  # each module in exactly one layer of the mode
    assert {v[0] for v in owners.values()} == set(config.layer_names) and layout.num_layers == len(config.layer_names)
    sizes = layout.count_sizes()
    method = config.peft_type.value if hasattr(config.peft_type, "value") else str(config.peft_type)
    if method == "LORTA":
        want = lorta_num_params(**sizes, r=config.r, modes=tuple(config.modes))
    elif method == "TENSLORA":
        want = tenslora_num_params(config.construction, config.decomposition, config.ranks, **sizes)
    else:
        want = tlora_num_params(sizes["L"], sizes["M"], config.r, sum(len(s) for s in layout.slots.values()))
    assert factors.num_trainable() == want == sum(p.numel() for p in model.parameters() if p.requires_grad)
