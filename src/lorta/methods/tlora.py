"""TLoRA: frozen random A and B, a trainable r × r core and a learnable scale per adapted matrix.

(docs/design.md, "The methods")

    dW_{l,m} = s_{l,m} · A_{l,m} · C_{l,m} · B_{l,m}        A: d_in × r, B: r × d_out frozen; C: r × r, s: scalar
    #params = M · L · (r² + 1)        (r² + 1 per adapted matrix)

In engine terms P = A and Q = s · C · B, so the forward is a rank-r LoRA with one extra r × r product.
A and B are drawn from `projection_seed` with torch's CPU generator, in a fixed order (matrix by matrix, layer by
layer), so they can be saved as tensors (`save_projection=True`, the default) or rebuilt from the seed.
Initialisation: C = 0 (the update starts at zero), s = 1; A ~ U(-1/√d_in, 1/√d_in), B ~ U(-1/√r, 1/√r)
(PEFT VeRA's kaiming-uniform draws).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..architectures import targets_of_kinds
from ..factorization import Factorization
from ..layout import Slot, TensorLayout
from ..lora_fit import ImportLoraError, LoraUpdate, adapted_layers, concatenated_columns
from ..spec import MethodSpec, Recipe
from ..tuner.config import MethodType, TensorAdapterConfig
from ..tuner.model import TensorAdapterModel

TLORA_DEFAULT_TARGETS = ("q", "v")  # the paper's GLUE setting
TLORA = MethodType("TLORA")


@dataclass
class TLoraConfig(TensorAdapterConfig):
    """TLoRA: A, B frozen random (from a seed), trainable r × r core C and scale s per adapted matrix.

    Example: ``TLoraConfig(r=32, target_modules=["query", "value"])`` on RoBERTa-large: 49,200 parameters.
    """

    projection_seed: int = field(default=0, metadata={"help": "Seed of the frozen random A and B."})
    save_projection: bool = field(
        default=True, metadata={"help": "Save A and B in the adapter file (True) or only the seed (False)."}
    )

    def __post_init__(self) -> None:
        self.peft_type = TLORA
        super().__post_init__()
        if not self.save_projection:
            warnings.warn(
                "save_projection=False stores only the seed of TLoRA's frozen A and B; loading regenerates them "
                "with torch's CPU generator, which is not guaranteed to give the same numbers on every platform "
                "or torch version. Keep save_projection=True for adapters you share.",
                UserWarning,
                stacklevel=3,
            )


class TLoraFactors(Factorization):
    """One row per adapted matrix: frozen A_m (L_m, d_in, r) and B_m (L_m, r, d_out) per matrix kind m (L_m: the
    layers that have kind m); trainable C (S, r, r) and s (S,) over the S adapted matrices, kind by kind, so a kind
    present in some layers only (a decoder's cross-attention) holds no value that cannot train."""

    def __init__(self, config: TLoraConfig, layout: TensorLayout) -> None:
        super().__init__(config, layout)
        r = config.r
        self.rank = r
        self.seed = config.projection_seed
        self.sizes: dict[int, tuple[int, int]] = {}
        layers: dict[int, set[int]] = {}
        for slots in layout.slots.values():
            for slot in slots:
                self.sizes[slot.matrix] = (slot.in_features, slot.out_features)
                layers.setdefault(slot.matrix, set()).add(slot.layer)
        self.rows: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, matrix) -> (row of C and s, row of A_m)
        self.spans: dict[int, tuple[int, int]] = {}  # matrix -> its rows of C and s
        start = 0
        for m in sorted(layers):
            ordered = sorted(layers[m])
            self.spans[m] = (start, start + len(ordered))
            for j, layer in enumerate(ordered):
                self.rows[(layer, m)] = (start + j, j)
            start += len(ordered)
            d_in, d_out = self.sizes[m]
            self.register_buffer(f"A{m}", torch.empty(len(ordered), d_in, r), persistent=config.save_projection)
            self.register_buffer(f"B{m}", torch.empty(len(ordered), r, d_out), persistent=config.save_projection)
        self.C = nn.Parameter(torch.empty(start, r, r))
        self.s = nn.Parameter(torch.empty(start))
        # Created on the meta device (low_cpu_mem_usage) with projections that are not in the file: they are
        # rebuilt from the seed on first use, whenever the buffers have left the meta device.
        self._draw_pending = self.C.is_meta and not config.save_projection
        self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, init_weights: bool) -> None:
        if self.C.is_meta:
            return
        self.draw_projections()
        self._draw_pending = False
        nn.init.ones_(self.s)
        nn.init.zeros_(self.C) if init_weights else nn.init.normal_(self.C, 0.0, 0.5)

    @torch.no_grad()
    def draw_projections(self) -> None:
        """Regenerate the frozen A and B from the seed (CPU generator, fixed order: kind by kind, layer by layer)."""
        generator = torch.Generator().manual_seed(self.seed)
        for m, (d_in, _) in sorted(self.sizes.items()):
            A, B = getattr(self, f"A{m}"), getattr(self, f"B{m}")
            # drawn on the CPU whatever the target device, so the same seed gives the same projections everywhere
            a = (torch.rand(A.shape, generator=generator, dtype=torch.float64, device="cpu") * 2 - 1) / math.sqrt(d_in)
            b = torch.rand(B.shape, generator=generator, dtype=torch.float64, device="cpu") * 2 - 1
            b = b / math.sqrt(self.rank)
            A.copy_(a)
            B.copy_(b)

    def maps(self, slot: Slot) -> tuple[Tensor, Tensor]:
        """P = A and Q = s · C · B of one matrix (its own product only: a module's direct call keeps thin tensors)."""
        self._draw_if_pending()
        i, j = self.rows[(slot.layer, slot.matrix)]
        A, B = getattr(self, f"A{slot.matrix}")[j], getattr(self, f"B{slot.matrix}")[j]
        return A, (self.s[i] * self.C[i]) @ B

    def maps_many(self, slots: list[Slot], indices: dict | None = None) -> list[tuple[Tensor, Tensor]]:
        """`maps` batched: every layer's Q = s · C · B of a matrix kind in one product, handed out by `unbind`."""
        self._draw_if_pending()
        Q = {}
        for m in sorted({slot.matrix for slot in slots}):
            start, end = self.spans[m]
            Q[m] = ((self.s[start:end, None, None] * self.C[start:end]) @ getattr(self, f"B{m}")).unbind(0)
        out = []
        for slot in slots:
            j = self.rows[(slot.layer, slot.matrix)][1]
            out.append((getattr(self, f"A{slot.matrix}")[j], Q[slot.matrix][j]))
        return out

    exact_concatenation = True

    def config_at_rank(self, config: Any, rank: int) -> Any:
        """A combined adapter's projections are the parts' side by side, a compressed one's singular bases: not a
        draw from a seed, so they are saved."""
        return dataclasses.replace(super().config_at_rank(config, rank), save_projection=True)

    def fit_start(self, tuner: nn.Module, updates: dict, seed: int, iterations: int, adapter: str) -> bool:
        return _svd_start(self, tuner, updates, seed, adapter)

    def concatenate(self, parts: list[tuple[Factorization, float]]) -> dict[str, Tensor]:
        """P'Q' = [A_1 .. A_n] blockdiag(w_i s_i C_i) [B_1; ..; B_n] = sum_i w_i s_i A_i C_i B_i, with s' = 1."""
        for part, _ in parts:
            part._draw_if_pending()  # seed-only projections loaded lazily
        out: dict[str, Tensor] = {}
        for m in self.sizes:
            out[f"A{m}"] = torch.cat([getattr(part, f"A{m}") for part, _ in parts], dim=-1)
            out[f"B{m}"] = torch.cat([getattr(part, f"B{m}") for part, _ in parts], dim=1)
        C = torch.block_diag  # one (R x R) block-diagonal core per adapted matrix
        out["C"] = torch.stack([C(*(w * part.s[i] * part.C[i] for part, w in parts)) for i in range(self.C.shape[0])])
        out["s"] = torch.ones_like(self.s)
        return out

    def _draw_if_pending(self) -> None:
        if self._draw_pending and not self.A0.is_meta:
            self._draw_pending = False
            self.draw_projections()


