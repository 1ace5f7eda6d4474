"""What ``lorta train`` takes and how a run is resolved: the methods, tasks and jobs, their recipes, the
options, and --targets' attention roles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...registry import Recipe, method_spec, method_specs
from ..models import (
    PACKAGED_MODELS,
    QUANTIZE_CHOICES,
    MissingDependencyError,
    is_causal_lm,
    resolve_model,
)
from ..models import model_type as model_type_of

PEFT_METHODS = ("lora", "vera")  # PEFT's own, as baselines
ADAPTER_METHODS = (*method_specs(), *PEFT_METHODS)
METHODS = (*ADAPTER_METHODS, "full", "head-only")
TASKS = ("sentiment", "party", "dpo")
JOBS = ("classify", "prompt", "dpo")
# --schedule: the lr after warm-up, as transformers' scheduler names (constant holds the lr until the last step).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
HEAD_MODULES = ("classifier", "score")  # what PEFT's SEQ_CLS task puts in modules_to_save
REFERENCE_LORA_RANK = 8
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
        for m, req, what in needs_optional
        if not _installed(m)
    ]


class UsageError(ValueError):
    """A combination of options that cannot run; the message says what to change."""


ATTENTION_ROLES = ("q", "k", "v", "o")
# The PEFT baselines' and the non-adapter methods' recipes; the lorta methods' are in their MethodSpec. LoRA r=8 on
# q, k, v, o at alpha 16 is PEFT's usual setting; VeRA trains scaling vectors that start small (d = 0.1, b = 0) and
# needs a learning rate an order above LoRA's, as its paper's GLUE runs use; its lr was swept beside LoRTA's
# (docs/results.md, "Recipe trials").
CLASSIFY_RECIPES: dict[str, Recipe] = {
    **{name: spec.classify for name, spec in method_specs().items()},
    "lora": Recipe(8, 16.0, 1e-3, 2e-3),
    "vera": Recipe(256, None, 2e-2, 1e-2),
    "full": Recipe(None, None, 1e-4, 2e-3),
    "head-only": Recipe(None, None, 1e-2, 1e-2),
}
# Causal-LM jobs: the baselines' prompt lrs were swept beside LoRTA's (docs/results.md, "Recipe trials"); their DPO jobs
# keep the conservative lrs they had.
LM_RECIPES: dict[str, Recipe] = {
    **{name: spec.causal_lm for name, spec in method_specs().items()},
    "lora": Recipe(8, 16.0, 2e-3, 0.0),
    "vera": Recipe(256, None, 2e-2, 0.0),
    "full": Recipe(None, None, 1e-5, 0.0),
}
DPO_RECIPES: dict[str, Recipe] = {
    **LM_RECIPES,
    **{n: s.dpo for n, s in method_specs().items() if s.dpo},
    "lora": Recipe(8, 16.0, 5e-4, 0.0),
    "vera": Recipe(256, None, 5e-3, 0.0),
}
RECIPES = {"classify": CLASSIFY_RECIPES, "prompt": LM_RECIPES, "dpo": DPO_RECIPES}


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


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``lorta train`` takes, as given; ``None`` means the job's or the method's default (see `Run`)."""

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
    dropout: float = 0.0
    schedule: str = "linear"
    warmup: float = 0.06
    weight_decay: float = 0.0
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
    beta: float = 0.1
    targets: tuple[str, ...] | None = None
    quantize: str | None = None
    quiet: bool = False
    # the method's own options (MethodSpec.train_flags), by dest; a resolved Run has every one of them
    method_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run(TrainOptions):
    """A resolved run: every default filled in (`resolve_options`), the job it makes and the local model folder."""

    job: str = ""
    model_path: Path = Path()


def job_kind(options: TrainOptions, model_path: Path) -> str:
    """classify, prompt or dpo, from the task and whether the model is a causal LM."""
    causal = is_causal_lm(model_path)
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


