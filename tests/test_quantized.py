"""Tensor adapters over quantised bases (found from outside: an 8-bit merge silently dropped the adapter, a 4-bit
merge crashed on the packed weight, and after an eval forward bitsandbytes' CPU 4-bit kernel cut the gradient).

For every method over bitsandbytes 8-bit, bitsandbytes nf4, torchao int8 weight-only and HQQ 4-bit: training moves
the output and only the adapter; merging keeps the adapter, within the error of re-quantising the merged weights;
unmerging restores the base within two re-quantisation steps; the saved adapter on a freshly quantised base gives
the trained model's outputs; mixed-adapter batches and the adapter bank work; a base that cannot be re-quantised
refuses to merge and stays untouched.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from methods import METHODS
from peft import PeftModel, get_peft_model
from tolerance import FORWARD_TERMS, assert_close

import lorta
from lorta.tuner import TensorAdapterLayer

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

BACKENDS = ["bnb-8bit", "bnb-nf4", "bnb-fp4", "torchao-int8", "hqq-4bit"]
METHOD_NAMES = ["lorta", "tenslora-tucker", "tlora"]
IDS = torch.tensor([[5, 17, 3, 44, 8], [60, 2, 91, 33, 12]])


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    path = tmp_path_factory.mktemp("float-llama")
    model.save_pretrained(path)
    return str(path)


def load(path: str, backend: str | None) -> torch.nn.Module:
    """The model at `path`, quantised with `backend` the way users load it (transformers' quantization_config;
    HQQ, which transformers 5 no longer loads, by replacing the attention projections with HQQLinear)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM, TorchAoConfig

    configs = {
        "bnb-8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
        "bnb-nf4": lambda: BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        ),
        "bnb-fp4": lambda: BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32
        ),
        "bnb-nf4-bf16": lambda: BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        "torchao-int8": lambda: TorchAoConfig(_torchao_int8()),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend in configs:
            model = LlamaForCausalLM.from_pretrained(path, quantization_config=configs[backend](), device_map="cpu")
        else:
            model = LlamaForCausalLM.from_pretrained(path)
            if backend == "hqq-4bit":
                _hqq(model)
    return model.eval()


