"""Regression tests for what PEFT's own test matrix found (tests/test_peft_common.py runs that matrix itself):
adapter dtypes under autocast_adapter_dtype, LoRA's bias option, safe_merge's message, peft_type.value."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from methods import METHODS
from peft import PeftModel, get_peft_model
from tolerance import FORWARD_TERMS, assert_close

method_names = pytest.mark.parametrize("method", sorted(METHODS))


def factor_dtypes(model, adapter: str = "default") -> set[torch.dtype]:
    factors = model.base_model.lorta_factors[adapter]
    return {t.dtype for t in (*factors.parameters(), *factors.buffers())}


@method_names
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(method, dtype, tmp_path):
    model = get_peft_model(make_model("llama", dtype=dtype), METHODS[method](), autocast_adapter_dtype=False)
    assert factor_dtypes(model) == {dtype}
    model.add_adapter("added", METHODS[method](), autocast_adapter_dtype=False)
    assert factor_dtypes(model, "added") == {dtype}
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="loaded", autocast_adapter_dtype=False)
    assert factor_dtypes(model, "loaded") == {dtype}
    model.load_adapter(tmp_path, adapter_name="upcast")  # the default upcasts, as for LoRA
    assert factor_dtypes(model, "upcast") == {torch.float32}
    default = get_peft_model(make_model("llama", dtype=dtype), METHODS[method]())
    assert factor_dtypes(default) == {torch.float32}
    with torch.no_grad():
        assert torch.isfinite(model(**make_inputs("llama")).logits).all()


def biases(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(".bias")}


@method_names
@pytest.mark.parametrize("bias", ["all", "lorta_only"])
def test_bias_trains_saves_and_loads_like_lora(method, bias, tmp_path):
    model = get_peft_model(make_model("gpt2"), METHODS[method](bias=bias, init_weights=False))
    trainable = {n for n, p in biases(model).items() if p.requires_grad}
    adapted = {n for n in biases(model) if ".base_layer." in n}
    assert trainable == (set(biases(model)) if bias == "all" else adapted) and adapted
    inputs = make_inputs("gpt2")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    model.eval()
    want = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.") for k in saved if k.endswith(".bias")} == {
        k.removeprefix("base_model.model.") for k in trainable
    }
    loaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    torch.testing.assert_close(output_of(loaded, inputs), want, atol=0, rtol=0)  # same tensors, same ops


def test_a_second_adapter_with_bias_is_refused():
    model = get_peft_model(make_model("gpt2"), METHODS["lorta"](bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", METHODS["lorta"](bias="lorta_only"))


@method_names
def test_safe_merge_of_broken_factors_says_what_peft_says(method):
    model = get_peft_model(make_model("llama"), METHODS[method](init_weights=False))
    before = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters() if "lorta" not in n}
    for name, p in model.named_parameters():
        if model.prefix in name:
            p.data[0] = torch.nan
    with pytest.raises(
        ValueError,
        match="^NaNs detected in the merged weights. The adapter default seems to be "
        "broken: its factor '.*' holds [0-9]+ NaN or Inf value",
    ):
        model.merge_and_unload(safe_merge=True)
    after = dict(model.base_model.model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())  # nothing was merged


def test_peft_type_is_a_string_with_a_value():
    import json

    config = METHODS["lorta"]()
    assert config.peft_type == "LORTA" and config.peft_type.value == "LORTA"
    assert json.loads(json.dumps(config.to_dict()))["peft_type"] == "LORTA"


@method_names
def test_peft_convert_to_lora_reproduces_the_adapter(method):
    """PEFT's own converter (peft.convert_to_lora: an SVD of each layer's dense delta) sees every lorta layer; at a
    rank no lower than the update's (each matrix's P @ Q has rank <= 3 here) it loses only the SVD's rounding."""
    from peft import LoraConfig, convert_to_lora

    model = get_peft_model(make_model("llama"), METHODS[method](init_weights=False)).eval()
    inputs = make_inputs("llama")
    want = output_of(model, inputs)
    assert model.supports_lora_conversion()
    lora_config, state_dict = convert_to_lora(model, rank=8)
    assert isinstance(lora_config, LoraConfig) and state_dict
    lora = get_peft_model(make_model("llama"), lora_config)
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(lora, state_dict)
    assert not result.unexpected_keys
    # an SVD of a d x d matrix (d <= 64) is backward stable to ~d eps ||delta||, entering the forward like one more
    # reduction of length d per layer: well inside a second forward's worth of terms.
    assert_close(output_of(lora.eval(), inputs), want, terms=2 * FORWARD_TERMS)
