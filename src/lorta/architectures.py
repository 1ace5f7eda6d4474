"""The attention module names of every model type lorta places, and how a fused q/k/v projection lays out its
output (docs/design.md, "The layout"). Plain data: `lorta.layout` reads a model through it, the tuners take
their default targets from it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

# Fused q/k/v output layouts.
CONCAT = "concat"  # [q heads | k heads | v heads]
GROUPED = "grouped"  # per KV head j: [q heads j*g .. j*g+g-1 | k_j | v_j]
CODEGEN = "codegen"  # 4 partitions, each [q | v | k] of a quarter of the heads


# Roles of the attention matrices.
OUT_HEADS = "out_heads"  # q, k, v: model dim in, heads out
IN_HEADS = "in_heads"  # o: heads in, model dim out
# Module names by matrix kind (matrix_kind reads a module's kind from its name).
_Q_NAMES = {"q_proj", "query", "q_lin", "wq", "q", "query_proj", "q_head"}
_K_NAMES = {"k_proj", "key", "k_lin", "wk", "k", "key_proj", "k_head"}
_V_NAMES = {"v_proj", "value", "v_lin", "wv", "v", "value_proj", "v_head"}
_O_NAMES = {"o_proj", "out_proj", "out_lin", "wo", "o"}
_O_QUALIFIED = {
    "attention.output.dense",
    "attn.c_proj",
    "attention.dense",
    "self_attention.dense",
    "self_attn.dense",
    "attention.post_proj",
}
_FUSED_NAMES = {"c_attn", "qkv_proj", "wqkv", "w_pack", "query_key_value"}


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


def fused_order(layout: str, n_heads: int, n_kv: int, head_dim: int) -> list[int] | None:
    """For each output feature of a fused q/k/v projection, its index in the concatenation [q | k | v]."""
    if layout == CONCAT:
        return None
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim
    order: list[int] = []
    if layout == GROUPED:
        group = n_heads // n_kv
        for j in range(n_kv):
            for t in range(group):
                start = (j * group + t) * head_dim
                order += range(start, start + head_dim)
            order += range(q_size + j * head_dim, q_size + (j + 1) * head_dim)
            order += range(q_size + kv_size + j * head_dim, q_size + kv_size + (j + 1) * head_dim)
    elif layout == CODEGEN:
        parts = 4
        if n_kv != n_heads or n_heads % parts:
            raise ValueError(f"CodeGen's qkv_proj needs H divisible by {parts} and no GQA, got H={n_heads}")
        local = q_size // parts
        for p in range(parts):
            order += range(p * local, (p + 1) * local)  # q
            order += range(q_size + kv_size + p * local, q_size + kv_size + (p + 1) * local)  # v
            order += range(q_size + p * local, q_size + (p + 1) * local)  # k
    else:
        raise ValueError(f"unknown fused q/k/v layout {layout!r}")
    return order if order != list(range(len(order))) else None


def matrix_kind(module_name: str, model_type: str = "") -> tuple[str, str]:
    """(kind, role) of a module by its name: 'q', 'k', 'v', 'o', 'qkv' (a fused q/k/v projection) or, for any
    other matrix, its name without the layer prefix (role ''). `model_type` adds its own fused name (DeBERTa's
    in_proj)."""
    parts = module_name.split(".")
    leaf = parts[-1].lower()
    lowered = [p.lower() for p in parts]
    own = ARCHITECTURES.get(model_type)
    if leaf in _FUSED_NAMES or (own is not None and own.qkv and leaf == own.qkv.lower()):
        return "qkv", OUT_HEADS
    if leaf in _Q_NAMES:
        return "q", OUT_HEADS
    if leaf in _K_NAMES:
        return "k", OUT_HEADS
    if leaf in _V_NAMES:
        return "v", OUT_HEADS
    if leaf in _O_NAMES or ".".join(lowered[-2:]) in _O_QUALIFIED or ".".join(lowered[-3:]) in _O_QUALIFIED:
        return "o", IN_HEADS
    return _strip_layer_prefix(module_name), ""


def _strip_layer_prefix(module_name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'mlp.up_proj': the name of the matrix kind, the same in every layer."""
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :]) or module_name
    return module_name


def targets_of_kinds(kinds: tuple[str, ...]) -> dict[str, list[str]]:
    """Default target modules per model type for the matrix kinds `kinds` (e.g. q, v): a method whose default
    targets are narrower than DEFAULT_TARGETS's q, k, v, o sets its tuner's `target_module_mapping` to this."""
    return {model_type: arch.targets(tuple(kinds)) for model_type, arch in ARCHITECTURES.items()}


