"""`lorta params`: exact trainable counts of an adapter beside LoRA's, or the largest rank within a budget.

A thin layer over lorta.params; every count is the meta-device count of the real PEFT config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

EPILOG = """examples:
  lorta params llama-2-7b --rank 4 --targets q_proj,v_proj
  lorta params roberta-base --method tenslora --ranks in=8,out=8,att=4,qkv=3,depth=4
  lorta params llama-3-8b --method lorta --modes heads,matrices --rank 16 --json
  lorta params ./my-model-folder --method tlora --rank 32
  lorta params model.Q4_K_M.gguf --budget 1000000
"""


def positive_int(text: str) -> int:
    """A positive integer; `1_000_000` and `1,000,000` are accepted."""
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def mode_list(text: str) -> list[str]:
    """LoRTA modes: 'heads,layers,matrices', any subset, or 'none' for a plain per-matrix factorisation."""
    return [] if text.strip().lower() in ("", "none") else name_list(text)


def tenslora_ranks(text: str) -> int | list[int] | dict[str, int]:
    """'8' (every mode), '8,8,4,3,4' (one per mode, in order) or 'in=8,out=8,att=4,qkv=3,depth=4'."""
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


def register(subparsers: Any) -> None:
    from ...params import METHODS

    parser = subparsers.add_parser(
        "params",
        help="exact trainable parameter counts (beside LoRA's) or the largest rank within a budget",
        description="Exact trainable parameter count of an adapter on a model, beside LoRA's on the same targets at "
        "the same rank. Counts come from the real PEFT config applied to the model built on the meta device "
        "(no weights are loaded), so they are exactly what training uses.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        help="a catalogue name (llama-2-7b, llama-3-8b, mistral-7b, roberta-base, "
        "roberta-large, gpt2, smollm2-135m, esm2-35m), a Hugging Face folder or a .gguf file",
    )
    parser.add_argument("--method", choices=METHODS, default="lorta", help="adapter method (default: lorta)")
    parser.add_argument("--rank", "-r", type=positive_int, help="rank r (default 8)")
    parser.add_argument(
        "--ranks",
        type=tenslora_ranks,
        help="TensLoRA ranks: 8, 8,8,4,3,4 (one per mode) or in=8,out=8,att=4,qkv=3,depth=4",
    )
    parser.add_argument("--construction", help="TensLoRA construction (default att_qkv_depth)")
    parser.add_argument("--decomposition", choices=("tucker", "cp"), help="TensLoRA decomposition (default tucker)")
    parser.add_argument("--modes", type=mode_list, help="LoRTA shared modes, e.g. heads,layers,matrices or none")
    parser.add_argument(
        "--targets",
        type=name_list,
        help="target modules, e.g. q_proj,v_proj (default: the method's default for the model type)",
    )
    parser.add_argument(
        "--budget",
        type=positive_int,
        metavar="N",
        help=f"print, for {', '.join(METHODS)}, the largest rank within N parameters",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...layout import LayoutError
    from ...params import ParamsError
    from ..catalogue import UnknownModelError
    from ..models import ModelNotFoundError

    try:
        return _run(args)
    except (ParamsError, LayoutError, ModelNotFoundError, UnknownModelError) as err:
        print(f"lorta params: error: {err}", file=sys.stderr)
        return 2


def _options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    if method == "lorta":
        return {"modes": args.modes}
    if method == "tenslora":
        return {"construction": args.construction, "decomposition": args.decomposition}
    return {}


def _run(args: argparse.Namespace) -> int:
    from ... import params
    from ...layout import LayoutError, ModelShape
    from ..catalogue import model_config

    method = args.method
    if args.budget is None:
        for flag, value, owner in (
            ("--ranks", args.ranks, "tenslora"),
            ("--construction", args.construction, "tenslora"),
            ("--decomposition", args.decomposition, "tenslora"),
            ("--modes", args.modes, "lorta"),
        ):
            if value is not None and method != owner:
                raise params.ParamsError(f"{flag} applies to --method {owner}, not {method}")
        if args.rank is not None and args.ranks is not None:
            raise params.ParamsError("pass --rank or --ranks, not both")
    elif args.rank is not None or args.ranks is not None:
        raise params.ParamsError("--budget searches the rank: leave out --rank and --ranks")

    config = model_config(args.model)
    if args.budget is not None:
        fits: list[Any] = []  # a Fit, or (method, why) for a method that cannot adapt these targets
        for m in params.METHODS:
            try:
                fits.append(
                    params.fit_budget(
                        args.budget,
                        config,
                        m,
                        targets=args.targets,
                        **{k: v for k, v in _options(args, m).items() if v is not None},
                    )
                )
            except (params.ParamsError, LayoutError) as err:
                fits.append((m, str(err)))
        if all(isinstance(f, tuple) for f in fits):
            raise params.ParamsError(fits[0][1])
        shape = ModelShape.from_model(params.meta_model(config)).to_dict()
        if args.json:
            rows = [{"method": f[0], "error": f[1]} if isinstance(f, tuple) else vars(f) for f in fits]
            print(json.dumps({"model": args.model, "shape": shape, "budget": args.budget, "methods": rows}, indent=2))
        else:
            print(_budget_table(args.model, shape, args.budget, fits))
        return 0

    options = {k: v for k, v in _options(args, method).items() if v is not None}
    if method == "tenslora" and args.ranks is not None:
        options["ranks"] = args.ranks
    result = params.compare(config, method, args.rank, targets=args.targets, **options)
    if args.json:
        print(json.dumps({"model": args.model, **result.to_dict()}, indent=2))
    else:
        print(_compare_table(args.model, result))
    return 0


# --------------------------------------------------------------------------------------------------- formatting
def _shape_line(model: str, shape: dict[str, Any]) -> str:
    return (
        f"{model} ({shape['model_type'] or 'unknown type'}): d={shape['hidden_size']}, d_h={shape['head_dim']}, "
        f"H={shape['num_heads']}, H_kv={shape['num_kv_heads']}, L={shape['num_layers']}"
    )


def ratio_text(trainable: int, lora: int) -> str:
    """'0.0082 (122.2x fewer)'."""
    if trainable == lora:
        return "1"
    ratio = trainable / lora
    if ratio > 1:
        return f"{ratio:,.2f} ({ratio:,.1f}x more)"
    digits = max(2, 1 - math.floor(math.log10(ratio)))
    return f"{ratio:.{digits}f} ({lora / trainable:,.1f}x fewer)"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _compare_table(model: str, result: Any) -> str:
    from ...params import METHOD_TITLES

    title = METHOD_TITLES[result.method]
    setting = f"r={result.rank}"
    if result.ranks is not None:
        setting = ",".join(f"{m}={r}" for m, r in result.ranks.items())
    extra = _setting(result.options)
    matrices = f" (matrices {', '.join(result.matrices)})" if result.matrices else ""
    rows = [
        [
            title,
            setting + (f"; {extra}" if extra else ""),
            f"{result.trainable:,}",
            ratio_text(result.trainable, result.lora),
        ]
    ]
    if result.method != "lora":
        rows.append(["LoRA", f"r={result.rank}", f"{result.lora:,}", "1"])
    return "\n".join(
        [
            f"model    {_shape_line(model, result.shape)}; {result.base_parameters:,} parameters",
            f"targets  {', '.join(result.targets)}{matrices}",
            "",
            _table(["method", "setting", "trainable", "ratio to LoRA"], rows, right={2}),
        ]
    )


def _setting(options: dict[str, Any]) -> str:
    return ", ".join(",".join(v) or "no modes" if isinstance(v, list) else str(v) for v in options.values())


def _budget_table(model: str, shape: dict[str, Any], budget: int, fits: list[Any]) -> str:
    from ...params import METHOD_TITLES

    rows = [
        [METHOD_TITLES[f[0]], "", "n/a", "-", "-", f[1]]
        if isinstance(f, tuple)
        else [
            METHOD_TITLES[f.method],
            _setting(f.options),
            str(f.rank) if f.rank else "none",
            f"{f.trainable:,}" if f.trainable is not None else "-",
            f"{f.next_trainable:,}",
            ", ".join(f.targets),
        ]
        for f in fits
    ]
    return "\n".join(
        [
            f"model    {_shape_line(model, shape)}",
            f"budget   {budget:,} trainable parameters",
            "",
            _table(["method", "setting", "largest rank", "trainable", "at rank + 1", "targets"], rows, right={2, 3, 4}),
        ]
    )
