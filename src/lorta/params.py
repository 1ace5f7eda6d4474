"""Exact trainable-parameter counts of an adapter on a model, without weights (the library behind `lorta params`).

Counts are not computed from formulas: the model is built from its config on the meta device (no memory, no
weights, well under a second even for 8B models), the real PEFT config is applied to it with `get_peft_model`,
and the trainable parameters are counted. So a count is, by construction, what training on that model with that
config will train. The closed forms of each method (`lorta.methods.*_num_params`) serve the budget search and are
checked against the meta-device count at the answer.

    from lorta.app.catalogue import config_for
    from lorta.params import compare, largest_rank_within
    compare(config_for("llama-2-7b"), "lorta", 4, targets=["q_proj", "v_proj"])   # .trainable 17160, .lora 2097152
    largest_rank_within(1_000_000, config_for("llama-3-8b"), "lora")
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, VeraConfig, get_peft_model
from torch import nn
from transformers import PretrainedConfig

from .architectures import DEFAULT_TARGETS
from .layout import LayoutError, ModelShape, matrix_kind
from .registry import method_specs

__all__ = [
    "METHODS",
    "Comparison",
    "Fit",
    "ParamsError",
    "adapt",
    "closed_form",
    "compare",
    "count_trainable",
    "fit_budget",
    "largest_rank_within",
    "lora_count",
    "lora_default_targets",
    "meta_model",
    "method_config",
    "quiet_transformers",
]

PEFT_BASELINES = {"lora": ("LoRA", LoraConfig), "vera": ("VeRA", VeraConfig)}  # PEFT's own, counted as PEFT builds them
METHODS = (*method_specs(), *PEFT_BASELINES)
METHOD_TITLES = {**{n: s.title for n, s in method_specs().items()}, **{n: t for n, (t, _) in PEFT_BASELINES.items()}}


class ParamsError(ValueError):
    """A request that cannot be counted (bad method, rank or options); the message says why."""


# ----------------------------------------------------------------------------------------------- model configs
@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports ("newly initialized weights ...") and progress bars for one call.

    The new classification head is expected to be random, so the report is noise for us; but we restore
    the previous verbosity so user code that relies on transformers' logging is unaffected.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of `config` on the meta device: masked-LM, else causal-LM, else bare (the adapted layers are the
    same in every head variant). Instant and memory-free."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModel
    for candidate in (AutoModelForMaskedLM, AutoModelForCausalLM):
        if type(config) in candidate._model_mapping:
            auto = candidate
            break
    with quiet_transformers(), warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return auto.from_config(copy.deepcopy(config))


# ----------------------------------------------------------------------------------------------- method configs
def method_config(
    method: str,
    rank: int | None = None,
    *,
    targets: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    ranks: int | dict[str, int] | Sequence[int] | None = None,
    construction: str | None = None,
    decomposition: str | None = None,
) -> PeftConfig:
    """The PEFT config of `method` at `rank` (TensLoRA: `ranks`, an int or one per mode; default `rank`)."""
    if method not in METHODS:
        raise ParamsError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    spec = method_specs().get(method)
    extras = {"modes": modes, "ranks": ranks, "construction": construction, "decomposition": decomposition}
    allowed = set(spec.params_options) if spec is not None else set()
    misplaced = [k for k, v in extras.items() if v is not None and k not in allowed]
    if misplaced:
        raise ParamsError(f"{', '.join(misplaced)} do(es) not apply to {METHOD_TITLES[method]}")
    rank = None if ranks is not None else (8 if rank is None else rank)  # TensLoRA's ranks take the rank's place
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ParamsError(f"rank must be a positive integer, got {rank!r}")
    target_modules = list(targets) if targets is not None else None
    try:
        if spec is None:
            return PEFT_BASELINES[method][1](r=rank, target_modules=target_modules)
        options = {k: (list(v) if k == "modes" else v) for k, v in extras.items() if v is not None and k != "ranks"}
        return spec.config(ranks if ranks is not None else rank, target_modules=target_modules, **options)
    except (TypeError, ValueError) as err:
        raise ParamsError(str(err)) from err


# ----------------------------------------------------------------------------------------------------- counting
def adapt(config: PretrainedConfig, peft_config: PeftConfig) -> PeftModel:
    """`get_peft_model` on the meta-device model of `config` (a copy of `peft_config`: the caller's is untouched).

    A LoraConfig without targets gets PEFT's LoRA default for the model type, or, for types PEFT has none for
    (e.g. ESM), the query and value matrices of lorta's default targets (see `lora_default_targets`).
    Raises LayoutError when the targets do not fit the model (e.g. match nothing), ParamsError for other
    refusals (e.g. PEFT's own "target modules not found").
    """
    model = meta_model(config)
    peft_config = copy.deepcopy(peft_config)
    if isinstance(peft_config, (LoraConfig, VeraConfig)) and peft_config.target_modules is None:
        peft_config.target_modules = lora_default_targets(config, vera=isinstance(peft_config, VeraConfig))
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return get_peft_model(model, peft_config)
    except LayoutError:
        raise
    except ValueError as err:
        raise ParamsError(str(err)) from err


def lora_default_targets(config: PretrainedConfig, vera: bool = False) -> list[str] | None:
    """None where PEFT has a LoRA (``vera``: VeRA) default for the model type; else q and v (or a fused qkv) of
    DEFAULT_TARGETS."""
    from peft.utils import constants

    peft_defaults = (
        constants.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING
        if vera
        else constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    )
    model_type = getattr(config, "model_type", "")
    if model_type in peft_defaults or model_type not in DEFAULT_TARGETS:
        return None
    return [t for t in DEFAULT_TARGETS[model_type] if matrix_kind(t)[0] in ("q", "v", "qkv")]


def trainable_of(peft_model: nn.Module) -> int:
    """Trainable adapter parameters, each shared factor once; heads in modules_to_save are not counted."""
    return sum(
        p.numel()
        for name, p in peft_model.named_parameters()
        if p.requires_grad and "modules_to_save" not in name and "original_module" not in name
    )


def count_trainable(config: PretrainedConfig, peft_config: PeftConfig) -> int:
    """The exact number of parameters `peft_config` trains on the model of `config`."""
    return trainable_of(adapt(config, peft_config))


def lora_count(config: PretrainedConfig, r: int, targets: Sequence[str] | None = None) -> int:
    """PEFT LoRA's trainable count at rank r on `targets` (default: PEFT's LoRA default, see `adapt`)."""
    return count_trainable(config, method_config("lora", r, targets=targets))


def resolved_targets(peft_model: PeftModel) -> list[str]:
    targets = peft_model.peft_config["default"].target_modules
    return [targets] if isinstance(targets, str) else sorted(targets)


@dataclass(frozen=True)
class Comparison:
    """One method's exact count beside LoRA's on the same targets at the same r."""

    method: str
    rank: int  # the r LoRA is compared at (TensLoRA: its in-rank, the r of its scale)
    ranks: dict[str, int] | None  # TensLoRA's rank per mode
    options: dict[str, Any]  # modes (LoRTA), construction and decomposition (TensLoRA)
    targets: list[str]
    matrices: list[str] | None  # the matrices mode of a tensor method, e.g. ["q", "v"]
    shape: dict[str, Any]
    base_parameters: int
    trainable: int
    lora: int

    @property
    def ratio(self) -> float:
        """trainable / LoRA's trainable."""
        return self.trainable / self.lora

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def compare(
    config: PretrainedConfig,
    method: str,
    rank: int | None = None,
    *,
    targets: Sequence[str] | None = None,
    **options: Any,
) -> Comparison:
    """Count `method` at `rank` (or TensLoRA `ranks=`) on `targets` (default: the method's own) and LoRA at the
    same r on the targets the method resolved to. `options`: modes, ranks, construction, decomposition."""
    peft_config = method_config(method, rank, targets=targets, **options)
    model = adapt(config, peft_config)
    resolved = resolved_targets(model)
    adapter_config = model.peft_config["default"]
    r = int(adapter_config.r)
    trainable = trainable_of(model)
    lora = trainable if method == "lora" else lora_count(config, r, resolved)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # only the adapter is trainable
    ranks = dict(adapter_config.ranks) if isinstance(getattr(adapter_config, "ranks", None), dict) else None
    matrices = getattr(adapter_config, "matrix_names", None)
    return Comparison(
        method=method,
        rank=r,
        ranks=ranks,
        options=method_options(adapter_config),
        targets=resolved,
        matrices=list(matrices) if matrices else None,
        shape=ModelShape.from_model(model.base_model.model).to_dict(),
        base_parameters=base,
        trainable=trainable,
        lora=lora,
    )


def method_options(adapter_config: PeftConfig) -> dict[str, Any]:
    """The method's own settings (its spec's params_options but the ranks): LoRTA's modes, TensLoRA's construction
    and decomposition."""
    spec = next((s for s in method_specs().values() if isinstance(adapter_config, s.config_cls)), None)
    names = [n for n in spec.params_options if n != "ranks"] if spec is not None else []
    values = {n: getattr(adapter_config, n) for n in names}
    return {n: list(v) if isinstance(v, (list, tuple)) else v for n, v in values.items()}


# -------------------------------------------------------------------------------------------------- budget search
def closed_form(
    config: PretrainedConfig, method: str, *, targets: Sequence[str] | None = None, **options: Any
) -> Callable[[int], int]:
    """rank -> trainable count from the method's closed form, its sizes read off the adapted meta model
    (TensLoRA: a uniform rank). LoRA's is Σ r · (d_in + d_out) over the adapted matrices; VeRA's Σ (r + d_out),
    its trainable vectors d and b (the shared random matrices are frozen)."""
    model = adapt(config, method_config(method, 1, targets=targets, **options))
    if method == "lora":
        per_rank = trainable_of(model)
        return lambda r: per_rank * r
    if method == "vera":
        at_one = trainable_of(model)
        matrices = trainable_of(adapt(config, method_config(method, 2, targets=targets))) - at_one
        return lambda r: at_one + matrices * (r - 1)
    spec = method_specs()[method]
    return spec.closed_form(model.base_model.lorta_factors["default"].layout, model.peft_config["default"])


@dataclass(frozen=True)
class Fit:
    """The largest rank within a budget (0 when even rank 1 is over it), its count and the count one rank up."""

    method: str
    rank: int
    trainable: int | None
    next_trainable: int
    targets: list[str]
    options: dict[str, Any]  # as in Comparison


def fit_budget(
    budget: int, config: PretrainedConfig, method: str, *, targets: Sequence[str] | None = None, **options: Any
) -> Fit:
    """Binary search over the closed form (counts grow strictly with the rank), then the meta-device count at the
    answer and one above it must agree with the closed form, so the answer is exact."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ParamsError(f"budget must be a positive integer, got {budget!r}")
    spec = method_specs().get(method)
    if spec is not None and spec.rank_field != "r" and options.get(spec.rank_field) is not None:
        raise ParamsError(f"the budget search uses one uniform {spec.title} rank; do not pass {spec.rank_field}")
    count = closed_form(config, method, targets=targets, **options)
    lo, hi = 0, 1  # count(lo) <= budget < count(hi), with count(0) = 0
    while count(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    exact: dict[int, int] = {}
    for r in (lo, lo + 1) if lo else (1,):
        model = adapt(config, method_config(method, r, targets=targets, **options))
        exact[r] = trainable_of(model)
        if exact[r] != count(r):
            raise RuntimeError(
                f"{METHOD_TITLES[method]} closed form gives {count(r)} at rank {r} but the model trains {exact[r]}"
            )
    adapter_config = model.peft_config["default"]
    return Fit(method, lo, exact.get(lo), exact[lo + 1], resolved_targets(model), method_options(adapter_config))


def largest_rank_within(
    budget: int,
    config: PretrainedConfig,
    method: str = "lorta",
    *,
    targets: Sequence[str] | None = None,
    **options: Any,
) -> int:
    """The largest rank whose exact trainable count is at most `budget` (0 when rank 1 already exceeds it)."""
    return fit_budget(budget, config, method, targets=targets, **options).rank
