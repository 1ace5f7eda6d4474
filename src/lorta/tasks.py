"""The fine-tuning jobs behind ``lorta train`` and ``lorta compare``: data, model, Trainer, evaluation, outputs.

Three jobs, picked from the model and ``--task``:

- ``classify`` (an encoder such as MiniLM, ``--task sentiment`` or ``party``): a sequence classifier with a fresh
  head; the adapter and the head are trained with cross-entropy; accuracy is the argmax on the held-out split.
- ``prompt`` (a causal LM such as SmolLM2, ``--task sentiment`` or ``party``): the prompt asks for the label and
  the loss is on the answer tokens only; accuracy compares the log-likelihoods of the label words
  (" positive" vs " negative", " Democratic" vs " Republican") given the prompt.

Tasks: ``sentiment`` (Rotten Tomatoes snippets, split by movie, or the user's ``--data`` table), ``party`` (the
2012 convention speeches' paragraphs, split by speaker), ``dpo`` (preference pairs from Rotten Tomatoes).
- ``dpo`` (a causal LM, ``--task dpo``): TRL's DPOTrainer on preference pairs; the reference model is the base
  model (TRL's reference for a PeftModel passed with ``ref_model=None``); reports held-out reward accuracy.

Every job uses a ``transformers.Trainer`` (progress bar, checkpoints, gradient accumulation, torchrun) with a
seeded, precomputed data order, so the same command gives the same metrics and a resumed run the same factors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import (
    DataError,
    TextDataset,
    TextSplit,
    load_convention_speeches,
    load_rotten_tomatoes,
    load_table,
    make_preference_pairs,
)
from .methods.lorta import DEFAULT_MODE_FACTOR_INIT, LORTA_MODES
from .methods.tenslora import DEFAULT_CONSTRUCTION, DEFAULT_DECOMPOSITION
from .models import (
    PACKAGED_MODELS,
    QUANTIZE_CHOICES,
    MissingDependencyError,
    load_for_causal_lm,
    load_for_classification,
    resolve_model,
)
from .registry import Recipe, method_spec, method_specs

__all__ = [
    "ADAPTER_METHODS",
    "JOBS",
    "METHODS",
    "TASKS",
    "TrainOptions",
    "UsageError",
    "count_parameters",
    "job_kind",
    "lora_reference_parameters",
    "resolve_options",
    "run_job",
]

PEFT_METHODS = ("lora", "vera")  # PEFT's own, as baselines
ADAPTER_METHODS = (*method_specs(), *PEFT_METHODS)
METHODS = (*ADAPTER_METHODS, "full", "head-only")
TASKS = ("sentiment", "party", "dpo")
JOBS = ("classify", "prompt", "dpo")
HEAD_MODULES = ("classifier", "score")  # what PEFT's SEQ_CLS task puts in modules_to_save
MODE_FACTORS = ("C_H", "C_L", "C_M")  # LoRTA's mode factors (--mode-lr)
REFERENCE_LORA_RANK = 8
# The prompt job's question per task; the answers are the label names (" positive", " Republican", ...).
PROMPTS = {
    "sentiment": "Review: {text}\nIs this review positive or negative?\nAnswer:",
    "party": "Convention speech: {text}\nWas this said at the Democratic or the Republican convention?\nAnswer:",
}

Echo = Callable[[str], None]


# (module, pip requirement, what needs it): checked before a job does any work.
_JOB_NEEDS: dict[str, list[tuple[str, str, str]]] = {
    "classify": [("tqdm", "tqdm", "progress bars")],
    "prompt": [("tqdm", "tqdm", "progress bars")],
    "dpo": [("tqdm", "tqdm", "progress bars"), ("trl", "trl>=0.20", "the DPO trainer")],
}
_OPTIONAL_OUTPUTS = [("matplotlib", "matplotlib", "the loss plot (loss.png)")]
_QUANTIZE_NEEDS = [("bitsandbytes", "bitsandbytes>=0.45", "--quantize (the quantised base)")]


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_requirements(
    kind: str, needs_optional: Sequence[tuple[str, str, str]] = _OPTIONAL_OUTPUTS, quantize: str | None = None
) -> list[str]:
    """Raise MissingDependencyError (with the pip command) for a missing package the job needs; return a note
    for each optional output that will be skipped because its package is missing."""
    needs = [*_JOB_NEEDS[kind], *(_QUANTIZE_NEEDS if quantize else [])]
    missing = [(m, req, what) for m, req, what in needs if not _installed(m)]
    if missing:
        packages = " ".join(f"'{req}'" for _, req, _ in missing)
        needs = "; ".join(f"{req} for {what}" for _, req, what in missing)
        raise MissingDependencyError(
            f"this {kind} job needs {needs}, which is not installed. Install it with: pip install {packages} "
            "(or everything the jobs use: pip install 'lorta[cli,data]')"
        )
    return [
        f"{what} will not be written: {m} is not installed (pip install '{req}')"
        for m, req, what in needs_optional if not _installed(m)
    ]


class UsageError(ValueError):
    """A combination of options that cannot run; the message says what to change."""


ATTENTION_ROLES = ("q", "k", "v", "o")


# The PEFT baselines' and the non-adapter methods' recipes; the lorta methods' are in their MethodSpec. LoRA r=8 on
# q, k, v, o at alpha 16 is PEFT's usual setting; VeRA trains scaling vectors that start small (d = 0.1, b = 0) and
# needs a learning rate an order above LoRA's, as its paper's GLUE runs use (a few 1e-3 to 1e-2).
CLASSIFY_RECIPES: dict[str, Recipe] = {
    **{name: spec.classify for name, spec in method_specs().items()},
    "lora": Recipe(8, 16.0, 1e-3, 2e-3),
    "vera": Recipe(256, None, 1e-2, 1e-2),
    "full": Recipe(None, None, 1e-4, 2e-3),
    "head-only": Recipe(None, None, 1e-2, 1e-2),
}
# Causal-LM jobs (prompt, dpo): conservative PEFT-typical values, not swept.
LM_RECIPES: dict[str, Recipe] = {
    **{name: spec.causal_lm for name, spec in method_specs().items()},
    "lora": Recipe(8, 16.0, 5e-4, 0.0),
    "vera": Recipe(256, None, 5e-3, 0.0),
    "full": Recipe(None, None, 1e-5, 0.0),
}
DEFAULT_MODES = LORTA_MODES


@dataclass(frozen=True)
class JobDefaults:
    steps: int
    batch_size: int
    max_train: int | None
    max_test: int | None
    max_length: int


JOB_DEFAULTS: dict[str, JobDefaults] = {
    "classify": JobDefaults(steps=400, batch_size=32, max_train=None, max_test=None, max_length=64),
    "prompt": JobDefaults(steps=60, batch_size=8, max_train=480, max_test=200, max_length=96),
    "dpo": JobDefaults(steps=40, batch_size=4, max_train=320, max_test=64, max_length=128),
}


@dataclass
class TrainOptions:
    """Everything ``lorta train`` takes; ``None`` means the job's or the method's default."""

    method: str = "lorta"
    model: str | None = None
    task: str = "sentiment"
    data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    rank: int | None = None
    alpha: float | None = None
    lr: float | None = None
    head_lr: float | None = None
    mode_lr: float | None = None
    dropout: float = 0.0
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    max_train: int | None = None
    max_test: int | None = None
    max_length: int | None = None
    seed: int = 0
    out: str | None = None
    resume: bool = False
    save_steps: int | None = None
    construction: str = DEFAULT_CONSTRUCTION
    decomposition: str = DEFAULT_DECOMPOSITION
    beta: float = 0.1
    modes: tuple[str, ...] = DEFAULT_MODES
    mode_init: str = DEFAULT_MODE_FACTOR_INIT
    targets: tuple[str, ...] | None = None
    quantize: str | None = None
    quiet: bool = False


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def _model_config(path: Path) -> dict[str, Any]:
    """The model folder's config.json, as plain data (no transformers import needed)."""
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def _is_causal_lm(path: Path) -> bool:
    names = _model_config(path).get("architectures") or []
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def job_kind(options: TrainOptions, model_path: Path) -> str:
    """classify, prompt or dpo, from the task and whether the model is a causal LM."""
    causal = _is_causal_lm(model_path)
    if options.task == "dpo":
        if not causal:
            raise UsageError(f"--task dpo needs a causal language model (e.g. --model smollm2); {options.model} is not")
        return "dpo"
    return "prompt" if causal else "classify"


