"""A fourth method declared entirely in this file (config, factors, tuner, spec) runs through everything a method
gets from lorta: get_peft_model, save / load, merge and export_lora (docs/design.md, "Adding a method").

ToyRank: every adapted matrix has its own rank-r pair, dW = scale * A_m B_m (a LoRA, written as a lorta method).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from tolerance import FORWARD_TERMS, assert_close
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorta
from lorta.factorization import Factorization
from lorta.layout import Slot, TensorLayout
from lorta.registry import method_specs, register, unregister
from lorta.spec import MethodSpec, Recipe
from lorta.tuner.config import MethodType, TensorAdapterConfig
from lorta.tuner.model import TensorAdapterModel

TOYRANK = MethodType("TOYRANK")


class ToyRankConfig(TensorAdapterConfig):
    """ToyRank: a rank-r pair A (d_in x r), B (r x d_out) per adapted matrix."""

    def __post_init__(self) -> None:
        self.peft_type = TOYRANK
        super().__post_init__()


class ToyRankFactors(Factorization):
    def __init__(self, config: ToyRankConfig, layout: TensorLayout) -> None:
        super().__init__(config, layout)
        r = config.r
        self.index: dict[tuple[int, int], int] = {}
        for slots in layout.slots.values():
            for slot in slots:
                i = self.index.setdefault((slot.layer, slot.matrix), len(self.index))
                self.register_parameter(f"A{i}", nn.Parameter(torch.empty(slot.in_features, r)))
                self.register_parameter(f"B{i}", nn.Parameter(torch.empty(r, slot.out_features)))
        self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, init_weights: bool) -> None:
        if next(self.parameters()).is_meta:
            return
        for name, p in self.named_parameters():
            if name.startswith("A"):
                nn.init.uniform_(p, -1 / math.sqrt(p.shape[0]), 1 / math.sqrt(p.shape[0]))
            else:
                nn.init.zeros_(p) if init_weights else nn.init.normal_(p, 0.0, 0.5)

    def maps(self, slot: Slot) -> tuple[Tensor, Tensor]:
        i = self.index[(slot.layer, slot.matrix)]
        return getattr(self, f"A{i}"), getattr(self, f"B{i}")


class ToyRankModel(TensorAdapterModel):
    factorization_cls = ToyRankFactors


SPEC = MethodSpec(
    name="toyrank",
    title="ToyRank",
    peft_type=TOYRANK,
    config_cls=ToyRankConfig,
    factors_cls=ToyRankFactors,
    tuner_cls=ToyRankModel,
    closed_form=lambda layout, config: (
        lambda r: sum((s.in_features + s.out_features) * r for slots in layout.slots.values() for s in slots)
    ),
    classify=Recipe(8, 16.0, 1e-3, 1e-3),
    causal_lm=Recipe(8, 16.0, 1e-3, 0.0),
)


@pytest.fixture
def toyrank():
    register(SPEC)
    yield SPEC
    unregister(SPEC)


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
    )
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[3, 7, 11, 19, 5], [2, 4, 8, 16, 31]])


def _out(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_method_declared_outside_lorta_runs_end_to_end(toyrank, tmp_path):
    assert list(method_specs())[-1] == "toyrank"
    base_out = _out(_base())
    model = get_peft_model(_base(), ToyRankConfig(r=2, lora_alpha=4.0, init_weights=False))
    adapted = _out(model)
    assert not torch.allclose(adapted, base_out, atol=1e-4)
    layout = model.base_model.lorta_factors["default"].layout
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == SPEC.closed_form(layout, model.peft_config["default"])(2)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(), tmp_path / "adapter")
    assert type(loaded.base_model) is ToyRankModel
    assert_close(_out(loaded), adapted, FORWARD_TERMS)

    lorta.export_lora(loaded, tmp_path / "lora")
    as_lora = PeftModel.from_pretrained(_base(), tmp_path / "lora")
    assert as_lora.peft_config["default"].peft_type.value == "LORA"
    assert_close(_out(as_lora), adapted, FORWARD_TERMS)

    # a factorisation without `concatenate` has no exact add_weighted_adapter: refused, the model untouched
    loaded.add_adapter("other", ToyRankConfig(r=2, init_weights=False))
    with pytest.raises(lorta.AdapterCombinationError, match="ToyRankFactors has no exact concatenation"):
        loaded.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")
    assert set(loaded.peft_config) == {"default", "other"}
    loaded.set_adapter("default")

    merged = loaded.merge_and_unload()
    assert_close(_out(merged), adapted, FORWARD_TERMS)


def test_unregister_forgets_the_method(toyrank):
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[TOYRANK] is ToyRankModel
    unregister(SPEC)
    assert "toyrank" not in method_specs() and TOYRANK not in PEFT_TYPE_TO_TUNER_MAPPING
    register(SPEC)  # the fixture unregisters it again
