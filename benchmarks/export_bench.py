#!/usr/bin/env python
"""Export to standard LoRA: lorta's exact path from the factors against PEFT's convert_to_lora (an SVD per matrix).

A Llama-2-7B-shaped model (d=4096, 32 heads, q/k/v/o) is built on the meta device, so no base weight exists;
only the adapter's factors are materialised (random, so every update is full-rank-r'). For each method and
each export path it reports the wall time, the time per adapted matrix, the rank written and the worst relative
error of a matrix's update against the float64 update from the same factors, ||B A - dW|| / ||dW||.

PEFT's path forms the dense d x d update of every matrix and takes its SVD: on a 2-core CPU that is seconds per
matrix, so by default only the first `--layers` layers are built (the cost is per matrix; the 32-layer figure
is the per-matrix time times the model's matrix count). The exact path is timed on all 32 layers.

Usage: python benchmarks/export_bench.py [--layers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings

import torch

from lorta.registry import METHODS

warnings.filterwarnings("ignore")


def llama_7b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def adapted(method: str, layers: int):
    from peft import get_peft_model

    import lorta  # noqa: F401  (registers the methods with PEFT)

    configs = {f"{spec.name} r={spec.bench_rank}": spec.config(spec.bench_rank) for spec in METHODS}
    model = get_peft_model(llama_7b(layers), configs[method])
    bank = model.base_model.lorta_factors["default"]
    bank.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in (*bank.parameters(), *bank.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0, 0.05)
    return model


def reference_updates(model) -> dict[str, torch.Tensor]:
    """The float64 update of each matrix in (out, in) orientation, from the same factors."""
    from lorta.tuner.layer import TensorAdapterLayer
    from lorta.tuner.maps import module_maps

    out = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, TensorAdapterLayer):
            factors = layer.adapter_factors("default").double()
            P, Q, _ = module_maps(factors, layer.lorta_slots["default"], layer.lorta_out_order)
            out[name] = (P @ Q * layer.lorta_scaling["default"]).t()
            factors.float()
    return out


def worst_error(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], reference: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, (a, b) in pairs.items():
        delta = reference[name]
        worst = max(worst, float((b.double() @ a.double() - delta).norm() / delta.norm()))
    return worst


def lorta_path(model):
    from lorta.export import lora_matrices

    start = time.perf_counter()
    pairs = lora_matrices(model)
    return time.perf_counter() - start, pairs


def peft_path(model, rank: int):
    from peft import convert_to_lora

    start = time.perf_counter()
    _, state = convert_to_lora(model, rank=rank)
    seconds = time.perf_counter() - start
    pairs = {}
    for key, a in state.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            pairs[name] = (a, state[key.replace("lora_A", "lora_B")])
    return seconds, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers built for PEFT's SVD path (default 2)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; Llama-2-7B shape, q/k/v/o\n"
    )
    rows = []
    for method in (f"{spec.name} r={spec.bench_rank}" for spec in METHODS):
        full = adapted(method, 32)
        seconds, pairs = lorta_path(full)
        error = worst_error(pairs, reference_updates(full))
        rank = max(a.shape[0] for a, _ in pairs.values())
        rows.append((method, "lorta.export (exact, from the factors)", 32, len(pairs), seconds, rank, error))
        del full, pairs
        few = adapted(method, args.layers)
        reference = reference_updates(few)
        for peft_rank in (rank, rank // 2):
            seconds, pairs = peft_path(few, peft_rank)
            rows.append(
                (
                    method,
                    f"peft.convert_to_lora(rank={peft_rank}) (SVD)",
                    args.layers,
                    len(pairs),
                    seconds,
                    peft_rank,
                    worst_error(pairs, reference),
                )
            )
        del few
    print(
        "| method | export path | layers | matrices | time (s) | per matrix (ms) | 32-layer time (s) | rank "
        "| worst rel. error |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, path, layers, matrices, seconds, rank, error in rows:
        per = seconds / matrices
        whole = per * matrices / layers * 32
        print(
            f"| {method} | {path} | {layers} | {matrices} | {seconds:.2f} | {per * 1e3:.1f} | {whole:.1f} "
            f"| {rank} | {error:.1e} |"
        )
    if args.json:
        keys = ("method", "path", "layers", "matrices", "seconds", "rank", "worst_relative_error")
        with open(args.json, "w") as handle:
            json.dump([dict(zip(keys, r, strict=True)) for r in rows], handle, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