def resolve_options(options: TrainOptions) -> Run:
    """The run `options` ask for: every default filled in, every combination checked, the model folder found."""
    if options.method not in METHODS:
        raise UsageError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    if options.task not in TASKS:
        raise UsageError(f"unknown task {options.task!r}; choose one of {', '.join(TASKS)}")
    if options.task == "party" and options.data is not None:
        raise UsageError(
            "--task party reads the 2012 convention speeches; --data replaces the sentiment data only "
            "(use --task sentiment --data FILE for your own table)"
        )
    if options.method == "vera" and options.alpha is not None:
        raise UsageError("--alpha: VeRA has no alpha (its vectors d and b learn each matrix's scale); drop --alpha")
    model = options.model or ("smollm2" if options.task == "dpo" else "minilm")
    path = resolve_model(model)
    options = dataclasses.replace(options, model=model)
    kind = job_kind(options, path)
    recipes = RECIPES[kind]
    if options.method not in recipes:
        raise UsageError(
            f"--method {options.method} needs a classification head, which the {kind} job on a causal LM does not "
            f"have; choose one of {', '.join(recipes)}"
        )
    options = _with_method_options(options)
    for flag in _factor_lr_flags(options):
        if kind == "dpo" and options.method_options.get(flag.dest) is not None:
            raise UsageError(
                f"{flag.flag} is not supported with --task dpo (TRL's DPOTrainer builds its own optimizer)"
            )
    if kind == "dpo" and options.method == "full":
        raise UsageError(
            "--task dpo trains adapters (the reference model is the base model with the adapter off); "
            f"choose one of {', '.join(ADAPTER_METHODS)}"
        )
    if options.quantize is not None and options.quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"--quantize {options.quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if options.quantize is not None and options.method == "full":
        raise UsageError(
            "--quantize stores the base weights in 8 or 4 bits, which do not train: use an adapter "
            f"method ({', '.join(ADAPTER_METHODS)}) or head-only, or drop --quantize for full"
        )
    if options.method in method_specs():  # the method's own options, checked by its config (fail before loading)
        spec = method_spec(options.method)
        try:
            spec.config_cls(**spec.train_kwargs(options.method_options, options))
        except ValueError as exc:
            raise UsageError(f"--method {options.method}: {exc}") from exc
    model_type = model_type_of(path)
    if options.targets is not None:
        if options.method not in ADAPTER_METHODS:
            raise UsageError(f"--targets picks the matrices an adapter adapts; --method {options.method} has none")
        target_modules(options.targets, model_type)  # fail now, not after the model has loaded
    filled = _with_defaults(options, recipes[options.method], JOB_DEFAULTS[kind], model_type)
    _check_numbers(filled)
    if filled.out is None:
        rank = f"-r{filled.rank}" if filled.rank is not None else ""
        modes = "".join(f"-{tag}" for tag in run_tags(filled))
        if options.targets is not None and filled.targets != recipes[options.method].targets:
            modes += "-" + "+".join(t.replace(".", "_") for t in filled.targets)
        name = f"{filled.method}{modes}-{model_label(model)}-{filled.task}{rank}-seed{filled.seed}"
        filled = dataclasses.replace(filled, out=str(Path("runs") / name))
    fields = {f.name: getattr(filled, f.name) for f in dataclasses.fields(TrainOptions)}
    return Run(**fields, job=kind, model_path=path)


def _with_defaults(o: TrainOptions, recipe: Recipe, job: JobDefaults, model_type: str) -> TrainOptions:
    """Options with every None replaced by the method's recipe or the job's default. The recipe's targets are
    roles (q, k, v, o); for a model type whose attention names lorta does not know they stay None, which leaves the
    choice to the method's own default."""

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    adapter = o.method in ADAPTER_METHODS
    rank = pick(o.rank, recipe.rank) if adapter else None
    return dataclasses.replace(
        o,
        rank=rank,
        alpha=pick(o.alpha, recipe.alpha) if adapter else None,
        lr=pick(o.lr, recipe.lr_at(rank)),
        head_lr=pick(o.head_lr, recipe.head_lr),
        steps=pick(o.steps, job.steps),
        batch_size=pick(o.batch_size, job.batch_size),
        max_train=pick(o.max_train, job.max_train),
        max_test=pick(o.max_test, job.max_test),
        max_length=pick(o.max_length, job.max_length),
        targets=_default_targets(o, recipe, model_type) if adapter else None,
    )


def _default_targets(o: TrainOptions, recipe: Recipe, model_type: str) -> tuple[str, ...] | None:
    if o.targets is not None:
        return tuple(o.targets)
    return recipe.targets if recipe.targets and default_targets(model_type) else None


def _with_method_options(o: TrainOptions) -> TrainOptions:
    """`o` with every option of its method filled in (given, else the flag's default). An option of another
    method, or of none, is refused: it would be silently ignored."""
    own = {flag.dest: flag for flag in method_spec(o.method).train_flags} if o.method in method_specs() else {}
    for dest in o.method_options:
        if dest in own:
            continue
        owners = [(s, f) for s in method_specs().values() for f in s.train_flags if f.dest == dest]
        if not owners:
            raise UsageError(f"unknown method option {dest!r}; the methods' options are {', '.join(_all_flags())}")
        spec, flag = owners[0]
        raise UsageError(
            f"{flag.flag} is an option of --method {spec.name} ({flag.help}); --method {o.method} has none"
        )
    values = method_spec(o.method).train_values(o.method_options) if own else {}
    return dataclasses.replace(o, method_options=values)