def _torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _hqq(model: torch.nn.Module) -> None:
    hqq = pytest.importorskip("hqq.core.quantize")
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(layer.self_attn, name)
            config = hqq.BaseQuantizeConfig(nbits=4, group_size=32)
            setattr(layer.self_attn, name, hqq.HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu"))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the base model (quantised storage included), to check that training leaves them alone."""
    out = {}
    for key, value in model.state_dict().items():
        if "lorta" not in key:  # torchao's quantised tensors compare through their integer data and scales
            parts = [value.qdata, value.scale] if hasattr(value, "qdata") else [value]
            out[key] = torch.cat([p.detach().reshape(-1).double() for p in parts])
    return out


def train(model, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_over_a_quantised_base_moves_only_the_adapter(float_dir, backend, method, tmp_path):
    model = get_peft_model(load(float_dir, backend), METHODS[method]())
    before = logits(model)  # an eval forward before training
    frozen = base_state(model)
    factors = {n: p.detach().clone() for n, p in model.base_model.lorta_factors["default"].named_parameters()}
    assert {p.dtype for p in factors.values()} == {torch.float32}
    train(model)
    after = logits(model)
    assert (after - before).norm() > 0.1 * before.norm(), "training did not move the output"
    for key, value in base_state(model).items():
        assert torch.equal(value, frozen[key]), f"{key} changed in training"
    moved = {n: not torch.equal(p, factors[n]) for n, p in model.base_model.lorta_factors["default"].named_parameters()}
    assert all(moved.values()), moved
    model.save_pretrained(tmp_path)  # onto a freshly quantised base: the same outputs
    loaded = PeftModel.from_pretrained(load(float_dir, backend), tmp_path)
    assert_close(logits(loaded), after, FORWARD_TERMS)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_an_eval_forward_before_adapting_does_not_cut_the_gradient(float_dir, method):
    """bitsandbytes repacks a CPU 4-bit weight for inference on an eval forward; its packed kernel has no backward,
    so without lorta's unpacking no gradient would reach the adapters before the last 4-bit layer."""
    base = load(float_dir, "bnb-nf4")
    logits(base)
    model = get_peft_model(base, METHODS[method](init_weights=False))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, p in model.base_model.lorta_factors["default"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def merged_float_logits(float_dir: str, model, backend: str, tmp_path) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the float model with the adapter's updates added, and of that model quantised from scratch."""
    from transformers import LlamaForCausalLM

    deltas = {
        n.removeprefix("base_model.model."): m.delta_weight("default").detach()
        for n, m in model.named_modules()
        if isinstance(m, TensorAdapterLayer)
    }
    dense = LlamaForCausalLM.from_pretrained(float_dir).eval()
    for name, delta in deltas.items():
        dense.get_submodule(name).weight.data += delta
    dense.save_pretrained(tmp_path / "merged-float")
    return logits(dense), logits(load(str(tmp_path / "merged-float"), backend))


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_keeps_the_adapter_within_the_requantisation_error(float_dir, backend, method, tmp_path):
    from transformers import LlamaForCausalLM

    base_out, float_out = logits(load(float_dir, backend)), logits(LlamaForCausalLM.from_pretrained(float_dir).eval())
    torch.manual_seed(0)
    model = get_peft_model(load(float_dir, backend), METHODS[method](init_weights=False))
    unmerged = logits(model)
    merged_float, merged_quantised = merged_float_logits(float_dir, model, backend, tmp_path)
    # Merging re-quantises once: the merged model differs from the unmerged one by at most the error of quantising
    # the merged weights from scratch plus the base's own quantisation error (measured on this model), x2 margin.
    bound = 2 * ((merged_quantised - merged_float).norm() + (base_out - float_out).norm())
    effect = (unmerged - base_out).norm()
    model.base_model.merge_adapter()
    merged = logits(model)
    assert (merged - unmerged).norm() <= bound, f"merged vs unmerged {(merged - unmerged).norm():.3g} > {bound:.3g}"
    assert (merged - unmerged).norm() < 0.25 * effect, "the merge lost the adapter"
    model.base_model.unmerge_adapter()
    with model.disable_adapter():
        restored = logits(model)
    # unmerging re-quantises twice more (W + delta, then W): within two steps of the merged weights' format
    assert (restored - base_out).norm() <= 2 * bound + 0.05 * effect
    torch.manual_seed(0)  # the same adapter again, merged and unloaded
    plain = get_peft_model(load(float_dir, backend), METHODS[method](init_weights=False)).merge_and_unload()
    assert not any(isinstance(m, TensorAdapterLayer) for m in plain.modules())
    assert (logits(plain) - unmerged).norm() <= bound


@pytest.mark.parametrize("backend", ["bnb-8bit", "bnb-nf4"])
def test_mixed_batches_and_the_bank_over_a_quantised_base(float_dir, backend, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(load(float_dir, backend), lorta.LortaConfig(r=3, init_weights=False))
    torch.manual_seed(1)
    model.add_adapter("other", lorta.LortaConfig(r=3, init_weights=False))
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["other", "default"]).logits
        model.set_adapter("other")
        alone_other = model(input_ids=IDS[:1]).logits
        model.set_adapter("default")
        alone_default = model(input_ids=IDS[1:]).logits
    assert_close(mixed[:1], alone_other, FORWARD_TERMS)
    assert_close(mixed[1:], alone_default, FORWARD_TERMS)
    model.save_pretrained(tmp_path / "bank")  # "default" at the root, "other" in its subfolder
    served = PeftModel.from_pretrained(load(float_dir, backend), tmp_path / "bank")
    bank = lorta.load_adapters(served, {"other": tmp_path / "bank" / "other"})
    assert_close(bank(["other", "__base__"], input_ids=IDS).logits[:1], alone_other, FORWARD_TERMS)


def test_a_base_that_cannot_be_requantised_refuses_to_merge_and_stays_untouched(float_dir):
    from torchao.quantization import quantize_

    base = load(float_dir, None)
    quantize_(base, _torchao_int8())  # directly: no quantization config to re-quantise a merged weight with
    model = get_peft_model(base, lorta.LortaConfig(r=3, init_weights=False))
    before, out = base_state(model), logits(model)
    with pytest.raises(
        lorta.QuantizedMergeError,
        match=r"cannot merge into a torchao .* base layer.*load the base "
        r"model unquantised",
    ):
        model.merge_and_unload()
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    assert_close(logits(model), out, 0)  # still adapted, unmerged


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_kbit_preparation_gradient_checkpointing_and_a_bfloat16_compute_dtype(float_dir, method):
    from peft import prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(load(float_dir, "bnb-nf4-bf16"), use_gradient_checkpointing=True)
    model = get_peft_model(base, METHODS[method](init_weights=False))
    factors = model.base_model.lorta_factors["default"]
    assert {p.dtype for p in factors.parameters()} == {torch.float32}  # upcast, as PEFT does for LoRA
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, p in factors.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    kept = get_peft_model(load(float_dir, "bnb-nf4-bf16"), METHODS[method](), autocast_adapter_dtype=False)
    assert {p.dtype for p in kept.base_model.lorta_factors["default"].parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("backend", ["bnb-8bit", "bnb-nf4"])
def test_safe_merge_of_broken_factors_leaves_the_quantised_weights_alone(float_dir, backend):
    model = get_peft_model(load(float_dir, backend), lorta.LortaConfig(r=3, init_weights=False))
    before = base_state(model)
    model.base_model.lorta_factors["default"].A.data[0] = torch.nan
    with pytest.raises(ValueError, match="^NaNs detected in the merged weights. The adapter default seems to be"):
        model.merge_and_unload(safe_merge=True)
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
