"""The movie-review snippets, their fixed split, and the VADER lexicon (needs `python -m salience.assets fetch`)."""

from __future__ import annotations

import pytest

from salience.assets import vader_dir
from salience.datasets.movie_snippets import (
    MOVIE_FILE,
    Snippet,
    load_movie_snippets,
    load_vader_lexicon,
    split_movie_snippets,
)


@pytest.fixture(scope="module")
def snippets() -> list[Snippet]:
    return load_movie_snippets()


def test_counts(snippets: list[Snippet]) -> None:
    n_lines = len((vader_dir() / MOVIE_FILE).read_bytes().splitlines())
    assert n_lines == 10_605
    assert len(snippets) == 10_605 - 37  # zero-valence sentences dropped
    assert sum(s.label for s in snippets) == 5_242
    assert sum(1 - s.label for s in snippets) == 5_326
    assert all((s.valence > 0) == (s.label == 1) and s.valence != 0 for s in snippets)
    assert len({s.id for s in snippets}) == len(snippets)


def test_text_is_decoded(snippets: list[Snippet]) -> None:
    first = next(s for s in snippets if s.id == "1")
    assert first.text.startswith("The Rock is destined")
    assert all("\ufffd" not in s.text and "\r" not in s.text for s in snippets)
    assert any("clichés" in s.text for s in snippets)  # UTF-8, not Latin-1 mojibake


def test_split_sizes_disjoint_deterministic(snippets: list[Snippet]) -> None:
    split = split_movie_snippets()
    assert {k: len(v) for k, v in split.items()} == {"train": 7_568, "validation": 1_000, "test": 2_000}
    ids = {k: {s.id for s in v} for k, v in split.items()}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert set().union(*ids.values()) == {s.id for s in snippets}
    assert split_movie_snippets(seed=0) == split
    assert [s.id for s in split_movie_snippets(seed=1)["test"]] != [s.id for s in split["test"]]
    # both classes are well represented in the held-out test set
    assert 900 < sum(s.label for s in split["test"]) < 1_100


def test_lexicon() -> None:
    lexicon = load_vader_lexicon()
    assert len(lexicon) == 7_502  # 7,517 lines, 15 duplicated tokens
    assert lexicon["terrible"] == pytest.approx(-2.1)
    assert lexicon["masterpiece"] == pytest.approx(3.1)
    assert lexicon[":-Þ"] == pytest.approx(0.9)  # the one non-ASCII byte (Latin-1) is decoded
    assert all(-4 <= v <= 4 for v in lexicon.values())
