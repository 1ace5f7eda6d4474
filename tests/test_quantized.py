"""Tensor adapters over quantised bases (found from outside: an 8-bit merge silently dropped the adapter, a 4-bit
merge crashed on the packed weight, and after an eval forward bitsandbytes' CPU 4-bit kernel cut the gradient).

For every method over bitsandbytes 8-bit, nf4 and fp4, torchao int8 weight-only and HQQ 4-bit: training moves
the output and only the adapter; merging writes every weight within one quantisation step of W + delta; unmerging
restores the base's quantised storage bit for bit; the saved adapter on a freshly quantised base gives
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
from lorta.quantized import dense_weight
from lorta.tuner import TensorAdapterLayer

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

BACKENDS = ["bnb-8bit", "bnb-nf4", "bnb-fp4", "torchao-int8", "hqq-4bit"]
METHOD_NAMES = ["lorta", "tenslora-tucker", "tlora"]
IDS = torch.tensor([[5, 17, 3, 44, 8], [60, 2, 91, 33, 12]])
# the tiny decoder of these tests (GQA: 4 heads, 2 key/value heads), as Llama and as Qwen2 (q/k/v biases)
TINY_DECODER = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_DECODER))
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
    # a sanity threshold, not a rounding bound: 3 AdamW steps at lr 3e-2 move the logits by O(1) of their norm,
    # orders of magnitude above any float or quantisation effect, and an adapter that does not train moves them by 0
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


def adapted_layers(model) -> dict[str, TensorAdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorAdapterLayer)}


def storage(layer: TensorAdapterLayer) -> dict[str, object]:
    """A quantised base layer's serialised storage: its state_dict (bitsandbytes: the packed weight with its absmax,
    codebook and nested absmax, or SCB; HQQ: W_q and its scale/zero meta; torchao: the weight's int8 data, scale and
    zero point), every tensor cloned."""
    out: dict[str, object] = {}
    for key, value in layer.get_base_layer().state_dict().items():
        if isinstance(value, torch.Tensor) and hasattr(value, "__tensor_flatten__"):
            for inner in value.__tensor_flatten__()[0]:
                out[f"{key}.{inner}"] = getattr(value, inner).detach().clone()
        else:
            out[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return out


def same_storage(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]  # bitwise, no tolerance
        for k in a
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerging_restores_the_quantised_base_bit_for_bit(float_dir, backend, method):
    torch.manual_seed(0)
    model = get_peft_model(load(float_dir, backend), METHODS[method](init_weights=False))
    layers = adapted_layers(model)
    before = {n: storage(m) for n, m in layers.items()}
    with model.disable_adapter():
        base_out = logits(model)
    unmerged = logits(model)
    for _ in range(2):  # a second round trip starts from the restored storage: no drift accumulates
        model.base_model.merge_adapter()
        assert all(m.pre_merge_storage is not None for m in layers.values())
        assert not any(same_storage(storage(m), before[n]) for n, m in layers.items()), "the merge wrote nothing"
        model.base_model.unmerge_adapter()
        for name, layer in layers.items():
            assert same_storage(storage(layer), before[name]), f"{name}: the base did not come back bit for bit"
            assert layer.pre_merge_storage is None and not layer.merged
        with model.disable_adapter():
            assert torch.equal(logits(model), base_out)  # the same storage and kernels: the same bits
        assert torch.equal(logits(model), unmerged)


def quantisation_bound(layer: TensorAdapterLayer, backend: str, target: torch.Tensor) -> torch.Tensor:
    """Per element, how far the layer's dequantised weight may be from `target` when the layer holds `target`
    quantised by round-to-nearest onto its grid (read from the layer's own quantisation state).

    x quantises to one of the two grid points around it, so it is off by at most half their gap (the codebook's
    local spacing times the block's scale), or, outside the grid, by its distance to the grid's end (HQQ clips).
    Where the stored scale s' is itself quantised (nf4's double quantisation) the point c * s' moves by
    |c| * |s' - s| <= |s' - s| from c * s. Float32 rounding of x / s, of the scale and of the dequantisation adds a
    few units of eps32 at the values' magnitude: 16 * eps * (|x| + s) covers it.
    """
    base = layer.get_base_layer()
    eps = torch.finfo(torch.float32).eps
    x = target.detach().double()
    if backend == "bnb-8bit":  # row-wise absmax a (SCB) of x rounded to float16 first: grid k * a / 127
        scb = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
        codes, s, s_stored = torch.arange(-127, 128).double() / 127, scb.double()[:, None], None
        groups, offset = x, 0.0
        # bitsandbytes quantises fp16(x): half a float16 unit at |x| (2^-25 absolute in fp16's subnormal range)
        extra = 0.5 * torch.finfo(torch.float16).eps * x.abs() + 2.0**-25
    elif backend in ("bnb-nf4", "bnb-fp4"):  # blocks of `blocksize` weights, grid code * absmax(block)
        import bitsandbytes.functional as F

        qs = base.weight.quant_state
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
        groups = x.reshape(-1, qs.blocksize)
        codes, s = qs.code.double(), groups.abs().amax(1, keepdim=True)
        s_stored, offset = absmax.double()[:, None], 0.0
    elif backend == "torchao-int8":  # row-wise scale s: grid k * s, k in -128..127
        data = base.weight.data
        codes, s, s_stored = torch.arange(-128, 128).double(), data.scale.double().reshape(-1, 1), None
        groups, offset = x, data.zero_point.double().reshape(-1, 1) * 0  # symmetric: the zero point is 0
    else:  # HQQ, groups of group_size along the rows: grid (k - zero) * scale, k in 0..2^nbits - 1
        meta = base.meta
        groups = x.reshape(-1, meta["group_size"])
        codes, s, s_stored = torch.arange(2 ** meta["nbits"]).double(), meta["scale"].double(), None
        offset = -meta["zero"].double() * s
    u = (groups - offset) / s  # the weights on the grid's unit scale
    hi_index = torch.searchsorted(codes.sort().values.contiguous(), u.contiguous()).clamp(1, len(codes) - 1)
    grid = codes.sort().values
    lo, hi = grid[hi_index - 1], grid[hi_index]
    inside = (u >= grid[0]) & (u <= grid[-1])
    off = torch.where(inside, (hi - lo) / 2, torch.maximum(grid[0] - u, u - grid[-1])) * s
    if s_stored is not None:
        off = off + (s_stored - s).abs()
    bound = off + 16 * eps * (groups.abs() + s)
    return bound.reshape(target.shape) + (extra if backend == "bnb-8bit" else 0)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_writes_each_weight_within_one_quantisation_step(float_dir, backend, method):
    torch.manual_seed(0)
    model = get_peft_model(load(float_dir, backend), METHODS[method](init_weights=False))
    layers = adapted_layers(model)
    with torch.no_grad():
        targets = {n: dense_weight(m) + m.delta_weight("default").float() for n, m in layers.items()}
        deltas = {n: m.delta_weight("default").float() for n, m in layers.items()}
    model.base_model.merge_adapter()
    for name, layer in layers.items():
        merged, bound = dense_weight(layer), quantisation_bound(layer, backend, targets[name])
        excess = ((merged - targets[name]).abs().double() - bound).max()
        assert excess <= 0, f"{name}: the merged weight is {excess:.3g} past one quantisation step of W + delta"
        # the check has power: were the adapter dropped, most updates would stand out of that step
        assert (deltas[name].abs() > bound).float().mean() > 0.5, f"{name}: delta is within the quantiser's step"
    torch.manual_seed(0)  # the same adapter again, merged and unloaded: the same bits, the kept storage freed
    again = get_peft_model(load(float_dir, backend), METHODS[method](init_weights=False))
    again_layers = list(adapted_layers(again).values())
    plain = again.merge_and_unload()
    assert not any(isinstance(m, TensorAdapterLayer) for m in plain.modules())
    assert all(layer.pre_merge_storage is None for layer in again_layers)
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.")
        assert same_storage(storage_of(plain.get_submodule(key)), storage(layer)), key


def storage_of(module: torch.nn.Module) -> dict[str, object]:
    return storage(type("Wrapped", (), {"get_base_layer": lambda self: module})())


@pytest.mark.parametrize("backend", ["bnb-nf4", "bnb-8bit"])
def test_unmerge_refuses_when_the_kept_storage_was_written_in_place(float_dir, backend):
    torch.manual_seed(0)
    model = get_peft_model(load(float_dir, backend), lorta.LortaConfig(r=3, init_weights=False))
    layers = list(adapted_layers(model).values())
    model.base_model.merge_adapter()
    merged = logits(model)
    kept = layers[-1].pre_merge_storage.weight
    kept.data.view(-1)[0] += 1  # through .data: the write a version counter would not see
    with pytest.raises(lorta.QuantizedMergeError, match=r"cannot unmerge: .*written in place.*Reload the base model"):
        model.base_model.unmerge_adapter()
    assert all(layer.merged for layer in layers), "a refused unmerge left some layers unmerged"
    assert torch.equal(logits(model), merged)


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
    assert_close(logits(model), out, 0)  # still adapted, unmerged: the same storage and ops, so the same bits


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


def test_merging_into_hqq_keeps_the_layers_bias():
    """Found from outside: PEFT's HQQ backend re-quantises a merged weight into a new HQQLinear without the old
    layer's bias, so a merge silently dropped the q/k/v biases of a Qwen2 base (LoRA's merge drops them too)."""
    hqq = pytest.importorskip("hqq.core.quantize")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_DECODER)).eval()
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(layer.self_attn, name)
            torch.nn.init.normal_(linear.bias)  # transformers initialises biases to zero
            config = hqq.BaseQuantizeConfig(nbits=4, group_size=32)
            quantised = hqq.HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
            setattr(layer.self_attn, name, quantised)
    adapted = get_peft_model(model, lorta.LortaConfig(r=3, init_weights=False))
    layers = {n: m for n, m in adapted_layers(adapted).items() if not n.endswith("o_proj")}  # o has no bias
    biases = {n: m.get_base_layer().bias.detach().clone() for n, m in layers.items()}
    assert len(biases) == 6 and all(b.abs().sum() > 0 for b in biases.values())
    adapted.base_model.merge_adapter()
    for name, layer in layers.items():
        bias = layer.get_base_layer().bias
        assert bias is not None and torch.equal(bias, biases[name]), f"{name}: the merge lost the bias"
