"""The other human-rated sentence sets of VADER's ``hutto_ICWSM_2014`` data: tweets, Amazon review
snippets and New York Times editorial snippets.

Same source and format as :mod:`salience.datasets.movie_snippets` (``python -m salience.assets
fetch``; Hutto & Gilbert, ICWSM 2014, MIT license): each sentence carries the mean valence in
[-4, 4] given by about 20 raters. The label is the sign of the mean valence (1 positive, 0
negative); sentences rated exactly 0 are dropped. No split: none of these sets trained a zoo model,
so all of each is held out (used for zero-shot and out-of-domain accuracy).

==========  =======================================  =========  ========  ========  =======
name        file                                     sentences  positive  negative  dropped
==========  =======================================  =========  ========  ========  =======
tweets      ``tweets_GroundTruth.txt``               4,200      2,897     1,299     4
amazon      ``amazonReviewSnippets_GroundTruth.txt`` 3,708      2,128     1,482     98
nyt         ``nytEditorialSnippets_GroundTruth.txt`` 5,190      2,204     2,742     244
==========  =======================================  =========  ========  ========  =======
"""

from __future__ import annotations

from salience.datasets.movie_snippets import Snippet, load_rated_sentences
from salience.errors import ParameterError

VADER_SET_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def load_vader_set(name: str) -> list[Snippet]:
    """Load the labelled sentences of one set (``"tweets"``, ``"amazon"`` or ``"nyt"``), in file order.

    Texts are as in the file (tweets keep their HTML entities such as ``&amp;``), stripped of
    surrounding white space.

    Raises:
        ParameterError: ``name`` is not one of the three sets.
        AssetMissingError: the VADER data has not been fetched.
    """
    if name not in VADER_SET_FILES:
        raise ParameterError(f"unknown VADER set {name!r}; choose one of {', '.join(VADER_SET_FILES)}")
    return load_rated_sentences(VADER_SET_FILES[name])
