"""The `lorta` command: a thin layer over the library. Each subcommand lives in lorta.app.commands.<name>."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("train", "params", "export", "import_lora")  # modules in lorta.app.commands; each has register(subparsers)


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


if __name__ == "__main__":
    sys.exit(main())
