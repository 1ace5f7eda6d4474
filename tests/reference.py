"""Float64 dense references built straight from the papers' formulas, independent of the engine's maps.

Each function returns {module name: dense update in the base weight's own layout} (out x in for Linear,
in x out for Conv1D), already multiplied by the adapter's scale. The reference reads only data the adapter config
records (model shape, the matrices and layers modes) and the factors; roles, head placement and the fused q/k/v
layouts of each architecture are written out here again, from the models' own code.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

_ROLE = {
    "q_proj": "q",
    "query": "q",
    "q": "q",
    "query_proj": "q",
    "q_lin": "q",
    "k_proj": "k",
    "key": "k",
    "k": "k",
    "key_proj": "k",
    "k_lin": "k",
    "v_proj": "v",
    "value": "v",
    "v": "v",
    "value_proj": "v",
    "v_lin": "v",
    "o_proj": "o",
    "out_proj": "o",
    "o": "o",
    "out_lin": "o",
    "attention.output.dense": "o",
    "attn.c_proj": "o",
    "attention.dense": "o",
    "self_attention.dense": "o",
    "self_attn.dense": "o",
    "c_attn": "qkv",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "Wqkv": "qkv",
    "in_proj": "qkv",
}


def adapted_modules(peft_model, adapter: str = "default") -> dict[str, torch.nn.Module]:
    from lorta.tuner import TensorAdapterLayer

    return {
        n: m
        for n, m in peft_model.base_model.model.named_modules()
        if isinstance(m, TensorAdapterLayer) and adapter in m.lorta_slots
    }


def _scale(cfg) -> float:
    return cfg.lora_alpha / (cfg.r**0.5 if cfg.use_rslora else cfg.r)


def _conv1d(module) -> bool:
    return type(module.get_base_layer()).__name__ == "Conv1D"


def _features(module) -> tuple[int, int]:
    w = module.get_base_layer().weight
    return (w.shape[0], w.shape[1]) if _conv1d(module) else (w.shape[1], w.shape[0])


def _role(name: str, cfg) -> str:
    if not cfg.model_shape.get("num_heads"):
        return "extra"
    parts = name.split(".")
    return _ROLE.get(parts[-1]) or _ROLE.get(".".join(parts[-2:])) or _ROLE.get(".".join(parts[-3:]), "extra")


def _layer(name: str, cfg) -> int:
    """The module's position in the recorded layers mode: its stack and index, e.g. 'model.decoder.layers.3'."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    key = name[: match.end(1)] if match else ""
    return cfg.layer_names.index(key)


def _kind(name: str, role: str, cfg) -> int:
    """The matrix index of a q/k/v/o (role) or extra (its name after the layer) module in the recorded mode."""
    after = re.sub(r"^.*?(?:^|\.)\d+\.", "", name) if re.search(r"(?:^|\.)\d+\.", name) else name
    if role == "extra":
        return cfg.matrix_names.index(after)
    path = [p for p in after.split(".")[:-1] if not p.isdigit()]
    for candidate in (role, f"{path[-1]}.{role}" if path else role, ".".join([*path, role])):
        if candidate in cfg.matrix_names:
            return cfg.matrix_names.index(candidate)
    raise KeyError(f"{name}: {role} not in {cfg.matrix_names}")


def _model_dim(peft_model, adapter, cfg) -> int:
    """The config's hidden size when an adapted module touches it, else the side size most modules share."""
    sizes = [_features(m) for m in adapted_modules(peft_model, adapter).values()]
    d = cfg.model_shape.get("hidden_size") or 0
    if d and any(d in s for s in sizes):
        return d
    counts = Counter(x for s in sizes for x in set(s))
    best = max(counts.values())
    return next(x for x in (*sizes[0], *counts) if counts[x] == best)


def _interleave(model_type: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, Hkv: int, dh: int):
    """Rows of a fused q/k/v update in the architecture's own output order (from each model's split code)."""
    if model_type in ("gpt_neox", "bloom", "falcon", "deberta") or (model_type == "gpt_bigcode" and Hkv == H):
        g = H // Hkv  # view(..., H_kv, g + 2, d_h): q heads of the group, then k, then v
        qs, ks, vs = q.view(H, dh, -1), k.view(Hkv, dh, -1), v.view(Hkv, dh, -1)
        rows = []
        for j in range(Hkv):
            rows += [qs[j * g + t] for t in range(g)] + [ks[j], vs[j]]
        return torch.cat(rows)
    if model_type == "codegen":  # view(..., 4, 3 * d/4), split into query, value, key
        n = q.shape[0] // 4
        return torch.cat(
            [torch.cat([q[p * n : (p + 1) * n], v[p * n : (p + 1) * n], k[p * n : (p + 1) * n]]) for p in range(4)]
        )
    return torch.cat([q, k, v])  # concatenated