def tlora_num_params(L: int, M: int, r: int, matrices: int | None = None) -> int:
    """M * L * (r^2 + 1); `matrices`: the number of adapted matrices when not every layer has every kind."""
    return (M * L if matrices is None else matrices) * (r * r + 1)


def _svd_start(
    factors: TLoraFactors, tuner: nn.Module, updates: dict[str, LoraUpdate], seed: int, adapter: str
) -> bool:
    """TLoRA's factors in closed form: each matrix's frozen A and B become the leading singular bases of its LoRA
    update and C the singular values, the best rank-r fit of every matrix (Eckart-Young), exact at r >= the LoRA's
    rank. The update's SVD comes from QR of its two thin factors (no dense d x d matrix); a basis the update does
    not fill is completed by random orthonormal columns. The projections are saved with the adapter."""
    generator = torch.Generator().manual_seed(seed)
    r = factors.rank
    with torch.no_grad():
        factors.s.fill_(1.0)
        for path, module in adapted_layers(tuner, adapter).items():
            update = updates[path]
            V = concatenated_columns(module, update.V)
            for slot in module.lorta_slots[adapter]:
                left, values, right = _thin_svd(update.U, V[:, slot.out_offset : slot.out_offset + slot.out_features])
                row, j = factors.rows[(slot.layer, slot.matrix)]
                getattr(factors, f"A{slot.matrix}")[j] = _complete(left[:, :r], r, generator)
                getattr(factors, f"B{slot.matrix}")[j] = _complete(right[:, :r], r, generator).t()
                core = torch.zeros(r, r, dtype=torch.float64)
                k = min(r, values.numel())
                core[:k, :k] = torch.diag(values[:k])
                factors.C[row] = core / module.lorta_scaling[adapter]
    return True  # the best rank-r fit of every matrix: nothing left to refine


