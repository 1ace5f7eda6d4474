"""Published configurations of well-known models, written out here so that `lorta params` needs no download.

Each entry is the model's `model_type` plus the transformers config values that shape its layers (values from
the model's published config.json). Only sizes are recorded; weights are never needed to count adapter
parameters, since `lorta.params` builds the model on the meta device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ..params import quiet_transformers
from .models import (
    PACKAGED_MODELS,
    ModelNotFoundError,
    _gguf_cache_path,
    _is_complete,
    _packaged_path,
    check_model_path,
)

__all__ = ["CATALOGUE", "UnknownModelError", "config_for", "model_config"]


class UnknownModelError(KeyError):
    """A name that is not in the catalogue; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


_LLAMA_2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
_ROBERTA = dict(
    model_type="roberta",
    vocab_size=50265,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)

CATALOGUE: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": _LLAMA_2_7B,
    # meta-llama/Meta-Llama-3-8B: grouped-query attention, 8 KV heads
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=4096,
        rms_norm_eps=1e-5,
    ),
    # FacebookAI/roberta-base, FacebookAI/roberta-large
    "roberta-base": dict(
        _ROBERTA, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "roberta-large": dict(
        _ROBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    # openai-community/gpt2 (124M): fused q|k|v projection c_attn
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    # HuggingFaceTB/SmolLM2-135M: head_dim 64, 3 KV heads
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # facebook/esm2_t12_35M_UR50D: protein language model, rotary positions
    "esm2-35m": dict(
        model_type="esm",
        hidden_size=480,
        num_hidden_layers=12,
        num_attention_heads=20,
        intermediate_size=1920,
        vocab_size=33,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        pad_token_id=1,
        mask_token_id=32,
        token_dropout=True,
        emb_layer_norm_before=False,
    ),
}


def config_for(name: str) -> PretrainedConfig:
    """The transformers config of a catalogue model (case-insensitive name); UnknownModelError lists the names."""
    entry = CATALOGUE.get(name.lower())
    if entry is None:
        raise UnknownModelError(f"unknown model {name!r}; the catalogue knows {', '.join(CATALOGUE)}")
    kwargs = dict(entry)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def model_config(model: str | os.PathLike[str]) -> PretrainedConfig:
    """The transformers config of a catalogue name, a packaged model name, a Hugging Face folder or a GGUF file.

    Reads configs only: a GGUF file's metadata is read by transformers (a few seconds, for the tokenizer
    vocabulary it also parses), never its weights; if `lorta train` already converted the file, the converted
    folder's config.json is read instead.
    """
    key = str(model)
    if key.lower() in CATALOGUE:
        return config_for(key)
    entry = PACKAGED_MODELS.get(key.lower())
    if entry is not None:
        return _config_from_path(_packaged_path(entry))
    path = Path(key).expanduser()
    if path.exists():
        return _config_from_path(path)
    if any(sep in key for sep in ("/", os.sep)) or key.startswith((".", "~")) or key.lower().endswith(".gguf"):
        raise ModelNotFoundError(f"no such file or folder: {key} (resolved to {path.resolve()})")
    known = ", ".join([*CATALOGUE, *PACKAGED_MODELS])
    raise UnknownModelError(
        f"unknown model {key!r}: not in the catalogue ({known}) and not an existing path; pass one of these names, "
        "a Hugging Face model folder (with config.json) or a .gguf file"
    )


def _config_from_path(path: Path) -> PretrainedConfig:
    check_model_path(path)
    if path.is_file():  # a GGUF: its converted folder's config if lorta train made one, else the file's metadata
        converted = _gguf_cache_path(path)
        if _is_complete(converted):
            return AutoConfig.from_pretrained(converted, local_files_only=True)
        with quiet_transformers():
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return AutoConfig.from_pretrained(path, local_files_only=True)
