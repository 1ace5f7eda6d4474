"""Where each adapted matrix sits in the update tensor (docs/design.md, "The layout", which states the conventions:
the d-mode on the model-dimension side, heads on the output side of q, k, v and the input side of o, GQA's
shared KV heads, the layers mode as the adapted layers only, extra matrices, fused q/k/v orders).

It reads a model's shape (d, H, H_kv, d_h) from its config and, for every targeted module, its layer, which matrix
it is (q, k, v, o, a fused q/k/v, or an extra matrix) and on which side its heads lie: plain data for the engine.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from torch import nn

from .architectures import (
    _FUSED_LAYOUTS,
    CONCAT,
    GROUPED,
    IN_HEADS,
    OUT_HEADS,
    _strip_layer_prefix,
    fused_order,
    matrix_kind,
)
from .layout_groups import several_shapes_message, short_list, split_nested_layers

# Matrix roles.
EXTRA_IN = "extra_in"  # model dim in, own side out (e.g. gate_proj, up_proj, fc1)
EXTRA_OUT = "extra_out"  # own side in, model dim out (e.g. down_proj, fc2)
EXTRA_FREE = "extra_free"  # neither side is the model dim: own factors on both sides
EXTRA_ROLES = (EXTRA_IN, EXTRA_OUT, EXTRA_FREE)


class LayoutError(ValueError):
    """A targeted module does not fit the update tensor; the message says which and why."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of the update tensor's modes, read from the base model's config (0: not known).

    A model without attention heads in its config (a custom nn.Module, an MLP) has num_heads = 0: every adapted
    matrix is then an extra matrix without a head mode.
    """

    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    model_type: str = ""
    fused_qkv: str = CONCAT

    SIZES: ClassVar[tuple[str, ...]] = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1

    @property
    def has_heads(self) -> bool:
        return self.num_heads > 0 and self.head_dim > 0 and self.hidden_size > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_model(cls, model: nn.Module, overrides: dict[str, Any] | None = None) -> ModelShape:
        """The shape in `model.config` (when it has one), then `overrides` (a saved adapter's or the user's)."""
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        values: dict[str, Any] = {}
        if config is not None and not isinstance(config, dict):
            values = _shape_of_config(config)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in cls.__dataclass_fields__})
        heads, kv = values.get("num_heads") or 0, values.get("num_kv_heads") or 0
        if heads and not kv:
            values["num_kv_heads"] = kv = heads
        if heads and values.get("hidden_size") and values.get("head_dim") is None:
            values["head_dim"] = values["hidden_size"] // heads
        if heads and heads % kv:
            raise LayoutError(f"num_heads={heads} is not a multiple of num_kv_heads={kv}")
        return cls(**{k: (v if v is not None else 0) for k, v in values.items() if k in cls.__dataclass_fields__})

    @classmethod
    def of_adapted(cls, model: nn.Module, recorded: dict[str, Any] | None) -> ModelShape:
        """The base model's shape; when an adapter records one (or the user gives model_shape), the two must agree
        on every size the model's config knows, and the recorded one fills in the sizes it does not."""
        actual = cls.from_model(model)
        if not recorded:
            return actual
        diffs = {k: (recorded.get(k), getattr(actual, k)) for k in cls.SIZES if recorded.get(k)}
        diffs = {k: v for k, v in diffs.items() if v[1] and v[0] != v[1]}
        if diffs:
            detail = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diffs.items())
            raise LayoutError(
                f"this adapter was made for a base model of another shape ({detail}); load it onto the model "
                "it was trained on"
            )
        return cls.from_model(model, recorded)


