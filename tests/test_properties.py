"""Property-based checks over random small Llama shapes and random adapter configurations (hypothesis).

1. In float64, every adapted matrix's update equals the dense reference built from the papers' formulas
   (tests/reference.py) to float64 rounding, and the whole model's forward to the float32 rounding HF's norms do
   inside a float64 model (tests/tolerance.py), for LoRTA (any modes, targets, rsLoRA),
   TensLoRA (any construction, Tucker or CP, a rank per mode) and TLoRA; shapes cover GQA (KV heads dividing the
   heads) and H * head_dim != hidden size.
2. In float32, 100 merge / unmerge cycles leave every base weight within 2 roundings per cycle of the original,
   and the merged model computes what the unmerged one does.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from reference import adapted_modules, reference_lorta, reference_tenslora, reference_tlora
from tolerance import FLOAT32_INSIDE_TERMS, FORWARD_TERMS, MAP_TERMS, assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import lorta
from lorta.methods import CONSTRUCTIONS, LORTA_MODES, tensor_modes

SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@st.composite
def shapes(draw) -> dict:
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": draw(st.sampled_from([2, 4, 8])),
        "hidden_size": heads * draw(st.integers(2, 6)),  # transformers wants a multiple of the heads
        "num_hidden_layers": draw(st.integers(1, 3)),
    }


targets = st.lists(st.sampled_from(ATTENTION), min_size=1, max_size=4, unique=True)


@st.composite
def lorta_configs(draw) -> lorta.LortaConfig:
    modes = draw(st.lists(st.sampled_from(LORTA_MODES), max_size=3, unique=True))
    extra = draw(st.sampled_from([[], ["gate_proj"], ["down_proj"]]))
    return lorta.LortaConfig(
        r=draw(st.integers(1, 4)),
        lora_alpha=draw(st.sampled_from([1.0, 3.0, 8.0])),
        modes=modes,
        target_modules=draw(targets) + extra,
        use_rslora=draw(st.booleans()),
        init_weights=False,
    )


@st.composite
def tenslora_configs(draw) -> lorta.TensLoraConfig:
    construction = draw(st.sampled_from(CONSTRUCTIONS))
    decomposition = draw(st.sampled_from(["tucker", "cp"]))
    modes = tensor_modes(construction)
    if decomposition == "cp":
        ranks = draw(st.integers(1, 3))
    else:
        ranks = {m: draw(st.integers(1, 3)) for m in modes}
    return lorta.TensLoraConfig(
        construction=construction,
        decomposition=decomposition,
        ranks=ranks,
        target_modules=draw(targets),
        lora_alpha=draw(st.sampled_from([1.0, 4.0])),
        init_weights=False,
    )


@st.composite
def tlora_configs(draw) -> lorta.TLoraConfig:
    return lorta.TLoraConfig(
        r=draw(st.integers(1, 4)),
        target_modules=draw(targets),
        projection_seed=draw(st.integers(0, 5)),
        init_weights=False,
    )


REFERENCES = {"LORTA": reference_lorta, "TENSLORA": reference_tenslora, "TLORA": reference_tlora}
CONFIGS = {"lorta": lorta_configs(), "tenslora": tenslora_configs(), "tlora": tlora_configs()}


def build(shape: dict, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=31, intermediate_size=12, max_position_embeddings=32, tie_word_embeddings=False, **shape
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", sorted(CONFIGS))
@SETTINGS
@given(data=st.data())
def test_forward_equals_the_float64_dense_reference(method, data):
    shape, config, seed = data.draw(shapes()), data.draw(CONFIGS[method]), data.draw(st.integers(0, 3))
    peft_model = get_peft_model(build(shape, torch.float64, seed), config)
    dense = build(shape, torch.float64, seed)
    references = REFERENCES[config.peft_type](peft_model)
    modules = adapted_modules(peft_model)
    assert modules and set(references) == set(modules)
    for name, module in modules.items():
        got = module.delta_weight("default").double()
        assert got.dtype == torch.float64 and got.shape == module.get_base_layer().weight.shape
        assert references[name].norm() > 0, name
        assert_close(got, references[name], MAP_TERMS, msg=name)  # float64 maps vs the formula, reordered
        dense.get_submodule(name).weight.data += references[name]
    ids = torch.randint(0, 31, (2, 5), generator=torch.Generator().manual_seed(seed))
    # float64 models, but HF's RMSNorms round to float32 inside (tests/tolerance.py)
    assert_close(logits(peft_model, ids), logits(dense, ids), FLOAT32_INSIDE_TERMS, dtype=torch.float32)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_100_merge_unmerge_cycles_restore_the_base_weights(method, data):
    shape, config = data.draw(shapes()), data.draw(CONFIGS[method])
    peft_model = get_peft_model(build(shape, torch.float32), config)
    layers = adapted_modules(peft_model)
    original = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    ids = torch.randint(0, 31, (2, 5), generator=torch.Generator().manual_seed(0))
    unmerged = logits(peft_model, ids)
    delta = {n: float(m.delta_weight("default").abs().max()) for n, m in layers.items()}
    cycles = 100
    for cycle in range(cycles):
        peft_model.base_model.merge_adapter()
        if cycle == 0:
            assert_close(logits(peft_model, ids), unmerged, FORWARD_TERMS)
        peft_model.base_model.unmerge_adapter()
    for name, module in layers.items():  # each cycle rounds twice, at the magnitude |W| + |delta W|
        scale = float(original[name].abs().max()) + delta[name]
        assert_close(module.get_base_layer().weight.detach(), original[name], 2 * cycles, scale=scale, msg=name)
    assert_close(logits(peft_model, ids), unmerged, FORWARD_TERMS + 2 * cycles)
