"""The PEFT life cycle, for every method of the family and every architecture shape (PEFT's common matrix)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, CAUSAL, make_inputs, make_model, output_of
from methods import METHODS
from peft import PeftModel, get_peft_model
from reference import adapted_modules
from tolerance import BACKWARD_TERMS, FORWARD_TERMS, HALF_TERMS, assert_close, assert_differs

import lorta
from lorta.tuner import TensorAdapterLayer

method_names = pytest.mark.parametrize("method", sorted(METHODS))
all_archs = pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
some_archs = pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gemma3"])


def adapted(arch: str, method: str, seed: int = 0, **kw):
    return get_peft_model(make_model(arch, seed=seed), METHODS[method](**kw))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lorta_factors" not in n}


@method_names
@all_archs
def test_starts_exactly_at_the_base_model(arch, method):
    inputs = make_inputs(arch)
    want = output_of(make_model(arch), inputs)
    model = adapted(arch, method)
    assert torch.equal(output_of(model, inputs), want)  # the update is exactly 0, and W x + 0 is W x bit for bit
    assert_differs(output_of(adapted(arch, method, init_weights=False), inputs), want, FORWARD_TERMS)


def test_lorta_mode_factors_start_as_seeded_random_signs():
    """C_H, C_L, C_M start at +-1 with different signs across heads, layers and q/k/v/o (B = 0 keeps the update
    at zero); the 'ones' option gives the identical start; the draw follows torch's seed."""

    def factors(**kw):
        torch.manual_seed(7)
        return get_peft_model(make_model("llama"), lorta.LortaConfig(r=8, **kw)).base_model.lorta_factors["default"]

    signs = factors()
    for C in (signs.C_H, signs.C_L, signs.C_M):
        assert set(C.unique().tolist()) == {-1.0, 1.0}
        rows = C.reshape(-1, C.shape[-2], C.shape[-1])[0]
        assert len({tuple(row.tolist()) for row in rows}) == len(rows)  # every head / layer / matrix its own mix
    assert torch.count_nonzero(signs.B) == 0
    assert all(torch.equal(a, b) for a, b in zip(signs.parameters(), factors().parameters(), strict=True))
    ones = factors(mode_factor_init="ones")
    assert all(torch.equal(C, torch.ones_like(C)) for C in (ones.C_H, ones.C_L, ones.C_M))


@method_names
@all_archs
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["eager", "low_cpu_mem"])
def test_save_load_round_trip(arch, method, low_cpu_mem_usage, tmp_path):
    model = adapted(arch, method, init_weights=False)
    inputs = make_inputs(arch)
    want = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    factors = model.base_model.lorta_factors["default"]
    stored = sum(t.numel() for t in factors.state_dict().values())  # trainable factors, plus saved projections
    if not method.startswith("tlora") or method == "tlora-seed-only":
        assert stored == model.base_model.num_adapter_parameters()
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert stored * 4 <= size <= stored * 4 + 2048
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == model.peft_config["default"].peft_type
    assert saved["r"] == 3 and saved["matrix_names"] and saved["target_modules"]
    assert set(saved["model_shape"]) >= {"num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make_model(arch), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not [w for w in caught if "missing adapter keys" in str(w.message) or "unexpected" in str(w.message)]
    assert_close(output_of(loaded, inputs), want, FORWARD_TERMS)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    assert all(not p.is_meta for p in loaded.parameters())


@method_names
@all_archs
def test_merge_unmerge_merge_and_unload(arch, method):
    model = adapted(arch, method, init_weights=False)
    inputs = make_inputs(arch)
    base_before = base_weights(model)
    unmerged = output_of(model, inputs)
    deltas = {
        n: m.delta_weight("default").detach()
        for n, m in model.base_model.model.named_modules()
        if isinstance(m, TensorAdapterLayer)
    }
    model.base_model.merge_adapter()
    assert_close(output_of(model, inputs), unmerged, FORWARD_TERMS)  # W x + (x P) Q vs (W + P Q) x
    merged_weights = base_weights(model)
    with pytest.warns(UserWarning, match="[Aa]lready merged"):
        model.base_model.merge_adapter()  # idempotent: the second merge does nothing
    for n, w in base_weights(model).items():
        assert torch.equal(w, merged_weights[n]), n
    model.base_model.unmerge_adapter()
    delta_scale = max(float(d.abs().max()) for d in deltas.values())
    for n, w in base_weights(model).items():  # (W + D) - D: two roundings at the magnitude |W| + |D|
        assert_close(w, base_before[n], 2, scale=float(base_before[n].abs().max()) + delta_scale, msg=n)
    assert_close(output_of(model, inputs), unmerged, FORWARD_TERMS)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, TensorAdapterLayer) for m in plain.modules())
    assert not any("lorta" in n for n, _ in plain.named_parameters())
    assert_close(output_of(plain, inputs), unmerged, FORWARD_TERMS)


@method_names
@some_archs
def test_unload_restores_base_and_disable_adapter(arch, method):
    inputs = make_inputs(arch)
    base_out = output_of(make_model(arch), inputs)
    model = adapted(arch, method, init_weights=False)
    adapted_out = output_of(model, inputs)
    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), base_out)
    torch.testing.assert_close(output_of(model, inputs), adapted_out, atol=0, rtol=0)  # the same computation again
    plain = model.unload()
    assert torch.equal(output_of(plain, inputs), base_out)


