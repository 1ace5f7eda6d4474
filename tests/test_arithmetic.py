"""Adapter arithmetic (`add_weighted_adapter`, PEFT's signature): `cat` is exact — the combined adapter's update is
the weighted sum of the inputs', checked against the papers' float64 dense references — and bad combinations refuse
with a message naming what differs, leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from methods import METHODS
from peft import PeftModel, get_peft_model
from reference import reference_lorta, reference_tenslora, reference_tlora
from tolerance import FORWARD_TERMS, MAP_TERMS, assert_close

import lorta
from lorta.tuner import TensorAdapterLayer

REFERENCES = {
    "lorta": reference_lorta,
    "lorta-heads": reference_lorta,
    "tenslora-tucker": reference_tenslora,
    "tenslora-cp-qkv": reference_tenslora,
    "tlora": reference_tlora,
    "tlora-seed-only": reference_tlora,
}
# the second adapter's rank: 2 (TensLoRA's Tucker: other ranks per mode than the first's 3, 3, 2, 2, 2)
OTHER_RANK = {"tenslora-tucker": {"ranks": [2, 2, 1, 3, 1]}, "tenslora-cp-qkv": {"ranks": 2}}
# q, k, v, o and two MLP matrices: extra matrices, which read TensLoRA's att mode through 1 / sqrt(r_att)
WITH_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
IDS = torch.tensor([[5, 17, 3, 44, 8], [60, 2, 91, 33, 12]])


def two_adapters(model_name: str, method: str, **kwargs):
    torch.manual_seed(0)
    model = get_peft_model(make_model(model_name), METHODS[method](init_weights=False, **kwargs))
    torch.manual_seed(1)
    other = OTHER_RANK.get(method, {"r": 2})
    model.add_adapter("other", METHODS[method](init_weights=False, lora_alpha=5, **other, **kwargs))
    return model.eval()


CASES = [
    *((name, method, None) for name in ("llama", "gpt2") for method in REFERENCES),
    ("llama", "tenslora-tucker", WITH_MLP),
    ("llama", "tenslora-cp-qkv", WITH_MLP),
    ("llama", "lorta", WITH_MLP),
]


@pytest.mark.parametrize(("model_name", "method", "targets"), CASES)
def test_cat_is_the_weighted_sum_of_the_updates(model_name, method, targets):
    model = two_adapters(model_name, method, **({"target_modules": targets} if targets else {}))
    weights = [0.7, -1.3]  # a negative weight: task-vector negation
    model.add_weighted_adapter(["default", "other"], weights, "sum", combination_type="cat")
    config = model.peft_config["sum"]
    assert config.r == model.peft_config["default"].r + 2 and config.peft_type == model.peft_config["default"].peft_type
    reference = REFERENCES[method]
    parts = [reference(model, "default"), reference(model, "other")]
    combined = reference(model, "sum")  # float64, from the combined adapter's own factors and scale
    assert combined.keys() == parts[0].keys()
    for name, update in combined.items():
        expected = weights[0] * parts[0][name] + weights[1] * parts[1][name]
        magnitude = float((abs(weights[0]) * parts[0][name].abs() + abs(weights[1]) * parts[1][name].abs()).max())
        # the weights were folded into one float32 factor: one rounding per term of a map's <= 32-term sums
        assert_close(update, expected, MAP_TERMS, scale=magnitude, dtype=torch.float32, msg=name)
    for module in model.modules():  # the engine's maps agree with the reference (float32 products)
        if isinstance(module, TensorAdapterLayer) and "sum" in module.lorta_slots:
            expected = weights[0] * module.delta_weight("default") + weights[1] * module.delta_weight("other")
            scale = float(module.delta_weight("default").abs().max() + module.delta_weight("other").abs().max())
            assert_close(module.delta_weight("sum"), expected, MAP_TERMS, scale=scale)


@pytest.mark.parametrize("method", ["lorta", "tenslora-tucker", "tlora"])
def test_a_combined_adapter_runs_saves_and_reloads(method, tmp_path):
    model = two_adapters("llama", method)
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")  # cat is the default
    assert not any(p.requires_grad for p in model.base_model.lorta_factors["sum"].parameters())
    model.set_adapter("sum")
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path, selected_adapters=["sum"])
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "sum").eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=IDS).logits, out, FORWARD_TERMS)


def test_task_vectors_add_and_negate_back_to_the_base():
    """a + b - b is a: the combined update of (a, b, b) with weights (1, 1, -1) equals a's."""
    model = two_adapters("llama", "lorta")
    torch.manual_seed(2)
    model.add_adapter("b", METHODS["lorta"](init_weights=False))
    model.add_weighted_adapter(["default", "b", "b"], [1.0, 1.0, -1.0], "a_again")
    for module in model.modules():
        if isinstance(module, TensorAdapterLayer) and "a_again" in module.lorta_slots:
            scale = float(module.delta_weight("default").abs().max() + 2 * module.delta_weight("b").abs().max())
            assert_close(module.delta_weight("a_again"), module.delta_weight("default"), MAP_TERMS, scale=scale)