def _module_updates(peft_model, adapter, matrix_update) -> dict[str, torch.Tensor]:
    """{module: scaled dense update in its weight's layout}, from matrix_update(layer, m, role) -> (out x in)."""
    cfg = peft_model.peft_config[adapter]
    shape = cfg.model_shape
    H, Hkv, dh = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    out = {}
    for name, module in adapted_modules(peft_model, adapter).items():
        role, layer = _role(name, cfg), _layer(name, cfg)
        if role == "qkv":
            subs = [matrix_update(layer, _kind(name, r, cfg), r) for r in ("q", "k", "v")]
            delta = _interleave(shape.get("model_type", ""), *subs, H, Hkv, dh)
        else:
            delta = matrix_update(layer, _kind(name, role, cfg), role)
        out[name] = (delta.t() if _conv1d(module) else delta) * _scale(cfg)
    return out


def _adapted_pairs(peft_model, adapter) -> set[tuple[int, int]]:
    cfg = peft_model.peft_config[adapter]
    pairs = set()
    for name in adapted_modules(peft_model, adapter):
        role, layer = _role(name, cfg), _layer(name, cfg)
        for r in ("q", "k", "v") if role == "qkv" else (role,):
            pairs.add((layer, _kind(name, r, cfg)))
    return pairs


def _extra_sizes(peft_model, adapter, m: int) -> tuple[int, int]:
    cfg = peft_model.peft_config[adapter]
    for name, module in adapted_modules(peft_model, adapter).items():
        if _role(name, cfg) == "extra" and _kind(name, "extra", cfg) == m:
            return _features(module)
    raise KeyError(m)


def _heads_to_matrix(T: torch.Tensor, role: str, g: int) -> torch.Tensor:
    """T: (d, d_h, H), the tensor slice of one matrix -> its (out x in) update; k/v read every g-th head."""
    d = T.shape[0]
    if role == "o":
        return T.permute(0, 2, 1).reshape(d, -1)  # heads on the input side
    if role in ("k", "v"):
        T = T[:, :, ::g]
    return T.permute(2, 1, 0).reshape(-1, d)


