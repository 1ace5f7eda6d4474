"""Where each adapted matrix sits in the update tensor.

A transformer's attention matrices are indexed by (layer, matrix, head). This module reads those coordinates off
a Hugging Face model: the model's shape (hidden size d, heads H, KV heads, head dim d_h, layers L) from its
config, and for every targeted module its layer index, which matrix it is (q, k, v, o, a fused qkv, or an extra
matrix such as an MLP projection) and on which side its heads lie. The result is plain data that the engine and
every factorisation read; nothing here owns parameters.

Conventions (DESIGN.md §1):
- the d-mode is always the MODEL-dimension side of a matrix, the (d_h, H) modes the HEAD side;
- q, k, v: heads on the output side; o: heads on the input side; output feature o = h * d_h + e (HF order);
- GQA: k and v have H_kv < H heads. KV head j serves query heads j*g .. j*g+g-1 (g = H / H_kv), so it reads
  the tensor's head slice j*g (the first query head of its group). No averaging.
- extra matrices (MLP projections, anything else targeted) have no head structure: their non-model side of
  size n gets a factor of its own (n x r), while the model side, layers and matrices modes are shared.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

# Matrix roles.
OUT_HEADS = "out_heads"  # q, k, v: model dim in, heads out
IN_HEADS = "in_heads"  # o: heads in, model dim out
EXTRA_IN = "extra_in"  # model dim in, own side out (e.g. gate_proj, up_proj, fc1)
EXTRA_OUT = "extra_out"  # own side in, model dim out (e.g. down_proj, fc2)

_Q_NAMES = {"q_proj", "query", "q_lin", "wq", "q"}
_K_NAMES = {"k_proj", "key", "k_lin", "wk", "k"}
_V_NAMES = {"v_proj", "value", "v_lin", "wv", "v"}
_O_NAMES = {"o_proj", "out_proj", "out_lin", "wo", "o"}
_O_QUALIFIED = {"attention.output.dense", "attn.c_proj", "attention.dense", "self_attention.dense"}
_FUSED_CONCAT = {"c_attn", "qkv_proj", "wqkv", "w_pack"}
_FUSED_INTERLEAVED = {"query_key_value"}

# Default targets per model type: the four attention matrices, the paper's M = 4 setting.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{
        t: ["q_proj", "k_proj", "v_proj", "o_proj"]
        for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3", "gemma3_text", "olmo", "olmo2", "starcoder2", "smollm3", "granite", "cohere", "phi",
            "stablelm", "internlm2", "deepseek_v2",
        )
    },
    **{t: ["q_proj", "k_proj", "v_proj", "out_proj"] for t in ("opt", "bart", "whisper", "m2m_100", "mbart")},
    **{
        t: ["query", "key", "value", "attention.output.dense"]
        for t in ("bert", "roberta", "xlm-roberta", "esm", "electra", "camembert", "ernie", "mpnet", "data2vec-text")
    },
    "gpt2": ["c_attn", "attn.c_proj"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "phi3": ["qkv_proj", "o_proj"],
}


class LayoutError(ValueError):
    """A targeted module does not fit the update tensor; the message says which and why."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of the update tensor's modes, read from the base model's config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = ""

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_model(cls, model: nn.Module, overrides: dict[str, Any] | None = None) -> ModelShape:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        values: dict[str, Any] = {}
        if config is not None:
            values["num_layers"] = _first_attr(config, "num_hidden_layers", "n_layer", "num_layers")
            values["hidden_size"] = _first_attr(config, "hidden_size", "n_embd", "d_model", "dim")
            values["num_heads"] = _first_attr(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
            values["num_kv_heads"] = _first_attr(config, "num_key_value_heads", "num_kv_heads")
            values["head_dim"] = _first_attr(config, "head_dim")
            values["model_type"] = getattr(config, "model_type", "") or ""
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        missing = [k for k in ("num_layers", "hidden_size", "num_heads") if not values.get(k)]
        if missing:
            raise LayoutError(
                f"cannot read {missing} from the base model's config ({type(config).__name__}); pass them as "
                f"model_shape={{'num_layers': ..., 'hidden_size': ..., 'num_heads': ...}} in the adapter config"
            )
        values["num_kv_heads"] = values.get("num_kv_heads") or values["num_heads"]
        values["head_dim"] = values.get("head_dim") or values["hidden_size"] // values["num_heads"]
        if values["num_heads"] % values["num_kv_heads"]:
            raise LayoutError(
                f"num_heads={values['num_heads']} is not a multiple of num_kv_heads={values['num_kv_heads']}"
            )
        fields = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**fields)


