"""Tiny random transformers models saved as local folders, standing in for PEFT's hub test models (offline).

PEFT's testers load `transformers_class.from_pretrained(model_id)` and branch on substrings of the id ("gpt2",
"bart", "t5", "OPT", ...), so each folder is named after the hub model it replaces. The folders are built once per
transformers version under `<lorta cache>/peft-models/` (written to a temporary name, then renamed, so parallel
workers never see half a model).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from peft_upstream import cache_root


def _opt():
    return transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=97,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            pad_token_id=1,
        )
    )


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97,
            n_embd=16,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def _gptj():
    return transformers.GPTJForCausalLM(
        transformers.GPTJConfig(
            vocab_size=97,
            n_embd=16,
            n_layer=2,
            n_head=4,
            n_positions=64,
            rotary_dim=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def _llama():
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def _mistral():
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=97,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=None,
        )
    )


def _qwen2():
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=97,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )


def _gemma3():
    return transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            vocab_size=97,
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=16,
        )
    )


def _t5():
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=97,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _bart():
    return transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            vocab_size=97,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
        )
    )


def _bert():
    return transformers.BertModel(
        transformers.BertConfig(
            vocab_size=97,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )


def _roberta():
    return transformers.RobertaModel(
        transformers.RobertaConfig(
            vocab_size=97,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=32,
            max_position_embeddings=70,
            pad_token_id=1,
        )
    )


def _deberta():
    return transformers.DebertaModel(
        transformers.DebertaConfig(
            vocab_size=97,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=32,
            max_position_embeddings=64,
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
        )
    )


def _deberta_v2():
    return transformers.DebertaV2Model(
        transformers.DebertaV2Config(
            vocab_size=97,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=32,
            max_position_embeddings=64,
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
        )
    )


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny-random-OPTForCausalLM": _opt,
    "tiny-random-GPT2LMHeadModel": _gpt2,
    "tiny-random-GPTJForCausalLM": _gptj,
    "tiny-random-LlamaForCausalLM": _llama,
    "tiny-dummy-qwen2": _qwen2,
    "tiny-random-Gemma3ForCausalLM": _gemma3,
    "tiny-random-MistralForCausalLM": _mistral,
    "tiny-random-T5ForConditionalGeneration": _t5,
    "tiny-random-BartForConditionalGeneration": _bart,
    "tiny-random-BertModel": _bert,
    "tiny-random-RobertaModel": _roberta,
    "tiny-random-DebertaModel": _deberta,
    "tiny-random-DebertaV2Model": _deberta_v2,
}
DECODERS = [
    "tiny-random-OPTForCausalLM",
    "tiny-random-GPT2LMHeadModel",
    "tiny-random-GPTJForCausalLM",
    "tiny-random-LlamaForCausalLM",
    "tiny-dummy-qwen2",
    "tiny-random-Gemma3ForCausalLM",
]
SMALL_GRID = [
    "tiny-random-GPT2LMHeadModel",
    "tiny-random-OPTForCausalLM",
    "tiny-random-MistralForCausalLM",
    "tiny-dummy-qwen2",
    "tiny-random-LlamaForCausalLM",
]
ENCODER_DECODERS = ["tiny-random-T5ForConditionalGeneration", "tiny-random-BartForConditionalGeneration"]
ENCODERS = [
    "tiny-random-BertModel",
    "tiny-random-RobertaModel",
    "tiny-random-DebertaModel",
    "tiny-random-DebertaV2Model",
]


def model_dir(name: str) -> str:
    """The folder of tiny model `name`, built (seeded) on first use."""
    root = cache_root() / "peft-models" / f"transformers-{transformers.__version__}"
    path = root / name
    if not (path / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.{uuid.uuid4().hex[:8]}"
        torch.manual_seed(0)
        BUILDERS[name]().save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another worker finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def model_dirs(names: list[str]) -> list[str]:
    return [model_dir(n) for n in names]


def short_id(path: str) -> str:
    return Path(path).name
