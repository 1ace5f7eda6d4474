"""`lorta params`: exact trainable counts of an adapter beside LoRA's, or the largest rank within a budget.

A thin layer over lorta.params; every count is the meta-device count of the real PEFT config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ...spec import positive_int

EPILOG = """examples:
  lorta params llama-2-7b --rank 4 --targets q_proj,v_proj
  lorta params roberta-base --method tenslora --ranks in=8,out=8,att=4,qkv=3,depth=4
  lorta params llama-3-8b --method lorta --modes heads,matrices --rank 16 --json
  lorta params ./my-model-folder --method tlora --rank 32
  lorta params model.Q4_K_M.gguf --budget 1000000
"""


def name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


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
    for spec in method_specs().values():  # each method's own options (MethodSpec.cli_options)
        for option in spec.cli_options:
            parser.add_argument(option.flag, **option.argparse_kwargs())
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


def method_specs() -> dict[str, Any]:
    from ...registry import method_specs as specs

    return specs()


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
    """The method's own options but its rank field, as given (None: not given)."""
    spec = method_specs().get(method)
    options = spec.cli_options if spec is not None else ()
    return {o.dest: getattr(args, o.dest) for o in options if o.dest != spec.rank_field}


def _rank_fields(args: argparse.Namespace) -> dict[str, Any]:
    """{flag: value} of the methods' own rank options (TensLoRA's --ranks)."""
    return {
        o.flag: getattr(args, o.dest)
        for spec in method_specs().values()
        for o in spec.cli_options
        if o.dest == spec.rank_field
    }


def _run(args: argparse.Namespace) -> int:
    from ... import params
    from ...layout import LayoutError, ModelShape
    from ..catalogue import model_config

    method = args.method
    if args.budget is None:
        for spec in method_specs().values():
            for option in spec.cli_options:
                if getattr(args, option.dest) is not None and method != spec.name:
                    raise params.ParamsError(f"{option.flag} applies to --method {spec.name}, not {method}")
        for flag, value in _rank_fields(args).items():
            if args.rank is not None and value is not None:
                raise params.ParamsError(f"pass --rank or {flag}, not both")
    elif args.rank is not None or any(v is not None for v in _rank_fields(args).values()):
        flags = " and ".join(["--rank", *_rank_fields(args)])
        raise params.ParamsError(f"--budget searches the rank: leave out {flags}")

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
    spec = method_specs().get(method)
    if spec is not None and getattr(args, spec.rank_field, None) is not None:
        options[spec.rank_field] = getattr(args, spec.rank_field)
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
