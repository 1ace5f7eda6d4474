"""What each serving engine accepts in a PEFT LoRA folder (docs/design.md, "Deploy: the engines' rules"), read from
its loader code: plain data that `lorta.export` checks an adapter against before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineRules:
    """What a serving engine accepts in a PEFT LoRA folder (read from its loader code)."""

    name: str
    version: str  # the release whose loader these rules were read from
    ranks: tuple[int, ...] | None = None  # the ranks it can serve (None: any)
    uniform_rank: bool = False  # it ignores rank_pattern / alpha_pattern
    module_names: frozenset[str] | None = None  # the module (suffix) names it can adapt (None: any)
    modules_to_save: frozenset[str] | None = None  # the fully trained modules it loads (None: any)
    bias: bool = True  # it loads trained biases
    refused_architectures: frozenset[str] = frozenset()  # model classes it serves without LoRA support
    sibling_groups: tuple[tuple[str, ...], ...] = ()  # projections it reads together: all present, zeros if unused
    needs_layer_index: bool = False  # every adapted module path holds "layers.<n>."
    model_types: frozenset[str] | None = None  # the base model types it can take an adapter for (None: any)


# Base model type -> (llama.cpp's architecture name, whether its HF -> GGUF conversion reorders the rows of q and
# k from rotate-half to interleaved RoPE pairs, which the LoRA's lora_B must follow).
# Checked tensor for tensor against llama.cpp's own convert_lora_to_gguf.py (tests/test_export_llama_cpp.py).
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "mixtral": ("llama", True),
    "granite": ("granite", True),
    "olmo": ("olmo", True),
    "smollm3": ("smollm3", True),
    "qwen2": ("qwen2", False),
    "qwen2_moe": ("qwen2moe", False),
    "qwen3": ("qwen3", False),
    "qwen3_moe": ("qwen3moe", False),
    "gemma": ("gemma", False),
    "gemma2": ("gemma2", False),
    "gemma3_text": ("gemma3", False),
    "phi3": ("phi3", False),
    "phi": ("phi2", False),
    "starcoder2": ("starcoder2", False),
    "olmo2": ("olmo2", False),
    "cohere": ("command-r", False),
    "stablelm": ("stablelm", False),
}

ENGINES: dict[str, EngineRules] = {
    "peft": EngineRules("PEFT", "0.21"),
    "vllm": EngineRules(
        "vLLM",
        "0.33",
        ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512),
        uniform_rank=True,
        modules_to_save=frozenset({"classifier", "score"}),
        bias=False,
        refused_architectures=frozenset(
            {
                "GPT2LMHeadModel",
                "GPT2Model",
                "BloomForCausalLM",
                "FalconForCausalLM",
                "GPTJForCausalLM",
                "StableLmForCausalLM",
            }
        ),
    ),
    "sglang": EngineRules(
        "SGLang",
        "0.5.23",
        uniform_rank=True,
        module_names=frozenset(
            {
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "qkv_proj",
                "gate_up_proj",
            }
        ),
        modules_to_save=frozenset(),
        bias=False,
        sibling_groups=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
        needs_layer_index=True,
    ),
    "llama.cpp": EngineRules(
        "llama.cpp",
        "of llama-cpp-python 0.3.36",
        uniform_rank=True,
        modules_to_save=frozenset(),
        bias=False,
        model_types=frozenset(GGUF_ARCHITECTURES),
    ),
}
