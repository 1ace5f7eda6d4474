"""`lorta export`: a saved tensor adapter as a standard LoRA (PEFT, vLLM, SGLang), a llama.cpp GGUF adapter or a
merged model. A thin layer over lorta.export; the tensor adapter stays the artifact of record."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Write a saved lorta adapter (LoRTA, TensLoRA, TLoRA) in a form other software loads, exactly:

  --format lora     a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors): each adapted matrix's
                    update scale * (P @ Q)^T is written as lora_A = P^T, lora_B = scale * Q^T (no SVD, no
                    dense update). Plain PEFT loads it without lorta; --engine vllm / sglang writes one rank for
                    every module (zero-padded: the same update), adds the sibling projections the engine reads
                    together, and refuses, with the rule named, what that engine cannot serve.
  --format gguf     a llama.cpp LoRA adapter (GGUF, float32) for a GGUF of the same base:
                    llama-cli -m base.gguf --lora OUT/adapter_model.gguf (OUT may also be a path ending in .gguf).
  --format merged   a plain transformers model folder with the adapter merged (equal to merge_and_unload()).

The base model (--base) defaults to the adapter's base_model_name_or_path: a local Hugging Face folder, a .gguf
file or a catalogue name (minilm, smollm2). OUT_DIR must not exist unless --overwrite; it is written whole or
not at all.
"""

EPILOG = """examples:
  lorta export runs/minilm/adapter exported/minilm-lora
  lorta export runs/smollm2/adapter exported/smollm2-vllm --engine vllm
  lorta export runs/smollm2/adapter exported/smollm2.gguf --format gguf --base smollm2
  lorta export runs/minilm/adapter exported/minilm-merged --format merged --overwrite
serve an export (docs/design.md, "Deploy: the engines' rules"):
  vllm serve BASE --enable-lora --lora-modules mine=exported/smollm2-vllm --max-lora-rank R
  python -m sglang.launch_server --model-path BASE --lora-paths mine=exported/smollm2-sglang --max-lora-rank R
  llama-cli -m base.gguf --lora exported/smollm2.gguf
"""

FORMATS = ("lora", "gguf", "merged")


def register(subparsers: Any) -> None:
    from ...engines import ENGINES
    from . import add_file_job_arguments

    engines = [e for e in ENGINES if e != "llama.cpp"]
    p = subparsers.add_parser(
        "export",
        help="write an adapter as a standard LoRA, a llama.cpp GGUF adapter or a merged model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a saved lorta adapter (e.g. a run's adapter/)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder (or, for gguf, the .gguf file) to create")
    p.add_argument("--format", choices=FORMATS, default="lora", help="what to write (default: lora)")
    p.add_argument(
        "--engine",
        choices=engines,
        default="peft",
        help="for --format lora: the serving engine whose rules the folder obeys (default: peft)",
    )
    add_file_job_arguments(p, "the adapter", "base_model_name_or_path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ... import export
    from ...layout import LayoutError
    from ...tuner.config import AdapterConfigError, AdapterFileError
    from ..models import MissingDependencyError, ModelNotFoundError, load_adapted

    if args.engine != "peft" and args.format != "lora":
        return _fail(
            f"--engine {args.engine} applies to --format lora only (gguf follows llama.cpp's rules, "
            "merged is a plain model)"
        )
    try:
        _check_target(Path(args.out_dir), args.overwrite)
        model, tokenizer = load_adapted(args.adapter_dir, args.base)
        if args.format == "lora":
            written = export.export_lora(model, args.out_dir, "default", engine=args.engine, overwrite=args.overwrite)
        elif args.format == "gguf":
            written = export.export_gguf(model, args.out_dir, "default", overwrite=args.overwrite)
        else:
            written = export.export_merged(
                model, args.out_dir, "default", overwrite=args.overwrite, tokenizer=tokenizer
            )
    except (
        export.ExportError,
        LayoutError,
        AdapterFileError,
        AdapterConfigError,
        ModelNotFoundError,
        MissingDependencyError,
        FileExistsError,
    ) as exc:
        return _fail(str(exc))
    print(f"wrote {written} ({_size(written)}; the tensor adapter: {_size(Path(args.adapter_dir))})")
    return 0


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an existing OUT_DIR before the (slow) model load; the writers check again when they write."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output path or pass --overwrite")


def _size(path: Path) -> str:
    files = (
        [path]
        if path.is_file()
        else [p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".gguf", ".bin")]
    )
    total = sum(p.stat().st_size for p in files)
    return f"{total / 1e6:.2f} MB" if total >= 1e5 else f"{total / 1e3:.1f} kB"


def _fail(message: str) -> int:
    print(f"lorta export: error: {message}", file=sys.stderr)
    return 2
