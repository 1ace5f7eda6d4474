"""Targets of several attention shapes in one adapter (Swin's stages of growing width, a vision tower beside a
language model): one update tensor has one model dim and one head layout, so such a target set is refused with
the groups of layers found, their shapes, and a target_modules that adapts each group alone (docs/design.md,
"The layout")."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .architectures import kind_suffix

ATTENTION_KINDS = ("qkv", "q", "k", "v", "o")


def shape_groups(items: Sequence[Any], kind_of: Callable[[str], str]) -> list[list[Any]]:
    """The attention targets grouped by layer shape: layers whose common matrix kinds have equal (in, out) sizes
    share a group. `items` carry .name, .layer (stack, index), .fin, .fout; `kind_of` names a module's kind."""
    groups: list[tuple[dict[str, tuple[int, int]], list[Any]]] = []
    by_layer: dict[tuple[str, int], list[Any]] = {}
    for item in items:
        if kind_of(item.name) in ATTENTION_KINDS:
            by_layer.setdefault(item.layer, []).append(item)
    for layer_items in by_layer.values():
        sizes = {(_within_layer(i), kind_of(i.name)): (i.fin, i.fout) for i in layer_items}
        for shape, members in groups:
            if all(shape.get(k, v) == v for k, v in sizes.items()):
                shape.update(sizes)
                members.extend(layer_items)
                break
        else:
            groups.append((dict(sizes), list(layer_items)))
    return [members for _, members in groups]


def group_target(members: Sequence[Any], kind_of: Callable[[str], str]) -> str:
    """A PEFT target_modules regular expression matching exactly this group's modules."""
    layers: dict[str, list[int]] = {}
    for item in members:
        stack, index = item.layer
        layers.setdefault(stack, []).append(index)
    where = _one_of(
        rf"{re.escape(stack)}\.{_one_of(str(i) for i in sorted(set(indices)))}"
        for stack, indices in layers.items()
        if stack
    )
    names = _one_of(re.escape(s) for s in dict.fromkeys(kind_suffix(i.name, kind_of) for i in members))
    return rf"{where}\..*\.{names}" if layers.keys() - {""} else rf".*\.{names}"


def several_shapes_message(
    items: Sequence[Any], kind_of: Callable[[str], str], hint: Callable[[list[Any]], tuple[dict | None, str]]
) -> str | None:
    """None when the attention targets have one shape; else the refusal: each group's layers and sizes, why one
    tensor cannot hold them, and the target_modules (and model_shape where the config's heads do not hold the
    group, with the reason: `hint(group)`) that adapt that group alone."""
    groups = shape_groups(items, kind_of)
    if len(groups) < 2:
        return None
    lines = []
    for members in groups:
        layer_names = list(dict.fromkeys(f"{s}.{i}" if s else str(i) for s, i in (m.layer for m in members)))
        shown = layer_names if len(layer_names) <= 4 else [*layer_names[:3], f"... {len(layer_names)} layers"]
        sizes = ", ".join(f"{k} {fin} -> {fout}" for k, (fin, fout) in _sizes(members, kind_of).items())
        fix = f"target_modules=r'{group_target(members, kind_of)}'"
        model_shape, mismatch = hint(members)
        if model_shape is not None:
            fix += f", model_shape={model_shape}"
        lines.append(f"  - layers {', '.join(shown)}: {sizes}; alone: {fix}" + (f" ({mismatch})" if mismatch else ""))
    return (
        f"target_modules match attention modules of {len(groups)} different shapes, and one update tensor holds one "
        "shape (one model dim, one head layout):\n" + "\n".join(lines) + "\n"
        "Adapt one group per adapter (pass that group's target_modules), or adapt them with LoRA."
    )


def _sizes(members: Sequence[Any], kind_of: Callable[[str], str]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for item in members:
        out.setdefault(kind_of(item.name), (item.fin, item.fout))
    return out


def _within_layer(item: Any) -> str:
    """The module's attention block below its layer ('self_attn', 'blocks.1.attention'): self- and cross-attention
    of one layer are compared with their own kind only."""
    stack, index = item.layer
    prefix = f"{stack}.{index}." if stack else f"{index}." if index >= 0 else ""
    return item.name[len(prefix) :].rpartition(".")[0] if item.name.startswith(prefix) else ""


def _one_of(options: Iterable[str]) -> str:
    options = list(options)
    return options[0] if len(options) == 1 else f"(?:{'|'.join(options)})"


def short_list(names: list[str]) -> str:
    names = list(names)
    return str(names) if len(names) <= 6 else f"[{', '.join(map(repr, names[:3]))}, ... {len(names)} layers]"


def split_nested_layers(items: Sequence[Any]) -> None:
    """A numbered stack inside a numbered layer whose entries each hold a whole attention block (Funnel's blocks
    of layers: encoder.blocks.0.1.attention): its entries are the layers mode, not the outer index."""
    seen = Counter((i.layer, re.sub(r"\.?\d+\.?", ".", _within_layer(i)).strip("."), i.kind) for i in items if i.role)
    nested = {layer for (layer, _, _), n in seen.items() if n > 1}
    for item in items:
        if item.layer not in nested:
            continue
        stack, index = item.layer
        outer = f"{stack}.{index}" if stack else str(index)
        rest = item.name[len(outer) + 1 :].split(".")
        inner = next((j for j, part in enumerate(rest) if part.isdigit()), None)
        if inner is None:
            continue
        item.layer = (".".join([outer, *rest[:inner]]), int(rest[inner]))
        if not item.role:  # an extra matrix's kind: its name below the inner layer
            item.kind = ".".join(rest[inner + 1 :])
