"""LoRA -> tensor adapter: fit a LoRTA (or TensLoRA, TLoRA) adapter to a PEFT LoRA adapter's updates
(docs/design.md, "Export and import").

The LoRA's update of module m is dW_m = s_m * B_m A_m. The fit minimises the total squared error of the updates,

    sum_m || scale * P_m Q_m - (s_m B_m A_m)^T ||_F^2,

through the tensor adapter's own maps P_m, Q_m, so every method, architecture and fused layout is handled by
the code that runs it. Each term is evaluated from r x r products (||PQ||^2 = tr(P^T P Q Q^T), <PQ, UV> =
tr(U^T P Q V^T)): no dense d x d update is formed while fitting.

Starts: LoRTA (its three modes over attention matrices) from CP by alternating least squares of the stacked
updates dW[:, :, h, l, m] (cp_als: exact least squares over the observed slices, where GQA's K/V heads and absent
matrices leave the tensor unobserved, computed through the LoRA's own factors, never the dense tensor; TensorLy's
`parafac` is its reference in the tests); TLoRA in closed form (its frozen A, B become each update's singular
bases, C its singular values: the best rank-r fit per matrix). Both already solve the least squares; TensLoRA and
LoRTA ablations start from their random initialisation and are fitted by Adam through the maps.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .layout import IN_HEADS, OUT_HEADS
from .saving import write_directory
from .tuner.layer import TensorAdapterLayer
from .tuner.maps import module_maps

METHODS = ("lorta", "tenslora", "tlora")


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


@dataclass
class ImportReport:
    """Relative errors ||fit - LoRA|| / ||LoRA|| per module and overall, with the parameter counts."""

    method: str
    rank: int
    per_module: dict[str, float]
    overall: float
    lora_params: int
    tensor_params: int
    steps: int
    history: list[float] = field(default_factory=list)

    def summary(self) -> str:
        worst = max(self.per_module, key=self.per_module.get)
        return (
            f"{self.method} rank {self.rank}: {self.tensor_params:,} parameters (the LoRA: {self.lora_params:,}); "
            f"relative error of the updates ||fit - LoRA|| / ||LoRA||: overall {self.overall:.4f}, "
            f"worst {self.per_module[worst]:.4f} ({worst})"
        )

    def table(self) -> str:
        width = max(len(m) for m in self.per_module)
        rows = [f"{'module':<{width}}  relative error"]
        rows += [f"{m:<{width}}  {e:.4f}" for m, e in self.per_module.items()]
        return "\n".join(rows + [self.summary()])


# ----------------------------------------------------------------------------------------------- reading the LoRA
def lora_updates(lora_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraUpdate]:
    """{module path: its LoRA update} of a PeftModel holding a LoRA adapter; refuses what is not a plain LoRA."""
    from peft.tuners.lora import LoraLayer

    config = lora_model.peft_config.get(adapter_name)
    kind = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    if kind != "LORA":
        raise ImportLoraError(f"import-lora takes a LoRA adapter; adapter {adapter_name!r} is {kind}")
    for option in ("use_dora", "lora_bias"):
        if getattr(config, option, False):
            raise ImportLoraError(f"the LoRA uses {option}=True, whose update is not B @ A: it cannot be imported")
    updates = {}
    base = lora_model.base_model.model
    for path, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name in getattr(layer, "lora_embedding_A", {}):
            raise ImportLoraError(f"{path} is an embedding LoRA; tensor adapters adapt Linear/Conv1D layers only")
        if adapter_name not in layer.lora_A:
            continue
        A = layer.lora_A[adapter_name].weight.detach().double()  # r x d_in
        B = layer.lora_B[adapter_name].weight.detach().double()  # d_out x r
        updates[path] = LoraUpdate(A.t().contiguous(), (B * layer.scaling[adapter_name]).t().contiguous())
    if not updates:
        raise ImportLoraError(f"adapter {adapter_name!r} adapts no Linear layer")
    return updates


def carried_tensors(lora_model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """What the LoRA file holds besides lora_A/lora_B (trained modules_to_save, biases), under PEFT's keys."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(lora_model, adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in state.items() if ".lora_" not in k}


