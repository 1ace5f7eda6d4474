"""Default targets derived from a model's own structure (lorta.architectures.structural_targets) for model types
the architecture table does not list: the attention projections found by name, adapted like any listed type."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tolerance import FORWARD_TERMS, assert_close, assert_differs
from transformers import AlbertConfig, AlbertModel, DeiTConfig, DeiTForImageClassification

import lorta
from lorta.architectures import ARCHITECTURES


def _deit():
    config = DeiTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, image_size=8, patch_size=4
    )
    return DeiTForImageClassification(config).eval()


def _albert():  # one layer reused at every depth: the layers mode holds one layer
    config = AlbertConfig(
        vocab_size=50,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=32,
    )
    return AlbertModel(config).eval()


MODELS = {
    "deit": (_deit, lambda: {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}),
    "albert": (_albert, lambda: {"input_ids": torch.tensor([[3, 7, 11, 19, 5], [2, 4, 8, 16, 31]])}),
}
EXPECTED = {  # (model type, method) -> the targets derived from the module names
    ("deit", "LORTA"): {"q_proj", "k_proj", "v_proj", "o_proj"},
    ("deit", "TENSLORA"): {"q_proj", "k_proj", "v_proj"},
    ("deit", "TLORA"): {"q_proj", "v_proj"},
    ("albert", "LORTA"): {"query", "key", "value", "attention.dense"},
    ("albert", "TENSLORA"): {"query", "key", "value"},
    ("albert", "TLORA"): {"query", "value"},
}
CONFIGS = {
    "LORTA": lambda **kw: lorta.LortaConfig(r=2, **kw),
    "TENSLORA": lambda **kw: lorta.TensLoraConfig(r=2, **kw),
    "TLORA": lambda **kw: lorta.TLoraConfig(r=2, **kw),
}


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_a_type_outside_the_table_gets_its_attention_projections_by_default(model_type, method, tmp_path):
    assert model_type not in ARCHITECTURES  # else this tests the table, not the derivation
    build, make_inputs = MODELS[model_type]
    inputs = make_inputs()
    torch.manual_seed(0)
    base_out = _out(build(), inputs)
    torch.manual_seed(0)
    model = get_peft_model(build(), CONFIGS[method]())
    assert set(model.peft_config["default"].target_modules) == EXPECTED[(model_type, method)]
    assert_close(_out(model, inputs), base_out, FORWARD_TERMS)  # identity at step 0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        out = model(**inputs)
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
        optimizer.step()
    model.eval()
    trained = _out(model, inputs)
    assert_differs(trained, base_out, FORWARD_TERMS)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    assert_close(_out(loaded, inputs), trained, FORWARD_TERMS)
    loaded.merge_adapter()
    assert_close(_out(loaded, inputs), trained, FORWARD_TERMS)


def test_albert_s_shared_layer_is_one_layer_of_the_tensor():
    model = get_peft_model(_albert(), lorta.LortaConfig(r=2))
    assert model.base_model.lorta_factors["default"].layout.num_layers == 1


# ------------------------------------------------------------------------- the shapes one tensor cannot hold
def _tiny(model_type: str, **overrides):
    from zoo import tiny_model

    return lambda: tiny_model(model_type, **overrides)


def _wrapped(model) -> list[str]:
    return [n for n, m in model.base_model.model.named_modules() if hasattr(m, "lorta_slots")]


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_hybrid_model_adapts_its_attention_layers_only(method):
    """Jamba: Mamba mixers in layer 0, attention in layer 1; the mixer's out_proj is not an attention output."""
    build = _tiny("jamba", attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2)
    model = get_peft_model(build(), CONFIGS[method]())
    assert model.peft_config["default"].layer_names == ["layers.1"]
    assert all(".self_attn." in n for n in _wrapped(model))


def test_a_model_without_attention_is_refused_with_the_targets_that_work():
    with pytest.raises(ValueError) as info:
        get_peft_model(_tiny("mamba")(), lorta.LortaConfig(r=2))
    message = str(info.value)
    assert "MambaModel has no attention projections" in message
    assert "mixer.in_proj (16 -> 64)" in message and "target_modules=['mixer.in_proj', 'mixer.out_proj']" in message


