"""The forward costs what LoRA costs: no dense update in training, O(N·r) kept for backward, x@A once."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from methods import METHODS
from peft import get_peft_model
from reference import adapted_modules

from lorta.tuner import shared_input


def saved_tensors(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_backward_keeps_only_thin_tensors(arch, method):
    """Besides x and W (which the base layer keeps anyway) autograd may keep x @ P (N x r') and the thin
    maps (d x r'), never an N x H x r intermediate, an N x d_out one, or a dense d_in x d_out update."""
    model = get_peft_model(make_model(arch), METHODS[method](init_weights=False))
    model.train()
    n_tokens = 45
    for name, module in adapted_modules(model).items():
        x = torch.randn(5, 9, module.in_features, requires_grad=True)
        rank = sum(module.adapter_factors("default").maps(s)[0].shape[1] for s in module.lorta_slots["default"])
        weight = module.get_base_layer().weight
        kept = [
            t
            for t in saved_tensors(lambda module=module, x=x: module(x))
            if t.data_ptr() not in (x.data_ptr(), weight.data_ptr())
        ]
        limit = max(n_tokens * rank, max(module.in_features, module.out_features) * rank)
        assert kept and all(t.numel() <= limit for t in kept), (name, [tuple(t.shape) for t in kept], limit)
        assert all(t.numel() < module.in_features * module.out_features for t in kept)


def test_lorta_computes_x_at_A_once_per_attention_call(monkeypatch):
    calls: list[tuple[int, ...]] = []
    real = shared_input._project

    def counting(x, P, dropout):
        calls.append(tuple(P.shape))
        return real(x, P, dropout)

    monkeypatch.setattr(shared_input, "_project", counting)
    model = get_peft_model(make_model("llama"), METHODS["lorta"](init_weights=False))
    model(**make_inputs("llama"))
    n_layers = model.peft_config["default"].model_shape["num_layers"]
    assert len(calls) == 2 * n_layers  # one for q, k, v together, one for o
    calls.clear()
    gpt = get_peft_model(make_model("gpt2"), METHODS["lorta"](init_weights=False))
    gpt(**make_inputs("gpt2"))
    assert len(calls) == 2 * 2  # fused c_attn: one x @ A; c_proj: one