def _first_attr(obj: Any, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class Slot:
    """One adapted matrix: its place in the tensor and how its sides map onto the tensor's modes.

    The matrix's j-th head reads the tensor's head j * head_stride (GQA: head_stride = H / H_kv for k and v).
    `out_offset` places the matrix's output inside a fused module's output.
    """

    layer: int
    matrix: int
    name: str
    role: str
    in_features: int
    out_features: int
    n_heads: int = 0
    head_stride: int = 1
    out_offset: int = 0

    @property
    def head_slice(self) -> slice:
        """The tensor heads this matrix reads, as a slice (no index tensor, no host-device copy)."""
        return slice(0, self.n_heads * self.head_stride, self.head_stride)


@dataclass
class TensorLayout:
    """The whole update tensor: model shape, the matrices mode (names in order) and each extra's own size."""

    shape: ModelShape
    matrix_names: list[str]
    matrix_roles: list[str]
    extra_sizes: dict[str, int] = field(default_factory=dict)
    slots: dict[str, list[Slot]] = field(default_factory=dict)  # module name -> its slots

    @property
    def num_matrices(self) -> int:
        return len(self.matrix_names)


def matrix_kind(module_name: str) -> tuple[str, str]:
    """Return (kind, role) for a module name; kind 'qkv' means a fused concatenated q|k|v projection."""
    parts = module_name.lower().split(".")
    leaf = parts[-1]
    qualified2 = ".".join(parts[-2:])
    qualified3 = ".".join(parts[-3:])
    if leaf in _FUSED_INTERLEAVED:
        raise LayoutError(
            f"module {module_name!r} is a per-head interleaved fused qkv projection (GPT-NeoX/Falcon layout); "
            "lorta supports concatenated q|k|v projections (GPT-2 c_attn, Phi-3 qkv_proj) and separate q, k, v"
        )
    if leaf in _FUSED_CONCAT:
        return "qkv", OUT_HEADS
    if leaf in _Q_NAMES:
        return "q", OUT_HEADS
    if leaf in _K_NAMES:
        return "k", OUT_HEADS
    if leaf in _V_NAMES:
        return "v", OUT_HEADS
    if leaf in _O_NAMES or qualified2 in _O_QUALIFIED or qualified3 in _O_QUALIFIED:
        return "o", IN_HEADS
    return _strip_layer_prefix(module_name), ""


def _strip_layer_prefix(module_name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'mlp.up_proj': the name of the matrix kind, the same in every layer."""
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :]) or module_name
    return module_name


def layer_index(module_name: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_name)
    return int(match.group(1)) if match else None


_CANONICAL_ORDER = {"q": 0, "k": 1, "v": 2, "o": 3}


def module_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        rows, cols = module.weight.shape
        return rows, cols
    raise LayoutError(
        f"cannot adapt a {type(module).__name__}: lorta adapts torch.nn.Linear and transformers Conv1D modules"
    )


def build_layout(
    shape: ModelShape, targets: dict[str, nn.Module], recorded_names: list[str] | None = None
) -> TensorLayout:
    """Place every targeted module in the tensor, checking each one's shape against the model's.

    `targets` maps module names to their (base) modules. `recorded_names` is the matrices mode saved with an
    adapter; when given, the targets must produce exactly those matrices, in that order.
    """
    if not targets:
        raise LayoutError("no module matched target_modules")
    d, dh, H, Hkv = shape.hidden_size, shape.head_dim, shape.num_heads, shape.num_kv_heads
    attn_q_out, attn_kv_out = H * dh, Hkv * dh
    kinds: dict[str, str] = {}
    infos: list[tuple[str, str, str, int, int, int]] = []
    extra_sizes: dict[str, int] = {}
    for name, module in targets.items():
        kind, role = matrix_kind(name)
        fin, fout = module_features(module)
        layer = layer_index(name)
        where = f"module {name!r} ({type(module).__name__} {fin} -> {fout})"
        if layer is None or not 0 <= layer < shape.num_layers:
            raise LayoutError(
                f"{where}: cannot tell its layer index (expected a number in 0..{shape.num_layers - 1} in its "
                "name, as in 'model.layers.3.self_attn.q_proj')"
            )
        if kind == "qkv":
            expected = attn_q_out + 2 * attn_kv_out
            if fin != d or fout != expected:
                raise LayoutError(
                    f"{where}: a fused q|k|v projection must map hidden_size={d} to (H + 2*H_kv) * head_dim"
                    f" = {expected}"
                )
            for sub in ("q", "k", "v"):
                kinds[sub] = OUT_HEADS
        elif kind in ("q", "k", "v"):
            expected = attn_q_out if kind == "q" else attn_kv_out
            if fin != d or fout != expected:
                heads = H if kind == "q" else Hkv
                raise LayoutError(
                    f"{where}: expected {d} -> {expected} (hidden_size -> {heads} heads x head_dim {dh}); the "
                    "output must be a whole number of heads of head_dim"
                )
            kinds[kind] = role
        elif kind == "o":
            if fin != attn_q_out or fout != d:
                raise LayoutError(
                    f"{where}: an attention output projection must map {H} heads x head_dim {dh} = "
                    f"{attn_q_out} -> hidden_size {d}"
                )
            kinds[kind] = role
        else:
            if fin == d:
                role, other = EXTRA_IN, fout
            elif fout == d:
                role, other = EXTRA_OUT, fin
            else:
                raise LayoutError(
                    f"{where}: neither side equals hidden_size={d}; an extra matrix needs one model-dimension "
                    "side to share the tensor's model-dim factor"
                )
            if extra_sizes.setdefault(kind, other) != other:
                raise LayoutError(f"{where}: matrix kind {kind!r} has different sizes in different layers")
            if kinds.setdefault(kind, role) != role:
                raise LayoutError(f"{where}: matrix kind {kind!r} changes sides between layers")
        infos.append((name, kind, role, layer, fin, fout))

    names = sorted(kinds, key=lambda k: (_CANONICAL_ORDER.get(k, 4), k))
    if recorded_names is not None and list(recorded_names) != names:
        raise LayoutError(
            f"the adapter was trained on matrices {list(recorded_names)} but target_modules match {names} "
            "on this model"
        )
    index = {n: i for i, n in enumerate(names)}
    group = shape.group_size
    q_heads, kv_heads = (H, 1), (Hkv, group)
    layout = TensorLayout(shape, names, [kinds[n] for n in names], extra_sizes)
    for name, kind, role, layer, fin, fout in infos:
        if kind == "qkv":
            layout.slots[name] = [
                Slot(layer, index["q"], "q", OUT_HEADS, fin, attn_q_out, *q_heads, 0),
                Slot(layer, index["k"], "k", OUT_HEADS, fin, attn_kv_out, *kv_heads, attn_q_out),
                Slot(layer, index["v"], "v", OUT_HEADS, fin, attn_kv_out, *kv_heads, attn_q_out + attn_kv_out),
            ]
        elif kind in ("q", "k", "v", "o"):
            heads = q_heads if kind in ("q", "o") else kv_heads
            layout.slots[name] = [Slot(layer, index[kind], kind, role, fin, fout, *heads)]
        else:
            layout.slots[name] = [Slot(layer, index[kind], kind, role, fin, fout)]
    return layout
