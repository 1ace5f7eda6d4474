"""The `lorta` command: a thin layer over the library. Each subcommand lives in lorta.app.commands.<name>."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "train",
    "compare",
    "params",
    "export",
    "import_lora",
)  # modules in lorta.app.commands; each has register(subparsers)
EXTRAS = {"tqdm": "cli", "matplotlib": "cli", "trl": "cli", "gguf": "cli", "bitsandbytes": "quant"}  # module: extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorta", description="Tensor low-rank adapters for Hugging Face PEFT.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lorta.app.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # a package of an extra that the job's own checks did not catch
        root = (exc.name or "").split(".")[0]
        if root not in EXTRAS:
            raise
        print(f"lorta {args.command}: {root} is not installed; pip install 'lorta[{EXTRAS[root]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