# ----------------------------------------------------------------------------------------------- the fit
def adapter_config(method: str, rank: int, lora_config: Any, targets: list[str], **kwargs: Any) -> Any:
    """The tensor adapter's config: the LoRA's modules, head and bias; scale alpha / r = 1 (the fit sets sizes)."""
    import lorta

    if method not in METHODS:
        raise ImportLoraError(f"method={method!r} is not one of {list(METHODS)}")
    common = dict(
        target_modules=sorted(targets),
        lora_alpha=float(rank),
        task_type=lora_config.task_type,
        modules_to_save=lora_config.modules_to_save,
        base_model_name_or_path=lora_config.base_model_name_or_path,
        bias={"none": "none", "all": "all", "lora_only": "lorta_only"}[lora_config.bias],
        init_weights=False,
    )
    if method == "lorta":
        return lorta.LortaConfig(r=rank, **common, **kwargs)
    if method == "tenslora":
        return lorta.TensLoraConfig(r=rank, **common, **kwargs)
    if not kwargs.get("save_projection", True):
        raise ImportLoraError(
            "an imported TLoRA's projections are the LoRA's singular bases, not a seed's draw: "
            "they must be saved (save_projection=True)"
        )
    return lorta.TLoraConfig(r=rank, **common, **kwargs)


def _layers(model: nn.Module) -> dict[str, TensorAdapterLayer]:
    return {p: m for p, m in model.base_model.model.named_modules() if isinstance(m, TensorAdapterLayer)}


def squared_errors(model: nn.Module, updates: dict[str, LoraUpdate], adapter: str = "default") -> dict[str, Tensor]:
    """|| scale P Q - U V ||_F^2 of each module, from r x r products (differentiable in the factors)."""
    errors = {}
    for path, layer in _layers(model).items():
        factors = layer.adapter_factors(adapter)
        P, Q, _ = module_maps(factors, layer.lorta_slots[adapter], layer.lorta_out_order)
        target = updates[path]
        U, V = target.U.to(P.dtype), target.V.to(P.dtype)
        s = layer.lorta_scaling[adapter]
        fit2 = s * s * torch.trace((P.t() @ P) @ (Q @ Q.t()))
        cross = s * torch.trace((U.t() @ P) @ (Q @ V.t()))
        errors[path] = fit2 - 2 * cross + target.norm2
    return errors


def relative_errors(model: nn.Module, updates: dict[str, LoraUpdate]) -> tuple[dict[str, float], float]:
    """Per-module and overall ||fit - LoRA|| / ||LoRA||, in float64 with the dense updates (the final report)."""
    per_module, num, den = {}, 0.0, 0.0
    with torch.no_grad():
        for path, layer in _layers(model).items():
            factors = layer.adapter_factors("default")
            P, Q, _ = module_maps(factors, layer.lorta_slots["default"], layer.lorta_out_order)
            fit = (P.double() @ Q.double()) * layer.lorta_scaling["default"]
            want = updates[path].dense()
            err, ref = float((fit - want).norm() ** 2), float(want.norm() ** 2)
            per_module[path] = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
            num, den = num + err, den + ref
    return per_module, math.sqrt(num / den) if den > 0 else math.sqrt(num)


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


