"""The user's own labelled table for ``lorta train --data``: a CSV, TSV or JSON(L) file read offline, its labels
encoded, split by group like the packaged data (lorta.app.data).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .data import (
    DataError,
    DataFileNotFoundError,
    LabelledText,
    TextDataset,
    build_dataset,
    check_fraction,
    dedupe,
    normalise,
    stable_hash,
)

__all__ = ["GROUP_COLUMNS", "load_table"]

#: Column names recognised as a grouping key by :func:`load_table`, in order of preference.
GROUP_COLUMNS: tuple[str, ...] = ("group", "movie", "movie_name", "groups")
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".ndjson": "jsonl"}


def _read_rows(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[str], int]:
    """Return (rows, columns found, number of the first data row) for error messages."""
    if fmt in ("csv", "tsv"):
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if fmt == "tsv" else ",")
            rows = list(reader)
            columns = [c for c in (reader.fieldnames or []) if c is not None]
        return rows, columns, 2  # row 1 is the header
    text = path.read_text(encoding="utf-8-sig")
    if fmt == "json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from exc
        if not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path} must hold a list of objects (one per example) or JSON lines.")
        return data, _columns(data), 1
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno} is not valid JSON ({exc.msg}). Expected one JSON object per line (JSON lines)."
            ) from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno} holds a {type(row).__name__}; expected a JSON object per line.")
        rows.append(row)
    return rows, _columns(rows), 1


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _as_int(value: Any) -> int | None:
    """Interpret ints, integral floats, bools and strings such as ``"1"`` as int labels, else ``None``."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return None


def _encode_labels(
    values: list[Any], label_names: Sequence[str] | None, path: Path, column: str, first_row: int
) -> tuple[list[int], list[str]]:
    """Map raw label values to indices and return (indices, label names), raising on unknown labels."""
    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names):
            raise DataError(f"label_names must be unique, got {names}.")
        index = {n: i for i, n in enumerate(names)}
        encoded: list[int | None] = []
        for v in values:
            key = str(v).strip()
            as_int = _as_int(v)
            if key in index:
                encoded.append(index[key])
            elif as_int is not None and 0 <= as_int < len(names):
                encoded.append(as_int)
            else:
                encoded.append(None)
        expected = f"one of {names} or an index 0..{len(names) - 1}"
    else:
        ints = [_as_int(v) for v in values]
        if all(i is not None for i in ints):
            top = max(ints)  # type: ignore[type-var]
            names = [str(i) for i in range(top + 1)]
            encoded = [i if i is not None and i >= 0 else None for i in ints]
            expected = f"non-negative integers (found up to {top})"
        else:
            names = sorted({str(v).strip() for v in values})
            index = {n: i for i, n in enumerate(names)}
            encoded = [index[str(v).strip()] for v in values]
            expected = "any"
    bad = [(first_row + i, values[i]) for i, e in enumerate(encoded) if e is None]
    if bad:
        offending = sorted({repr(v) for _, v in bad})
        raise DataError(
            f"{path}: column '{column}' has labels outside the expected set: {', '.join(offending[:10])}"
            f"{' ...' if len(offending) > 10 else ''} ({len(bad)} row(s), first at row {bad[0][0]}). "
            f"Expected {expected}."
        )
    return [e for e in encoded if e is not None], names


def load_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    group_column: str | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
) -> TextDataset:
    """Load a user text-classification table (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, or ``.json``).

    ``.json`` may be JSON lines or one array of objects. Labels may be integers (kept as indices) or
    strings (mapped to the sorted unique names, or to ``label_names`` when given, which also accepts
    integer indices). Texts are whitespace-normalised; empty texts are dropped; duplicates are removed
    as in :func:`load_rotten_tomatoes`. The split is by ``group_column`` (default: the first of
    ``group``, ``movie``, ``movie_name``, ``groups`` present) or, without one, by a hash of the text.
    Raises :class:`DataError` (or :class:`DataFileNotFoundError`) with what was wrong and what was expected.
    """
    check_fraction(test_fraction)
    path = Path(path).expanduser()
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if not path.exists():
        raise DataFileNotFoundError(
            f"Data file not found: {path} (resolved to {path.resolve()}). Expected a .csv or .jsonl file "
            f"with columns '{text_column}' and '{label_column}'."
        )
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a .csv or .jsonl file.")
    if fmt is None:
        raise DataError(
            f"Unsupported file extension '{path.suffix}' for {path}. "
            f"Expected one of: {', '.join(sorted(_SUFFIX_FORMATS))}."
        )
    rows, columns, first_row = _read_rows(path, fmt)
    if not rows:
        raise DataError(f"{path} holds no examples (found columns: {columns or 'none'}).")
    missing = [c for c in (text_column, label_column) if c not in columns]
    if group_column is not None and group_column not in columns:
        missing.append(group_column)
    if missing:
        raise DataError(
            f"{path} lacks required column(s) {missing}; found columns {columns}. "
            f"Pass text_column=/label_column= to name the columns to use."
        )
    if group_column is None:
        group_column = next((c for c in GROUP_COLUMNS if c in columns), None)

    kept: list[tuple[str, Any, str]] = []
    no_label: list[int] = []
    for i, row in enumerate(rows):
        text = normalise(str(row.get(text_column) or ""))
        if not text:
            continue
        label = row.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            no_label.append(first_row + i)
            continue
        group = str(row.get(group_column) or "") if group_column else ""
        kept.append((text, label, group or "text:" + stable_hash(text.casefold())[:16]))
    if no_label:
        raise DataError(
            f"{path}: {len(no_label)} row(s) with a text but no value in column '{label_column}', "
            f"first at row {no_label[0]}. Every example needs a label."
        )
    if not kept:
        raise DataError(f"{path}: no examples left after dropping empty texts in column '{text_column}'.")

    labels, names = _encode_labels([k[1] for k in kept], label_names, path, label_column, first_row)
    raw = [LabelledText(text=t, label=y, group=g) for (t, _, g), y in zip(kept, labels, strict=True)]
    present = sorted({names[ex.label] for ex in dedupe(raw)})
    if len(present) < 2:
        raise DataError(
            f"{path}: only one class ({present[0]!r}) in column '{label_column}' after cleaning; "
            f"classification needs at least two."
        )
    return build_dataset(raw, names, test_fraction, seed, max_train, max_test, str(path))


# --------------------------------------------------------------------------------------------------
# Preference pairs (DPO)
# --------------------------------------------------------------------------------------------------
