"""Running ``lorta train`` / ``lorta compare`` in-process, for the CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorta.app import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _only_train_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs build the parser from these commands only (the others are tested elsewhere)."""
    monkeypatch.setattr(cli, "COMMANDS", ("train", "compare"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def lorta(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``lorta ARGV`` in-process; return (exit code, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