def tensor_slices(model: nn.Module, updates: dict[str, LoraUpdate]) -> Slices | None:
    """The LoRA's updates as LoRTA's 5-way tensor (Slices); None where the adapter is not LoRTA's full tensor over
    attention matrices. A fused module's update is split back into its matrices (undoing an interleave)."""
    factors = model.base_model.lorta_factors["default"]
    if type(factors).__name__ != "LortaFactors" or not (
        factors.share_heads and factors.share_layers and factors.share_matrices
    ):
        return None
    layers = _layers(model)
    for module in layers.values():
        slots = module.lorta_slots["default"]
        if any(s.role not in (OUT_HEADS, IN_HEADS) for s in slots) or (
            len(slots) > 1 and any(s.role != OUT_HEADS for s in slots)
        ):
            return None
    layout = factors.layout
    d, d_h = layout.model_dim, layout.shape.head_dim
    r = max(u.U.shape[1] for u in updates.values())
    X, Y, index = [], [], []
    for path, module in layers.items():
        U, V = updates[path].U, _concatenated(module, updates[path].V)
        pad = r - U.shape[1]
        U, V = nn.functional.pad(U, (0, pad)), nn.functional.pad(V, (0, 0, 0, pad))  # zero rank: same update
        for slot in module.lorta_slots["default"]:
            for j in range(slot.n_heads):
                if slot.role == OUT_HEADS:  # the head's output columns: U @ V[:, cols]
                    start = slot.out_offset + j * d_h
                    X.append(U), Y.append(V[:, start : start + d_h])
                else:  # the head's input rows, transposed: (U[rows] @ V)^T = V^T @ U[rows]^T
                    X.append(V.t()), Y.append(U[j * d_h : (j + 1) * d_h].t())
                index.append((j * slot.head_stride, slot.layer, slot.matrix))
    shape = (d, d_h, layout.shape.num_heads, layout.num_layers, layout.num_matrices)
    return Slices(shape, torch.stack(X), torch.stack(Y), torch.tensor(index))


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


def cp_start(model: nn.Module, updates: dict[str, LoraUpdate], seed: int, iterations: int) -> bool:
    """LoRTA's factors from CP-ALS of the stacked updates dW[:, :, h, l, m] (cp_als); False where the adapter is
    not LoRTA's 5-mode tensor over attention matrices (the Adam fit then starts from the random init)."""
    data = tensor_slices(model, updates)
    if data is None:
        return False
    factors = model.base_model.lorta_factors["default"]
    columns, _ = best_cp(data, factors.rank, iterations, seed)
    # balance: every factor column gets the same norm, the rank-one term's size split five ways
    norms = torch.stack([c.norm(dim=0) for c in columns]).clamp_min(1e-300)
    size = norms.prod(0) ** (1 / 5)
    columns = [c / n * size for c, n in zip(columns, norms, strict=True)]
    scale = next(iter(_layers(model).values())).lorta_scaling["default"]
    with torch.no_grad():
        dtype = factors.A.dtype
        factors.A.copy_((columns[0] / scale).to(dtype).view_as(factors.A))
        factors.B.copy_(columns[1].to(dtype).view_as(factors.B))
        factors.C_H.copy_(columns[2].to(dtype).view_as(factors.C_H))
        factors.C_L.copy_(columns[3].to(dtype).view_as(factors.C_L))
        factors.C_M.copy_(columns[4].to(dtype).view_as(factors.C_M))
    return True


def _concatenated(module: TensorAdapterLayer, columns: Tensor) -> Tensor:
    """A fused module's output columns in the concatenated [q | k | v] order of its slots (undoing an interleave:
    the module's column i is the concatenated column order[i])."""
    order = module.lorta_out_order
    if order is None:
        return columns
    out = torch.empty_like(columns)
    out[:, order.to(columns.device)] = columns
    return out


def tlora_start(model: nn.Module, updates: dict[str, LoraUpdate], seed: int) -> None:
    """TLoRA's factors in closed form: each matrix's frozen A and B become the leading singular bases of its LoRA
    update and C the singular values, the best rank-r fit of every matrix (Eckart-Young), exact at r >= the LoRA's
    rank. The update's SVD comes from QR of its two thin factors (no dense d x d matrix); a basis the update does
    not fill is completed by random orthonormal columns. The projections are saved with the adapter."""
    factors = model.base_model.lorta_factors["default"]
    generator = torch.Generator().manual_seed(seed)
    r = factors.rank
    with torch.no_grad():
        factors.s.fill_(1.0)
        for path, module in _layers(model).items():
            update = updates[path]
            V = _concatenated(module, update.V)
            for slot in module.lorta_slots["default"]:
                left, values, right = _thin_svd(update.U, V[:, slot.out_offset : slot.out_offset + slot.out_features])
                row, j = factors.rows[(slot.layer, slot.matrix)]
                getattr(factors, f"A{slot.matrix}")[j] = _complete(left[:, :r], r, generator)
                getattr(factors, f"B{slot.matrix}")[j] = _complete(right[:, :r], r, generator).t()
                core = torch.zeros(r, r, dtype=torch.float64)
                k = min(r, values.numel())
                core[:k, :k] = torch.diag(values[:k])
                factors.C[row] = core / module.lorta_scaling["default"]


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


