"""Exactness: every adapted module's update equals the float64 dense reference built from the paper's formula."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ARCHITECTURES, make_inputs, make_model, output_of
from peft import get_peft_model
from reference import adapted_modules, reference_lorta, reference_tenslora, reference_tlora
from tolerance import FLOAT32_INSIDE_TERMS, MAP_TERMS, assert_close

import lorta

ALL_MODE_SETS = [list(c) for k in range(4) for c in itertools.combinations(lorta.methods.LORTA_MODES, k)]


def assert_matches_reference(arch: str, config, reference_fn) -> None:
    peft_model = get_peft_model(make_model(arch, dtype=torch.float64), config)
    dense = make_model(arch, dtype=torch.float64)
    references = reference_fn(peft_model)
    modules = adapted_modules(peft_model)
    assert set(references) == set(modules) and modules
    for name, module in modules.items():
        got = module.delta_weight("default").double()
        assert got.shape == module.get_base_layer().weight.shape
        assert references[name].norm() > 0
        assert_close(got, references[name], MAP_TERMS, msg=name)  # float64 maps vs the formula, reordered
        dense.get_submodule(name).weight.data += references[name]
    inputs = make_inputs(arch)
    # float64 models, but HF's norms and softmaxes round to float32 inside (tests/tolerance.py)
    assert_close(output_of(peft_model, inputs), output_of(dense, inputs), FLOAT32_INSIDE_TERMS, dtype=torch.float32)


@pytest.mark.parametrize("modes", ALL_MODE_SETS, ids=lambda m: "+".join(m) or "none")
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lorta_matches_dense_reference(arch, modes):
    config = lorta.LortaConfig(r=3, lora_alpha=5, modes=modes, init_weights=False)
    assert_matches_reference(arch, config, reference_lorta)


@pytest.mark.parametrize(
    "arch,targets",
    [
        ("llama", ["q_proj", "v_proj", "gate_proj", "down_proj"]),
        ("gpt2", ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        ("bert", ["query", "value", "intermediate.dense"]),
    ],
)
@pytest.mark.parametrize("modes", [["heads", "layers", "matrices"], ["heads"]], ids=["all", "heads"])
def test_lorta_extra_matrices_match_reference(arch, targets, modes):
    config = lorta.LortaConfig(r=2, target_modules=targets, modes=modes, init_weights=False, use_rslora=True)
    assert_matches_reference(arch, config, reference_lorta)


@pytest.mark.parametrize("construction", lorta.methods.CONSTRUCTIONS)
@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "bert"])
def test_tenslora_matches_dense_reference(arch, construction, decomposition):
    modes = lorta.methods.tensor_modes(construction)
    ranks = {m: 2 + i % 2 for i, m in enumerate(modes)} if decomposition == "tucker" else 3
    targets = None if arch != "llama" else ["q_proj", "k_proj", "v_proj", "o_proj"]  # o is optional
    config = lorta.TensLoraConfig(
        construction=construction, decomposition=decomposition, ranks=ranks, target_modules=targets, init_weights=False
    )
    assert_matches_reference(arch, config, reference_tenslora)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tlora_matches_dense_reference(arch):
    config = lorta.TLoraConfig(r=3, init_weights=False)
    assert_matches_reference(arch, config, reference_tlora)
