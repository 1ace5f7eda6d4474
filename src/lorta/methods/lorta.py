"""LoRTA (the LoRTA paper §3.2; docs/design.md, "The methods"): all attention updates as ONE rank-r CP tensor.

    dW[:, :, h, l, m] = A · Diag(C_H[h] ∘ C_L[l] ∘ C_M[m]) · Bᵀ
    A: d×r (model dim), B: d_h×r (head dim), C_H: H×r, C_L: L×r, C_M: M×r
    #params = (d + d_h + H + L + M) · r

`modes` chooses which of heads / layers / matrices are shared tensor modes (paper Table 4, Appendix D). A mode
that is not shared splits the tensor into separate tensors along it: without "layers" every layer has its own
CP tensor, without "matrices" every matrix has its own, without "heads" the head side is one d_out-long factor
(no head mode). With no modes at all each matrix gets a plain rank-r factorisation A·Diag(1)·Bᵀ, i.e. LoRA.

Factor storage: every factor carries two leading "group" axes (GL, GM) = (1 if layers is a mode else L,
1 if matrices is a mode else M), so one code path serves every mode combination. Extra (non-attention)
matrices get an own-side factor B_extra<m> (GL, n, r); a free extra (no side of size d) also A_extra<m>.

Initialisation: A ~ U(-1/√d, 1/√d) (PEFT LoRA's A), B = 0 (so the update starts at exactly zero), and C_H, C_L,
C_M random signs ±1 (`mode_factor_init="signs"`, the default). With C = 1 (`"ones"`) every head, layer and matrix
starts on the same direction A·Bᵀ: q and k then move together (their product adds one positive-semidefinite
attention pattern to every head of every layer). Random signs give each head, layer and matrix its own mix of the
r rank-one terms from the first step, at the same magnitudes (measured in docs/results.md, "Recipe trials").
"""

from __future__ import annotations

import argparse
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..factorization import Factorization, concat_ranks, gather_groups, head_maps, slot_index
from ..layout import IN_HEADS, OUT_HEADS, Slot, TensorLayout
from ..lora_fit import cp_start
from ..spec import CliOption, MethodSpec, Recipe
from ..tuner.config import MethodType, TensorAdapterConfig
from ..tuner.model import TensorAdapterModel

LORTA_MODES = ("heads", "layers", "matrices")
MODE_FACTOR_INITS = ("signs", "ones")
DEFAULT_MODE_FACTOR_INIT = "signs"
LORTA = MethodType("LORTA")


@dataclass
class LortaConfig(TensorAdapterConfig):
    """LoRTA: one CP tensor over model dim, head dim, heads, layers and matrices.

    Example: ``get_peft_model(model, LortaConfig(r=8, lora_alpha=16))`` adapts q, k, v, o of every layer with
    (d + d_h + H + L + 4) * 8 trainable parameters.
    """

    modes: list[str] = field(
        default_factory=lambda: list(LORTA_MODES),
        metadata={"help": "Shared tensor modes, any subset of heads, layers, matrices (default: all three)."},
    )

    mode_factor_init: str = field(
        default=DEFAULT_MODE_FACTOR_INIT,
        metadata={
            "help": "Initial C_H, C_L, C_M: 'signs' (random +-1: heads, layers and matrices start on different mixes "
            "of the rank-one terms; the default) or 'ones' (all start identical)."
        },
    )

    def __post_init__(self) -> None:
        self.peft_type = LORTA
        super().__post_init__()
        if isinstance(self.modes, str):
            self.modes = [self.modes]
        if self.mode_factor_init not in MODE_FACTOR_INITS:
            raise ValueError(f"mode_factor_init={self.mode_factor_init!r} is not one of {list(MODE_FACTOR_INITS)}")
        unknown = [m for m in self.modes if m not in LORTA_MODES]
        if unknown:
            raise ValueError(f"unknown LoRTA mode(s) {unknown}; expected a subset of {list(LORTA_MODES)}")
        self.modes = [m for m in LORTA_MODES if m in self.modes]


