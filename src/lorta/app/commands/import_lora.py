"""`lorta import-lora`: fit a tensor adapter (LoRTA, TensLoRA, TLoRA) to a saved PEFT LoRA adapter and save it as
a normal lorta adapter. A thin layer over lorta.import_lora."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Fit a tensor adapter to an existing PEFT LoRA adapter's updates and save it as a lorta adapter:

  each LoRA module's update s * B @ A is fitted by least squares: LoRTA by a CP decomposition of the stacked
  updates (alternating least squares through the LoRA's own factors);
  TLoRA in closed form (its frozen A, B become each update's singular bases: exact at --rank >= the LoRA's
  rank, the best rank-R fit per matrix below it);
  TensLoRA by Adam from its initialisation. The relative error ||fit - LoRA|| / ||LoRA|| is printed per module
  and overall, and saved with the adapter (import_report.json). A LoRTA fit is only as good as the structure the
  LoRA's layers share: a LoRA trained alone needs a high rank (docs/results.md, "Import a LoRA").
  Trained classifier heads and biases the LoRA saved are carried over unchanged.

The base model (--base) defaults to the LoRA's base_model_name_or_path: a local Hugging Face folder, a .gguf file
or a catalogue name (minilm, smollm2). OUT_DIR must not exist unless --overwrite; it is written whole or not at all.
"""

EPILOG = """examples:
  lorta import-lora runs/minilm-lora/adapter imported/minilm-lorta --rank 16
  lorta import-lora my-lora imported/tenslora --method tenslora --rank 8 --base minilm --steps 5000
"""


def register(subparsers: Any) -> None:
    from ...import_lora import METHODS
    from ...spec import positive_int
    from . import add_file_job_arguments

    p = subparsers.add_parser(
        "import-lora",
        help="fit a LoRTA / TensLoRA / TLoRA adapter to a saved LoRA adapter",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("lora_dir", metavar="LORA_DIR", help="a saved PEFT LoRA adapter folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the lorta adapter folder to create")
    p.add_argument("--method", choices=METHODS, default="lorta", help="the tensor adapter to fit (default: lorta)")
    p.add_argument("--rank", type=positive_int, default=16, help="its rank r, every mode's for TensLoRA (default: 16)")
    p.add_argument(
        "--steps",
        type=_non_negative,
        default=None,
        help="Adam steps after the start (default: 0 after LoRTA's ALS and TLoRA's closed form, which "
        "already solve the least squares; 3000 for TensLoRA and LoRTA ablations)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the start (default: 0)")
    add_file_job_arguments(p, "the LoRA", "base_model_name_or_path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...import_lora import ImportLoraError, import_lora, save_imported
    from ...layout import LayoutError
    from ...tuner.config import AdapterConfigError, AdapterFileError
    from ..models import MissingDependencyError, ModelNotFoundError, load_adapted

    try:
        out = Path(args.out_dir)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} already exists; choose another output folder or pass --overwrite")
        lora_model, _ = load_adapted(args.lora_dir, args.base, peft_types=("LORA",))
        if args.base is not None:
            lora_model.peft_config["default"].base_model_name_or_path = str(args.base)
        model, report = import_lora(lora_model, args.method, args.rank, steps=args.steps, seed=args.seed)
        written = save_imported(model, out, report, overwrite=args.overwrite)
    except (
        ImportLoraError,
        LayoutError,
        AdapterFileError,
        AdapterConfigError,
        ModelNotFoundError,
        MissingDependencyError,
        FileExistsError,
    ) as exc:
        print(f"lorta import-lora: error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"wrote {written}")
    return 0


def _non_negative(text: str) -> int:
    """An integer >= 0 (Adam steps; 0 keeps the start as it is)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value