def refine(model: nn.Module, updates: dict[str, LoraUpdate], steps: int, lr: float = 1e-2) -> list[float]:
    """Adam on the total squared error relative to the LoRA's, through the maps; keeps the best factors seen."""
    factors = model.base_model.lorta_factors["default"]
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
        loss = sum(squared_errors(model, updates).values()) / total
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


def import_lora(
    lora_model: nn.Module,
    method: str = "lorta",
    rank: int = 16,
    steps: int | None = None,
    seed: int = 0,
    als_iterations: int = 500,
    **config_kwargs: Any,
) -> tuple[nn.Module, ImportReport]:
    """Fit a tensor adapter to a PeftModel's LoRA adapter "default"; returns (the PeftModel of the base with the
    tensor adapter, the report). The LoRA model is consumed: its LoRA layers are unloaded from the base."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    updates = lora_updates(lora_model)
    carried = carried_tensors(lora_model)
    lora_config = lora_model.peft_config["default"]
    lora_params = sum(u.U.numel() + u.V.numel() for u in updates.values())
    config = adapter_config(method, rank, lora_config, list(updates), **config_kwargs)
    base = lora_model.unload()
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    factors = model.base_model.lorta_factors["default"]
    factors.double()  # the fit runs in float64: its error terms cancel to well below float32's eps
    missing = set(updates) - set(_layers(model))
    if missing:  # pragma: no cover - the targets are the LoRA's own modules
        raise ImportLoraError(f"the tensor adapter does not reach {sorted(missing)[:3]}")
    if method == "tlora":
        tlora_start(model, updates, seed)
        started = True
    else:
        started = cp_start(model, updates, seed, als_iterations) if method == "lorta" else False
    if not started:
        _shrink_start(model, updates)
    if steps is None:  # LoRTA's ALS and TLoRA's closed form already solve the same least squares
        steps = 0 if started else 3000
    history = refine(model, updates, steps)
    if carried:
        own = get_peft_model_state_dict(model)
        foreign = sorted(set(carried) - set(own))
        if foreign:
            raise ImportLoraError(f"the LoRA saved {foreign[:3]}, which the tensor adapter does not hold")
        set_peft_model_state_dict(model, {**own, **carried})
    factors.float()
    per_module, overall = relative_errors(model, updates)
    tensor_params = sum(p.numel() for p in factors.parameters() if p.requires_grad)
    report = ImportReport(method, rank, per_module, overall, lora_params, tensor_params, steps, history)
    model.eval()
    return model, report


def _shrink_start(model: nn.Module, updates: dict[str, LoraUpdate]) -> None:
    """Scale the random start so that its updates have the LoRA's overall size. The update is a product of the
    trainable factors, so scaling all of them by c scales it by c^k; k is measured (c = 2), not assumed."""
    params = [p for p in model.base_model.lorta_factors["default"].parameters() if p.requires_grad]
    empty = {p: LoraUpdate(u.U[:, :0], u.V[:0]) for p, u in updates.items()}
    target = sum(u.norm2 for u in updates.values()) ** 0.5
    with torch.no_grad():
        size = float(sum(squared_errors(model, empty).values())) ** 0.5
        if size <= 0 or target <= 0 or not params:
            return
        for p in params:
            p.mul_(2.0)
        degree = math.log2(float(sum(squared_errors(model, empty).values())) ** 0.5 / size)
        factor = (target / size) ** (1 / max(degree, 1.0)) / 2.0
        for p in params:
            p.mul_(factor)


def save_imported(
    model: nn.Module, out_dir: str | os.PathLike[str], report: ImportReport | None = None, overwrite: bool = False
) -> Path:
    """save_pretrained (plus import_report.json) into a folder written whole or not at all (an existing one only
    with overwrite)."""

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        if report is not None:
            Path(tmp, "import_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")

    return write_directory(out_dir, write, overwrite=overwrite)
