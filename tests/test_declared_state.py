"""The tuner's state is declared (no attributes tagged onto configs or parameters) and its caches follow the one rule
of docs/design.md, "Caches": read only inside their scope, never past it, with no private torch API."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
import torch
from conftest import make_inputs, make_model
from methods import METHODS
from peft import PeftModel, get_peft_model
from test_batched_maps import adapted, assert_same, grads_of  # (checkpointing per method: test_batched_maps)

import lorta
from lorta.tuner.config import TensorAdapterConfig

SRC = pathlib.Path(lorta.__file__).parent


def test_no_private_torch_api_in_the_package():
    users = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "torch._C" in p.read_text(encoding="utf-8")]
    assert users == []


def test_loaded_from_is_declared_never_saved_and_consumed_by_the_injection(tmp_path):
    model = get_peft_model(make_model("llama"), METHODS["lorta"](init_weights=False))
    model.save_pretrained(tmp_path)
    assert "loaded_from" not in json.loads((tmp_path / "adapter_config.json").read_text())
    config = lorta.LortaConfig.from_pretrained(str(tmp_path))
    assert config.loaded_from == str(tmp_path)
    assert "loaded_from" not in config.to_dict() and "loaded_from" not in repr(config)
    other = copy.deepcopy(config)
    other.loaded_from = None
    assert other == config  # not part of ==
    assert "_lorta_source" not in vars(config)
    loaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path), config=config)
    assert loaded.peft_config["default"].loaded_from is None  # checked once, at the injection
    config.save_pretrained(tmp_path / "again")
    assert "loaded_from" not in json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    with pytest.raises(TypeError):
        TensorAdapterConfig(loaded_from="x")  # not a constructor argument


def test_a_saved_adapter_on_the_wrong_model_names_its_directory(tmp_path):
    get_peft_model(make_model("llama"), METHODS["lorta"]()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["no_such_proj"]}))
    with pytest.raises(lorta.LayoutError, match=f"matched no module.*adapter at {tmp_path}"):
        PeftModel.from_pretrained(make_model("llama"), str(tmp_path))


def test_fsdp_bookkeeping_lives_in_the_tuner_state_not_on_parameters():
    model = get_peft_model(make_model("llama"), METHODS["lorta"]())
    state = model.base_model.lorta_state
    params = list(model.base_model.lorta_factors.parameters())
    assert params and all(p in state.book.unmanaged for p in params)
    assert not any(k.startswith("_lorta") for p in params for k in vars(p))
    copied = copy.deepcopy(model)
    copied_params = list(copied.base_model.lorta_factors.parameters())
    assert all(p in copied.base_model.lorta_state.book.unmanaged for p in copied_params)
    assert not any(p in copied.base_model.lorta_state.book.unmanaged for p in params)
    replaced = torch.nn.Parameter(params[0].detach().clone())
    assert replaced not in state.book.unmanaged  # what FSDP's replacement looks like: not the same parameter


def test_no_cache_survives_its_forward():
    model = adapted("llama", "lorta")
    caches = model.base_model.lorta_state.caches
    seen = []
    attention = model.base_model.model.model.layers[0].self_attn
    attention.o_proj.register_forward_pre_hook(lambda *_: seen.append(len(caches.inputs.entries)))  # after q, k, v
    grads_of(model, "llama")
    assert seen and seen[0] > 0  # q, k, v shared their projection within the call
    assert caches.inputs.entries == {} and caches.inputs.depth == 0
    frames = caches.frames
    assert not frames.frame.open and not frames.backward_frame.in_backward  # the backward closed its window
    with torch.no_grad():
        model(**make_inputs("llama"))
    assert frames.frame is None and caches.inputs.entries == {}


def test_the_backward_window_is_closed_outside_the_backward():
    """Between a training forward and its backward, a direct call of a wrapped submodule builds its own maps."""
    model = adapted("llama", "lorta")
    frames = model.base_model.lorta_state.caches.frames
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    out = model(**make_inputs("llama")).logits
    assert frames.backward_frame is not None and not frames.backward_frame.in_backward
    assert frames.lookup("default", q_proj.lorta_slots["default"]) is None
    x = torch.randn(2, 5, q_proj.in_features)
    q_proj(x).sum().backward()  # its own graph, its own maps
    out.pow(2).mean().backward()
    assert not frames.backward_frame.in_backward


def test_a_retained_graph_recomputes_from_the_same_maps_in_each_backward():
    model = adapted("llama", "lorta")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    _, once = grads_of(model, "llama")
    model.zero_grad()
    inputs = make_inputs("llama")
    torch.manual_seed(0)
    loss = model(**inputs).logits.pow(2).mean()
    loss.backward(retain_graph=True)
    loss.backward()  # the window opens again for the second backward
    twice = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_same(twice, {n: 2 * g for n, g in once.items()})
