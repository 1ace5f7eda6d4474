"""Fields every tensor adapter shares; each method's config adds its factorisation's own knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig


@dataclass
class TensorAdapterConfig(PeftConfig):
    """Common configuration of the lorta family (LoRA-compatible names where the meaning is the same).

    `model_shape` and `matrix_names` are filled in when the adapter is created and saved with it, so that loading
    it onto a base model of another shape fails with a clear error instead of silently mis-indexing heads.
    """

    r: int = field(default=8, metadata={"help": "Rank of the tensor decomposition."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex; default: the attention matrices of the model."},
    )
    exclude_modules: list[str] | str | None = field(default=None)
    lora_alpha: float = field(default=16.0, metadata={"help": "Scale numerator: scale = alpha / r."})
    use_rslora: bool = field(default=False, metadata={"help": "Use alpha / sqrt(r) (rank-stabilised) scaling."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: the update starts at zero. False: random, for tests only."}
    )
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    target_parameters: list[str] | None = field(default=None)
    bias: str = field(default="none")
    model_shape: dict[str, Any] | None = field(
        default=None, metadata={"help": "Base model shape (filled on creation, checked on load)."}
    )
    matrix_names: list[str] | None = field(
        default=None, metadata={"help": "The matrices mode, in order (filled on creation, checked on load)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("r", self.r)
        if isinstance(self.target_modules, list):
            self.target_modules = sorted(set(self.target_modules))
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported by lorta methods; use bias='none'")

    def scale_for(self, rank: int) -> float:
        """LoRA's alpha / r, or rsLoRA's alpha / sqrt(r)."""
        return float(self.lora_alpha) / (math.sqrt(rank) if self.use_rslora else rank)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
