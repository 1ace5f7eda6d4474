"""Subcommands of the `lorta` CLI (see lorta.app.cli)."""

from __future__ import annotations

import argparse


def add_file_job_arguments(p: argparse.ArgumentParser, source: str, recorded: str) -> None:
    """The arguments export and import-lora share: --base (default: the one `recorded` in the `source`) and
    --overwrite."""
    p.add_argument(
        "--base",
        metavar="MODEL",
        default=None,
        help="the base model: a Hugging Face folder, a .gguf file or a catalogue name "
        f"(default: {source}'s {recorded})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
