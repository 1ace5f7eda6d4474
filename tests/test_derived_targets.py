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
