"""Every model type in lorta's architecture table, built tiny from its config: the default targets adapt exactly its
attention matrices, every method's update equals the float64 reference (fused and interleaved q/k/v included) and
the adapted model equals the dense model with those updates added. README's table is this table."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from reference import adapted_modules, reference_lorta, reference_tenslora, reference_tlora
from tolerance import FLOAT32_INSIDE_TERMS, MAP_TERMS, assert_close

import lorta
from lorta.architectures import ARCHITECTURES

_L = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=16, intermediate_size=32, vocab_size=97)
_GQA = dict(_L, num_key_value_heads=2)
_SEQ2SEQ = dict(
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    vocab_size=97,
    pad_token_id=1,
)
_MOE = dict(experts_implementation="eager", num_experts_per_tok=1)  # float64 needs the plain expert loop
_T5 = dict(d_model=16, d_kv=6, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=4, vocab_size=97)  # H*d_kv != d
_MULTIMODAL = dict(
    text_config=dict(_GQA, head_dim=4, vocab_size=300),
    vision_config=dict(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=16, image_size=8, patch_size=4
    ),
)

# model type -> config kwargs and the inputs its forward takes ("ids", "seq2seq", "pixels", "audio"; "language
# model": ids into the multimodal model's language model).
CASES: dict[str, tuple[dict, str]] = {
    "llama": (_GQA, "ids"),
    "mistral": (_GQA, "ids"),
    "mixtral": (dict(_GQA, **_MOE, num_local_experts=2), "ids"),
    "qwen2": (dict(_L, num_key_value_heads=1), "ids"),
    "qwen2_moe": (
        dict(_GQA, **_MOE, num_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
        "ids",
    ),
    "qwen3": (dict(_GQA, head_dim=8), "ids"),
    "qwen3_moe": (dict(_GQA, **_MOE, head_dim=8, num_experts=2, moe_intermediate_size=16), "ids"),
    "gemma": (dict(_L, num_key_value_heads=1, head_dim=8), "ids"),
    "gemma2": (dict(_GQA, head_dim=8), "ids"),
    "gemma3_text": (dict(_L, num_key_value_heads=1, head_dim=8), "ids"),
    "gemma3": (dict(_MULTIMODAL, mm_tokens_per_image=4), "ids"),
    "llama4": (dict(_MULTIMODAL, text_config=dict(_MULTIMODAL["text_config"], **_MOE)), "language model"),
    "llama4_text": (dict(_GQA, **_MOE, head_dim=4, intermediate_size_mlp=32, num_local_experts=2), "ids"),
    "olmo": (_L, "ids"),
    "olmo2": (_L, "ids"),
    "starcoder2": (_GQA, "ids"),
    "smollm3": (dict(_GQA, pad_token_id=0), "ids"),
    "granite": (_GQA, "ids"),
    "cohere": (_GQA, "ids"),
    "phi": (_L, "ids"),
    "stablelm": (_GQA, "ids"),
    "nemotron_h": (
        dict(
            _GQA,
            head_dim=4,
            hybrid_override_pattern="M*",
            mamba_num_heads=4,
            mamba_head_dim=4,
            ssm_state_size=4,
            n_groups=1,
        ),
        "ids",
    ),
    "vit": (
        dict(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, image_size=8, patch_size=4
        ),
        "pixels",
    ),
    "opt": (
        dict(
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=4,
            vocab_size=97,
            word_embed_proj_dim=16,
        ),
        "ids",
    ),
    "bart": (_SEQ2SEQ, "seq2seq"),
    "mbart": (_SEQ2SEQ, "seq2seq"),
    "m2m_100": (_SEQ2SEQ, "seq2seq"),
    "whisper": (dict(_SEQ2SEQ, num_mel_bins=8, max_source_positions=8, decoder_start_token_id=0), "audio"),
    "gptj": (dict(n_embd=16, n_layer=2, n_head=4, rotary_dim=4, vocab_size=97), "ids"),
    "gpt_neo": (
        dict(hidden_size=16, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], vocab_size=97),
        "ids",
    ),
    "bert": (_L, "ids"),
    "roberta": (dict(_L, pad_token_id=1), "ids"),
    "xlm-roberta": (dict(_L, pad_token_id=1), "ids"),
    "esm": (dict(_L, vocab_size=33, pad_token_id=1), "ids"),
    "electra": (dict(_L, embedding_size=16), "ids"),
    "camembert": (dict(_L, pad_token_id=1), "ids"),
    "ernie": (_L, "ids"),
    "mpnet": (dict(_L, pad_token_id=1), "ids"),
    "data2vec-text": (dict(_L, pad_token_id=1), "ids"),
    "layoutlm": (_L, "ids"),
    "t5": (_T5, "seq2seq"),
    "mt5": (_T5, "seq2seq"),
    "umt5": (_T5, "seq2seq"),
    "gpt2": (dict(n_embd=16, n_layer=2, n_head=4, vocab_size=97), "ids"),
    "gpt_bigcode": (dict(n_embd=16, n_layer=2, n_head=4, vocab_size=97), "ids"),  # multi-query: 1 KV head
    "distilbert": (dict(dim=16, n_layers=2, n_heads=4, hidden_dim=32, vocab_size=97), "ids"),
    "deberta-v2": (_L, "ids"),
    "deberta": (_L, "ids"),
    "phi3": (dict(_GQA, pad_token_id=0), "ids"),
    "codegen": (dict(n_embd=32, n_layer=2, n_head=8, rotary_dim=4, vocab_size=97), "ids"),
    "mpt": (dict(d_model=16, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=97), "ids"),
    "gpt_neox": (_L, "ids"),
    "bloom": (dict(hidden_size=16, n_layer=2, n_head=4, vocab_size=97), "ids"),
    "falcon": (dict(_L, new_decoder_architecture=True, num_kv_heads=2), "ids"),
}
# More shapes of the interleaved and multi-query fused projections (model type, extra config kwargs).
VARIANTS = {
    "falcon-multi-query": ("falcon", dict(_L, new_decoder_architecture=False, multi_query=True)),
    "falcon-rw": ("falcon", dict(_L, new_decoder_architecture=False, multi_query=False)),
    "gpt_bigcode-multi-head": ("gpt_bigcode", dict(n_embd=16, n_layer=2, n_head=4, vocab_size=97, multi_query=False)),
}
METHODS = {
    "lorta": lambda: lorta.LortaConfig(r=2, lora_alpha=3, init_weights=False),
    "tenslora": lambda: lorta.TensLoraConfig(ranks=[2, 3, 2, 2, 2], lora_alpha=3, init_weights=False),
    "tlora": lambda: lorta.TLoraConfig(r=2, lora_alpha=3, init_weights=False),
}
REFERENCES = {"lorta": reference_lorta, "tenslora": reference_tenslora, "tlora": reference_tlora}
ROLES = {"lorta": ("q", "k", "v", "o"), "tenslora": ("q", "k", "v"), "tlora": ("q", "v")}


def build(model_type: str, kwargs: dict) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs))
    return model.double().eval()


def inputs_for(kind: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 30, (2, 6), generator=g)
    if kind == "pixels":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)}
    if kind == "audio":
        features = torch.randn(2, model.config.num_mel_bins, 16, generator=g, dtype=torch.float64)
        return {"input_features": features, "decoder_input_ids": ids}
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def first_output(model, inputs, kind: str) -> torch.Tensor:
    if kind == "language model":
        from peft import PeftModel

        model = model.get_base_model() if isinstance(model, PeftModel) else model
        model = model.language_model
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def expected_modules(model: torch.nn.Module, model_type: str, roles: tuple[str, ...]) -> set[str]:
    """The modules the table names for `roles`, found by name in the base model (independently of PEFT)."""
    arch = ARCHITECTURES[model_type]
    names = arch.names(roles)
    found = set()
    for key, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and type(module).__name__ != "Conv1D":
            continue
        if arch.scope and f"{arch.scope}." not in key:
            continue
        if any(key == n or key.endswith("." + n) for n in names):
            found.add(key)
    return found


CASE_IDS = sorted(CASES) + sorted(VARIANTS)


def _case(case: str) -> tuple[str, dict, str]:
    if case in VARIANTS:
        model_type, kwargs = VARIANTS[case]
        return model_type, kwargs, CASES[model_type][1]
    return case, *CASES[case]


def test_every_architecture_of_the_table_is_tested():
    assert set(CASES) == set(ARCHITECTURES)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_default_targets_match_the_reference(case, method):
    model_type, kwargs, kind = _case(case)
    peft_model = get_peft_model(build(model_type, kwargs), METHODS[method]())
    modules = adapted_modules(peft_model)
    assert set(modules) == expected_modules(build(model_type, kwargs), model_type, ROLES[method]) != set()
    references = REFERENCES[method](peft_model)
    dense = build(model_type, kwargs)
    for name, module in modules.items():
        got = module.delta_weight("default")
        assert got.dtype == torch.float64 and references[name].abs().max() > 0, name
        assert_close(got, references[name], MAP_TERMS, msg=name)  # the maps' short products, reordered
        dense.get_submodule(name).weight.data += references[name]
    inputs = inputs_for(kind, dense)
    # float64 models, but HF's norms and softmaxes round to float32 inside: W x + (x P) Q vs (W + P Q) x can flip one
    want = first_output(dense, inputs, kind)
    assert_close(first_output(peft_model, inputs, kind), want, FLOAT32_INSIDE_TERMS, dtype=torch.float32)


def test_encoder_decoder_layers_and_attention_blocks_are_their_own_slots():
    """T5: 2 encoder blocks + 1 decoder block; the decoder's self- and cross-attention are different matrices."""
    peft_model = get_peft_model(build("t5", _T5), lorta.LortaConfig(r=2))
    config = peft_model.peft_config["default"]
    assert config.layer_names == ["encoder.block.0", "encoder.block.1", "decoder.block.0"]
    assert config.matrix_names == [f"{b}.{r}" for b in ("SelfAttention", "EncDecAttention") for r in "qkvo"]
    slots = [s for m in adapted_modules(peft_model).values() for s in m.lorta_slots["default"]]
    assert len({(s.layer, s.matrix) for s in slots}) == len(slots) == 3 * 4 + 4


def test_readme_lists_the_tested_architectures():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Supported architectures", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is a pipe in a cell
        if len(cells) >= 2 and cells[0] and not set(cells[0]) <= {"-", " "} and cells[0] != "model types":
            for model_type in re.findall(r"`([^`]+)`", cells[0]):
                rows[model_type] = cells[1].replace("\\|", "|")
    assert set(rows) == set(ARCHITECTURES)
    for model_type, targets in rows.items():
        want = ARCHITECTURES[model_type].targets()
        want = [want] if isinstance(want, str) else want
        assert re.findall(r"`([^`]+)`", targets) == want, model_type
