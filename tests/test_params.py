"""Trainable counts, on meta-device models (no weights): the paper's Table 1 and the closed forms."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, RobertaConfig

import lorta
from lorta.methods import LORTA_MODES, lorta_num_params

LLAMA2_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
ROBERTA_BASE = RobertaConfig(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=50265,
    max_position_embeddings=514,
)


def meta_model(config, auto=AutoModelForCausalLM):
    with torch.device("meta"):
        return auto.from_config(config)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("r,lorta_count,lora_count", [(4, 17_160, 2_097_152), (64, 274_560, 33_554_432)])
def test_llama2_7b_table1(r, lorta_count, lora_count):
    model = get_peft_model(meta_model(LLAMA2_7B), lorta.LortaConfig(r=r, target_modules=["q_proj", "v_proj"]))
    assert trainable_count(model) == lorta_count
    lora = get_peft_model(meta_model(LLAMA2_7B), LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    assert trainable_count(lora) == lora_count


@pytest.mark.parametrize("r", [1, 4, 8, 16])
def test_roberta_base_qkvo_is_860_r(r):
    model = get_peft_model(meta_model(ROBERTA_BASE, AutoModelForSequenceClassification), lorta.LortaConfig(r=r))
    assert model.peft_config["default"].matrix_names == ["q", "k", "v", "o"]
    factors = model.base_model.lorta_factors["default"]
    assert factors.num_trainable() == 860 * r


@pytest.mark.parametrize("modes", [[], ["heads"], ["heads", "matrices"], list(LORTA_MODES), ["layers"]])
def test_mode_ablation_counts_match_closed_form(modes):
    """Paper Table 4: heads; heads + matrices; heads + matrices + layers; plain per-matrix factorisation."""
    r = 8
    model = get_peft_model(meta_model(LLAMA2_7B), lorta.LortaConfig(r=r, modes=modes))
    want = lorta_num_params(4096, 128, 32, 32, 4, r, tuple(modes))
    assert model.base_model.lorta_factors["default"].num_trainable() == want
    if not modes:  # no shared mode: one rank-r matrix factorisation per matrix, i.e. exactly LoRA's count
        assert want == 2 * 4 * 32 * 4096 * r
    if modes == ["heads"]:
        assert want == 4 * 32 * (4096 + 128 + 32) * r


def test_print_trainable_parameters_counts_shared_factors_once(capsys):
    model = get_peft_model(meta_model(LLAMA2_7B), lorta.LortaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    assert "trainable params: 17,160" in capsys.readouterr().out


ROBERTA_LARGE = RobertaConfig(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    vocab_size=50265,
    max_position_embeddings=514,
)


def test_tlora_roberta_large_qv_r32_is_49200():
    model = get_peft_model(
        meta_model(ROBERTA_LARGE, AutoModelForSequenceClassification),
        lorta.TLoraConfig(r=32, target_modules=["query", "value"]),
    )
    assert model.base_model.lorta_factors["default"].num_trainable() == 49_200
    assert lorta.methods.tlora_num_params(L=24, M=2, r=32) == 49_200


@pytest.mark.parametrize("construction", lorta.methods.CONSTRUCTIONS)
@pytest.mark.parametrize("decomposition,ranks", [("tucker", [8, 6, 4, 3, 5]), ("tucker", 4), ("cp", 8)])
def test_tenslora_count_matches_published_formula(construction, decomposition, ranks):
    modes = lorta.methods.tensor_modes(construction)
    ranks = dict(zip(modes, ranks, strict=False)) if isinstance(ranks, list) else ranks
    config = lorta.TensLoraConfig(construction=construction, decomposition=decomposition, ranks=ranks)
    model = get_peft_model(meta_model(LLAMA2_7B), config)
    assert model.peft_config["default"].matrix_names == ["q", "k", "v"]  # TensLoRA's default targets
    want = lorta.methods.tenslora_num_params(construction, decomposition, config.ranks, 4096, 128, 32, 32, 3)
    assert model.base_model.lorta_factors["default"].num_trainable() == want


def test_tenslora_att_qkv_depth_tucker_by_hand():
    """Σ rank·size + Π ranks for one tensor: in 4096, out 128, att 32, qkv 3, depth 32."""
    ranks = {"in": 8, "out": 8, "att": 4, "qkv": 2, "depth": 4}
    config = lorta.TensLoraConfig(ranks=ranks)
    model = get_peft_model(meta_model(LLAMA2_7B), config)
    want = 8 * 4096 + 8 * 128 + 4 * 32 + 2 * 3 + 4 * 32 + 8 * 8 * 4 * 2 * 4
    assert model.base_model.lorta_factors["default"].num_trainable() == want


@pytest.mark.parametrize("r", [1, 256, 1000])
def test_vera_count_by_hand_and_closed_form(r):
    """PEFT's VeRA trains d (r) and b (d_out) per adapted matrix; its shared random A, B are frozen buffers."""
    from lorta import params
    from lorta.app.catalogue import model_config

    config = model_config("minilm")
    targets = ["query", "key", "value", "attention.output.dense"]
    want = 6 * 4 * (r + 384)
    assert params.count_trainable(config, params.method_config("vera", r, targets=targets)) == want
    assert params.closed_form(config, "vera", targets=targets)(r) == want
    fit = params.fit_budget(want, config, "vera", targets=targets)
    assert (fit.rank, fit.trainable, fit.next_trainable) == (r, want, want + 24)
