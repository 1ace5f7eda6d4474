"""Batched map construction: one vectorised pass per training forward must equal the per-module maps exactly, in
values and gradients, under every way a forward can be re-run (checkpointing, direct submodule calls, errors)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_inputs, make_model
from methods import METHODS
from peft import get_peft_model
from tolerance import BACKWARD_TERMS, FORWARD_TERMS, MAP_TERMS, assert_close
from torch.utils.checkpoint import checkpoint

from lorta.factorization import Factorization

method_names = pytest.mark.parametrize("method", sorted(METHODS))


def adapted(arch: str, method: str, **kw):
    model = get_peft_model(make_model(arch), METHODS[method](init_weights=False, **kw))
    model.train()
    return model


def factors_of(model) -> Factorization:
    return model.base_model.lorta_factors["default"]


def grads_of(model, arch: str, run=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = make_inputs(arch)
    torch.manual_seed(0)  # the same dropout masks in every run
    out = (run or (lambda: model(**inputs)))().logits
    loss = out.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert_close(a[name], b[name], BACKWARD_TERMS, msg=name)  # batched vs per-module maps, then the backward


@method_names
def test_maps_many_equals_maps_slot_by_slot(arch, method):
    factors = factors_of(adapted(arch, method))
    slots = [slot for group in factors.layout.slots.values() for slot in group]
    for slot, (P, Q) in zip(slots, factors.maps_many(slots), strict=True):
        P_ref, Q_ref = factors.maps(slot)
        assert P.shape == P_ref.shape and Q.shape == Q_ref.shape, slot
        assert_close(P, P_ref, MAP_TERMS)  # a gather, or (o) the same contraction batched
        assert_close(Q, Q_ref, MAP_TERMS)


def test_maps_many_covers_every_lorta_mode_set_and_mlp_extras():
    for modes in (
        [],
        ["heads"],
        ["layers"],
        ["matrices"],
        ["heads", "layers"],
        ["layers", "matrices"],
        ["heads", "matrices"],
        ["heads", "layers", "matrices"],
    ):
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
        factors = factors_of(adapted("mistral", "lorta", modes=modes, target_modules=targets))
        slots = [slot for group in factors.layout.slots.values() for slot in group]
        for slot, (P, Q) in zip(slots, factors.maps_many(slots), strict=True):
            P_ref, Q_ref = factors.maps(slot)
            assert_close(P @ Q, P_ref @ Q_ref, MAP_TERMS, msg=f"{modes} {slot}")


@method_names
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_batched_training_forward_matches_per_module_maps(arch, method):
    batched, per_module = adapted(arch, method), adapted(arch, method)
    per_module.base_model.batched_maps = False
    loss_b, grads_b = grads_of(batched, arch)
    loss_p, grads_p = grads_of(per_module, arch)
    assert_close(loss_b, loss_p, FORWARD_TERMS)
    assert_same(grads_b, grads_p)


@pytest.mark.parametrize("method", ["lorta", "tenslora-tucker", "tenslora-cp-qkv", "tlora"])
def test_training_forward_builds_no_map_module_by_module(monkeypatch, method):
    """The point of batching: no per-slot `maps` call (and its index ops) in a training forward; LoRTA and
    TensLoRA make one `group_maps` call per group of slots with the same role and heads."""
    model = adapted("qwen2", method)
    factors = factors_of(model)
    calls = {"maps": 0, "group_maps": 0}
    for name in calls:
        original = getattr(type(factors), name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(type(factors), name, counted)
    grads_of(model, "qwen2")
    groups = {(s.role, s.n_heads, s.head_stride) for slots in factors.layout.slots.values() for s in slots}
    assert calls == {"maps": 0, "group_maps": 0 if method == "tlora" else len(groups)}
    calls.update(maps=0, group_maps=0)
    model.base_model.batched_maps = False
    grads_of(model, "qwen2")
    assert calls["group_maps"] == 0 and calls["maps"] == sum(len(s) for s in factors.layout.slots.values())


@method_names
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_transformers_gradient_checkpointing_recomputes_from_the_same_maps(method, reentrant):
    """Reentrant and non-reentrant checkpointing give the gradients of the plain backward, for every method."""
    _, plain = grads_of(adapted("llama", method), "llama")
    model = adapted("llama", method)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    _, checkpointed = grads_of(model, "llama")
    assert_same(checkpointed, plain)


def test_hand_written_checkpointing_of_each_layer():
    """Non-reentrant torch.utils.checkpoint around each layer, as torch's activation-checkpoint wrappers do: the
    recomputation must save exactly what the forward saved (reentrant checkpointing is covered above)."""
    _, plain = grads_of(adapted("llama", "lorta"), "llama")
    model = adapted("llama", "lorta")
    model.enable_input_require_grads()
    for layer in model.base_model.model.model.layers:

        def wrapped(hidden, *args, _forward=layer.forward, **kwargs):
            return checkpoint(functools.partial(_forward, **kwargs), hidden, *args, use_reentrant=False)

        layer.forward = wrapped
    _, checkpointed = grads_of(model, "llama")
    assert_same(checkpointed, plain)


def test_maps_of_a_finished_forward_are_never_reused_outside_its_backward():
    """After the step, calling an adapted submodule directly builds fresh maps (the old graph is freed)."""
    model = adapted("llama", "lorta")
    grads_of(model, "llama")
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 7, attention.q_proj.in_features)
    attention.q_proj(x).sum().backward()  # would raise "backward through the graph a second time" if reused
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    attention.q_proj(x).sum().backward()


def test_a_failing_forward_closes_its_frame_and_call():
    model = adapted("llama", "lorta")
    frames = model.base_model.lorta_state.caches.frames
    with pytest.raises(IndexError):
        model(input_ids=torch.full((1, 4), 10_000))  # out of the vocabulary
    assert frames.depth == 0 and frames.calls == 0
    assert frames.frame is None or not frames.frame.open
    _, grads = grads_of(model, "llama")  # and the next forward works
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_frames_live_as_long_as_their_forward_or_call():
    model = adapted("llama", "lorta")
    frames = model.base_model.lorta_state.caches.frames
    inputs = make_inputs("llama")
    with torch.no_grad():
        model(**inputs)
    assert frames.frame is None and frames.backward_frame is None  # a no-grad call's maps go with the call
    with model.disable_adapter():
        model(**inputs)
    assert frames.frame is None  # adapters disabled: nothing built
    model(**inputs)
    assert frames.frame is frames.backward_frame and not frames.frame.open  # kept for its backward only
    with torch.no_grad():
        model(**inputs)
    assert frames.backward_frame is not None  # a no-grad pass (a DPO reference) leaves it alone