def model_label(name: str) -> str:
    """A short name for output folders: the catalogue name, or the file/folder name of a path."""
    if name.lower() in PACKAGED_MODELS:
        return name.lower()
    return Path(name).expanduser().resolve().stem or "model"


def resolve_options(options: TrainOptions) -> tuple[TrainOptions, str, Path]:
    """Fill every default; return (options, job kind, local model folder)."""
    if options.method not in METHODS:
        raise UsageError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    if options.task not in TASKS:
        raise UsageError(f"unknown task {options.task!r}; choose one of {', '.join(TASKS)}")
    if options.task == "party" and options.data is not None:
        raise UsageError("--task party reads the 2012 convention speeches; --data replaces the sentiment data only "
                         "(use --task sentiment --data FILE for your own table)")
    if options.method == "vera" and options.alpha is not None:
        raise UsageError("--alpha: VeRA has no alpha (its vectors d and b learn each matrix's scale); drop --alpha")
    model = options.model or ("smollm2" if options.task == "dpo" else "minilm")
    path = resolve_model(model)
    options = dataclasses.replace(options, model=model)
    kind = job_kind(options, path)
    recipes = CLASSIFY_RECIPES if kind == "classify" else LM_RECIPES
    if options.method not in recipes:
        raise UsageError(
            f"--method {options.method} needs a classification head, which the {kind} job on a causal LM does not "
            f"have; choose one of {', '.join(recipes)}"
        )
    if kind == "dpo" and options.mode_lr is not None:
        raise UsageError("--mode-lr is not supported with --task dpo (TRL's DPOTrainer builds its own optimizer)")
    if kind == "dpo" and options.method == "full":
        raise UsageError("--task dpo trains adapters (the reference model is the base model with the adapter off); "
                         f"choose one of {', '.join(ADAPTER_METHODS)}")
    if options.quantize is not None and options.quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"--quantize {options.quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if options.quantize is not None and options.method == "full":
        raise UsageError("--quantize stores the base weights in 8 or 4 bits, which do not train: use an adapter "
                         f"method ({', '.join(ADAPTER_METHODS)}) or head-only, or drop --quantize for full")
    if options.method in method_specs():  # the method's own options, checked by its config (fail before loading)
        spec = method_spec(options.method)
        try:
            spec.config_cls(**spec.train_kwargs(options))
        except ValueError as exc:
            raise UsageError(f"--method {options.method}: {exc}") from exc
    model_type = _model_type(path)
    if options.targets is not None:
        if options.method not in ADAPTER_METHODS:
            raise UsageError(f"--targets picks the matrices an adapter adapts; --method {options.method} has none")
        target_modules(options.targets, model_type)  # fail now, not after the model has loaded
    filled = _with_defaults(options, recipes[options.method], JOB_DEFAULTS[kind], model_type)
    _check_numbers(filled)
    if filled.out is None:
        rank = f"-r{filled.rank}" if filled.rank is not None else ""
        modes = f"-{'+'.join(filled.modes) or 'nomodes'}" if _custom_modes(filled) else ""
        custom_init = filled.method == "lorta" and filled.mode_init != DEFAULT_MODE_FACTOR_INIT
        modes += f"-init{filled.mode_init}" if custom_init else ""
        if options.targets is not None and filled.targets != recipes[options.method].targets:
            modes += "-" + "+".join(t.replace(".", "_") for t in filled.targets)
        name = f"{filled.method}{modes}-{model_label(model)}-{filled.task}{rank}-seed{filled.seed}"
        filled = dataclasses.replace(filled, out=str(Path("runs") / name))
    return filled, kind, path


