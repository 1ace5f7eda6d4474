"""No code path answers with maps of factors that are not the current ones (found from outside: an in-place
edit through `.data`, which leaves no version-counter trace, was served the old adapter's output)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, output_of
from methods import METHODS
from peft import get_peft_model
from tolerance import FORWARD_TERMS, assert_close, assert_differs

import lorta

method_names = pytest.mark.parametrize("method", sorted(METHODS))


def _no_grad(fn, *args):
    with torch.no_grad():
        fn(*args)


EDITS = {
    "data.normal_": lambda p: p.data.normal_(),
    "data.copy_": lambda p: p.data.copy_(torch.randn_like(p)),
    "data.mul_": lambda p: p.data.mul_(1.5),
    "data assignment": lambda p: setattr(p, "data", torch.randn_like(p)),
    "no_grad mul_": lambda p: _no_grad(p.mul_, 0.5),
}


def adapted(arch: str, method: str):
    torch.manual_seed(0)
    model = get_peft_model(make_model(arch), METHODS[method](init_weights=False))
    model.eval()
    return model


def fresh_output(model, inputs):
    """The model's output from maps built now, per module, without any frame (the reference)."""
    model.base_model.batched_maps = False
    try:
        with torch.no_grad():
            return model.base_model.model(**inputs).logits
    finally:
        model.base_model.batched_maps = True


def edit_factors(model, edit) -> None:
    for p in model.base_model.lorta_factors["default"].parameters():
        edit(p)


@method_names
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_in_place_edit_between_two_forwards_is_seen(method, edit):
    model = adapted("llama", method)
    inputs = make_inputs("llama")
    before = output_of(model, inputs)
    edit_factors(model, EDITS[edit])
    after = output_of(model, inputs)
    assert_differs(after, before, FORWARD_TERMS)  # the edit moves the output past rounding: stale maps cannot pass
    assert_close(after, fresh_output(model, inputs), FORWARD_TERMS)  # batched vs per-module maps


@pytest.mark.parametrize("method", ["lorta", "tenslora-tucker", "tlora"])
def test_an_edit_between_two_generate_calls_is_seen(method):
    model = adapted("llama", method)
    inputs = make_inputs("llama")
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    first = model.generate(**inputs, **kwargs).scores[0]
    edit_factors(model, EDITS["data.normal_"])
    second = model.generate(**inputs, **kwargs).scores[0]
    with torch.no_grad():
        want = model(**inputs).logits[:, -1]
    assert_differs(second, first, FORWARD_TERMS)
    assert_close(second, want, FORWARD_TERMS)  # generate's cached attention path vs one full forward


def test_an_edit_through_the_base_model_call_is_seen():
    """Calling the transformers model directly (no PeftModel call scope) builds maps per forward."""
    model = adapted("gpt2", "lorta")
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        before = model.base_model.model(**inputs).logits
        edit_factors(model, EDITS["data.copy_"])
        after = model.base_model.model(**inputs).logits
    assert_differs(after, before, FORWARD_TERMS)
    assert_close(after, fresh_output(model, inputs), FORWARD_TERMS)  # batched vs per-module maps


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_mixed_batches_see_an_in_place_edit(edit):
    model = adapted("llama", "lorta")
    model.add_adapter("other", lorta.LortaConfig(r=3, lora_alpha=6, init_weights=False))
    model.eval()
    inputs = make_inputs("llama")
    names = ["default", "other"]
    with torch.no_grad():
        before = model(**inputs, adapter_names=names).logits
        EDITS[edit](model.base_model.lorta_factors["other"].A)
        after = model(**inputs, adapter_names=names).logits
        model.set_adapter("other")
        want_other = model(**inputs).logits[1]
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)  # the untouched adapter's row: the same ops
    assert_differs(after[1], before[1], FORWARD_TERMS)
    assert_close(after[1], want_other, FORWARD_TERMS)  # batched (bmm) vs plain products


def test_an_optimizer_step_between_training_forwards_uses_the_new_factors():
    model = adapted("llama", "lorta")
    model.train()
    inputs = make_inputs("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    model.eval()
    assert_close(output_of(model, inputs), fresh_output(model, inputs), FORWARD_TERMS)
