"""The attention module names of every model type lorta places, and how a fused q/k/v projection lays out its
output (docs/design.md, "The layout"). Plain data: `lorta.layout` reads a model through it, the tuners take
their default targets from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

# Fused q/k/v output layouts.
CONCAT = "concat"  # [q heads | k heads | v heads]
GROUPED = "grouped"  # per KV head j: [q heads j*g .. j*g+g-1 | k_j | v_j]
CODEGEN = "codegen"  # 4 partitions, each [q | v | k] of a quarter of the heads


@dataclass(frozen=True)
class Attention:
    """The attention module names of a model type, as PEFT target_modules (suffixes of module names).

    `scope` restricts them to one sub-model of a multimodal model (its language model): the targets are then a
    regular expression, as PEFT's own default for Gemma 4.
    """

    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qkv: str | None = None  # one module computing q, k and v
    scope: str | None = None

    def names(self, roles: tuple[str, ...] = ("q", "k", "v", "o")) -> list[str]:
        """The module names adapting `roles`; a fused q/k/v module is adapted whole when any of q, k, v is asked."""
        out = []
        for role in roles:
            name = self.qkv if (self.qkv and role in "qkv") else getattr(self, role)
            if name and name not in out:
                out.append(name)
        return out

    def targets(self, roles: tuple[str, ...] = ("q", "k", "v", "o")) -> list[str] | str:
        """PEFT target_modules for `roles`: the names, or within `scope` a regular expression."""
        names = self.names(roles)
        if self.scope is None:
            return names
        return rf".*{re.escape(self.scope)}\..*\.({'|'.join(re.escape(n) for n in names)})"


_LLAMA = Attention("q_proj", "k_proj", "v_proj", "o_proj")
_BART = Attention("q_proj", "k_proj", "v_proj", "out_proj")
_BERT = Attention("query", "key", "value", "attention.output.dense")
_NEOX = Attention(qkv="query_key_value", o="attention.dense")

# Every model type whose attention lorta places, with its module names (tested over a tiny config of each:
# tests/test_architectures.py). The defaults adapt q, k, v, o, the paper's M = 4 setting.
ARCHITECTURES: dict[str, Attention] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "olmo",
            "olmo2",
            "starcoder2",
            "smollm3",
            "granite",
            "cohere",
            "stablelm",
            "llama4_text",
            "nemotron_h",
            "vit",
        ),
        _LLAMA,
    ),
    **dict.fromkeys(("gemma3", "llama4"), replace(_LLAMA, scope="language_model")),
    **dict.fromkeys(("opt", "bart", "mbart", "whisper", "m2m_100", "gptj", "gpt_neo"), _BART),
    **dict.fromkeys(
        (
            "bert",
            "roberta",
            "xlm-roberta",
            "esm",
            "electra",
            "camembert",
            "ernie",
            "mpnet",
            "data2vec-text",
            "layoutlm",
        ),
        _BERT,
    ),
    **dict.fromkeys(("t5", "mt5", "umt5"), Attention("q", "k", "v", "o")),
    "phi": Attention("q_proj", "k_proj", "v_proj", "self_attn.dense"),
    "mpnet": Attention("q", "k", "v", "o"),
    "gpt2": Attention(qkv="c_attn", o="attn.c_proj"),
    "gpt_bigcode": Attention(qkv="c_attn", o="attn.c_proj"),
    "distilbert": Attention("q_lin", "k_lin", "v_lin", "out_lin"),
    "deberta-v2": Attention("query_proj", "key_proj", "value_proj", "attention.output.dense"),
    "deberta": Attention(qkv="in_proj", o="attention.output.dense"),
    "phi3": Attention(qkv="qkv_proj", o="o_proj"),
    "codegen": Attention(qkv="qkv_proj", o="out_proj"),
    "mpt": Attention(qkv="Wqkv", o="out_proj"),
    "gpt_neox": _NEOX,
    "bloom": Attention(qkv="query_key_value", o="self_attention.dense"),
    "falcon": Attention(qkv="query_key_value", o="self_attention.dense"),
}
DEFAULT_TARGETS: dict[str, list[str] | str] = {t: a.targets() for t, a in ARCHITECTURES.items()}
# How a model type's fused q/k/v projection lays out its output (default: concatenated).
_FUSED_LAYOUTS = {"gpt_neox": GROUPED, "bloom": GROUPED, "falcon": GROUPED, "deberta": GROUPED, "codegen": CODEGEN}


def targets_of_kinds(kinds: tuple[str, ...]) -> dict[str, list[str]]:
    """Default target modules per model type for the matrix kinds `kinds` (e.g. q, v): a method whose default
    targets are narrower than DEFAULT_TARGETS's q, k, v, o sets its tuner's `target_module_mapping` to this."""
    return {model_type: arch.targets(tuple(kinds)) for model_type, arch in ARCHITECTURES.items()}


def structural_targets(
    model: Any, kinds: tuple[str, ...], matrix_kind: Callable[[str, str], tuple[str, str]], model_type: str = ""
) -> list[str]:
    """Default targets read off a model's own structure, for a model type the table does not list: the linear
    layers whose names say they are attention projections of `kinds` (`lorta.layout.matrix_kind`: q_proj, query,
    c_attn, attention.output.dense, ...), as PEFT target_modules suffixes. Empty when none is found. `matrix_kind`
    is lorta.layout's (passed in: the layout reads this table, so the table does not import the layout)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        kind, _role = matrix_kind(name, model_type)
        if kind not in kinds and not (kind == "qkv" and set(kinds) & {"q", "k", "v"}):
            continue
        parts = name.split(".")
        # the shortest suffix that names the same kind: q_proj, query, attn.c_proj (not an MLP's c_proj)
        suffix = next(
            (x for k in (1, 2, 3) for x in [".".join(parts[-k:])] if matrix_kind(x, model_type)[0] == kind), name
        )
        if suffix not in found:
            found.append(suffix)
    return found
