"""TensLoRA: stack the updates along chosen modes and factor with Tucker (a rank per mode) or CP.

(docs/design.md, "The methods")

Modes of the update tensor: in (model dim d), out (head dim d_h if heads are stacked, else the whole output),
and the stacked ones, att (heads H), qkv (matrices M), depth (layers L). A construction names the stacked
modes; a mode that is not stacked splits the update into separate tensors ('qkv': one tensor per layer,
'depth': one per matrix, 'att': one per layer and matrix).

Tucker, per tensor:  dW = G ×_in U_in ×_out U_out ×_att U_att ×_qkv U_qkv ×_depth U_depth
    #params = Σ_mode rank_mode · size_mode + Π_mode rank_mode         (times the number of tensors)
CP, per tensor: the same with a superdiagonal core of ones, #params = r · Σ_mode size_mode.

For one matrix (layer l, matrix m) the engine needs, per head h, the small core
K[h] = G ×_att U_att[h] ×_qkv U_qkv[m] ×_depth U_depth[l]  (rank_in × rank_out), then P = U_in and
Q[:, h·d_h:(h+1)·d_h] = K[h] · U_outᵀ (heads on the output side; transposed roles for o). The dense update is
never built. GQA: k and v read the head slice j·g of U_att (or of the output rows when heads are not stacked).

Initialisation: U_in ~ U(-1/√d, 1/√d) (PEFT LoRA's A); the other factors have orthonormal columns scaled to
unit-norm rows on average; the Tucker core (or, for CP, U_out) is zero, so the update starts at zero.
Scale α / rank_in.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..architectures import targets_of_kinds
from ..factorization import Factorization, gather_groups, head_maps
from ..layout import Slot, TensorLayout
from ..spec import CliOption, MethodSpec, Recipe, positive_int
from ..tuner.config import AdapterConfigError, MethodType, TensorAdapterConfig, check_positive_int
from ..tuner.model import TensorAdapterModel

CONSTRUCTIONS = ("att", "qkv", "depth", "att_qkv", "att_depth", "qkv_depth", "att_qkv_depth")
DECOMPOSITIONS = ("tucker", "cp")
DEFAULT_CONSTRUCTION, DEFAULT_DECOMPOSITION = "att_qkv_depth", "tucker"
_STACKED = ("att", "qkv", "depth")
DEFAULT_RANK = 8
TENSLORA = MethodType("TENSLORA")


def tensor_modes(construction: str) -> tuple[str, ...]:
    """The modes of one update tensor, in storage order: in, out, then the stacked ones."""
    stacked = construction.split("_")
    return ("in", "out", *(m for m in _STACKED if m in stacked))


@dataclass
class TensLoraConfig(TensorAdapterConfig):
    """TensLoRA: a construction (which of att / qkv / depth are stacked) and Tucker or CP with a rank per mode.

    Example: ``TensLoraConfig(construction="att_qkv_depth", decomposition="tucker", ranks={"in": 8, "out": 8,
    "att": 4, "qkv": 3, "depth": 4})``; ``TensLoraConfig(r=4)`` (or ``ranks=4``) means 4 for every mode.
    """

    r: int | None = field(default=None, metadata={"help": "Rank of every mode (default 8); or give `ranks`."})
    construction: str = field(default=DEFAULT_CONSTRUCTION, metadata={"help": f"One of {CONSTRUCTIONS}."})
    decomposition: str = field(
        default=DEFAULT_DECOMPOSITION, metadata={"help": "tucker (a rank per mode) or cp (one rank)."}
    )
    ranks: int | dict[str, int] | list[int] | None = field(
        default=None, metadata={"help": "An int for every mode, or a rank per mode: in, out, att, qkv, depth."}
    )

    def __post_init__(self) -> None:
        self.peft_type = TENSLORA
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(f"unknown construction {self.construction!r}; expected one of {list(CONSTRUCTIONS)}")
        if self.decomposition not in DECOMPOSITIONS:
            raise ValueError(f"unknown decomposition {self.decomposition!r}; expected one of {list(DECOMPOSITIONS)}")
        if self.r is not None:
            check_positive_int("r", self.r)
        if self.ranks is None:
            self.ranks = self.r if self.r is not None else DEFAULT_RANK
        self.ranks = self._normalised_ranks()
        if self.r is not None and self.r != self.ranks["in"]:
            raise AdapterConfigError(
                f"TensLoraConfig got r={self.r} and ranks={self.ranks}, which disagree: r is the rank of every mode "
                f"(and the r of the scale alpha / r, the input rank). Pass r={self.r} alone for rank {self.r} in "
                f"every mode, or ranks alone for a rank per mode"
            )
        self.r = self.ranks["in"]
        super().__post_init__()

    def _normalised_ranks(self) -> dict[str, int]:
        modes = tensor_modes(self.construction)
        ranks = self.ranks
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = dict.fromkeys(modes, ranks)
        elif isinstance(ranks, (list, tuple)):
            if len(ranks) != len(modes):
                raise ValueError(f"ranks {list(ranks)} must give one rank per mode {list(modes)}")
            ranks = dict(zip(modes, ranks, strict=True))
        elif isinstance(ranks, dict):
            unknown = sorted(set(ranks) - set(modes))
            missing = [m for m in modes if m not in ranks]
            if unknown or missing:
                raise ValueError(
                    f"ranks for construction {self.construction!r} must name exactly the modes {list(modes)}; "
                    f"unknown {unknown}, missing {missing}"
                )
            ranks = {m: ranks[m] for m in modes}
        else:
            raise TypeError(f"ranks must be an int, a list or a dict of ints, got {ranks!r}")
        for mode, rank in ranks.items():
            check_positive_int(f"ranks[{mode!r}]", rank)
        if self.decomposition == "cp" and len(set(ranks.values())) != 1:
            raise ValueError(f"a CP decomposition has one rank for every mode, got {ranks}")
        return ranks


class TensLoraFactors(Factorization):
    """Tucker or CP factors of every update tensor of one TensLoRA adapter (leading group axes as in LoRTA).

    Extra matrices (MLP projections, the linear layers of a model without attention heads) are one-"head" matrices
    of the tensor: their own side gets a factor of its own (U_extra<m>, in place of U_out; a matrix with neither side
    equal to the model dimension also gets U_in_extra<m>), and the core's att mode is contracted with the unit vector
    1/sqrt(r_att) (the size of a head's U_att row). A model without any head-structured matrix has no att mode.
    """

    batched = True
    model_input = "U_in"

    def __init__(self, config: TensLoraConfig, layout: TensorLayout) -> None:
        super().__init__(config, layout)
        shape = layout.shape
        heads = layout.has_head_slots
        self.modes = tuple(m for m in tensor_modes(config.construction) if heads or m != "att")
        self.ranks = {m: config.ranks[m] for m in self.modes}
        self.tucker = config.decomposition == "tucker"
        self.stack_heads = "att" in self.modes
        self.stack_matrices = "qkv" in self.modes
        self.stack_layers = "depth" in self.modes
        gl, gm = self._group_counts(self.stack_layers, self.stack_matrices)
        sizes = {
            "in": layout.model_dim,
            "out": shape.head_dim if self.stack_heads else shape.num_heads * shape.head_dim,
            "att": shape.num_heads,
            "qkv": layout.num_matrices,
            "depth": layout.num_layers,
        }
        self.sizes = {m: sizes[m] for m in self.modes}
        wanted = {"in": layout.uses_model_dim, "out": heads, "att": heads}
        for mode in self.modes:
            if wanted.get(mode, True):
                self.register_parameter(f"U_{mode}", nn.Parameter(torch.empty(gl, gm, sizes[mode], self.ranks[mode])))
            else:
                setattr(self, f"U_{mode}", None)
        if self.tucker:
            self.core = nn.Parameter(torch.empty(gl, gm, *(self.ranks[m] for m in self.modes)))
        for m, name in enumerate(layout.matrix_names):
            own = layout.extra_sizes.get(name) or (layout.free_sizes.get(name) or (0, 0))[1]
            if not own:
                continue
            self.extra_names[m] = f"U_extra{m}"
            self.register_parameter(f"U_extra{m}", nn.Parameter(torch.empty(gl, own, self.ranks["out"])))
            if name in layout.free_sizes:
                self.free_inputs[m] = f"U_in_extra{m}"
                n_in = layout.free_sizes[name][0]
                self.register_parameter(f"U_in_extra{m}", nn.Parameter(torch.empty(gl, n_in, self.ranks["in"])))
        self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, init_weights: bool) -> None:
        if next(self.parameters()).is_meta:
            return
        self._init_inputs()
        others = [getattr(self, f"U_{mode}") for mode in self.modes[1:]]
        others += [getattr(self, n) for n in self.extra_names.values()]
        for factor in others:
            if factor is None:
                continue
            for block in factor.view(-1, *factor.shape[-2:]):
                nn.init.orthogonal_(block)
                block.mul_(math.sqrt(block.shape[0] / block.shape[1]))
        zeros = [self.core] if self.tucker else [self.U_out, *(getattr(self, n) for n in self.extra_names.values())]
        for factor in zeros:
            if factor is not None:
                nn.init.zeros_(factor) if init_weights else nn.init.normal_(factor, 0.0, 0.5)

    def _extra_core(self, gl: int, gm: int, slot: Slot) -> Tensor:
        """An extra matrix's core, as one head whose att weights are the unit vector: (1, r_in, r_out) for
        Tucker, (1, r) for CP's diagonal."""
        if self.tucker:
            core = self.core[gl, gm]  # (r_in, r_out, [r_att], [r_qkv], [r_depth])
            if self.stack_layers:
                core = core @ self.U_depth[gl, gm, slot.layer]
            if self.stack_matrices:
                core = core @ self.U_qkv[gl, gm, slot.matrix]
            return (core.sum(-1) / math.sqrt(core.shape[-1]))[None] if self.stack_heads else core[None]
        weights = self._cp_weights(slot.layer, slot.matrix, gl, gm)
        return (weights / math.sqrt(weights.shape[-1]) if self.stack_heads else weights)[None]

    def _cp_weights(self, l: Any, m: Any, gl: Any, gm: Any) -> Tensor:
        """CP's diagonal core: U_depth[l] ∘ U_qkv[m] (each only where that mode is stacked; ones where neither), for
        one slot (int indices: (r,)) or G slots (index tensors: (G, r))."""
        weights = next(self.parameters()).new_ones(self.ranks["in"])
        if self.stack_layers:
            weights = weights * self.U_depth[gl, gm, l]
        if self.stack_matrices:
            weights = weights * self.U_qkv[gl, gm, m]
        return weights

    def extra_maps(self, slot: Slot) -> tuple[Tensor, Tensor]:
        gl, gm = self._groups(slot)
        basis = getattr(self, self.extra_names[slot.matrix])[gl][None]
        own_input = self.free_inputs.get(slot.matrix)
        model_factor = getattr(self, own_input)[gl] if own_input else self.U_in[gl, gm]
        return head_maps(slot.role, model_factor, basis, self._extra_core(gl, gm, slot))

    def head_side(self, role: str, heads: slice, index: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """G slots with the same role and heads (G = 1: one matrix): each slot's head cores K[h] contracted."""
        shape, G = self.layout.shape, len(index["l"])
        n_heads = len(range(shape.num_heads)[heads])
        gl, gm = index["gl"], index["gm"]
        out = gather_groups(self.U_out, index)
        if self.stack_heads:
            basis = out[:, None].expand(G, n_heads, *out.shape[1:])  # (G, n_heads, d_h, r_out)
        else:
            basis = out.view(G, shape.num_heads, shape.head_dim, out.shape[-1])[:, heads]
        if self.tucker:
            if self.stack_layers:  # the core against every layer once (GM, L, ...), then each slot's layer
                every_layer = torch.einsum("m...d,mld->ml...", self.core[0], self.U_depth[0])
                core = every_layer[gm, index["l"]]  # (G, r_in, r_out, [r_att], [r_qkv])
            else:
                core = gather_groups(self.core, index)  # (G, r_in, r_out, [r_att], [r_qkv])
            if self.stack_matrices:
                core = torch.einsum("g...q,gq->g...", core, self.U_qkv[gl, gm, index["m"]])
            if self.stack_heads:
                core = torch.einsum("gija,gha->ghij", core, gather_groups(self.U_att, index)[:, heads])
            else:
                core = core[:, None].expand(G, n_heads, *core.shape[1:])
            side = torch.einsum("ghij,ghej->ghei", core, basis)
        else:
            weights = self._cp_weights(index["l"], index["m"], gl, gm).expand(G, self.ranks["in"])  # (G, r)
            core = weights[:, None]  # (G, 1 or n_heads, r)
            if self.stack_heads:
                core = gather_groups(self.U_att, index)[:, heads] * core
            side = basis * core[:, :, None, :]
        return gather_groups(self.U_in, index), side

    # Adapter arithmetic (lorta.arithmetic): a sum of Tucker models is a Tucker model with the factors concatenated
    # along each mode's rank and the cores on the block diagonal; a sum of CP models is a CP model of the summed
    # rank. docs/design.md, "Adapter arithmetic".
    exact_concatenation = True
    structure_fields = ("modes", "tucker")

    def config_at_rank(self, config: Any, rank: int | dict[str, int]) -> Any:
        """`config` at `rank` in every mode (or a rank per mode), scale 1."""
        ranks = rank if isinstance(rank, dict) else dict.fromkeys(config.ranks, rank)
        return dataclasses.replace(
            config, r=ranks["in"], ranks=ranks, lora_alpha=ranks["in"], use_rslora=False, init_weights=True
        )

    def concatenated_config(self, configs: list[Any], rank: int) -> Any:
        return self.config_at_rank(configs[0], {mode: sum(c.ranks[mode] for c in configs) for mode in configs[0].ranks})

    def concatenate(self, parts: list[tuple[Factorization, float]]) -> dict[str, Tensor]:
        """Each part's weight goes where every one of its terms reads it once: the core block (Tucker) or the output
        side, U_out and U_extra<m> (CP). An extra matrix reads the att mode through 1/sqrt(r_att), which the sum's
        larger r_att would shrink: part i's U_extra<m> columns carry sqrt(R_att / r_att_i) back."""
        states = [(part.state_dict(), weight, part) for part, weight in parts]
        extras = set(self.extra_names.values())
        total_att = sum(part.ranks.get("att", 0) for part, _ in parts)
        out = {}
        for key in states[0][0]:
            if key == "core":
                out[key] = block_diagonal([state[key] * weight for state, weight, _ in states], lead=2)
                continue
            columns = []
            for state, weight, part in states:
                factor = state[key]
                if key in extras and self.stack_heads:
                    factor = factor * math.sqrt(total_att / part.ranks["att"])
                if not self.tucker and (key == "U_out" or key in extras):
                    factor = factor * weight
                columns.append(factor)
            out[key] = torch.cat(columns, dim=-1)
        return out


def block_diagonal(blocks: list[Tensor], lead: int) -> Tensor:
    """The blocks (equal in their first `lead` dims) along the diagonal of the remaining dims, zeros elsewhere."""
    first = blocks[0]
    out = first.new_zeros(*first.shape[:lead], *(sum(b.shape[d] for b in blocks) for d in range(lead, first.dim())))
    offsets = [0] * (first.dim() - lead)
    for block in blocks:
        window = tuple(slice(o, o + n) for o, n in zip(offsets, block.shape[lead:], strict=True))
        out[(slice(None),) * lead + window] = block
        offsets = [o + n for o, n in zip(offsets, block.shape[lead:], strict=True)]
    return out


def tenslora_num_params(
    construction: str,
    decomposition: str,
    ranks: dict[str, int],
    d: int,
    d_h: int,
    H: int,
    L: int,
    M: int,
    extra_sizes: tuple[int, ...] = (),
    free_sizes: tuple[tuple[int, int], ...] = (),
) -> int:
    """TensLoRA's published count: Σ rank·size + Π ranks (Tucker core) per tensor, times the number of tensors;
    plus each extra matrix's own factors (H = 0: no head-structured matrix; d = 0: none with a model side)."""
    modes = tuple(m for m in tensor_modes(construction) if H or m != "att")  # no heads: no att mode
    sizes = {"in": d, "out": (d_h if "att" in modes else H * d_h) if H else 0, "att": H, "qkv": M, "depth": L}
    per_tensor = sum(ranks[m] * sizes[m] for m in modes)
    if decomposition == "tucker":
        per_tensor += math.prod(ranks[m] for m in modes)
    gl = 1 if "depth" in modes else L
    tensors = (1 if "qkv" in modes else M) * gl
    own = sum(n * ranks["out"] for n in extra_sizes) + sum(a * ranks["in"] + b * ranks["out"] for a, b in free_sizes)
    return per_tensor * tensors + gl * own


def _bench_config(r: int, alpha: float, targets: list[str], shape: dict) -> TensLoraConfig:
    """Tucker att_qkv_depth with rank r on the in/out modes and min(r, size) on heads, matrices, layers (the
    core is a product of the five ranks: r on every mode would be r^5 parameters, 1e9 at r=64)."""
    ranks = {
        "in": r,
        "out": r,
        "att": min(r, shape["heads"]),
        "qkv": min(r, shape["matrices"]),
        "depth": min(r, shape["layers"]),
    }
    return TensLoraConfig(
        construction=DEFAULT_CONSTRUCTION,
        decomposition=DEFAULT_DECOMPOSITION,
        ranks=ranks,
        lora_alpha=alpha,
        target_modules=targets,
    )


def parse_ranks(text: str) -> int | list[int] | dict[str, int]:
    """`lorta params --ranks`: '8' (every mode), '8,8,4,3,4' (one per mode, in order) or
    'in=8,out=8,att=4,qkv=3,depth=4'."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a rank, a list of ranks or mode=rank pairs")
    if all("=" in p for p in parts):
        pairs = [p.split("=", 1) for p in parts]
        return {mode.strip(): positive_int(rank) for mode, rank in pairs}
    if any("=" in p for p in parts):
        raise argparse.ArgumentTypeError(f"mix of mode=rank pairs and bare ranks: {text!r}")
    ranks = [positive_int(p) for p in parts]
    return ranks[0] if len(ranks) == 1 else ranks


class TensLoraModel(TensorAdapterModel):
    """The PEFT tuner of TensLoRA (`lorta.tuner.model.TensorAdapterModel` with TensLoRA's factors)."""

    factorization_cls = TensLoraFactors
    default_kinds = ("q", "k", "v")
    target_module_mapping = targets_of_kinds(default_kinds)


SPEC = MethodSpec(
    name="tenslora",
    title="TensLoRA",
    peft_type=TENSLORA,
    config_cls=TensLoraConfig,
    factors_cls=TensLoraFactors,
    tuner_cls=TensLoraModel,
    closed_form=lambda layout, config: (
        lambda r: tenslora_num_params(
            config.construction,
            config.decomposition,
            dict.fromkeys(tensor_modes(config.construction), r),
            **layout.count_sizes(),
        )
    ),
    classify=Recipe(8, 16.0, 2e-3, 1e-2),
    causal_lm=Recipe(8, 16.0, 1e-3, 0.0),
    rank_field="ranks",
    params_options=("ranks", "construction", "decomposition"),
    cli_options=(
        CliOption(
            "--ranks",
            "ranks",
            "TensLoRA ranks: 8, 8,8,4,3,4 (one per mode) or in=8,out=8,att=4,qkv=3,depth=4",
            type=parse_ranks,
        ),
        CliOption("--construction", "construction", "TensLoRA construction (default att_qkv_depth)"),
        CliOption(
            "--decomposition", "decomposition", "TensLoRA decomposition (default tucker)", choices=("tucker", "cp")
        ),
    ),
    train_flags=(
        CliOption(
            "--construction",
            "construction",
            "TensLoRA: stacked modes",
            choices=CONSTRUCTIONS,
            default=DEFAULT_CONSTRUCTION,
        ),
        CliOption(
            "--decomposition",
            "decomposition",
            "TensLoRA: tucker or cp",
            choices=DECOMPOSITIONS,
            default=DEFAULT_DECOMPOSITION,
        ),
    ),
    train_kwargs=lambda values, o: dict(values),
    bench_config=_bench_config,
)