def for_method(o: TrainOptions, method: str) -> TrainOptions:
    """`o` for `method`, keeping only its own method options (one command line of ``lorta compare`` serves every
    method of its grid, each reading its own)."""
    spec = method_specs().get(method)
    own = {flag.dest for flag in spec.train_flags} if spec is not None else set()
    return dataclasses.replace(o, method=method, method_options={k: v for k, v in o.method_options.items() if k in own})


def _all_flags() -> list[str]:
    return [flag.flag for spec in method_specs().values() for flag in spec.train_flags]


def _factor_lr_flags(o: TrainOptions) -> list[Any]:
    """The method's train flags that set a learning rate of some of its factors (MethodSpec.factor_groups)."""
    if o.method not in method_specs():
        return []
    spec = method_spec(o.method)
    return [flag for flag in spec.train_flags if flag.dest in spec.factor_groups]


def run_tags(o: TrainOptions) -> list[str]:
    """The run's non-default method options, as its folder name and label show them."""
    return method_spec(o.method).run_tags(o.method_options) if o.method in method_specs() else []


def factor_lrs(o: TrainOptions) -> dict[str, float]:
    """Factor name -> learning rate, where the run's method options set one (e.g. LoRTA's --mode-lr)."""
    return method_spec(o.method).factor_lrs(o.method_options) if o.method in method_specs() else {}


def _check_numbers(o: TrainOptions) -> None:
    checks = [
        ("--steps", o.steps, 1),
        ("--batch-size", o.batch_size, 1),
        ("--grad-accum", o.grad_accum, 1),
        ("--max-length", o.max_length, 8),
        ("--rank", o.rank, 1),
        ("--save-steps", o.save_steps, 1),
        ("--max-train", o.max_train, 1),
        ("--max-test", o.max_test, 1),
    ]
    for flag, value, low in checks:
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if not 0.0 <= o.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {o.dropout}")
    if o.schedule not in SCHEDULES:
        raise UsageError(f"--schedule {o.schedule}: choose one of {', '.join(SCHEDULES)}")
    if not (math.isfinite(o.warmup) and 0.0 <= o.warmup < 1.0):
        raise UsageError(f"--warmup is the fraction of --steps spent warming up, in [0, 1); got {o.warmup}")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a non-negative number, got {o.weight_decay}")
    rates = [(flag.flag, o.method_options.get(flag.dest)) for flag in _factor_lr_flags(o)]
    for flag, value in (("--lr", o.lr), ("--head-lr", o.head_lr), *rates, ("--alpha", o.alpha)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a non-negative number, got {value}")


def default_targets(model_type: str) -> list[str] | None:
    """LoRTA's default targets for a model type (q, k, v, o), reused for LoRA so both adapt the same matrices."""
    from ...architectures import DEFAULT_TARGETS

    return DEFAULT_TARGETS.get(model_type)


def target_modules(targets: Sequence[str] | None, model_type: str) -> list[str] | None:
    """PEFT ``target_modules`` for ``--targets``: the roles q, k, v, o become this model type's attention module
    names (``lorta.architectures.ARCHITECTURES``); any other entry is a module name, which PEFT matches exactly or
    as a suffix. None stays None (the adapter config's default)."""
    from ...architectures import ARCHITECTURES

    if targets is None:
        return None
    if not targets:
        raise UsageError("--targets is empty; give roles (q,k,v,o) and/or module names, comma-separated")
    attention = ARCHITECTURES.get(model_type)
    roles = [t for t in targets if t in ATTENTION_ROLES]
    if roles and attention is None:
        raise UsageError(
            f"--targets {','.join(roles)}: lorta does not know the attention module names of model type "
            f"{model_type!r}; pass module names instead (e.g. --targets q_proj,v_proj)"
        )
    fused = [r for r in roles if r != "o"]
    if fused and attention.qkv and set(fused) != {"q", "k", "v"}:  # GPT-2's c_attn, Phi-3's qkv_proj
        raise UsageError(
            f"--targets {','.join(roles)}: {model_type} computes q, k and v in one module ({attention.qkv}), which "
            "is adapted as a whole; give all three of q,k,v or none"
        )
    modules = [name for t in targets for name in (attention.names((t,)) if t in ATTENTION_ROLES else [t])]
    return list(dict.fromkeys(modules))


def run_identity(o: TrainOptions) -> dict[str, Any]:
    """The resolved options that decide a run's result (not where it is written or how it reports): what
    ``lorta compare --resume`` matches a finished run by."""
    skip = {"out", "resume", "quiet", "save_steps", "job", "model_path", "method_options"}
    identity = {k: v for k, v in dataclasses.asdict(o).items() if k not in skip}
    # every method's options, flat (as when they were fields of TrainOptions): defaults, then this run's own
    identity |= {flag.dest: flag.default for spec in method_specs().values() for flag in spec.train_flags}
    identity |= dict(o.method_options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in identity.items()}
