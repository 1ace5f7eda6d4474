#!/usr/bin/env python
"""What a merge into a quantised base keeps for an exact unmerge: the bytes of pre-merge storage per base.

For each bitsandbytes format of `lorta train --quantize` (nf4 with double quantisation, LLM.int8), the default
job's model (the packaged all-MiniLM-L6-v2) is loaded quantised, adapted with `lorta.LortaConfig()` (its default
targets for the model type), merged, and the bytes each adapted layer keeps (`pre_merge_storage.nbytes`) are summed
beside the whole model's size; then unmerge is checked to give the storage back bit for bit.

Usage: ``python benchmarks/quantized_merge_memory.py`` (seconds on a CPU). Prints a markdown table.
"""

from __future__ import annotations

import datetime
import platform

import torch
from peft import get_peft_model

import lorta
from lorta.app.models import load_for_classification
from lorta.tuner import TensorAdapterLayer


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in model.state_dict().values()}.values())


def measure(quantize: str) -> dict[str, object]:
    torch.manual_seed(0)
    base, _ = load_for_classification("minilm", 2, quantize=quantize)
    model = get_peft_model(base, lorta.LortaConfig(init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, TensorAdapterLayer)]
    before = [{k: v.clone() for k, v in m.get_base_layer().state_dict().items()} for m in layers]
    model.base_model.merge_adapter()
    kept = sum(m.pre_merge_storage.nbytes for m in layers)
    model.base_model.unmerge_adapter()
    exact = all(
        all(torch.equal(v, saved[k]) for k, v in m.get_base_layer().state_dict().items())
        for m, saved in zip(layers, before, strict=True)
    )
    weights = sum(m.in_features * m.out_features for m in layers)
    return {
        "quantize": quantize,
        "layers": len(layers),
        "weights": weights,
        "kept_bytes": kept,
        "bytes_per_weight": kept / weights,
        "model_bytes": model_bytes(base),
        "exact": exact,
    }


def main() -> None:
    rows = [measure(q) for q in ("4bit", "8bit")]
    print(f"{datetime.date.today()} · `python benchmarks/quantized_merge_memory.py`")
    print(f"torch {torch.__version__}, {platform.machine()}, CPU\n")
    print("| base | adapted layers | weights | kept while merged | bytes / weight | whole model | unmerge exact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "nf4 (double quant)" if r["quantize"] == "4bit" else "LLM.int8"
        print(
            f"| {name} | {r['layers']} | {r['weights']:,} | {r['kept_bytes'] / 2**20:.2f} MiB | "
            f"{r['bytes_per_weight']:.3f} | {r['model_bytes'] / 2**20:.1f} MiB | {r['exact']} |"
        )


if __name__ == "__main__":
    main()