def reference_lorta(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """dW[:, :, h, l, m] = A · Diag(C_H[h] ∘ C_L[l] ∘ C_M[m]) · Bᵀ (paper §3.2), per group for mode ablations; an
    extra matrix: its model side reads A, its own side B_extra (a free one has A_extra too)."""
    cfg = peft_model.peft_config[adapter]
    f = peft_model.base_model.lorta_factors[adapter]
    modes = cfg.modes
    shape = cfg.model_shape
    H, dh, g = shape["num_heads"], shape["head_dim"], max(1, shape["num_heads"] // max(1, shape["num_kv_heads"]))
    d = _model_dim(peft_model, adapter, cfg)
    r = cfg.r
    P = {n: p.detach().double() for n, p in f.named_parameters()}

    def update(l: int, m: int, role: str) -> torch.Tensor:
        gl = 0 if "layers" in modes else l
        gm = 0 if "matrices" in modes else m
        w = torch.ones(r, dtype=torch.float64)
        if "layers" in modes:
            w = w * P["C_L"][gm, l]
        if "matrices" in modes:
            w = w * P["C_M"][gl, m]
        if role == "extra":
            n_in, n_out = _extra_sizes(peft_model, adapter, m)
            E = P[f"B_extra{m}"][gl]
            if n_in == d:
                return torch.einsum("ir,or,r->oi", P["A"][gl, gm], E, w)
            if n_out == d:
                return torch.einsum("or,ir,r->oi", P["A"][gl, gm], E, w)
            return torch.einsum("ir,or,r->oi", P[f"A_extra{m}"][gl], E, w)
        A = P["A"][gl, gm]
        if "heads" in modes:
            T = torch.einsum("ir,er,hr,r->ieh", A, P["B"][gl, gm], P["C_H"][gl, gm], w)
        else:
            T = torch.einsum("ir,or,r->io", A, P["B"][gl, gm], w).reshape(d, H, dh).permute(0, 2, 1)
        return _heads_to_matrix(T, role, g)

    return _module_updates(peft_model, adapter, update)


def reference_tenslora(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The whole Tucker (or CP) tensor G ×_1 U_in ×_2 U_out ×_3 U_att ... built densely, then sliced per matrix.
    An extra matrix replaces U_out by its own U_extra and reads the att mode through the unit vector 1/sqrt(r_att)."""
    cfg = peft_model.peft_config[adapter]
    f = peft_model.base_model.lorta_factors[adapter]
    P = {n: p.detach().double() for n, p in f.named_parameters()}
    shape = cfg.model_shape
    H, dh, g = shape["num_heads"], shape["head_dim"], max(1, shape["num_heads"] // max(1, shape["num_kv_heads"]))
    d = _model_dim(peft_model, adapter, cfg)
    stacked = cfg.construction.split("_")
    heads = any(_role(n, cfg) != "extra" for n in adapted_modules(peft_model, adapter))
    modes = ["in", "out", *(m for m in ("att", "qkv", "depth") if m in stacked and (heads or m != "att"))]
    letters = {"in": "i", "out": "o", "att": "h", "qkv": "m", "depth": "t"}
    ranks = {"in": "a", "out": "b", "att": "c", "qkv": "f", "depth": "g"}

    def full_tensor(factors: dict[str, torch.Tensor], gl: int, gm: int) -> torch.Tensor:
        if cfg.decomposition == "tucker":
            core = P["core"][gl, gm]
        else:
            r = cfg.ranks["in"]
            core = torch.zeros((r,) * len(modes), dtype=torch.float64)
            core[(torch.arange(r),) * len(modes)] = 1.0
        spec = "".join(ranks[m] for m in modes) + "," + ",".join(letters[m] + ranks[m] for m in modes)
        return torch.einsum(spec + "->" + "".join(letters[m] for m in modes), core, *(factors[m] for m in modes))

    def update(l: int, m: int, role: str) -> torch.Tensor:
        gl = 0 if "depth" in stacked else l
        gm = 0 if "qkv" in stacked else m
        factors = {mode: P[f"U_{mode}"][gl, gm] for mode in modes if f"U_{mode}" in P}
        if role == "extra":
            n_in, n_out = _extra_sizes(peft_model, adapter, m)
            factors["out"] = P[f"U_extra{m}"][gl]
            if "att" in modes:
                r_att = P["core"].shape[2 + modes.index("att")] if "core" in P else cfg.ranks["att"]
                factors["att"] = torch.full((1, r_att), r_att**-0.5, dtype=torch.float64)
            if n_in != d and n_out != d:
                factors["in"] = P[f"U_in_extra{m}"][gl]
        T = full_tensor(factors, gl, gm)
        if "depth" in modes:
            T = T[..., l]
        if "qkv" in modes:
            T = T[..., m]
        if role == "extra":
            T = T[..., 0] if "att" in modes else T  # (in, own)
            return T.t() if (n_in == d or n_out != d) else T
        if "att" not in stacked:
            T = T.reshape(d, H, dh).permute(0, 2, 1)
        return _heads_to_matrix(T, role, g)

    return _module_updates(peft_model, adapter, update)


def reference_tlora(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """dW_{l,m} = s_{l,m} · A_{l,m} · C_{l,m} · B_{l,m} (in x out), per matrix; no tensor structure."""
    f = peft_model.base_model.lorta_factors[adapter]
    T = {n: t.detach().double() for n, t in [*f.named_parameters(), *f.named_buffers()]}

    rows = {}  # the engine's storage: C and s kind by kind, one row per adapted (layer, matrix), layers in order
    layers = sorted({(m, l) for l, m in _adapted_pairs(peft_model, adapter)})
    for i, (m, l) in enumerate(layers):
        rows[(l, m)] = (i, sum(1 for mm, ll in layers if mm == m and ll < l))

    def update(l: int, m: int, role: str) -> torch.Tensor:  # out x in
        i, j = rows[(l, m)]
        return (T["s"][i] * T[f"A{m}"][j] @ T["C"][i] @ T[f"B{m}"][j]).t()

    return _module_updates(peft_model, adapter, update)
