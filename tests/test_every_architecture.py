"""Every model type of PEFT's own LoRA target table (the installed peft's), and the families users fine-tune most
beside them, built tiny from its config: for each method the default adapter (no target_modules) is the identity
at step 0, trains, saves and reloads exactly, merges exactly and has the closed-form parameter count; or it is
refused with a message naming a fix, and that fix, applied, passes the same checks.

docs/architectures.md is this test's table: `python tests/test_every_architecture.py` writes it, and every case
checks that its row there is what it observed (so the table cannot drift from the code).
"""

from __future__ import annotations

import ast
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA_TARGETS
from zoo import check_adapter, tiny_model

import lorta

TABLE = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
# The forward of the largest sweep model (Swin: widths up to d = 64, d_ff = 256, windows of 4 tokens, 4 blocks;
# the others: d = 16, <= 6 layers of <= 64 tokens): per block q/k/v/o (4 d), scores and mix (d_h + T), the MLP
# (d + d_ff) and two norms (2 d) < 1024; 6 blocks, patch merging (4 d) and the head stay under 8192 steps.
SWEEP_TERMS = 8192
# Beyond PEFT's table: vision and speech encoders, translation, hybrid, state-space, MoE and multimodal models.
FAMILIES = (
    "vit deit swin siglip clip wav2vec2 hubert whisper marian pegasus mbart jamba mamba qwen2_moe qwen3_moe "
    "albert funnel biogpt xglm persimmon exaone4 helium llava qwen2_vl gemma3"
).split()
MODEL_TYPES = sorted({*PEFT_LORA_TARGETS, *FAMILIES})
# Config overrides where the generic shrink leaves a model unbuildable or without the structure under test.
OVERRIDES: dict[str, dict] = {
    "funnel": dict(block_sizes=[2, 1], block_repeats=[1, 1]),  # block 0 holds two layers
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2),
    "swin": dict(
        image_size=16, patch_size=2, window_size=2, depths=[1, 2, 1], num_heads=[1, 2, 4]
    ),  # widths 16, 32, 64
    "clip": dict(projection_dim=16),
    "siglip": dict(text_config__max_position_embeddings=16, text_config__projection_size=16),
    "rwkv": dict(attention_hidden_size=16),
    **dict.fromkeys(  # a narrow convolutional feature encoder and positional convolution
        ("wav2vec2", "hubert"), dict(conv_dim=[16] * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
    ),
    "qwen2_vl": dict(
        text_config__rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 0]}
    ),
}
METHODS = {
    "LoRTA": lambda **kw: lorta.LortaConfig(r=2, **kw),
    "TensLoRA": lambda **kw: lorta.TensLoraConfig(r=2, **kw),
    "TLoRA": lambda **kw: lorta.TLoraConfig(r=2, **kw),
}
FIX = re.compile(r"(target_modules|model_shape|exclude_modules)=(r?'[^']*'|\[[^\]]*\]|\{[^}]*\})")


class NotBuildable(Exception):
    """transformers itself cannot build this model type from a config (remote code only, or refuses a config)."""


# Config constructor arguments, for sizes a config derives at init.
CONFIG_KWARGS: dict[str, dict] = {
    "gemma4": dict(  # per-layer head dims: 4 in the sliding-window layer, 8 in the full-attention one
        text_config=dict(
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            global_head_dim=8,
            vocab_size=97,
            vocab_size_per_layer_input=97,
            hidden_size_per_layer_input=4,
            num_kv_shared_layers=0,
        )
    ),
}


def build(model_type: str) -> torch.nn.Module:
    try:
        return tiny_model(model_type, CONFIG_KWARGS.get(model_type), **OVERRIDES.get(model_type, {}))
    except ValueError as exc:
        if "Unrecognized model" in str(exc):
            raise NotBuildable(f"transformers has no model type {model_type!r} (remote code only)") from None
        raise


def checked(model_type: str, method: str, tmp: Path, **fix) -> PeftModel:
    """The checks of one adapter (zoo.check_adapter) on a tiny `model_type` with `method` and `fix`."""
    return check_adapter(lambda: build(model_type), lambda: METHODS[method](**fix), tmp, SWEEP_TERMS)