def _with_defaults(o: TrainOptions, recipe: Recipe, job: JobDefaults, model_type: str) -> TrainOptions:
    """Options with every None replaced by the method's recipe or the job's default. The recipe's targets are
    roles (q, k, v, o); for a model type whose attention names lorta does not know they stay None, which leaves the
    choice to the method's own default."""

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    adapter = o.method in ADAPTER_METHODS
    return dataclasses.replace(
        o,
        rank=pick(o.rank, recipe.rank) if adapter else None,
        alpha=pick(o.alpha, recipe.alpha) if adapter else None,
        lr=pick(o.lr, recipe.lr),
        head_lr=pick(o.head_lr, recipe.head_lr),
        steps=pick(o.steps, job.steps),
        batch_size=pick(o.batch_size, job.batch_size),
        max_train=pick(o.max_train, job.max_train),
        max_test=pick(o.max_test, job.max_test),
        max_length=pick(o.max_length, job.max_length),
        modes=tuple(m for m in DEFAULT_MODES if m in o.modes),
        targets=_default_targets(o, recipe, model_type) if adapter else None,
    )


def _default_targets(o: TrainOptions, recipe: Recipe, model_type: str) -> tuple[str, ...] | None:
    if o.targets is not None:
        return tuple(o.targets)
    return recipe.targets if recipe.targets and default_targets(model_type) else None


def _model_type(path: Path) -> str:
    return str(_model_config(path).get("model_type", ""))


def _custom_modes(o: TrainOptions) -> bool:
    return o.method == "lorta" and tuple(o.modes) != DEFAULT_MODES


