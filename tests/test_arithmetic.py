"""Adapter arithmetic (`add_weighted_adapter`, PEFT's signature): `cat` is exact — the combined adapter's update is
the weighted sum of the inputs', checked against the papers' float64 dense references — and bad combinations refuse
with a message naming what differs, leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
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


def assert_reloads(model, name: str, tmp_path) -> None:
    """Adapter `name` runs, saves alone and reloads onto a fresh base to the same outputs."""
    model.set_adapter(name)
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path, selected_adapters=[name])
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / name).eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=IDS).logits, out, FORWARD_TERMS)


@pytest.mark.parametrize("method", ["lorta", "tenslora-tucker", "tlora"])
def test_a_combined_adapter_runs_saves_and_reloads(method, tmp_path):
    model = two_adapters("llama", method)
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")  # cat is the default
    assert not any(p.requires_grad for p in model.base_model.lorta_factors["sum"].parameters())
    assert_reloads(model, "sum", tmp_path)


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
    refuses(model, r"combination_type='ties' is not available.*'cat'.*'als'", ["default", "other"], [1, 1], "x", "ties")
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


# ------------------------------------------------------------------------------------ compression to a target rank
def _reference_of(model):
    method = str(model.peft_config["default"].peft_type)
    return {"LORTA": reference_lorta, "TENSLORA": reference_tenslora, "TLORA": reference_tlora}[method]


def _dense_sum(model, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i * delta_i of every adapted module, float64, from the papers' formulas (tests/reference.py)."""
    parts = [_reference_of(model)(model, name) for name in ("default", "other")]
    return {name: weights[0] * parts[0][name] + weights[1] * parts[1][name] for name in parts[0]}


def _error_against(model, name: str, dense: dict[str, torch.Tensor]) -> float:
    fit = _reference_of(model)(model, name)
    num = sum(float((fit[k] - dense[k]).norm() ** 2) for k in dense)
    return (num / sum(float(v.norm() ** 2) for v in dense.values())) ** 0.5


# A fit that reaches the sum exactly stops at the float32 rounding of its factors' maps.
EXACT_FIT = MAP_TERMS * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("method", ["lorta", "tlora"])
def test_als_at_the_sums_rank_recovers_the_sum_and_reports_its_error(method):
    """LoRTA's CP-ALS and TLoRA's closed form reach the rank-5 sum of a rank-3 and a rank-2 adapter; the report
    is the error against the float64 reference sum."""
    model = two_adapters("llama", method)
    weights = [0.7, -1.3]
    dense = _dense_sum(model, weights)
    report = model.add_weighted_adapter(["default", "other"], weights, "als5", combination_type="als", svd_rank=5)
    assert model.peft_config["als5"].r == 5 and report.rank == 5
    assert report.overall < EXACT_FIT and max(report.per_module.values()) < EXACT_FIT
    assert abs(_error_against(model, "als5", dense) - report.overall) <= EXACT_FIT
    cat = model.add_weighted_adapter(["default", "other"], weights, "cat5")  # the exact sum, reported at rounding
    assert cat.overall < EXACT_FIT and cat.combination_type == "cat"


def test_tlora_compression_is_the_best_rank_k_fit_of_every_matrix():
    """TLoRA's fit is each matrix's truncated SVD: its error is the Eckart-Young tail of the sum's singular values."""
    model = two_adapters("llama", "tlora")
    weights = [1.0, 0.5]
    dense = _dense_sum(model, weights)
    report = model.add_weighted_adapter(["default", "other"], weights, "svd2", combination_type="svd", svd_rank=2)
    for name, update in dense.items():
        values = torch.linalg.svdvals(update)
        tail = float((values[2:] ** 2).sum() / (values**2).sum()) ** 0.5
        assert abs(report.per_module[name] - tail) <= EXACT_FIT + 1e-12, name
    assert 0 < report.overall < 1