def _thin_svd(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(left, singular values, right) of U @ V (U: n x k, V: k x m), from QR of U and V^T and a k x k SVD."""
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V.t())
    X, values, Yt = torch.linalg.svd(Ru @ Rv.t())
    return Qu @ X, values, Qv @ Yt.t()


def _complete(basis: Tensor, r: int, generator: torch.Generator) -> Tensor:
    """`basis` (n x k orthonormal, k <= r) with r - k random orthonormal columns orthogonal to it."""
    n, k = basis.shape
    if k >= r:
        return basis
    extra = torch.randn(n, r - k, generator=generator, dtype=basis.dtype)
    extra = extra - basis @ (basis.t() @ extra)
    return torch.cat([basis, torch.linalg.qr(extra)[0]], dim=1)


def _import_check(kwargs: dict) -> None:
    if not kwargs.get("save_projection", True):
        raise ImportLoraError(
            "an imported TLoRA's projections are the LoRA's singular bases, not a seed's draw: "
            "they must be saved (save_projection=True)"
        )


class TLoraModel(TensorAdapterModel):
    """The PEFT tuner of TLoRA (`lorta.tuner.model.TensorAdapterModel` with TLoRA's factors)."""

    factorization_cls = TLoraFactors
    default_kinds = TLORA_DEFAULT_TARGETS
    target_module_mapping = targets_of_kinds(default_kinds)


SPEC = MethodSpec(
    name="tlora",
    title="TLoRA",
    peft_type=TLORA,
    config_cls=TLoraConfig,
    factors_cls=TLoraFactors,
    tuner_cls=TLoraModel,
    closed_form=lambda layout, config: (
        lambda r: tlora_num_params(
            L=layout.num_layers, M=layout.num_matrices, r=r, matrices=sum(len(s) for s in layout.slots.values())
        )
    ),
    classify=Recipe(16, 16.0, 1e-2, 2e-3),
    causal_lm=Recipe(16, 16.0, 2e-3, 0.0),
    train_kwargs=lambda values, o: {"projection_seed": o.seed},
    import_check=_import_check,
    bench_config=lambda r, alpha, targets, shape: TLoraConfig(r=r, lora_alpha=alpha, target_modules=targets),
)
