"""User-given character spans as features of token models (text classifiers and causal LMs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_TEXT
from tiny_lm import build_model, build_tokenizer


def test_spans_that_are_the_words_give_the_word_scores(toy):
    words = toy.encode(TOY_TEXT).words
    spans = [(w.start, w.end) for w in words]
    by_span = salience.explain(toy, TOY_TEXT, method="occlusion", level="span", spans=spans)
    by_word = salience.explain(toy, TOY_TEXT, method="occlusion")
    assert [f.text for f in by_span.features] == [w.text for w in words]
    np.testing.assert_array_equal(by_span.scores, by_word.scores)  # same rows, same model calls


def test_a_span_groups_its_tokens(toy):
    # "the plot was dull" as one feature: occlusion removes all four words at once
    start = TOY_TEXT.index("the plot")
    end = TOY_TEXT.index("dull") + len("dull")
    e = salience.explain(toy, TOY_TEXT, method="occlusion", level="span", spans=[(0, 3), (start, end)])
    encoded = toy.encode(TOY_TEXT)
    inside = [i for i, w in enumerate(encoded.words) if start <= w.start < end]
    keep = np.ones((2, len(encoded.words)), dtype=bool)
    keep[1, inside] = False
    full, without = toy.score_perturbed(encoded, torch.as_tensor(keep), encoded.words, "mask",
                                        e.target).numpy()
    assert e.scores[1] == pytest.approx(full - without, abs=1e-12) and len(inside) == 4


def test_causal_lm_prompt_spans(tmp_path):
    lm = salience.CausalLM(build_model(), build_tokenizer())
    prompt = "the capital of france is"
    g = salience.explain(lm, prompt, method="occlusion", continuation=" paris", level="span", spans=[(0, 11), (12, 24)])
    words = salience.explain(lm, prompt, method="occlusion", continuation=" paris", level="word")
    assert g.scores.shape == (1, 2) and [f.text for f in g.features] == ["the capital", "of france is"]
    assert np.all(np.isfinite(g.scores)) and np.isfinite(words.scores[0, :5]).all()


@pytest.mark.parametrize("spans, message", [
    (None, "needs spans"),
    ([(5, 3)], "outside the first text"),
    ([(0, 1000)], "outside the first text"),
    ([(3, 4)], "holds no token"),
    ([("a", 2)], "a span is"),
])
def test_bad_spans_are_one_line_errors(toy, spans, message):
    options = {} if spans is None else {"spans": spans}
    with pytest.raises(salience.ParameterError, match=message):
        salience.explain(toy, TOY_TEXT, method="occlusion", level="span", **options)


def test_spans_need_the_span_level(toy):
    with pytest.raises(salience.ParameterError, match="level 'span'"):
        salience.explain(toy, TOY_TEXT, method="occlusion", spans=[(0, 3)])