def test_lorta_compression_below_the_sums_rank_reports_an_honest_error(tmp_path):
    model = two_adapters("llama", "lorta")
    weights = [1.0, 1.0]
    dense = _dense_sum(model, weights)
    errors = {}
    for rank in (1, 3):
        report = model.add_weighted_adapter(["default", "other"], weights, f"r{rank}", "als", svd_rank=rank)
        assert abs(_error_against(model, f"r{rank}", dense) - report.overall) <= EXACT_FIT
        errors[rank] = report.overall
    assert 0 < errors[3] < errors[1] <= 1.0  # no better than exact, never worse than no update at all
    assert_reloads(model, "r3", tmp_path)


def test_tenslora_compression_is_fitted_by_adam_and_reported():
    model = two_adapters("llama", "tenslora-tucker")
    weights = [0.7, -1.3]
    dense = _dense_sum(model, weights)
    report = model.add_weighted_adapter(["default", "other"], weights, "fit", "als", svd_rank=3, steps=150)
    assert model.peft_config["fit"].ranks == dict.fromkeys(model.peft_config["default"].ranks, 3)
    assert len(report.history) > 1 and report.history[-1] < report.history[0]
    assert report.overall < 1.0  # better than no update
    assert abs(_error_against(model, "fit", dense) - report.overall) <= EXACT_FIT


def test_compression_requests_refuse_clearly():
    model = two_adapters("llama", "lorta")
    refuses(model, r"pass svd_rank=R \(a positive int\), got None", ["default", "other"], [1, 1], "x", "als")
    refuses(model, r"got 0", ["default", "other"], [1, 1], "x", "als", svd_rank=0)
    refuses(model, r"svd_rank=2 goes with combination_type='als'", ["default", "other"], [1, 1], "x", svd_rank=2)


# ------------------------------------------------------ PEFT's weighted-combination test (testing_common), adapted
# PEFT runs `_test_weighted_combination_of_adapters` for LoRA and IA3 only. The same journey for the lorta methods:
# three adapters (the third of another rank), one re-weighted alone and two combined, with positive and with
# negative weights; each new adapter becomes the active one and runs a forward; its update is the weighted sum.
def _third_rank(method: str) -> dict:
    return {"tenslora-tucker": {"ranks": [4, 2, 3, 2, 1]}, "tenslora-cp-qkv": {"ranks": 4}}.get(method, {"r": 4})


@pytest.mark.parametrize("weights", [[0.5, 1.5, 1.5], [-0.5, -0.8, -1.2]], ids=["positive", "negative"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lorta", "tenslora-tucker", "tenslora-cp-qkv", "tlora"])
def test_peft_weighted_combination_of_adapters(method, arch, weights):
    names = ["adapter_1", "adapter_2", "adapter_3"]
    torch.manual_seed(0)
    model = get_peft_model(make_model(arch), METHODS[method](init_weights=False), names[0])
    torch.manual_seed(1)
    model.add_adapter(names[1], METHODS[method](init_weights=False))
    torch.manual_seed(2)
    model.add_adapter(names[2], METHODS[method](init_weights=False, **_third_rank(method)))
    model.add_weighted_adapter([names[0]], [weights[0]], "single_adapter_reweighting")
    model.add_weighted_adapter(names[1:], weights[1:], "multi_adapter_reweighting")
    expected = {
        "single_adapter_reweighting": [(names[0], weights[0])],
        "multi_adapter_reweighting": list(zip(names[1:], weights[1:], strict=True)),
    }
    inputs = make_inputs(arch)
    model.eval()
    for new, terms in expected.items():
        assert new in model.peft_config
        model.set_adapter(new)
        assert model.active_adapter == new and model.active_adapters == [new]
        assert torch.isfinite(model(**inputs).logits).all()
        for module in model.modules():
            if isinstance(module, TensorAdapterLayer) and new in module.lorta_slots:
                want = sum(w * module.delta_weight(n) for n, w in terms)
                scale = sum(abs(w) * float(module.delta_weight(n).abs().max()) for n, w in terms)
                assert_close(module.delta_weight(new), want, MAP_TERMS, scale=scale)
