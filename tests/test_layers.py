"""The layers and matrices modes hold exactly what is adapted: no factor value that can never train (found from
outside: `layers_to_transform=[0]` kept a C_L row for every layer), TensLoRA's `r`, and head-less models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from methods import METHODS
from peft import get_peft_model
from torch import nn

import lorta
from lorta import params as lp
from lorta.app import catalogue

LLAMA_2_7B = catalogue.config_for("llama-2-7b")  # d 4096, d_h 128, H 32, L 32


@pytest.mark.parametrize(
    "kwargs,layers",
    [
        ({}, 32),
        ({"layers_to_transform": [0]}, 1),
        ({"layers_to_transform": [0, 5], "layers_pattern": "layers"}, 2),
        ({"layers_to_transform": 7}, 1),
    ],
)
def test_the_layers_mode_holds_the_adapted_layers_only(kwargs, layers):
    config = lorta.LortaConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs)
    assert lp.count_trainable(LLAMA_2_7B, config) == (4096 + 128 + 32 + layers + 2) * 4  # 17,036 for one layer
    tlora = lorta.TLoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs)
    assert lp.count_trainable(LLAMA_2_7B, tlora) == 2 * layers * (4 * 4 + 1)


def test_layer_names_are_recorded_and_checked_on_load(tmp_path):
    from peft import PeftModel

    model = get_peft_model(make_model("llama"), lorta.LortaConfig(r=2, layers_to_transform=[0, 2]))
    assert model.peft_config["default"].layer_names == ["model.layers.0", "model.layers.2"]
    model.save_pretrained(tmp_path)
    config = lorta.LortaConfig.from_pretrained(tmp_path)
    config.layers_to_transform = [1]  # targets that no longer match the recorded layers
    with pytest.raises(lorta.LayoutError, match=r"trained on layers \['model.layers.0', 'model.layers.2'\]"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path, config=config)


def every_value_gets_a_gradient(peft_model, inputs) -> None:
    peft_model.train()
    out = peft_model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().pow(2).mean().backward()
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and (p.grad != 0).all(), f"{name}: {(p.grad == 0).sum()} values never train"


# LoRTA without the matrices mode ("lorta-heads") keeps one group of factors per matrix, all of one shape: on a
# GQA model the k/v groups read H_kv of the H rows of their head factor, and extra matrices leave their group's B
# and C_H unread. Those ablations are tested on models without GQA or extras; the defaults everywhere.
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("llama", {"layers_to_transform": [1]}),
        ("gpt2", {"layers_to_transform": [0]}),
        ("bert", {}),
        ("mistral", {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}),
    ],
)
def test_no_factor_value_that_cannot_train(arch, kwargs, method):
    if method == "lorta-heads" and arch in ("llama", "mistral"):
        pytest.skip("an ablation with per-matrix groups of one shape (see above)")
    peft_model = get_peft_model(make_model(arch), METHODS[method](init_weights=False, **kwargs))
    every_value_gets_a_gradient(peft_model, make_inputs(arch))


def test_tenslora_r_sets_every_mode_rank():
    by_r = lorta.TensLoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    by_ranks = lorta.TensLoraConfig(ranks=4, target_modules=["q_proj", "v_proj"])
    assert by_r.ranks == by_ranks.ranks == dict.fromkeys(("in", "out", "att", "qkv", "depth"), 4)
    assert lp.count_trainable(LLAMA_2_7B, by_r) == (4096 + 128 + 32 + 2 + 32) * 4 + 4**5
    assert lorta.TensLoraConfig().ranks["in"] == 8 and lorta.TensLoraConfig().r == 8
    assert lorta.TensLoraConfig(r=3, ranks=[3, 2, 2, 2, 2]).r == 3  # r is the input rank: they agree
    with pytest.raises(ValueError, match=r"got r=4 and ranks=.*which disagree"):
        lorta.TensLoraConfig(r=4, ranks=8)


# ------------------------------------------------------------------------------ models without attention heads
class Block(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(size, size), nn.Linear(size, size)

    def forward(self, x):  # tanh, not relu: a dead unit would make "never trains" depend on the data
        return self.lin1(torch.tanh(self.lin0(x)))


class DeepMLP(nn.Module):
    """No transformers config, numbered layers of square matrices, a head of another shape."""

    def __init__(self, size: int = 12, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(size) for _ in range(layers)])
        self.out = nn.Linear(size, 5)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.out(x)


class MLP(nn.Module):
    """PEFT's test MLP: 10 -> 20 -> 2, no layer numbers; plus a 7 -> 3 side branch that shares no side."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.side = nn.Linear(10, 20), nn.Linear(20, 2), nn.Linear(7, 3)

    def forward(self, x):  # tanh, not relu: a dead unit would make "never trains" depend on the data
        return self.lin1(torch.tanh(self.lin0(x))) + self.side(x[:, :7]).sum(-1, keepdim=True)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_headless_models_train_and_count(method):
    torch.manual_seed(0)
    mlp = get_peft_model(MLP(), METHODS[method](init_weights=False, target_modules=["lin0", "lin1", "side"]))
    layout = mlp.base_model.lorta_factors["default"].layout
    assert layout.model_dim == 20 and layout.free_sizes == {"side": (7, 3)}
    if method == "lorta-heads":  # one A per matrix: the free extra 'side' has its own input factor instead
        mlp(torch.randn(4, 10)).sum().backward()
    else:
        every_value_gets_a_gradient(mlp, {"x": torch.randn(4, 10)})
    deep = get_peft_model(DeepMLP(), METHODS[method](init_weights=False, target_modules=["lin0", "lin1", "out"]))
    layout = deep.base_model.lorta_factors["default"].layout
    assert layout.model_dim == 12 and not layout.has_head_slots
    assert layout.layer_names == ["layers.0", "layers.1", "layers.2", ""]
    assert layout.matrix_names == ["lin0", "lin1", "out"]
    if method in ("lorta-heads", "tenslora-cp-qkv"):
        # groups per layer (and per matrix) of one shape: 'out' is only in the last layer, lin0/lin1 not there
        pytest.skip("an ablation with per-layer groups of one shape on an incomplete layers x matrices grid")
    every_value_gets_a_gradient(deep, {"x": torch.randn(4, 12)})


def test_headless_lorta_count_is_the_closed_form():
    """DeepMLP (d = 12): A (12) + own sides of lin0, lin1 (12 each) and out (5), C_L (4 layers), C_M (3)."""
    peft_model = get_peft_model(DeepMLP(), lorta.LortaConfig(r=3, target_modules=["lin0", "lin1", "out"]))
    assert peft_model.get_nb_trainable_parameters()[0] == (12 + 12 + 12 + 5 + 4 + 3) * 3
    free = get_peft_model(MLP(), lorta.LortaConfig(r=2, target_modules=["lin0", "side"]))
    # d = 10 (lin0's input, the first target's, ties broken that way): A 10, lin0's own 20, side's own 7 and 3
    assert free.get_nb_trainable_parameters()[0] == (10 + 20 + (7 + 3) + 1 + 2) * 2
