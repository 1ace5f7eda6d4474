"""A tensor adapter fitted to low-rank updates by least squares: what lorta.import_lora (a LoRA's updates) and
add_weighted_adapter's compression (a weighted sum of adapters, lorta.arithmetic) run. A LoRA update in lorta's
orientation, the adapted layers of a tuner, the error of a fit, its Adam refinement, and CP-ALS of the stacked
updates, LoRTA's closed start.

Nothing here knows a method by name: a method's factors offer their closed start (``Factorization.fit_start``).
Every function takes the tuner (a PeftModel's ``base_model``) and the adapter being fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layout import IN_HEADS, OUT_HEADS
from .tuner.layer import TensorAdapterLayer
from .tuner.maps import module_maps


class ImportLoraError(ValueError):
    """The LoRA adapter cannot be imported; the message names what and how to proceed."""


@dataclass
class LoraUpdate:
    """One module's LoRA update in lorta's (in, out) orientation: U @ V, U: d_in x r, V: r x d_out (float64)."""

    U: Tensor
    V: Tensor
    norm2: float = field(init=False)  # ||U V||_F^2, from r x r products

    def __post_init__(self) -> None:
        self.norm2 = float(torch.trace((self.U.t() @ self.U) @ (self.V @ self.V.t())))

    def dense(self) -> Tensor:
        return self.U @ self.V


def adapted_layers(tuner: nn.Module, adapter: str | None = None) -> dict[str, TensorAdapterLayer]:
    """{path: layer} of the tuner's wrapped layers (those adapting `adapter`, where one is named)."""
    return {
        p: m
        for p, m in tuner.model.named_modules()
        if isinstance(m, TensorAdapterLayer) and (adapter is None or adapter in m.lorta_slots)
    }


@dataclass
class Slices:
    """The observed frontal slices T[:, :, h, l, m] = X_s @ Y_s (d x d_h, rank <= r) of the update tensor: the
    LoRA's own factors per head, so CP-ALS never forms the dense d x d_h x H x L x M tensor. Slices absent (GQA's
    unshared K/V heads, matrices a layer lacks) are unobserved, and the fit leaves them out exactly."""

    shape: tuple[int, int, int, int, int]  # (d, d_h, H, L, M)
    X: Tensor  # S x d x r
    Y: Tensor  # S x r x d_h
    index: Tensor  # S x 3: (h, l, m) of each slice

    @property
    def norm2(self) -> float:
        """||T||^2 over the observed slices: sum_s tr(X_s^T X_s Y_s Y_s^T)."""
        return float(((self.X.transpose(1, 2) @ self.X) * (self.Y @ self.Y.transpose(1, 2))).sum())


def tensor_slices(tuner: nn.Module, updates: dict[str, LoraUpdate], adapter: str = "default") -> Slices | None:
    """The LoRA's updates as LoRTA's 5-way tensor (Slices); None where the adapter is not LoRTA's full tensor over
    attention matrices. A fused module's update is split back into its matrices (undoing an interleave)."""
    factors = tuner.lorta_factors[adapter]
    if not all(getattr(factors, f"share_{mode}", False) for mode in ("heads", "layers", "matrices")):
        return None
    layers = adapted_layers(tuner, adapter)
    for module in layers.values():
        slots = module.lorta_slots[adapter]
        if any(s.role not in (OUT_HEADS, IN_HEADS) for s in slots) or (
            len(slots) > 1 and any(s.role != OUT_HEADS for s in slots)
        ):
            return None
    layout = factors.layout
    d, d_h = layout.model_dim, layout.shape.head_dim
    r = max(u.U.shape[1] for u in updates.values())
    X, Y, index = [], [], []
    for path, module in layers.items():
        U, V = updates[path].U, concatenated_columns(module, updates[path].V)
        pad = r - U.shape[1]
        U, V = nn.functional.pad(U, (0, pad)), nn.functional.pad(V, (0, 0, 0, pad))  # zero rank: same update
        for slot in module.lorta_slots[adapter]:
            for j in range(slot.n_heads):
                if slot.role == OUT_HEADS:  # the head's output columns: U @ V[:, cols]
                    start = slot.out_offset + j * d_h
                    X.append(U), Y.append(V[:, start : start + d_h])
                else:  # the head's input rows, transposed: (U[rows] @ V)^T = V^T @ U[rows]^T
                    X.append(V.t()), Y.append(U[j * d_h : (j + 1) * d_h].t())
                index.append((j * slot.head_stride, slot.layer, slot.matrix))
    shape = (d, d_h, layout.shape.num_heads, layout.num_layers, layout.num_matrices)
    return Slices(shape, torch.stack(X), torch.stack(Y), torch.tensor(index))


