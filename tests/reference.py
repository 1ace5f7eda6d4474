"""Float64 dense references built straight from the papers' formulas, independent of the engine's maps.

Each function returns {module name: dense update in the base weight's own layout} (out x in for Linear,
in x out for Conv1D), already multiplied by the adapter's scale.
"""

from __future__ import annotations

import re

import torch

_ROLE = {
    "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v", "o_proj": "o",
    "out_proj": "o", "attention.output.dense": "o", "attn.c_proj": "o", "c_attn": "qkv", "qkv_proj": "qkv",
}


def adapted_modules(peft_model, adapter: str = "default") -> dict[str, torch.nn.Module]:
    from lorta.tuner import TensorAdapterLayer

    return {
        n: m for n, m in peft_model.base_model.model.named_modules()
        if isinstance(m, TensorAdapterLayer) and adapter in m.lorta_slots
    }


def _scale(cfg) -> float:
    return cfg.lora_alpha / (cfg.r ** 0.5 if cfg.use_rslora else cfg.r)


def _place(name, module, cfg, head_tensor) -> torch.Tensor:
    """Turn per-matrix tensors T_m (d x d_h x H, or own-side for extras) into the module's dense update."""
    shape = cfg.model_shape
    H, Hkv, dh, d = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], shape["hidden_size"]
    g = H // Hkv
    layer = int(re.search(r"\.(\d+)\.", name).group(1))
    parts = name.split(".")
    role = _ROLE.get(parts[-1]) or _ROLE.get(".".join(parts[-2:])) or _ROLE.get(".".join(parts[-3:]), "extra")
    index = {n: i for i, n in enumerate(cfg.matrix_names)}

    def out_heads(kind: str) -> torch.Tensor:  # (out, in)
        T = head_tensor(layer, index[kind], kind)  # d x d_h x H
        if kind in ("k", "v"):
            T = T[:, :, ::g]  # KV head j reads tensor head j*g
        return T.permute(2, 1, 0).reshape(-1, d)

    if role == "qkv":
        return torch.cat([out_heads(k).t() for k in ("q", "k", "v")], dim=1)  # Conv1D: in x out
    if role in ("q", "k", "v"):
        delta = out_heads(role)
    elif role == "o":
        T = head_tensor(layer, index["o"], "o")
        delta = T.permute(0, 2, 1).reshape(d, H * dh)  # o: heads on the input side
    else:
        kind = re.sub(r"^.*?\.\d+\.", "", name)
        delta = head_tensor(layer, index[kind], kind)  # (out, in) already, see reference_lorta
    return delta.t() if type(module.get_base_layer()).__name__ == "Conv1D" else delta