class LortaFactors(Factorization):
    """The CP factors A, B, C_H, C_L, C_M of one LoRTA adapter (see module docstring for shapes).

    Only factors that some adapted matrix reads exist: no A when no matrix has a model-dimension side, no B or C_H
    without head-structured matrices (a model without attention heads).
    """

    batched = True
    model_input = "A"

    def __init__(self, config: LortaConfig, layout: TensorLayout) -> None:
        super().__init__(config, layout)
        shape, r = layout.shape, config.r
        self.rank = r
        self.mode_factor_init = config.mode_factor_init
        self.share_heads = "heads" in config.modes
        self.share_layers = "layers" in config.modes
        self.share_matrices = "matrices" in config.modes
        gl, gm = self._group_counts(self.share_layers, self.share_matrices)
        heads = layout.has_head_slots
        head_side = shape.head_dim if self.share_heads else shape.num_heads * shape.head_dim
        self.A = nn.Parameter(torch.empty(gl, gm, layout.model_dim, r)) if layout.uses_model_dim else None
        self.B = nn.Parameter(torch.empty(gl, gm, head_side, r)) if heads else None
        self.C_H = nn.Parameter(torch.empty(gl, gm, shape.num_heads, r)) if heads and self.share_heads else None
        self.C_L = nn.Parameter(torch.empty(gm, layout.num_layers, r)) if self.share_layers else None
        self.C_M = nn.Parameter(torch.empty(gl, layout.num_matrices, r)) if self.share_matrices else None
        for m, name in enumerate(layout.matrix_names):
            if name in layout.extra_sizes:
                self.extra_names[m] = f"B_extra{m}"
                self.register_parameter(f"B_extra{m}", nn.Parameter(torch.empty(gl, layout.extra_sizes[name], r)))
            elif name in layout.free_sizes:
                n_in, n_out = layout.free_sizes[name]
                self.extra_names[m], self.free_inputs[m] = f"B_extra{m}", f"A_extra{m}"
                self.register_parameter(f"A_extra{m}", nn.Parameter(torch.empty(gl, n_in, r)))
                self.register_parameter(f"B_extra{m}", nn.Parameter(torch.empty(gl, n_out, r)))
        self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, init_weights: bool) -> None:
        if next(self.parameters()).is_meta:
            return
        self._init_inputs()
        for p in (self.C_H, self.C_L, self.C_M):
            if p is None:
                continue
            if not init_weights:
                nn.init.normal_(p, 1.0, 0.5)
            elif self.mode_factor_init == "signs":
                p.copy_(torch.randint(0, 2, p.shape, device=p.device, dtype=p.dtype) * 2 - 1)
            else:
                nn.init.ones_(p)
        for p in [self.B, *(getattr(self, n) for n in self.extra_names.values())]:
            if p is not None:
                nn.init.zeros_(p) if init_weights else nn.init.normal_(p, 0.0, 0.5)

    @staticmethod
    def _in_group(factor: Tensor, gl: int, gm: int) -> Tensor:
        """factor[gl, gm]; a view when both group axes have size 1 (a select's backward zero-fills a copy)."""
        return factor.view(factor.shape[2:]) if factor.shape[0] == factor.shape[1] == 1 else factor[gl, gm]

    def fit_start(self, tuner: nn.Module, updates: dict, seed: int, iterations: int, adapter: str) -> bool:
        """CP-ALS of the stacked updates (False, and Adam, where the adapter is not the full 5-mode tensor)."""
        return cp_start(tuner, updates, seed, iterations, adapter)

    def _layer_matrix_weights(self, l: Any, m: Any, gl: Any, gm: Any) -> Tensor | None:
        """C_L[l] ∘ C_M[m] (each only if that mode is shared), None if neither is; the layer, matrix and group
        indices are ints (one slot) or index tensors (G slots: (G, r))."""
        c = self.C_L[gm, l] if self.C_L is not None else None
        if self.C_M is not None:
            c = self.C_M[gl, m] if c is None else c * self.C_M[gl, m]
        return c

    def extra_maps(self, slot: Slot) -> tuple[Tensor, Tensor]:
        """An extra matrix: its own side B_extra, the shared (or its own free) input factor, C_L ∘ C_M as core."""
        gl, gm = self._groups(slot)
        c = self._layer_matrix_weights(slot.layer, slot.matrix, gl, gm)
        basis = getattr(self, self.extra_names[slot.matrix])[gl][None]
        core = c[None] if c is not None else torch.ones_like(basis[:, 0])
        own_input = self.free_inputs.get(slot.matrix)
        model_factor = getattr(self, own_input)[gl] if own_input else self._in_group(self.A, gl, gm)
        return head_maps(slot.role, model_factor, basis, core)

    def head_side(self, role: str, heads: slice, index: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """G slots with the same role and heads (G = 1: one matrix):

        core[g] = C_H[heads] ∘ C_L[l_g] ∘ C_M[m_g]      side[g] = B ∘ core[g]      (G, n_heads, d_h, r)
        """
        shape, r, G = self.layout.shape, self.rank, len(index["l"])
        A = gather_groups(self.A, index)  # (G, d, r)
        c = self._layer_matrix_weights(index["l"], index["m"], index["gl"], index["gm"])  # (G, r)
        if self.share_heads:
            core = gather_groups(self.C_H, index)[:, heads]  # (G, n_heads, r)
            core = core * c[:, None] if c is not None else core
            side = gather_groups(self.B, index)[:, None] * core[:, :, None]  # (G, n_heads, d_h, r)
        else:
            side = gather_groups(self.B, index).view(G, shape.num_heads, shape.head_dim, r)[:, heads]
            side = side * c[:, None, None] if c is not None else side
        return A, side

    def factored_keys(self, slot: Slot) -> tuple[Hashable, Hashable] | None:
        """q, k, v: P = A, Q = diag(C_L[l] ∘ C_M[m]) (B ∘ C_H over the slot's heads); o: the transpose. One A and
        one head basis per heads and group serve every layer and matrix."""
        groups = self._groups(slot)
        heads = ("B", slot.n_heads, slot.head_stride, *groups)
        if slot.role == OUT_HEADS:
            return ("A", *groups), heads
        if slot.role == IN_HEADS:
            return heads, ("A", *groups)
        return None

    def _head_basis(self, slot: Slot) -> Tensor:
        """B ∘ C_H over the slot's heads (or B's own heads): (n_heads, d_h, r)."""
        gl, gm = self._groups(slot)
        shape, heads = self.layout.shape, slot.head_slice
        if self.share_heads:
            return self._in_group(self.B, gl, gm)[None] * self._in_group(self.C_H, gl, gm)[heads][:, None]
        return self._in_group(self.B, gl, gm).view(shape.num_heads, shape.head_dim, self.rank)[heads]

    def input_basis(self, slot: Slot) -> Tensor:
        if slot.role == OUT_HEADS:
            return self._in_group(self.A, *self._groups(slot))
        return self._head_basis(slot).reshape(-1, self.rank)  # (n_heads * d_h, r)

    def output_basis(self, slot: Slot) -> Tensor:
        if slot.role == OUT_HEADS:
            return self._head_basis(slot).reshape(-1, self.rank)  # Q0^T: (n_heads * d_h, r), o's input basis
        return self._in_group(self.A, *self._groups(slot))  # Q0^T = A: q, k, v's input basis

    def slot_weights(self, slot: Slot) -> Tensor:
        return self.slots_weights([slot])[0]

    def slots_weights(self, slots: list[Slot]) -> Tensor:
        index = slot_index(self, slots)
        c = self._layer_matrix_weights(index["l"], index["m"], index["gl"], index["gm"])  # (G, r)
        return c if c is not None else self.B.new_ones(len(slots), self.rank)

    exact_concatenation = True
    structure_fields = ("share_heads", "share_layers", "share_matrices")

    def concatenate(self, parts: list[tuple[Factorization, float]]) -> dict[str, Tensor]:
        """Every term of the CP sum reads B (or an extra's B_extra) once: the weights go there."""
        return concat_ranks(parts, ("B", *self.extra_names.values()))


def lorta_num_params(
    d: int,
    d_h: int,
    H: int,
    L: int,
    M: int,
    r: int,
    modes: tuple[str, ...] = LORTA_MODES,
    extra_sizes: tuple[int, ...] = (),
    free_sizes: tuple[tuple[int, int], ...] = (),
) -> int:
    """Closed-form trainable count (paper Table 1 / Table 4), used by `lorta params` and checked by tests.

    L: adapted layers; H = 0: no head-structured matrix; d = 0: no matrix with a model-dimension side."""
    gl = 1 if "layers" in modes else L
    gm = 1 if "matrices" in modes else M
    head_side = ((d_h + H) if "heads" in modes else H * d_h) if H else 0
    per_group = (d + head_side) * r
    total = gl * gm * per_group
    total += gm * L * r if "layers" in modes else 0
    total += gl * M * r if "matrices" in modes else 0
    total += sum(gl * n * r for n in extra_sizes)
    total += sum(gl * (a + b) * r for a, b in free_sizes)
    return total


def parse_modes(text: str) -> list[str]:
    """`lorta params --modes`: 'heads,layers,matrices', any subset, or 'none' for a plain per-matrix factorisation."""
    if text.strip().lower() in ("", "none"):
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def parse_train_modes(text: str) -> tuple[str, ...]:
    """`lorta train --modes`: like `parse_modes`, in LORTA_MODES' order (one run name per set); unknown names are
    kept, at the end, for the config to refuse."""
    names = parse_modes(text)
    return (*(m for m in LORTA_MODES if m in names), *(m for m in names if m not in LORTA_MODES))


def _run_tags(values: Mapping[str, Any]) -> list[str]:
    """The options of a run that differ from the defaults, as they appear in its folder name and label."""
    modes = tuple(values["modes"])
    tags = [] if modes == LORTA_MODES else ["+".join(modes) or "nomodes"]
    return tags + ([] if values["mode_init"] == DEFAULT_MODE_FACTOR_INIT else [f"init{values['mode_init']}"])


class LortaModel(TensorAdapterModel):
    """The PEFT tuner of LoRTA (`lorta.tuner.model.TensorAdapterModel` with LoRTA's factors)."""

    factorization_cls = LortaFactors


SPEC = MethodSpec(
    name="lorta",
    title="LoRTA",
    peft_type=LORTA,
    config_cls=LortaConfig,
    factors_cls=LortaFactors,
    tuner_cls=LortaModel,
    closed_form=lambda layout, config: (
        lambda r: lorta_num_params(**layout.count_sizes(), r=r, modes=tuple(config.modes))
    ),
    # The default job's recipe (its sweeps are in docs/results.md): q, k, v only, alpha 32 at rank 16 (LoRA r=8's
    # scale alpha / r = 2) and at any other rank, the head at 1e-2, and an lr that grows like sqrt(r): at a fixed
    # alpha the scale falls like 1 / r while the r rank-one terms' Adam steps (about the lr each) add up like
    # sqrt(r) if independent, so lr ~ sqrt(r) keeps the update's change per step the same at every rank. The prompt
    # job's 60 short steps want lr 1e-2 at every rank swept; DPO diverges there (its loss rises above log 2) and
    # keeps 1e-3.
    classify=Recipe(16, 32.0, 3e-3, 1e-2, targets=("q", "k", "v"), lr_rank_power=0.5),
    causal_lm=Recipe(16, 16.0, 1e-2, 0.0),
    dpo=Recipe(16, 16.0, 1e-3, 0.0),
    params_options=("modes",),
    cli_options=(
        CliOption("--modes", "modes", "LoRTA shared modes, e.g. heads,layers,matrices or none", type=parse_modes),
    ),
    train_flags=(
        CliOption(
            "--modes",
            "modes",
            "LoRTA: shared tensor modes, a comma-separated subset of heads,layers,matrices, or none",
            type=parse_train_modes,
            default=LORTA_MODES,
        ),
        CliOption(
            "--mode-init",
            "mode_init",
            "LoRTA: initial C_H, C_L, C_M, random signs or all ones",
            choices=MODE_FACTOR_INITS,
            default=DEFAULT_MODE_FACTOR_INIT,
        ),
        CliOption(
            "--mode-lr", "mode_lr", "LoRTA: learning rate of the mode factors C_H, C_L, C_M (default: --lr)", type=float
        ),
    ),
    train_kwargs=lambda values, o: {"modes": list(values["modes"]), "mode_factor_init": values["mode_init"]},
    run_tags=_run_tags,
    factor_groups={"mode_lr": ("C_H", "C_L", "C_M")},
    bench_config=lambda r, alpha, targets, shape: LortaConfig(r=r, lora_alpha=alpha, target_modules=targets),
)