# ----------------------------------------------------------------------------------------------- the fit
def squared_errors(tuner: nn.Module, updates: dict[str, LoraUpdate], adapter: str = "default") -> dict[str, Tensor]:
    """|| scale P Q - U V ||_F^2 of each module, from r x r products (differentiable in the factors)."""
    errors = {}
    for path, layer in adapted_layers(tuner, adapter).items():
        factors = layer.adapter_factors(adapter)
        P, Q, _ = module_maps(factors, layer.lorta_slots[adapter], layer.lorta_out_order)
        target = updates[path]
        U, V = target.U.to(P.dtype), target.V.to(P.dtype)
        s = layer.lorta_scaling[adapter]
        fit2 = s * s * torch.trace((P.t() @ P) @ (Q @ Q.t()))
        cross = s * torch.trace((U.t() @ P) @ (Q @ V.t()))
        errors[path] = fit2 - 2 * cross + target.norm2
    return errors


def relative_errors(
    tuner: nn.Module, updates: dict[str, LoraUpdate], adapter: str = "default"
) -> tuple[dict[str, float], float]:
    """Per-module and overall ||fit - LoRA|| / ||LoRA||, in float64 with the dense updates (the final report)."""
    per_module, num, den = {}, 0.0, 0.0
    with torch.no_grad():
        for path, layer in adapted_layers(tuner, adapter).items():
            factors = layer.adapter_factors(adapter)
            P, Q, _ = module_maps(factors, layer.lorta_slots[adapter], layer.lorta_out_order)
            fit = (P.double() @ Q.double()) * layer.lorta_scaling[adapter]
            want = updates[path].dense()
            err, ref = float((fit - want).norm() ** 2), float(want.norm() ** 2)
            per_module[path] = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
            num, den = num + err, den + ref
    return per_module, math.sqrt(num / den) if den > 0 else math.sqrt(num)


def refine(
    tuner: nn.Module, updates: dict[str, LoraUpdate], steps: int, lr: float = 1e-2, adapter: str = "default"
) -> list[float]:
    """Adam on the total squared error relative to the updates', through the maps; keeps the best factors seen."""
    factors = tuner.lorta_factors[adapter]
    params = [p for p in factors.parameters() if p.requires_grad]
    total = sum(u.norm2 for u in updates.values())
    history: list[float] = []
    if steps <= 0 or not params:
        return history
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    best, best_state = math.inf, None
    for step in range(steps):
        optimizer.zero_grad()
        loss = sum(squared_errors(tuner, updates, adapter).values()) / total
        value = float(loss.detach())
        if value < best:
            best, best_state = value, [p.detach().clone() for p in params]
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 20) == 0:
            history.append(math.sqrt(max(value, 0.0)))
    with torch.no_grad():
        for p, saved in zip(params, best_state, strict=True):
            p.copy_(saved)
    return history


def shrink_start(tuner: nn.Module, updates: dict[str, LoraUpdate], adapter: str = "default") -> None:
    """Scale the random start so that its updates have the LoRA's overall size. The update is a product of the
    trainable factors, so scaling all of them by c scales it by c^k; k is measured (c = 2), not assumed."""
    params = [p for p in tuner.lorta_factors[adapter].parameters() if p.requires_grad]
    empty = {p: LoraUpdate(u.U[:, :0], u.V[:0]) for p, u in updates.items()}
    target = sum(u.norm2 for u in updates.values()) ** 0.5
    with torch.no_grad():
        size = float(sum(squared_errors(tuner, empty, adapter).values())) ** 0.5
        if size <= 0 or target <= 0 or not params:
            return
        for p in params:
            p.mul_(2.0)
        degree = math.log2(float(sum(squared_errors(tuner, empty, adapter).values())) ** 0.5 / size)
        factor = (target / size) ** (1 / max(degree, 1.0)) / 2.0
        for p in params:
            p.mul_(factor)


def fit_updates(
    tuner: nn.Module,
    updates: dict[str, LoraUpdate],
    adapter: str,
    seed: int = 0,
    iterations: int = 500,
    steps: int | None = None,
) -> tuple[int, list[float]]:
    """Fit the tuner's `adapter` (float64 factors) to `updates`: the method's closed start where it has one
    (`Factorization.fit_start`: LoRTA's CP-ALS, TLoRA's SVD), else a shrunk random start and `steps` of Adam
    (default 3000; 0 after a closed start, which already solves the same least squares). Returns (steps, the
    relative error every few steps)."""
    started = tuner.lorta_factors[adapter].fit_start(tuner, updates, seed, iterations, adapter)
    if not started:
        shrink_start(tuner, updates, adapter)
    if steps is None:
        steps = 0 if started else 3000
    return steps, refine(tuner, updates, steps, adapter=adapter)


