#!/usr/bin/env python
"""What import-lora is worth: a LoRA trained by `lorta train --method lora` (MiniLM, Rotten Tomatoes), fitted by
tensor adapters of several ranks, each evaluated on the same held-out split as the LoRA.

Rows: the LoRA itself; the LoRA's trained head with its updates removed (what an import that fits nothing would
keep); each import with its parameter count, adapter file size, relative error of the updates
||fit - LoRA|| / ||LoRA|| and held-out accuracy. Nothing is trained after the fit.

Usage:
  lorta train --method lora --out runs/lora-minilm
  python benchmarks/import_quality.py runs/lora-minilm [--fits lorta:8,lorta:16,lorta:64,lorta:256,tlora:8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    from lorta.app.data import load_rotten_tomatoes
    from lorta.app.models import load_adapted
    from lorta.app.train import evaluate_classifier
    from lorta.import_lora import import_lora, save_imported

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a lorta train --method lora run folder (adapter/, metrics.json)")
    parser.add_argument(
        "--fits",
        default="lorta:8,lorta:16,lorta:64,lorta:256,tlora:8,tenslora:8",
        help="method:rank pairs to import (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    if metrics.get("method") != "lora" or metrics.get("task") != "sentiment":
        sys.exit(f"{args.run} is a {metrics.get('method')} {metrics.get('task')} run; pass a LoRA sentiment run")
    adapter = args.run / "adapter"
    data = load_rotten_tomatoes(seed=metrics["seed"])
    max_length = metrics.get("max_length") or 64
    torch.manual_seed(0)

    def accuracy(model, tokenizer) -> float:
        return evaluate_classifier(model, tokenizer, data.test, max_length, quiet=True)["accuracy"]

    rows = []
    lora, tokenizer = load_adapted(adapter, peft_types=("LORA",))
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if ".lora_" in n)
    rows.append(
        dict(
            adapter=f"LoRA r={metrics['rank']} (trained)",
            params=lora_params,
            file_bytes=(adapter / "adapter_model.safetensors").stat().st_size,
            error=0.0,
            accuracy=accuracy(lora, tokenizer),
            seconds=0.0,
        )
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.zero_()
    rows.append(
        dict(
            adapter="its head alone (updates removed)",
            params=0,
            file_bytes=0,
            error=1.0,
            accuracy=accuracy(lora, tokenizer),
            seconds=0.0,
        )
    )
    print(f"n_test={len(data.test)}, LoRA {rows[0]['accuracy']:.4f}, head alone {rows[1]['accuracy']:.4f}", flush=True)
    for fit in args.fits.split(","):
        method, rank = fit.split(":")
        lora, tokenizer = load_adapted(adapter, peft_types=("LORA",))
        start = time.perf_counter()
        model, report = import_lora(lora, method, int(rank))
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_imported(model, Path(tmp) / "imported", report)
            size = (folder / "adapter_model.safetensors").stat().st_size
        rows.append(
            dict(
                adapter=f"import-lora --method {method} --rank {rank}",
                params=report.tensor_params,
                file_bytes=size,
                error=report.overall,
                accuracy=accuracy(model, tokenizer),
                seconds=seconds,
            )
        )
        print(rows[-1], flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; held-out n={len(data.test)}\n")
    print("| adapter | trainable values | file | rel. error of the updates | held-out accuracy | fit time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        size = f"{r['file_bytes'] / 1e3:.1f} kB" if r["file_bytes"] else "—"
        print(
            f"| {r['adapter']} | {r['params']:,} | {size} | {r['error']:.3f} | {r['accuracy']:.4f} "
            f"| {r['seconds']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