def test_swin_s_stages_are_refused_with_each_stage_s_shape_and_targets():
    with pytest.raises(lorta.LayoutError) as info:
        get_peft_model(
            _tiny("swin", image_size=16, patch_size=2, window_size=2, depths=[1, 2, 1], num_heads=[1, 2, 4])(),
            lorta.LortaConfig(r=2),
        )
    message = str(info.value)
    assert "3 different shapes" in message
    for stage, width in enumerate((16, 32, 64)):
        assert f"layers encoder.layers.{stage}: q {width} -> {width}" in message
        assert rf"target_modules=r'encoder\.layers\.{stage}\..*\.(?:q_proj|k_proj|v_proj|o_proj)'" in message


def test_a_multimodal_model_adapts_its_language_model_by_default():
    for model_type in ("llava", "qwen2_vl", "blip-2"):
        model = get_peft_model(_tiny(model_type)(), lorta.LortaConfig(r=2))
        assert _wrapped(model) and all(".language_model." in f".{n}" for n in _wrapped(model)), model_type


def _tower_and_language_model(pixels, ids):
    def run(model):
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        tower = base.vision_tower(pixel_values=pixels).last_hidden_state
        return torch.cat([tower.flatten(), base.language_model(input_ids=ids).last_hidden_state.flatten()])

    return run


def test_target_modules_can_add_the_vision_tower(tmp_path):
    """Tower and language model of one shape (4 heads of 4, no GQA): one tensor, its layers mode holding both."""
    from zoo import check_adapter

    build = _tiny("llava", text_config__num_key_value_heads=4)
    run = _tower_and_language_model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), IDS)
    targets = r".*\.(q_proj|k_proj|v_proj|o_proj)"
    model = check_adapter(build, lambda: lorta.LortaConfig(r=2, target_modules=targets), tmp_path, FORWARD_TERMS, run)
    layers = model.peft_config["default"].layer_names
    assert any("vision_tower" in n for n in layers) and any("language_model" in n for n in layers)


def test_a_tower_of_another_shape_is_refused_with_a_fix_per_part(tmp_path):
    """GQA in the language model (2 KV heads) but not in the tower: two groups, each fix passes the checks."""
    import ast
    import re

    from zoo import check_adapter

    build = _tiny("llava")
    targets = r".*\.(q_proj|k_proj|v_proj|o_proj)"
    with pytest.raises(lorta.LayoutError) as info:
        get_peft_model(build(), lorta.LortaConfig(r=2, target_modules=targets))
    message = str(info.value)
    assert "2 different shapes" in message and "k 16 -> 16" in message and "k 16 -> 8" in message
    fixes = re.findall(r"target_modules=(r'[^']*')(?:, model_shape=(\{[^}]*\}))?", message)
    assert len(fixes) == 2
    run = _tower_and_language_model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), IDS)
    for i, (target, shape) in enumerate(fixes):
        kwargs = {
            "target_modules": ast.literal_eval(target),
            **({"model_shape": ast.literal_eval(shape)} if shape else {}),
        }
        check_adapter(build, lambda kw=kwargs: lorta.LortaConfig(r=2, **kw), tmp_path / str(i), FORWARD_TERMS, run)


IDS = torch.tensor([[3, 7, 11, 19, 5], [2, 4, 8, 16, 31]])


def test_multihead_attention_projections_are_left_out_or_refused():
    """nn.MultiheadAttention reads out_proj.weight itself, so a wrapper there would never run: SigLIP's pooling
    head is excluded from the defaults, and naming it is refused with the exclude_modules that fix it."""
    build = _tiny("siglip", text_config__max_position_embeddings=16, text_config__projection_size=16)
    model = get_peft_model(build(), lorta.LortaConfig(r=2))
    assert "vision_model.head.attention.out_proj" in model.peft_config["default"].exclude_modules
    assert not any(n.startswith("vision_model.head.") for n in _wrapped(model))
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    with pytest.raises(lorta.LayoutError, match=r"exclude_modules=\['vision_model.head.attention.out_proj'\]"):
        get_peft_model(build(), lorta.LortaConfig(r=2, target_modules=targets))
    fixed = lorta.LortaConfig(r=2, target_modules=targets, exclude_modules=["vision_model.head.attention.out_proj"])
    assert "vision_model.head.attention.out_proj" not in _wrapped(get_peft_model(build(), fixed))