def refuses(model, match: str, *args, **kwargs) -> None:
    before = set(model.peft_config)
    with pytest.raises(lorta.AdapterCombinationError, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    assert set(model.peft_config) == before and set(model.base_model.lorta_factors) == before


def test_bad_combinations_refuse_naming_what_differs():
    model = two_adapters("llama", "lorta")
    refuses(model, r"combination_type='svd' is not available.*'cat'", ["default", "other"], [1, 1], "x", "svd")
    refuses(model, r"one weight per adapter: got 2 adapters and 1 weights", ["default", "other"], [1], "x")
    refuses(model, r"no lorta adapter named \['nope'\]", ["default", "nope"], [1, 1], "x")
    refuses(model, r"an adapter named 'other' exists already", ["default", "other"], [1, 1], "other")
    model.add_adapter("qv", lorta.LortaConfig(r=2, target_modules=["q_proj", "v_proj"]))
    refuses(model, r"different layouts \(matrix_names\)", ["default", "qv"], [1, 1], "x")
    model.add_adapter("heads", METHODS["lorta-heads"]())
    refuses(model, r"different layouts \(.*share_layers", ["default", "heads"], [1, 1], "x")


def test_tenslora_adapters_of_two_constructions_or_decompositions_refuse():
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), METHODS["tenslora-tucker"](init_weights=False))
    model.add_adapter("qkv", METHODS["tenslora-cp-qkv"](init_weights=False))
    refuses(model, r"different layouts \(modes, tucker", ["default", "qkv"], [1, 1], "x")


def test_an_exported_lorta_adapter_combines_with_a_lora_in_peft(tmp_path):
    """Mixing methods: lorta's exact LoRA export and a LoRA adapter, combined by PEFT's own add_weighted_adapter
    (cat), give the sum of the two updates."""
    from peft import LoraConfig

    torch.manual_seed(0)
    tensor_model = get_peft_model(make_model("llama"), METHODS["lorta"](init_weights=False)).eval()
    lorta.export_lora(tensor_model, tmp_path / "exported")
    tensor_deltas = {
        n.removeprefix("base_model.model."): m.delta_weight("default")
        for n, m in tensor_model.named_modules()
        if isinstance(m, TensorAdapterLayer)
    }
    model = PeftModel.from_pretrained(make_model("llama"), tmp_path / "exported", adapter_name="exported")
    torch.manual_seed(3)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["exported", "lora"], [1.0, 1.0], "mix", combination_type="cat")
    mixed = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A}
    assert mixed.keys() == tensor_deltas.keys()
    for name, module in mixed.items():
        expected = tensor_deltas[name] + (module.get_delta_weight("lora") if "lora" in module.lora_A else 0)
        scale = float(expected.abs().max()) + float(tensor_deltas[name].abs().max())
        assert_close(module.get_delta_weight("mix"), expected, MAP_TERMS, scale=scale, msg=name)