def _check_numbers(o: TrainOptions) -> None:
    checks = [
        ("--steps", o.steps, 1), ("--batch-size", o.batch_size, 1), ("--grad-accum", o.grad_accum, 1),
        ("--max-length", o.max_length, 8), ("--rank", o.rank, 1), ("--save-steps", o.save_steps, 1),
        ("--max-train", o.max_train, 1), ("--max-test", o.max_test, 1),
    ]
    for flag, value, low in checks:
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if not 0.0 <= o.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {o.dropout}")
    if o.mode_lr is not None and o.method != "lorta":
        raise UsageError(f"--mode-lr sets the lr of LoRTA's mode factors C_H, C_L, C_M; --method {o.method} has none")
    for flag, value in (("--lr", o.lr), ("--head-lr", o.head_lr), ("--mode-lr", o.mode_lr), ("--alpha", o.alpha)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a non-negative number, got {value}")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_data(o: TrainOptions, subset: bool = True) -> TextDataset:
    """Rotten Tomatoes (default) or the user's CSV/JSONL table, split by group; with ``subset``, --max-train and
    --max-test take seeded class-balanced subsets (DPO applies them to the pairs instead)."""
    limits = {"max_train": o.max_train, "max_test": o.max_test} if subset else {}
    if o.task == "party":
        return load_convention_speeches(seed=o.seed, **limits)
    if o.data is None:
        return load_rotten_tomatoes(seed=o.seed, **limits)
    return load_table(o.data, text_column=o.text_column, label_column=o.label_column, seed=o.seed, **limits)


def describe_data(o: TrainOptions) -> str:
    if o.task == "party":
        return "2012 convention speech paragraphs (Democratic/Republican)"
    return "Rotten Tomatoes snippets (fresh/rotten)" if o.data is None else str(o.data)


def grouped_order(lengths: Sequence[int], batch_size: int, total: int, seed: int) -> list[int]:
    """A seeded order of ``total`` example indices (epochs concatenated) whose consecutive ``batch_size`` blocks
    hold examples of similar length, so dynamic padding wastes little; batch order is shuffled.

    Each epoch is a seeded permutation cut into chunks of 64 batches, each chunk sorted by length, cut into
    batches, and the batches shuffled. Fixed here (not drawn by the Trainer) so runs and resumed runs agree.
    """
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        rng = random.Random(f"lorta-order:{seed}:{epoch}")
        perm = list(range(len(lengths)))
        rng.shuffle(perm)
        chunk = 64 * batch_size
        batches = []
        for start in range(0, len(perm), chunk):
            part = sorted(perm[start:start + chunk], key=lambda i: lengths[i])
            batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
        rng.shuffle(batches)
        order.extend(i for b in batches for i in b)
        epoch += 1
    return order[:total]


class ListDataset(torch.utils.data.Dataset):
    """Feature dicts in a fixed order (``indices`` into ``features``)."""

    def __init__(self, features: Sequence[dict[str, Any]], indices: Sequence[int] | None = None) -> None:
        self.features = features
        self.indices = list(range(len(features))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[self.indices[i]]


def ordered_train_set(features: Sequence[dict[str, Any]], o: TrainOptions) -> ListDataset:
    """Exactly steps × batch × grad-accum × world-size examples, in the seeded length-grouped order."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = o.batch_size * o.grad_accum * world
    lengths = [len(f["input_ids"]) for f in features]
    return ListDataset(features, grouped_order(lengths, o.batch_size * world, o.steps * per_step, o.seed))


# --------------------------------------------------------------------------------------------------
# Models and adapters
# --------------------------------------------------------------------------------------------------


def default_targets(model_type: str) -> list[str] | None:
    """LoRTA's default targets for a model type (q, k, v, o), reused for LoRA so both adapt the same matrices."""
    from .layout import DEFAULT_TARGETS

    return DEFAULT_TARGETS.get(model_type)


def target_modules(targets: Sequence[str] | None, model_type: str) -> list[str] | None:
    """PEFT ``target_modules`` for ``--targets``: the roles q, k, v, o become this model type's attention module
    names (``layout.DEFAULT_TARGETS``); any other entry is a module name, which PEFT matches exactly or as a suffix.
    None stays None (the adapter config's default)."""
    if targets is None:
        return None
    if not targets:
        raise UsageError("--targets is empty; give roles (q,k,v,o) and/or module names, comma-separated")
    names = default_targets(model_type)
    roles = [t for t in targets if t in ATTENTION_ROLES]
    if roles and not names:
        raise UsageError(
            f"--targets {','.join(roles)}: lorta does not know the attention module names of model type "
            f"{model_type!r}; pass module names instead (e.g. --targets q_proj,v_proj)"
        )
    by_role: dict[str, str] = {}
    if roles and len(names) == 2:  # a fused q/k/v projection (GPT-2's c_attn, Phi-3's qkv_proj) and o
        fused = [r for r in roles if r != "o"]
        if fused and set(fused) != {"q", "k", "v"}:
            raise UsageError(
                f"--targets {','.join(roles)}: {model_type} computes q, k and v in one module ({names[0]}), which "
                "is adapted as a whole; give all three of q,k,v or none"
            )
        by_role = {"q": names[0], "k": names[0], "v": names[0], "o": names[1]}
    elif roles:
        by_role = dict(zip(ATTENTION_ROLES, names, strict=True))
    modules = [by_role.get(t, t) for t in targets]
    return list(dict.fromkeys(modules))


def _check_targets_match(model: nn.Module, targets: Sequence[str]) -> None:
    """Every --targets name must match a Linear-like module (exactly or as a dotted suffix): PEFT only fails when
    none matches, so a typo next to a valid name would silently adapt less than asked."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UsageError(
                f"--targets {target!r} matches no linear module of this {model.config.model_type} model; "
                f"its linear modules end in: {', '.join(leaves)}"
            )


def peft_config(o: TrainOptions, task_type: str, model_type: str) -> Any:
    """The PEFT config of an adapter method."""
    import peft


    common: dict[str, Any] = {"lora_alpha": o.alpha, "lora_dropout": o.dropout, "task_type": task_type}
    targets = target_modules(o.targets, model_type)
    if targets is not None:
        common["target_modules"] = targets
    if o.method in method_specs():
        spec = method_spec(o.method)
        return spec.config(o.rank, **spec.train_kwargs(o), **common)
    common.setdefault("target_modules", default_targets(model_type))
    if o.method == "vera":  # seeded random projections, saved with the adapter (PEFT's default)
        common.pop("lora_alpha")
        return peft.VeraConfig(r=o.rank, vera_dropout=common.pop("lora_dropout"), projection_prng_key=o.seed,
                               **common)
    return peft.LoraConfig(r=o.rank, **common)


def is_head(name: str) -> bool:
    return any(part in HEAD_MODULES for part in name.split("."))


def prepare_model(model: nn.Module, o: TrainOptions, task_type: str) -> nn.Module:
    """Wrap an adapter method with PEFT, or set requires_grad for full / head-only training. A quantised base first
    goes through PEFT's prepare_model_for_kbit_training (float32 norms, input gradients), as for QLoRA."""
    if o.quantize is not None:
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if o.method in ADAPTER_METHODS:
        import peft

        import lorta  # noqa: F401  (registers the lorta methods with PEFT)

        config = peft_config(o, task_type, model.config.model_type)
        if o.targets is not None:
            _check_targets_match(model, config.target_modules)
        return peft.get_peft_model(model, config)
    for name, param in model.named_parameters():
        param.requires_grad_(o.method == "full" or is_head(name))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(adapter, head) trainable parameters; each shared tensor counted once. Full training counts every weight
    outside the head as 'adapter'."""
    adapter = head = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            if is_head(name):
                head += param.numel()
            else:
                adapter += param.numel()
    return adapter, head


def lora_reference_parameters(model_path: Path, rank: int = REFERENCE_LORA_RANK) -> int:
    """Trainable parameters of PEFT LoRA at ``rank`` on LoRTA's default targets (q, k, v, o), counted exactly on a
    meta-device copy of the model (no weights are read)."""
    import peft
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    targets = default_targets(config.model_type)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules=targets))
    return sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" in n)


def saved_path(out: Path, o: TrainOptions) -> Path:
    """Adapters: ``out/adapter`` (for PeftModel.from_pretrained); full: ``out/model``; head-only:
    ``out/head.safetensors``."""
    if o.method in ADAPTER_METHODS:
        return out / "adapter"
    return out / ("model" if o.method == "full" else "head.safetensors")


def save_trained(model: nn.Module, tokenizer: Any, out: Path, o: TrainOptions) -> Path:
    """Write what the run trained to :func:`saved_path`."""
    path = saved_path(out, o)
    if o.method in ADAPTER_METHODS:
        model.save_pretrained(path, selected_adapters=["default"])
    elif o.method == "full":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Trainer plumbing
# --------------------------------------------------------------------------------------------------


def _trainer_classes() -> tuple[type, type]:
    """A Trainer with a separate head learning rate, and a compact progress callback (imported lazily)."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    class HeadLrTrainer(Trainer):
        """AdamW with up to three groups: the adapter (args.learning_rate), the classification head (head_lr) and
        LoRTA's mode factors C_H, C_L, C_M (mode_lr)."""

        head_lr: float | None = None
        mode_lr: float | None = None

        def _lr_of(self, name: str) -> float:
            if is_head(name) and self.head_lr is not None:
                return self.head_lr
            if self.mode_lr is not None and name.rsplit(".", 1)[-1] in MODE_FACTORS:
                return self.mode_lr
            return self.args.learning_rate

        def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                groups: dict[float, list[nn.Parameter]] = {self.args.learning_rate: []}  # logged lr = adapter's
                for name, param in opt_model.named_parameters():
                    if param.requires_grad:
                        groups.setdefault(self._lr_of(name), []).append(param)
                groups = {lr: ps for lr, ps in groups.items() if ps}
                decay = self.args.weight_decay
                param_groups = [{"params": ps, "lr": lr, "weight_decay": decay} for lr, ps in groups.items()]
                self.optimizer = optimizer_cls(param_groups, **kwargs)
            return self.optimizer

    class CompactProgress(ProgressCallback):
        """The Trainer's progress bar, with one short line per logging step instead of a dict."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not (state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs):
                return
            line = f"step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}"
            if "rewards/accuracies" in logs:
                line += f"  reward acc {logs['rewards/accuracies']:.2f}"
            if "learning_rate" in logs:
                line += f"  lr {logs['learning_rate']:.2e}"
            self.training_bar.write(line)

    return HeadLrTrainer, CompactProgress


def training_arguments(o: TrainOptions, output_dir: Path, cls: type | None = None, **extra: Any) -> Any:
    """TrainingArguments shared by all jobs: CPU unless CUDA, no reporting, seeded, linear schedule, checkpoints."""
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    save_steps = o.save_steps or min(100, o.steps)
    return cls(
        output_dir=str(output_dir),
        max_steps=o.steps,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size * 2,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=0.06,
        logging_steps=max(1, o.steps // 20),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        seed=o.seed,
        data_seed=o.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=o.quiet,
        dataloader_num_workers=0,
        **extra,
    )


def install_progress(trainer: Any, quiet: bool) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    _, compact = _trainer_classes()
    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    if not quiet:
        trainer.add_callback(compact)


def checkpoint_to_resume(o: TrainOptions, ckpt_dir: Path, echo: Echo) -> str | None:
    """The last checkpoint when --resume (None, with a note, when there is none); without --resume, old checkpoints
    of this output folder are removed so they cannot mix with the new run's."""
    from transformers.trainer_utils import get_last_checkpoint

    if not o.resume:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        return None
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last is None:
        echo(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    else:
        echo(f"resuming from {last}")
    return last


def loss_curve(trainer: Any) -> list[list[float]]:
    return [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]


def plot_loss(curve: Sequence[Sequence[float]], path: Path, title: str) -> None:
    """A PNG of the training loss against the step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if curve:
        steps, losses = zip(*curve, strict=True)
        ax.plot(steps, losses, marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------


def _classify_features(tokenizer: Any, split: TextSplit, max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer(split.texts, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": split.labels[i]} for i in range(len(split))]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, tokenizer: Any, split: TextSplit, max_length: int, batch_size: int = 128, quiet: bool = False
) -> dict[str, float]:
    """Accuracy and mean cross-entropy on a split (examples sorted by length, so batches need little padding)."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    model.eval()
    device = next(model.parameters()).device
    features = _classify_features(tokenizer, split, max_length)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    correct, loss = 0, 0.0
    for start in tqdm(range(0, len(order), batch_size), desc="evaluating", disable=quiet, leave=False):
        batch = collate([features[i] for i in order[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    n = max(1, len(features))
    return {"accuracy": correct / n, "eval_loss": loss / n}


def _answer_ids(tokenizer: Any, label_names: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in label_names]
    if len({tuple(i) for i in ids}) != len(ids) or any(not i for i in ids):
        raise DataError(f"label names {list(label_names)} do not tokenize to distinct answers for the prompt task")
    return ids


def _prompt_ids(tokenizer: Any, text: str, max_text_tokens: int, template: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_text_tokens:
        text = tokenizer.decode(ids[:max_text_tokens])
    return tokenizer(template.format(text=text))["input_ids"]


def _prompt_features(
    tokenizer: Any, split: TextSplit, answers: list[list[int]], max_length: int, template: str
) -> list[dict[str, Any]]:
    """Prompt + answer tokens; labels are -100 on the prompt so the loss is on the answer only."""
    question = len(tokenizer(template.format(text=""))["input_ids"])
    max_text = max(8, max_length - max(24, question + 2) - max(len(a) for a in answers))  # room for the question
    feats = []
    for text, label in zip(split.texts, split.labels, strict=True):
        prompt = _prompt_ids(tokenizer, text, max_text, template)
        answer = answers[label]
        feats.append({
            "input_ids": prompt + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [-100] * len(prompt) + answer,
            "prompt_len": len(prompt),
        })
    return feats


def _pad_right(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate causal-LM features: right padding; labels padded with -100."""
    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        gap = width - len(f["input_ids"])
        out["input_ids"].append(f["input_ids"] + [pad_id] * gap)
        out["attention_mask"].append(f["attention_mask"] + [0] * gap)
        out["labels"].append(f["labels"] + [-100] * gap)
    return {k: torch.tensor(v) for k, v in out.items()}


@torch.no_grad()
def score_answers(
    model: nn.Module, prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int,
    batch_size: int = 16, quiet: bool = False,
) -> torch.Tensor:
    """Log-probability of each answer given each prompt: a tensor (len(prompts), len(answers)).

    Sequences are left-padded (with explicit position ids) so every answer ends at the last position and only
    the last few positions' logits are computed. Single-token answers need one forward pass per prompt.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    single = all(len(a) == 1 for a in answers)
    items = [(p, None) for p in prompts] if single else [(p + a, a) for p in prompts for a in answers]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    scores = torch.empty(len(items), len(answers) if single else 1)
    for start in tqdm(range(0, len(order), batch_size), desc="evaluating", disable=quiet, leave=False):
        idx = order[start:start + batch_size]
        width = max(len(items[i][0]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(items[i][0])) + items[i][0] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(items[i][0])) + [1] * len(items[i][0]) for i in idx], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = 1 if single else 1 + max(len(items[i][1]) for i in idx)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(idx):
            if single:
                scores[i] = logp[row, -1, [a[0] for a in answers]].cpu()
            else:
                ans = items[i][1]
                picked = logp[row, keep - 1 - len(ans):keep - 1].gather(-1, torch.tensor(ans, device=device)[:, None])
                scores[i, 0] = picked.sum().cpu()
    return scores if single else scores.view(len(prompts), len(answers))


def evaluate_prompt(
    model: nn.Module, tokenizer: Any, split: TextSplit, answers: list[list[int]], max_length: int, quiet: bool,
    template: str,
) -> dict[str, float]:
    """Accuracy of the most likely label word, and the mean negative log-likelihood of the true answer."""
    feats = _prompt_features(tokenizer, split, answers, max_length, template)
    prompts = [f["input_ids"][: f["prompt_len"]] for f in feats]
    scores = score_answers(model, prompts, answers, tokenizer.pad_token_id, quiet=quiet)
    labels = torch.tensor(split.labels)
    accuracy = (scores.argmax(-1) == labels).float().mean().item()
    nll = -scores.gather(-1, labels[:, None]).mean().item()
    return {"accuracy": accuracy, "eval_loss": nll}


def _train(trainer: Any, o: TrainOptions, ckpt_dir: Path, echo: Echo) -> float:
    """Run the Trainer (resuming if asked); return the training wall time in seconds."""
    install_progress(trainer, o.quiet)
    resume = checkpoint_to_resume(o, ckpt_dir, echo)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return time.perf_counter() - start


def _classify(o: TrainOptions, path: Path, ds: TextDataset, echo: Echo) -> dict[str, Any]:
    from transformers import DataCollatorWithPadding

    trainer_cls, _ = _trainer_classes()
    model, tokenizer = load_for_classification(
        path, ds.num_labels, label_names=ds.label_names, quantize=o.quantize
    )
    model = prepare_model(model, o, "SEQ_CLS")
    train = ordered_train_set(_classify_features(tokenizer, ds.train, o.max_length), o)
    ckpt = Path(o.out) / "checkpoints"
    args = training_arguments(o, ckpt, train_sampling_strategy="sequential")
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.head_lr, trainer.mode_lr = o.head_lr, o.mode_lr
    train_s = _train(trainer, o, ckpt, echo)
    start = time.perf_counter()
    result = evaluate_classifier(model, tokenizer, ds.test, o.max_length, quiet=o.quiet)
    result.update(train_time_s=train_s, eval_time_s=time.perf_counter() - start)
    return {**result, "trainer": trainer, "model": model, "tokenizer": tokenizer}


def _prompt(o: TrainOptions, path: Path, ds: TextDataset, echo: Echo) -> dict[str, Any]:
    trainer_cls, _ = _trainer_classes()
    model, tokenizer = load_for_causal_lm(path, quantize=o.quantize)
    answers = _answer_ids(tokenizer, ds.label_names)
    model = prepare_model(model, o, "CAUSAL_LM")
    template = PROMPTS[o.task]
    train = ordered_train_set(_prompt_features(tokenizer, ds.train, answers, o.max_length, template), o)
    ckpt = Path(o.out) / "checkpoints"
    args = training_arguments(o, ckpt, train_sampling_strategy="sequential", remove_unused_columns=False)
    pad_id = tokenizer.pad_token_id
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, data_collator=lambda f: _pad_right(f, pad_id),
        processing_class=tokenizer,
    )
    trainer.mode_lr = o.mode_lr
    train_s = _train(trainer, o, ckpt, echo)
    start = time.perf_counter()
    result = evaluate_prompt(model, tokenizer, ds.test, answers, o.max_length, o.quiet, template)
    result.update(train_time_s=train_s, eval_time_s=time.perf_counter() - start, label_words=[
        tokenizer.decode(a) for a in answers])
    return {**result, "trainer": trainer, "model": model, "tokenizer": tokenizer}


def _dpo(o: TrainOptions, path: Path, ds: TextDataset, echo: Echo) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    train_pairs = make_preference_pairs(ds, "train", seed=o.seed, max_pairs=o.max_train)
    test_pairs = make_preference_pairs(ds, "test", seed=o.seed, max_pairs=o.max_test)
    model, tokenizer = load_for_causal_lm(path, quantize=o.quantize)
    model = prepare_model(model, o, "CAUSAL_LM")
    ckpt = Path(o.out) / "checkpoints"
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # TRL's default bf16 crawls on most CPUs
    args = training_arguments(
        o, ckpt, cls=DPOConfig, beta=o.beta, max_length=o.max_length, bf16=bf16, gradient_checkpointing=False
    )
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(test_pairs), processing_class=tokenizer,
    )
    train_s = _train(trainer, o, ckpt, echo)
    start = time.perf_counter()
    metrics = trainer.evaluate()
    return {
        "accuracy": metrics["eval_rewards/accuracies"],
        "eval_loss": metrics["eval_loss"],
        "reward_margin": metrics.get("eval_rewards/margins"),
        "train_pairs": len(train_pairs),
        "test_pairs": len(test_pairs),
        "train_time_s": train_s,
        "eval_time_s": time.perf_counter() - start,
        "trainer": trainer, "model": model, "tokenizer": tokenizer,
    }


JOB_RUNNERS: dict[str, Callable[[TrainOptions, Path, TextDataset, Echo], dict[str, Any]]] = {
    "classify": _classify, "prompt": _prompt, "dpo": _dpo,
}


def run_job(options: TrainOptions, echo: Echo = print, started: float | None = None) -> dict[str, Any]:
    """Train, evaluate and write the outputs of one run; return its metrics (also in ``<out>/metrics.json``).

    ``started`` (a ``time.time()`` stamp, e.g. the process start) is where the reported wall time begins; default:
    now."""
    from transformers import set_seed

    start = time.time() if started is None else started
    o, kind, path = resolve_options(options)
    skipped = check_requirements(kind, quantize=o.quantize)  # before any work: a missing package fails now
    for note in skipped:
        echo(f"note: {note}")
    if o.quiet:
        _silence_library_bars()
    set_seed(o.seed)
    ds = load_data(o, subset=kind != "dpo")
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(o.seed)
    run = JOB_RUNNERS[kind](o, path, ds, echo)
    trainer, model, tokenizer = run.pop("trainer"), run.pop("model"), run.pop("tokenizer")
    metrics = _metrics(o, kind, path, ds, model, loss_curve(trainer), run)
    metrics["wall_time_s"] = time.time() - start
    metrics["loss_plot"] = None if skipped else str(out / "loss.png")
    if trainer.is_world_process_zero():  # the adapter and metrics first; the optional plot last
        save_trained(model, tokenizer, out, o)
        write_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if not skipped:
            title = f"{o.method} r={o.rank} · {o.model} · {o.task} · acc {run['accuracy']:.3f}"
            plot_loss(metrics["loss_curve"], out / "loss.png", title)
    return metrics


def write_atomically(path: Path, text: str) -> None:
    """Write a file whole or not at all (a temporary file next to it, then one rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _metrics(
    o: TrainOptions, kind: str, path: Path, ds: TextDataset, model: nn.Module, curve: list[list[float]],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Everything metrics.json records about a run (wall time is added last)."""
    adapter, head = count_parameters(model)
    if kind == "dpo":  # TRL adds a frozen "ref" copy of the adapter; count the trained one only
        adapter = _adapter_only(model)
    metrics: dict[str, Any] = {
        "method": o.method, "model": o.model, "task": o.task, "job": kind, "data": describe_data(o),
        "rank": o.rank, "seed": o.seed, "steps": o.steps, "batch_size": o.batch_size, "grad_accum": o.grad_accum,
        "lr": o.lr, "head_lr": o.head_lr if kind == "classify" else None, "mode_lr": o.mode_lr, "alpha": o.alpha,
        "adapter_params": adapter, "head_params": head, "trainable_params": adapter + head,
        "lora_r8_params": lora_reference_parameters(path),
        "n_train": len(ds.train), "n_test": len(ds.test), "label_names": ds.label_names,
        "majority_baseline": max(ds.test.label_counts(ds.num_labels)) / max(1, len(ds.test)),
        **run,
        "train_loss": curve[-1][1] if curve else None, "loss_curve": curve,
        "out": o.out, "saved": str(saved_path(Path(o.out), o)),
        "quantize": o.quantize, "base_bytes": base_bytes(model), "peak_rss_mb": peak_rss_mb(),
        "options": run_identity(o),
    }
    if o.method in method_specs():
        for name in method_spec(o.method).train_options:
            value = getattr(o, name)
            metrics[name] = list(value) if isinstance(value, tuple) else value
    if o.method in ADAPTER_METHODS:
        metrics["targets"] = adapted_modules(model)
    return metrics


def run_identity(o: TrainOptions) -> dict[str, Any]:
    """The resolved options that decide a run's result (not where it is written or how it reports): what
    ``lorta compare --resume`` matches a finished run by."""
    skip = {"out", "resume", "quiet", "save_steps"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(o).items() if k not in skip}


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen weights (quantised storage as stored: int8, packed 4-bit plus their scales)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.requires_grad or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports kilobytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def adapted_modules(model: nn.Module) -> list[str]:
    """The distinct target names the adapter was put on (PEFT's config, as PEFT resolved it)."""
    config = model.peft_config[model.active_adapter]
    modules = config.target_modules
    return sorted(modules) if isinstance(modules, (set, list, tuple)) else [str(modules)]


def _silence_library_bars() -> None:
    """--quiet: also no progress bars from transformers (checkpoint writing) and datasets (TRL's tokenisation)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _adapter_only(model: nn.Module) -> int:
    """Trainable parameters of the 'default' adapter of a PeftModel (excluding TRL's frozen reference copy)."""
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "num_adapter_parameters"):
        return int(tuner.num_adapter_parameters("default"))
    return sum(p.numel() for n, p in model.named_parameters() if ".default." in n and p.requires_grad)