def reference_lorta(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """dW[:, :, h, l, m] = A · Diag(C_H[h] ∘ C_L[l] ∘ C_M[m]) · Bᵀ (paper §3.2), per group for mode ablations."""
    cfg = peft_model.peft_config[adapter]
    f = peft_model.base_model.lorta_factors[adapter]
    modes = cfg.modes
    shape = cfg.model_shape
    H, dh, d = shape["num_heads"], shape["head_dim"], shape["hidden_size"]
    r = cfg.r
    P = {n: p.detach().double() for n, p in f.named_parameters()}

    def weights(l: int, m: int, gl: int, gm: int) -> torch.Tensor:
        w = torch.ones(r, dtype=torch.float64)
        if "layers" in modes:
            w = w * P["C_L"][gm, l]
        if "matrices" in modes:
            w = w * P["C_M"][gl, m]
        return w

    def head_tensor(l: int, m: int, kind: str) -> torch.Tensor:
        gl = 0 if "layers" in modes else l
        gm = 0 if "matrices" in modes else m
        A, w = P["A"][gl, gm], weights(l, m, gl, gm)
        if kind not in ("q", "k", "v", "o"):
            E = P[f"B_extra{m}"][gl]  # own side x r
            side_in = cfg.matrix_names and _extra_is_input(peft_model, adapter, kind)
            full = torch.einsum("ir,or,r->oi", A, E, w)  # (own, d): model dim in
            return full if side_in else full.t()
        if "heads" in modes:
            return torch.einsum("ir,er,hr,r->ieh", A, P["B"][gl, gm], P["C_H"][gl, gm], w)
        full = torch.einsum("ir,or,r->io", A, P["B"][gl, gm], w)
        return full.reshape(d, H, dh).permute(0, 2, 1)

    return {
        n: _place(n, m, cfg, head_tensor) * _scale(cfg) for n, m in adapted_modules(peft_model, adapter).items()
    }


def _extra_is_input(peft_model, adapter, kind) -> bool:
    """Whether an extra matrix takes the model dim as input (gate/up) rather than output (down)."""
    d = peft_model.peft_config[adapter].model_shape["hidden_size"]
    for n, m in adapted_modules(peft_model, adapter).items():
        if n.endswith(kind):
            return m.in_features == d
    raise KeyError(kind)


def reference_tenslora(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The whole Tucker (or CP) tensor G ×_1 U_in ×_2 U_out ×_3 U_att ... built densely, then sliced per matrix."""
    cfg = peft_model.peft_config[adapter]
    f = peft_model.base_model.lorta_factors[adapter]
    P = {n: p.detach().double() for n, p in f.named_parameters()}
    stacked = cfg.construction.split("_")
    modes = ["in", "out", *(m for m in ("att", "qkv", "depth") if m in stacked)]
    shape = cfg.model_shape
    H, dh, d = shape["num_heads"], shape["head_dim"], shape["hidden_size"]
    letters = {"in": "i", "out": "o", "att": "h", "qkv": "m", "depth": "t"}
    ranks = {"in": "a", "out": "b", "att": "c", "qkv": "f", "depth": "g"}

    def full_tensor(gl: int, gm: int) -> torch.Tensor:
        factors = [P[f"U_{m}"][gl, gm] for m in modes]
        if cfg.decomposition == "tucker":
            core = P["core"][gl, gm]
        else:
            r = cfg.ranks["in"]
            core = torch.zeros((r,) * len(modes), dtype=torch.float64)
            core[(torch.arange(r),) * len(modes)] = 1.0
        spec = "".join(ranks[m] for m in modes) + "," + ",".join(letters[m] + ranks[m] for m in modes)
        return torch.einsum(spec + "->" + "".join(letters[m] for m in modes), core, *factors)

    def head_tensor(l: int, m: int, kind: str) -> torch.Tensor:
        gl = 0 if "depth" in stacked else l
        gm = 0 if "qkv" in stacked else m
        T = full_tensor(gl, gm)
        if "depth" in stacked:
            T = T[..., l]
        if "qkv" in stacked:
            T = T[..., m]
        if "att" in stacked:
            return T  # d x d_h x H
        return T.reshape(d, H, dh).permute(0, 2, 1)

    return {
        n: _place(n, m, cfg, head_tensor) * _scale(cfg) for n, m in adapted_modules(peft_model, adapter).items()
    }


def reference_tlora(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """dW_{l,m} = s_{l,m} · A_{l,m} · C_{l,m} · B_{l,m} (in x out), per matrix; no tensor structure."""
    cfg = peft_model.peft_config[adapter]
    f = peft_model.base_model.lorta_factors[adapter]
    T = {n: t.detach().double() for n, t in [*f.named_parameters(), *f.named_buffers()]}
    index = {n: i for i, n in enumerate(cfg.matrix_names)}
    out = {}
    for name, module in adapted_modules(peft_model, adapter).items():
        layer = int(re.search(r"\.(\d+)\.", name).group(1))
        parts = name.split(".")
        role = _ROLE.get(parts[-1]) or _ROLE.get(".".join(parts[-2:])) or _ROLE.get(".".join(parts[-3:]), "extra")

        def update(m: int, layer: int = layer) -> torch.Tensor:  # in x out
            return T["s"][layer, m] * T[f"A{m}"][layer] @ T["C"][layer, m] @ T[f"B{m}"][layer]

        if role == "qkv":
            delta = torch.cat([update(index[k]) for k in ("q", "k", "v")], dim=1)
        else:
            delta = update(index[role])
        conv = type(module.get_base_layer()).__name__ == "Conv1D"
        out[name] = (delta if conv else delta.t()) * _scale(cfg)
    return out