def observe(model_type: str, method: str, tmp: Path) -> str:
    """This case's cell of the table, after checking the default (or the refusal's fixes)."""
    try:
        build(model_type)
    except NotBuildable as exc:
        return f"not built: {exc}"
    try:
        get_peft_model(build(model_type), METHODS[method]())
    except ValueError as exc:  # LayoutError too: a refusal, which must name a fix that works
        message = str(exc)
        fixes = _fixes(message)
        assert fixes, f"a refusal must name a fix (target_modules=...): {message}"
        for i, fix in enumerate(fixes):
            checked(model_type, method, tmp / f"fix{i}", **fix)
        reason = re.split(r"[(:,;]", message, maxsplit=1)[0].strip()
        shown = ", ".join(f"{k}=r'{v}'" if isinstance(v, str) else f"{k}={v!r}" for k, v in fixes[0].items())
        more = f" (and {len(fixes) - 1} more groups)" if len(fixes) > 1 else ""
        return f"refused: {reason}; works with {shown}{more}"
    model = checked(model_type, method, tmp / "default")
    targets = model.peft_config["default"].target_modules
    shown = targets if isinstance(targets, str) else ", ".join(sorted(targets))
    layers = len(model.peft_config["default"].layer_names)
    return f"default: {shown} ({layers} layer{'s' if layers > 1 else ''})"


def _fixes(message: str) -> list[dict]:
    """Each group's fix in a refusal: the target_modules (with model_shape / exclude_modules) it names."""
    fixes: list[dict] = []
    for line in message.splitlines():
        found = {k: ast.literal_eval(v) for k, v in FIX.findall(line)}
        if "target_modules" in found:
            fixes.append(found)
    return fixes


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`" if text.startswith("default") else text.replace("|", "\\|")


def table_rows() -> dict[tuple[str, str], str]:
    """(model type, method) -> cell, as docs/architectures.md has them."""
    rows: dict[tuple[str, str], str] = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 1 + len(METHODS) and cells[0] in MODEL_TYPES:
            rows.update({(cells[0], m): c for m, c in zip(METHODS, cells[1:], strict=True)})
    return rows


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_model_type_gets_a_working_default_or_a_refusal_naming_a_fix(model_type, method, tmp_path):
    cell = observe(model_type, method, tmp_path)
    assert table_rows().get((model_type, method)) == _cell(cell), (
        "docs/architectures.md disagrees with this run: regenerate it with `python tests/test_every_architecture.py`"
    )
    if cell.startswith("not built"):
        pytest.skip(cell)


def write_table() -> None:
    import peft
    import transformers

    lines = [
        "# Model types: what each method does by default",
        "",
        "Generated by `python tests/test_every_architecture.py` from the checks of tests/test_every_architecture.py,",
        f"with transformers {transformers.__version__} and peft {peft.__version__}: every model type of PEFT's LoRA",
        "target table plus the families listed there, built tiny from its config. `default`: the adapter with no",
        "`target_modules` is the identity at step 0, trains, saves and reloads exactly, merges exactly, and has its",
        "closed-form parameter count (targets and adapted layers shown). `refused`: the message names the fix",
        "shown, and that fix passes the same checks. `not built`: transformers itself cannot build the type.",
        "",
        "| model type | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in MODEL_TYPES:
            cells = []
            for method in METHODS:
                try:
                    cell = observe(model_type, method, Path(tmp) / f"{model_type}-{method}")
                except Exception as exc:  # written down, so one run shows every failure (the test fails on it)
                    first = (str(exc).splitlines() or [""])[0]
                    cell = f"error: {type(exc).__name__}: {first}"
                counts[cell.split(":")[0]] = counts.get(cell.split(":")[0], 0) + 1
                cells.append(_cell(cell))
            lines.append(f"| {model_type} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    total = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    lines += ["", f"{len(MODEL_TYPES)} model types x {len(METHODS)} methods: {total}.", ""]
    from lorta.saving import write_text

    write_text(TABLE, "\n".join(lines))


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    write_table()