def _shape_of_config(config: Any) -> dict[str, Any]:
    model_type = getattr(config, "model_type", "") or ""
    head_dim = _per_layer_head_dim(config)
    heads = _first_attr(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    kv = _first_attr(config, "num_key_value_heads", "num_kv_heads")
    if model_type == "falcon" and heads:
        kv = kv if getattr(config, "new_decoder_architecture", False) else 1 if config.multi_query else heads
    elif model_type == "gpt_bigcode" and heads:
        kv = 1 if getattr(config, "multi_query", True) else heads
    fused = _FUSED_LAYOUTS.get(model_type, CONCAT)
    if model_type == "gpt_bigcode" and not getattr(config, "multi_query", True):
        fused = GROUPED
    return {
        "num_layers": _first_attr(config, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": _first_attr(config, "hidden_size", "n_embd", "d_model", "dim"),
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": head_dim
        if head_dim is not None
        else _first_attr(config, "head_dim", "d_kv", "attention_head_size"),
        "model_type": model_type,
        "fused_qkv": fused,
    }


def _per_layer_head_dim(config: Any) -> int | None:
    """A per-layer config's (Gemma 4's) head dim: the layers' common one, 0 when they differ (then each group of
    layers is adapted alone: see _check_one_shape), None for a config with one global head_dim."""
    try:
        getattr(config, "head_dim", None)
        return None
    except Exception:  # transformers' heterogeneous configs refuse a global per-layer attribute
        layers = config.per_layer_config
        dims = {getattr(layers[i], "head_dim", 0) for i in range(len(layers))}
        return dims.pop() if len(dims) == 1 else 0


def _first_attr(obj: Any, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class Slot:
    """One adapted matrix: its place in the tensor and how its sides map onto the tensor's modes.

    The matrix's j-th head reads the tensor's head j * head_stride (GQA: head_stride = H / H_kv for k and v).
    `out_offset` places the matrix's output inside a fused module's concatenated [q | k | v] output.
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
    """The whole update tensor: model shape, the layers and matrices modes (names in order), each extra matrix's
    own sizes, every module's slots and, for interleaved fused projections, their output order."""

    shape: ModelShape
    matrix_names: list[str]
    matrix_roles: list[str]
    layer_names: list[str] = field(default_factory=lambda: [""])
    model_dim: int = 0  # d: the config's hidden size, or the side most head-less targets share
    extra_sizes: dict[str, int] = field(default_factory=dict)  # EXTRA_IN / EXTRA_OUT kind -> its own side
    free_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # EXTRA_FREE kind -> (in, out)
    slots: dict[str, list[Slot]] = field(default_factory=dict)  # module name -> its slots
    out_orders: dict[str, list[int]] = field(default_factory=dict)  # module -> concat index of each output

    @property
    def num_matrices(self) -> int:
        return len(self.matrix_names)

    def count_sizes(self) -> dict[str, Any]:
        """The sizes the methods' closed-form counts take: d (0: no matrix with a model-dimension side), d_h, H (0:
        no head-structured matrix), L, M and the extra matrices' own sizes, in matrix order."""
        return {
            "d": self.model_dim if self.uses_model_dim else 0,
            "d_h": self.shape.head_dim,
            "H": self.shape.num_heads if self.has_head_slots else 0,
            "L": self.num_layers,
            "M": self.num_matrices,
            "extra_sizes": tuple(self.extra_sizes[n] for n in self.matrix_names if n in self.extra_sizes),
            "free_sizes": tuple(self.free_sizes[n] for n in self.matrix_names if n in self.free_sizes),
        }

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def has_head_slots(self) -> bool:
        return any(r in (OUT_HEADS, IN_HEADS) for r in self.matrix_roles)

    @property
    def uses_model_dim(self) -> bool:
        return any(r != EXTRA_FREE for r in self.matrix_roles)


def layer_of(module_name: str) -> tuple[str, int]:
    """(stack, index) of a module's layer: 'model.decoder.layers.3.fc1' -> ('model.decoder.layers', 3); a module
    outside any numbered stack is in the one layer ('', -1)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_name)
    if match is None:
        return "", -1
    return module_name[: match.start(1)].rstrip("."), int(match.group(1))


def _layer_name(stack: str, index: int) -> str:
    """The recorded name of a layer: the module path up to its index ('model.layers.3', '0'), '' for none."""
    if index < 0:
        return ""
    return f"{stack}.{index}" if stack else str(index)


def layer_index(module_name: str) -> int | None:
    """The index of a module's layer ('model.layers.3.self_attn.q_proj' -> 3), None outside a numbered stack."""
    index = layer_of(module_name)[1]
    return index if index >= 0 else None


_CANONICAL_ORDER = {"q": 0, "k": 1, "v": 2, "o": 3}


def module_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        rows, cols = module.weight.shape
        return rows, cols
    from .quantized import features

    quantized = features(module)  # a quantised linear layer that is not an nn.Linear subclass (HQQ)
    if quantized is not None:
        return quantized
    raise LayoutError(
        f"cannot adapt a {type(module).__name__}: lorta adapts torch.nn.Linear and transformers Conv1D modules"
    )


@dataclass
class _Target:
    name: str
    kind: str  # q, k, v, o, qkv, or the extra matrix's name
    role: str
    layer: tuple[str, int]
    fin: int
    fout: int
    type_name: str = "Linear"
    block: str = ""  # the attention block inside the layer ('self_attn', 'encoder_attn'), for q/k/v/o

    @property
    def where(self) -> str:
        return f"module {self.name!r} ({self.type_name} {self.fin} -> {self.fout})"


def build_layout(
    shape: ModelShape,
    targets: dict[str, nn.Module],
    recorded_names: list[str] | None = None,
    recorded_layers: list[str] | None = None,
) -> TensorLayout:
    """Place every targeted module in the tensor, checking each one's shape against the model's.

    `targets` maps module names to their (base) modules, in model order. `recorded_names` / `recorded_layers` are
    the matrices and layers modes saved with an adapter; when given, the targets must produce exactly those.
    """
    if not targets:
        raise LayoutError("no module matched target_modules")
    items = []
    for name, module in targets.items():
        fin, fout = module_features(module)
        kind, role = matrix_kind(name, shape.model_type) if shape.has_heads else (_strip_layer_prefix(name), "")
        items.append(_Target(name, kind, role, layer_of(name), fin, fout, type(module).__name__))
    split_nested_layers(items)
    _check_one_shape(shape, items)
    d = _model_dim(shape, items)
    for item in items:
        if item.role:
            _check_attention_shape(shape, item)
    _name_attention_blocks(items)

    kinds: dict[str, str] = {}
    extra_sizes: dict[str, int] = {}
    free_sizes: dict[str, tuple[int, int]] = {}
    for item in items:
        if item.role:
            for sub in ("q", "k", "v") if item.kind == "qkv" else (item.kind,):
                kinds[_qualified(item.block, sub)] = OUT_HEADS if sub != "o" else IN_HEADS
            continue
        if item.fin == d:
            role, own = EXTRA_IN, item.fout
        elif item.fout == d:
            role, own = EXTRA_OUT, item.fin
        else:
            role, own = EXTRA_FREE, None
        if kinds.setdefault(item.kind, role) != role:
            raise LayoutError(f"{item.where}: matrix kind {item.kind!r} changes sides between layers")
        sizes = free_sizes if role == EXTRA_FREE else extra_sizes
        size = (item.fin, item.fout) if role == EXTRA_FREE else own
        if sizes.setdefault(item.kind, size) != size:
            raise LayoutError(f"{item.where}: matrix kind {item.kind!r} has different sizes in different layers")
        item.role = role

    blocks = list(dict.fromkeys(i.block for i in items))
    names = sorted(kinds, key=lambda k: _kind_order(k, blocks))
    if recorded_names is not None and list(recorded_names) != names:
        raise LayoutError(
            f"the adapter was trained on matrices {list(recorded_names)} but target_modules match {names} on this model"
        )
    stacks = list(dict.fromkeys(i.layer[0] for i in items))
    layers = sorted({i.layer for i in items}, key=lambda s: (stacks.index(s[0]), s[1]))
    layer_names = [_layer_name(stack, index) for stack, index in layers]
    if recorded_layers is not None and list(recorded_layers) != layer_names:
        raise LayoutError(
            f"the adapter was trained on layers {short_list(recorded_layers)} but target_modules match "
            f"{short_list(layer_names)} on this model"
        )
    layout = TensorLayout(shape, names, [kinds[n] for n in names], layer_names, d, extra_sizes, free_sizes)
    index = {n: i for i, n in enumerate(names)}
    layer_pos = {key: i for i, key in enumerate(layers)}
    seen: dict[tuple[int, int], str] = {}
    for item in items:
        layer = layer_pos[item.layer]
        layout.slots[item.name] = _slots_of(item, layer, index, shape)
        for slot in layout.slots[item.name]:
            clash = seen.setdefault((slot.layer, slot.matrix), item.name)
            if clash != item.name:
                raise LayoutError(
                    f"modules {clash!r} and {item.name!r} would be the same matrix {slot.name!r} of layer "
                    f"{layer_names[slot.layer]!r}; target only one of them or adapt them with separate adapters"
                )
        if item.kind == "qkv":
            try:
                order = fused_order(shape.fused_qkv, shape.num_heads, shape.num_kv_heads, shape.head_dim)
            except ValueError as exc:
                raise LayoutError(f"{item.where}: {exc}") from None
            if order is not None:
                layout.out_orders[item.name] = order
    return layout


def _model_dim(shape: ModelShape, items: list[_Target]) -> int:
    """The model dimension d: the config's hidden size when a target touches it, else the side size that most
    targets share (ties: the first target's input size)."""
    if shape.hidden_size and any(shape.hidden_size in (i.fin, i.fout) for i in items):
        return shape.hidden_size
    counts = Counter(size for i in items for size in {i.fin, i.fout})
    best = max(counts.values())
    first = items[0]
    for size in (first.fin, first.fout, *counts):
        if counts[size] == best:
            return size
    raise AssertionError("unreachable")


def _check_one_shape(shape: ModelShape, items: list[_Target]) -> None:
    """Refuse attention targets of several shapes (Swin's stages, a tower beside a language model)."""

    def hint(members: list[_Target]) -> tuple[dict[str, int] | None, str]:
        """The model_shape that holds this group alone (None: the config's), and why the config's does not."""
        try:
            for item in members:
                _check_attention_shape(shape, replace(item, kind=matrix_kind(item.name, shape.model_type)[0]))
            return None, ""
        except LayoutError as exc:
            q = next((i.fout for i in members if matrix_kind(i.name, shape.model_type)[0] == "q"), 0)
            if not shape.head_dim and shape.num_heads and q and q % shape.num_heads == 0:  # per-layer head dims
                return {"head_dim": q // shape.num_heads}, str(exc)
            return ({"num_heads": 0} if shape.has_heads else None), str(exc) if shape.has_heads else ""

    message = several_shapes_message(items, lambda name: matrix_kind(name, shape.model_type)[0], hint)
    if message:
        raise LayoutError(message)


def _check_attention_shape(shape: ModelShape, item: _Target) -> None:
    d, dh, H, Hkv = shape.hidden_size, shape.head_dim, shape.num_heads, shape.num_kv_heads
    q_out, kv_out = H * dh, Hkv * dh
    if item.kind == "qkv":
        expected = q_out + 2 * kv_out
        if item.fin != d or item.fout != expected:
            raise LayoutError(
                f"{item.where}: a fused q/k/v projection must map hidden_size={d} to (H + 2*H_kv) * head_dim = "
                f"{expected} (H={H}, H_kv={Hkv}, head_dim={dh})"
            )
    elif item.kind in ("q", "k", "v"):
        expected = q_out if item.kind == "q" else kv_out
        if item.fin != d or item.fout != expected:
            heads = H if item.kind == "q" else Hkv
            raise LayoutError(
                f"{item.where}: expected {d} -> {expected} (hidden_size -> {heads} heads x head_dim {dh}); the "
                "output must be a whole number of heads of head_dim"
            )
    elif item.fin != q_out or item.fout != d:
        raise LayoutError(
            f"{item.where}: an attention output projection must map {H} heads x head_dim {dh} = {q_out} -> "
            f"hidden_size {d}"
        )


def _name_attention_blocks(items: list[_Target]) -> None:
    """Give q/k/v/o modules their attention block when a layer has several (self- and cross-attention)."""
    attention = [i for i in items if i.role]
    subs = {"qkv": ("q", "k", "v")}
    per_layer = Counter((i.layer, sub) for i in attention for sub in subs.get(i.kind, (i.kind,)))
    if all(n == 1 for n in per_layer.values()):
        return
    for item in attention:
        path = _strip_layer_prefix(item.name).split(".")[:-1]
        named = [p for p in path if not p.isdigit()]
        item.block = named[-1] if named else ""
    counts = Counter((i.layer, i.block, i.kind) for i in attention)
    if any(n > 1 for n in counts.values()):  # the last path component does not tell them apart: use the path
        for item in attention:
            path = _strip_layer_prefix(item.name).split(".")[:-1]
            item.block = ".".join(p for p in path if not p.isdigit())


def _qualified(block: str, kind: str) -> str:
    return f"{block}.{kind}" if block else kind


def _kind_order(kind: str, blocks: list[str]) -> tuple:
    block, _, role = kind.rpartition(".")
    if role in _CANONICAL_ORDER and (block in blocks or not block):
        return (0, blocks.index(block) if block in blocks else 0, _CANONICAL_ORDER[role], kind)
    return (1, 0, 0, kind)


def _slots_of(item: _Target, layer: int, index: dict[str, int], shape: ModelShape) -> list[Slot]:
    H, Hkv, dh = shape.num_heads, shape.num_kv_heads, shape.head_dim
    q_heads, kv_heads = (H, 1), (Hkv, shape.group_size)
    q_out, kv_out = H * dh, Hkv * dh
    if item.kind == "qkv":
        q, k, v = (_qualified(item.block, sub) for sub in ("q", "k", "v"))
        return [
            Slot(layer, index[q], q, OUT_HEADS, item.fin, q_out, *q_heads, 0),
            Slot(layer, index[k], k, OUT_HEADS, item.fin, kv_out, *kv_heads, q_out),
            Slot(layer, index[v], v, OUT_HEADS, item.fin, kv_out, *kv_heads, q_out + kv_out),
        ]
    if item.kind in ("q", "k", "v", "o"):
        heads = q_heads if item.kind in ("q", "o") else kv_heads
        role = IN_HEADS if item.kind == "o" else OUT_HEADS
        kind = _qualified(item.block, item.kind)
        return [Slot(layer, index[kind], kind, role, item.fin, item.fout, *heads)]
    return [Slot(layer, index[item.kind], item.kind, item.role, item.fin, item.fout)]