@method_names
def test_safe_merge_refuses_nan_and_leaves_weights(method):
    model = adapted("llama", method, init_weights=False)
    before = base_weights(model)
    factors = model.base_model.lorta_factors["default"]
    with torch.no_grad():
        next(p for p in factors.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.base_model.merge_adapter(safe_merge=True)
    for n, w in base_weights(model).items():
        assert torch.equal(w, before[n]) or torch.isnan(w).any() and "lorta" in n, n


@method_names
def test_several_named_adapters(method):
    inputs = make_inputs("llama")
    model = adapted("llama", method, init_weights=False)
    first = output_of(model, inputs)
    torch.manual_seed(123)
    model.add_adapter("second", METHODS[method](init_weights=False))
    assert set(model.base_model.lorta_factors) == {"default", "second"}
    # adding does not activate; the same adapter, though a second one present may change how maps are batched
    assert_close(output_of(model, inputs), first, FORWARD_TERMS)
    model.set_adapter("second")
    second = output_of(model, inputs)
    assert_differs(second, first, FORWARD_TERMS)
    grads = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert grads == {"second"}
    model.set_adapter("default")
    assert_close(output_of(model, inputs), first, FORWARD_TERMS)
    model.delete_adapter("second")
    assert set(model.base_model.lorta_factors) == {"default"}
    assert all("second" not in m.lorta_slots for m in adapted_modules(model).values())
    assert_close(output_of(model, inputs), first, FORWARD_TERMS)


def causal_loss(model, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


@method_names
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_training_changes_only_adapter_parameters(arch, method):
    model = adapted(arch, method)
    model.train()
    inputs = make_inputs(arch, batch=4, length=12)
    frozen, start = base_weights(model), trainable(model)
    assert start and all("lorta_factors" in n for n in start)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = causal_loss(model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, w in base_weights(model).items():
        assert torch.equal(w, frozen[n]), n
    assert all(not torch.equal(p, start[n]) for n, p in trainable(model).items())


@method_names
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(arch, method):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = adapted(arch, method, init_weights=False)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(**make_inputs(arch)).logits
        out.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        assert_close(checkpointed[n], plain[n], BACKWARD_TERMS, msg=n)


@method_names
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_base_and_autocast(method, dtype):
    inputs = make_inputs("llama")
    model = get_peft_model(make_model("llama", dtype=dtype), METHODS[method](init_weights=False))
    factors = model.base_model.lorta_factors["default"]
    assert all(p.dtype == torch.float32 for p in factors.parameters())  # adapters stay in float32
    out = output_of(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    full = get_peft_model(make_model("llama"), METHODS[method](init_weights=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = output_of(full, inputs)
    assert_close(auto.float(), output_of(full, inputs), HALF_TERMS, dtype=torch.bfloat16)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in factors.parameters())
    model.base_model.merge_adapter()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.dtype == dtype


@method_names
@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_generate_matches_merged_model(arch, method):
    model = adapted(arch, method, init_weights=False)
    ids = make_inputs(arch, batch=2, length=5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = model.generate(**ids, **kwargs, output_scores=True, return_dict_in_generate=True)
        merged = model.merge_and_unload()
        forced = merged(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits
    assert out.sequences.shape == (2, 11)
    # The merged model, teacher-forced on the tokens the adapted model generated, gives the same next-token
    # logits at every step (comparing the generated tokens themselves would flip on a near tie on another CPU).
    scores = torch.stack(out.scores, dim=1)  # (batch, new tokens, vocab)
    assert_close(forced[:, 4:-1], scores, FORWARD_TERMS)


@pytest.mark.slow
@method_names
def test_torch_compile(method):
    model = adapted("llama", method, init_weights=False)
    inputs = make_inputs("llama")
    want = output_of(model, inputs)
    compiled = torch.compile(model)
    assert_close(output_of(compiled, inputs), want, FORWARD_TERMS)  # inductor fuses and reorders
    model.train()
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_adapter_for_another_shape_is_refused(tmp_path):
    adapted("llama", "lorta").save_pretrained(tmp_path)
    other = make_model("mistral")  # different hidden size, heads and layers
    with pytest.raises(lorta.LayoutError, match="another shape"):
        PeftModel.from_pretrained(other, tmp_path)


@method_names
def test_inference_maps_follow_factor_updates(method):
    """Without autograd the maps of one call are built in one batched pass; any change to a factor is seen."""
    model = adapted("llama", method, init_weights=False)
    inputs = make_inputs("llama")
    first = output_of(model, inputs)
    torch.testing.assert_close(output_of(model, inputs), first, atol=0, rtol=0)  # the same computation again
    factors = model.base_model.lorta_factors["default"]
    with torch.no_grad():
        for p in factors.parameters():
            p.mul_(1.5)  # an in-place update, as an optimizer step makes
    cached = output_of(model, inputs)
    with torch.enable_grad():
        fresh = model(**inputs).logits.detach()
    assert_differs(cached, first, FORWARD_TERMS)  # so the comparison below tells stale maps from fresh ones
    assert_close(cached, fresh, FORWARD_TERMS)  # a no-grad and a grad forward: the same maps, batched alike
    factors.load_state_dict({k: v * 0 for k, v in factors.state_dict().items()}, strict=False)
    with torch.enable_grad():
        fresh = model(**inputs).logits.detach()
    assert_close(output_of(model, inputs), fresh, FORWARD_TERMS)


def test_inference_after_a_training_step_with_fused_adamw():
    """Fused AdamW updates parameters in place without bumping their version counter."""
    model = adapted("llama", "lorta")
    inputs = make_inputs("llama")
    model.eval()
    before = output_of(model, inputs)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    versions = [p._version for p in model.parameters() if p.requires_grad]
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    model.eval()
    after = output_of(model, inputs)
    assert_differs(after, before, FORWARD_TERMS)  # so the comparison below tells stale maps from fresh ones
    with torch.enable_grad():
        fresh = model(**inputs).logits.detach()
    assert_close(after, fresh, FORWARD_TERMS)
    assert versions  # (whatever the counters did)