def structural_targets(model: Any, kinds: tuple[str, ...], model_type: str = "") -> list[str] | str:
    """Default targets read off a model's own structure, for a model type the table does not list: the linear
    layers whose names say they are attention projections of `kinds` (`matrix_kind`: q_proj, query, c_attn,
    attention.output.dense, ...), as PEFT target_modules suffixes.

    Only attention counts: an output projection is kept when it sits in the same attention block as a q/k/v
    projection (so a Mamba mixer's out_proj is not taken for one), and the projections of nn.MultiheadAttention
    are skipped (it reads their weights directly: a wrapper would never run). A model with a language model
    (a vision or audio tower beside it) gets the language model's attention only, as a regular expression.
    Raises ValueError, naming the model's linear layers and the target_modules that would adapt them, when the
    model has no attention projection at all (Mamba)."""
    scope = _language_model_scope(model)
    linears = _plain_linears(model, scope)
    found: dict[str, tuple[str, str]] = {}  # module name -> (kind, target suffix)
    for name in linears:
        kind, _role = matrix_kind(name, model_type)
        if kind not in ("q", "k", "v", "o", "qkv"):
            continue
        found[name] = (kind, kind_suffix(name, lambda x: matrix_kind(x, model_type)[0]))
    inputs = [n for n, (kind, _) in found.items() if kind != "o"]
    wanted = set(kinds) | ({"qkv"} if set(kinds) & {"q", "k", "v"} else set())
    targets: list[str] = []
    for name, (kind, suffix) in found.items():
        if kind not in wanted or (kind == "o" and not any(_same_block(name, i) for i in inputs)):
            continue
        if suffix not in targets:
            targets.append(suffix)
    if not inputs:
        raise ValueError(_no_attention_message(model, linears))
    if scope is None:
        return targets
    return rf".*{re.escape(scope)}\..*\.({'|'.join(re.escape(t) for t in targets)})"


def kind_suffix(name: str, kind_of: Callable[[str], str]) -> str:
    """The shortest suffix of a module name that names the same kind: q_proj, query, attn.c_proj (not an MLP's
    c_proj), attention.output.dense (not an MLP's dense): a PEFT target_modules entry."""
    parts = name.split(".")
    return next(x for k in range(1, len(parts) + 1) for x in [".".join(parts[-k:])] if kind_of(x) == kind_of(name))


def multihead_projections(model: nn.Module) -> list[str]:
    """The linear children of every nn.MultiheadAttention (its out_proj): the module reads their weights directly
    (F.multi_head_attention_forward), so a PEFT wrapper there would never run. Defaults exclude them."""
    return [f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) for c in m._modules]


def multihead_message(names: list[str]) -> str:
    return (
        f"target_modules match {names}, the projections of an nn.MultiheadAttention: it reads their weights "
        "directly (F.multi_head_attention_forward), so an adapter there would never run. Leave them out: "
        f"exclude_modules={names!r}"
    )


def _language_model_scope(model: nn.Module) -> str | None:
    """The path of the language model of a multimodal model (a module named language_model), else None."""
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] == "language_model"]
    return min(names, key=len) if names else None


def _plain_linears(model: nn.Module, scope: str | None) -> dict[str, nn.Module]:
    """The linear layers a PEFT wrapper can adapt, in model order (within `scope` when given)."""
    inside_mha = set(multihead_projections(model))
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
        and name not in inside_mha
        and (scope is None or name.startswith(f"{scope}."))
    }


def _same_block(output: str, query: str) -> bool:
    """Whether an output projection and a q/k/v projection share an attention block: their common path goes
    below the numbered layer (h.0.attn, layer.0.attention), not just to the layer stack."""
    a, b = output.split("."), query.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    numbered = [i for i, part in enumerate(a[:common]) if part.isdigit()]
    return bool(numbered) and common > numbered[-1] + 1


def _no_attention_message(model: nn.Module, linears: dict[str, nn.Module]) -> str:
    sizes: dict[str, tuple[int, int]] = {}
    for name, module in linears.items():
        parts = name.split(".")
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        if numbered:  # a per-layer matrix: its name below the layer index
            weight = module.weight
            fin, fout = (weight.shape[1], weight.shape[0]) if isinstance(module, nn.Linear) else tuple(weight.shape)
            sizes.setdefault(".".join(parts[numbered[0] + 1 :]), (int(fin), int(fout)))
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = next((getattr(config, k) for k in ("hidden_size", "d_model", "n_embd") if hasattr(config, k)), None)
    if not isinstance(width, int):  # no config: the side most layers share
        counts = Counter(size for pair in sizes.values() for size in pair)
        width = counts.most_common(1)[0][0] if counts else None
    model_side = [k for k, (fin, fout) in sizes.items() if width in (fin, fout)]
    found = ", ".join(f"{k} ({fin} -> {fout})" for k, (fin, fout) in sizes.items()) or "none"
    fix = (
        f"Pass target_modules={model_side!r} to adapt those on the model dim ({width}) as head-less matrices of "
        'one tensor (modes: model dim, own side, layers, matrices; docs/design.md, "The layout")'
        if model_side
        else "Pass target_modules naming the linear layers to adapt"
    )
    return (
        f"{type(model).__name__} has no attention projections (no q/k/v module found by name), so lorta has no "
        f"default targets for it: its update tensor stacks attention heads. Per-layer linear layers found: "
        f"{found}. {fix}."
    )
