"""Rotten Tomatoes movie-review sentences with human valence ratings, and the VADER lexicon.

Source: ``hutto_ICWSM_2014`` from the ``vadersentiment==3.3.2`` sdist (Hutto & Gilbert, ICWSM 2014;
MIT license), fetched by ``python -m salience.assets fetch``. ``movieReviewSnippets_GroundTruth.txt``
holds 10,605 sentences (the Pang-Lee polarity source that SST was built from), each with the mean
valence in [-4, 4] given by about 20 raters.

The VADER lexicon is human judgement of *which words carry sentiment*; it is a plausibility
reference for sentiment explanations, not a rationale annotation of each sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from salience.assets import vader_dir

MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
LEXICON_FILE = "vader_sentiment_lexicon.txt"
N_TEST = 2000
N_VALIDATION = 1000


@dataclass(frozen=True)
class Snippet:
    """One human-rated sentence (a movie-review snippet, or a tweet / Amazon / NYT snippet of
    :mod:`salience.datasets.vader_sets`).

    Attributes:
        id: the sentence id in the source file (movies: ``"1"`` .. ``"10605"``; others e.g. ``"1_2"``).
        valence: mean human valence rating in [-4, 4].
        text: the sentence.
        label: 1 (positive) if ``valence > 0``, 0 (negative) if ``valence < 0``.
    """

    id: str
    valence: float
    text: str
    label: int


def _read_lines(path: Path) -> list[str]:
    """Read a text file line by line: UTF-8, falling back to Latin-1 for lines that are not UTF-8.

    The movie file is valid UTF-8 (accented names, en dashes). The lexicon is ASCII except two
    emoticons (``:-Þ``, ``:Þ``) written as the single Latin-1 byte 0xDE; per-line fallback reads
    them correctly without mangling genuine UTF-8 elsewhere.
    """
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("latin-1"))
    return lines


def load_movie_snippets() -> list[Snippet]:
    """Load the labelled movie-review sentences, in file order.

    The file has 10,605 sentences; the 37 whose mean valence is exactly 0 have no polarity and are
    dropped, leaving 10,568 (5,242 positive, 5,326 negative).

    Raises:
        AssetMissingError: the VADER data has not been fetched.
    """
    return load_rated_sentences(MOVIE_FILE)


def load_rated_sentences(file_name: str) -> list[Snippet]:
    """Load one ``*_GroundTruth.txt`` file of the VADER data (``id<TAB>mean valence<TAB>text`` per
    line), in file order: label = sign of the mean valence; sentences rated exactly 0 are dropped.

    Raises:
        AssetMissingError: the VADER data has not been fetched.
    """
    snippets = []
    for line in _read_lines(vader_dir() / file_name):
        if not line.strip():
            continue
        sid, valence_str, text = line.split("\t", 2)
        valence = float(valence_str)
        if valence == 0:
            continue
        snippets.append(Snippet(id=sid, valence=valence, text=text.strip(), label=int(valence > 0)))
    return snippets


def split_movie_snippets(seed: int = 0) -> dict[str, list[Snippet]]:
    """Split the snippets into fixed ``"train"``, ``"validation"`` and ``"test"`` sets.

    The snippets are sorted by numeric id and permuted with ``numpy.random.default_rng(seed)``;
    the first 2,000 are ``"test"``, the next 1,000 ``"validation"``, the rest (7,568) ``"train"``.
    With the default seed, ``"test"`` is held out from the training of the zoo sentiment models
    (``zoo:minilm-l6-sentiment``, ``zoo:minilm-sentiment``, the size ladder; ``"validation"``
    picked their epochs): evaluations of those models must use ``"test"`` only.
    """
    snippets = sorted(load_movie_snippets(), key=lambda s: int(s.id))
    order = np.random.default_rng(seed).permutation(len(snippets))
    shuffled = [snippets[i] for i in order]
    return {
        "train": shuffled[N_TEST + N_VALIDATION:],
        "validation": shuffled[N_TEST:N_TEST + N_VALIDATION],
        "test": shuffled[:N_TEST],
    }


def load_vader_lexicon() -> dict[str, float]:
    """Load the VADER lexicon: word or emoticon -> mean human valence in [-4, 4].

    The file has 7,517 entries; 15 tokens (emoticons and slang such as ``:p``, ``lol``, ``ok``)
    appear twice, and the later entry wins, as in VADER itself (7,502 keys). Keys keep the
    file's case; words are lowercase.

    Raises:
        AssetMissingError: the VADER data has not been fetched.
    """
    lexicon: dict[str, float] = {}
    for line in _read_lines(vader_dir() / LEXICON_FILE):
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0]:
            lexicon[fields[0]] = float(fields[1])
    return lexicon
