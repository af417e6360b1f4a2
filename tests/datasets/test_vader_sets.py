"""The tweets / Amazon / NYT human-rated sets (needs `python -m salience.assets fetch`)."""

from __future__ import annotations

import pytest

from salience.assets import vader_dir
from salience.datasets.vader_sets import VADER_SET_FILES, load_vader_set
from salience.errors import ParameterError

# (lines in the file, positive, negative): counted by hand from the files with awk, sign of column 2
EXPECTED = {"tweets": (4_200, 2_897, 1_299), "amazon": (3_708, 2_128, 1_482), "nyt": (5_190, 2_204, 2_742)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_labels_and_neutral_dropped(name: str) -> None:
    n_lines, n_pos, n_neg = EXPECTED[name]
    raw = [line for line in (vader_dir() / VADER_SET_FILES[name]).read_bytes().splitlines() if line.strip()]
    assert len(raw) == n_lines
    n_zero = sum(float(line.split(b"\t")[1]) == 0 for line in raw)
    sentences = load_vader_set(name)
    assert len(sentences) == n_lines - n_zero == n_pos + n_neg
    assert sum(s.label for s in sentences) == n_pos
    assert all((s.valence > 0) == (s.label == 1) and s.valence != 0 for s in sentences)
    assert len({s.id for s in sentences}) == len(sentences)
    assert all(s.text and s.text == s.text.strip() and "\r" not in s.text and "\ufffd" not in s.text for s in sentences)
    assert all(-4 <= s.valence <= 4 for s in sentences)


def test_text_and_order() -> None:
    tweets = load_vader_set("tweets")
    assert tweets[1].id == "2" and tweets[1].text == "Yay. Another good phone interview."
    assert tweets[1].valence == pytest.approx(1.443298969)
    nyt = load_vader_set("nyt")
    assert nyt[0].id == "1_1" and nyt[0].text.startswith("On Dec. 19, around noon")


def test_unknown_set() -> None:
    with pytest.raises(ParameterError, match="unknown VADER set 'movies'"):
        load_vader_set("movies")