def cp_als(
    data: Slices,
    rank: int,
    iterations: int = 500,
    seed: int = 0,
    tol: float = 1e-6,
    init: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[float]]:
    """CP by alternating least squares over the observed slices: (factors [A, B, C_H, C_L, C_M], relative error
    after each sweep). Each step solves its factor's normal equations exactly (no imputation of unobserved
    slices); every contraction goes through the slices' rank-r factors, so a sweep costs O(S r R (d + d_h) + S R^2)
    for S slices, not O(R) times the dense tensor's size as a dense MTTKRP does."""
    generator = torch.Generator().manual_seed(seed)
    F = (
        [f.clone() for f in init]
        if init is not None
        else [torch.randn(n, rank, generator=generator, dtype=torch.float64) / math.sqrt(n) for n in data.shape]
    )
    X, Y, index = data.X, data.Y, data.index
    total = data.norm2
    history: list[float] = []

    def coefficients(skip: int) -> Tensor:  # S x R: the product of the mode factors' rows, one mode left out
        out = torch.ones(len(index), rank, dtype=torch.float64)
        for mode in (2, 3, 4):
            if mode != skip:
                out = out * F[mode][index[:, mode - 2]]
        return out

    def ridge(G: Tensor) -> Tensor:  # keeps a factor row no slice observes (and exact degeneracies) solvable
        diag = G.diagonal(dim1=-2, dim2=-1)
        return G + torch.diag_embed(diag.amax(-1, keepdim=True).clamp_min(1e-300).expand_as(diag) * 1e-13)

    for _ in range(iterations):
        c = coefficients(-1)
        YB = Y @ F[1]  # S x r x R
        rhs = torch.einsum("sdr,srk,sk->dk", X, YB, c)
        F[0] = torch.linalg.solve(ridge((c.t() @ c) * (F[1].t() @ F[1])), rhs.t()).t()
        XA = X.transpose(1, 2) @ F[0]
        rhs = torch.einsum("sre,srk,sk->ek", Y, XA, c)
        F[1] = torch.linalg.solve(ridge((c.t() @ c) * (F[0].t() @ F[0])), rhs.t()).t()
        YB = Y @ F[1]
        z = (XA * YB).sum(1)  # S x R: A_k^T T_s B_k
        gram = (F[0].t() @ F[0]) * (F[1].t() @ F[1])
        for mode in (2, 3, 4):
            c = coefficients(mode)
            rows = index[:, mode - 2]
            n = data.shape[mode]
            G = torch.zeros(n, rank, rank, dtype=torch.float64).index_add_(0, rows, c[:, :, None] * c[:, None, :])
            rhs = torch.zeros(n, rank, dtype=torch.float64).index_add_(0, rows, c * z)
            F[mode] = torch.linalg.solve(ridge(G * gram), rhs.unsqueeze(-1)).squeeze(-1)
        c = coefficients(-1)
        error2 = total - 2 * float((c * z).sum()) + float(((c @ gram) * c).sum())
        history.append(math.sqrt(max(error2, 0.0) / total) if total > 0 else 0.0)
        if len(history) > 1 and abs(history[-2] - history[-1]) <= tol * max(history[-1], 1e-12):
            break
    return F, history


def best_cp(
    data: Slices, rank: int, iterations: int = 500, seed: int = 0, restarts: int = 4, probe: int = 30
) -> tuple[list[Tensor], list[float]]:
    """cp_als from `restarts` random starts, `probe` sweeps each, then the best one run to `iterations`: CP-ALS
    can stall in a swamp (diverging, cancelling rank-one terms) from one start and not from another."""
    starts = [cp_als(data, rank, min(probe, iterations), seed + i) for i in range(max(1, restarts))]
    factors, history = min(starts, key=lambda start: start[1][-1])
    if iterations > probe:
        factors, more = cp_als(data, rank, iterations - probe, init=factors)
        history = history + more
    return factors, history


def cp_start(tuner: nn.Module, updates: dict[str, LoraUpdate], seed: int, iterations: int, adapter: str) -> bool:
    """LoRTA's factors from CP-ALS of the stacked updates dW[:, :, h, l, m] (cp_als); False where the adapter is
    not LoRTA's 5-mode tensor over attention matrices (the Adam fit then starts from the random init)."""
    data = tensor_slices(tuner, updates, adapter)
    if data is None:
        return False
    factors = tuner.lorta_factors[adapter]
    columns, _ = best_cp(data, factors.rank, iterations, seed)
    # balance: every factor column gets the same norm, the rank-one term's size split five ways
    norms = torch.stack([c.norm(dim=0) for c in columns]).clamp_min(1e-300)
    size = norms.prod(0) ** (1 / 5)
    columns = [c / n * size for c, n in zip(columns, norms, strict=True)]
    scale = next(iter(adapted_layers(tuner, adapter).values())).lorta_scaling[adapter]
    with torch.no_grad():
        dtype = factors.A.dtype
        factors.A.copy_((columns[0] / scale).to(dtype).view_as(factors.A))
        factors.B.copy_(columns[1].to(dtype).view_as(factors.B))
        factors.C_H.copy_(columns[2].to(dtype).view_as(factors.C_H))
        factors.C_L.copy_(columns[3].to(dtype).view_as(factors.C_L))
        factors.C_M.copy_(columns[4].to(dtype).view_as(factors.C_M))
    return True


def concatenated_columns(module: TensorAdapterLayer, columns: Tensor) -> Tensor:
    """A fused module's output columns in the concatenated [q | k | v] order of its slots (undoing an interleave:
    the module's column i is the concatenated column order[i])."""
    order = module.lorta_out_order
    if order is None:
        return columns
    out = torch.empty_like(columns)
    out[:, order.to(columns.device)] = columns
    return out
