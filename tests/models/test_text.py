"""Encoding texts into features, the truncation policy, targets and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_PAIR, TOY_TEXT


def test_words_merge_subwords_and_map_to_characters(toy):
    encoded = toy.encode("The plot was unbelievable!")
    assert [w.text for w in encoded.words] == ["The", "plot", "was", "unbelievable", "!"]
    word = encoded.words[3]
    assert [encoded.tokens[t] for t in word.tokens] == ["un", "##believ", "##able"]
    assert "The plot was unbelievable!"[word.start:word.end] == "unbelievable"
    assert all(not encoded.special[t] for w in encoded.words for t in w.tokens)


def test_pair_features_carry_their_segment(toy):
    encoded = toy.encode(TOY_PAIR)
    segments = {w.segment for w in encoded.words}
    assert segments == {0, 1}
    for w in encoded.words:
        assert TOY_PAIR[w.segment][w.start:w.end] == w.text
    assert encoded.token_type_ids is not None and set(encoded.token_type_ids.tolist()) == {0, 1}


@pytest.mark.parametrize("text", ["", "   \n\t", ("premise", " ")])
def test_empty_text_is_refused(toy, text):
    with pytest.raises(salience.InputError, match="empty"):
        salience.explain(toy, text, method="sig")


def test_text_over_limit_errors_unless_truncated(toy):
    long_text = " ".join(["good film"] * 40)  # 80 words, limit 64 positions
    with pytest.raises(salience.InputError, match="over the model's limit of 64.*truncate"):
        salience.explain(toy, long_text, method="sig")
    with pytest.warns(salience.SalienceWarning, match="truncated"):
        e = salience.explain(toy, long_text, method="sig", truncate=True)
    assert e.truncated and len(e.tokens) == 64 and len(e.features) == 62


# the toy predicts each class on one of these (p = 0.998 for "positive" and for "negative")
@pytest.mark.parametrize("text, predicted", [("the film was superb", "positive"), ("the story is dull", "negative")])
def test_targets_by_index_and_label(toy, text, predicted):
    default = salience.explain(toy, text, method="sig")
    assert default.prediction.label == predicted
    assert default.target.index == default.prediction.index and default.target.label == predicted
    other = 1 - default.target.index
    by_label = salience.explain(toy, text, method="sig", target=toy.labels[other])
    by_index = salience.explain(toy, text, method="sig", target=other)
    assert by_label.target == by_index.target and by_label.target.index == other
    np.testing.assert_array_equal(by_label.scores, by_index.scores)
    # two classes: p_other = 1 - p_predicted, so each score (a probability difference) flips sign;
    # both are differences of float64 probabilities near 0 or 1, so they agree to ~1e-16 absolute
    assert np.abs(default.scores).max() > 1e-4  # scores large enough for the sign check to mean something
    np.testing.assert_allclose(by_label.scores, -default.scores, rtol=0, atol=1e-14)


def test_target_errors(toy):
    with pytest.raises(salience.TargetError, match="out of range"):
        salience.explain(toy, TOY_TEXT, method="sig", target=5)
    with pytest.raises(salience.TargetError, match="unknown target label 'neutral'.*negative, positive"):
        salience.explain(toy, TOY_TEXT, method="sig", target="neutral")


def test_unknown_method_and_parameter(toy):
    with pytest.raises(salience.UnknownMethodError, match="did you mean 'lime'"):
        salience.explain(toy, TOY_TEXT, method="limes")
    with pytest.raises(salience.ParameterError, match="has no parameter 'step'"):
        salience.explain(toy, TOY_TEXT, method="ig", step=3)
    with pytest.raises(salience.ParameterError, match="unknown output"):
        salience.explain(toy, TOY_TEXT, method="ig", output="odds")


def test_nan_model_output_is_an_error(toy):
    with torch.no_grad():
        toy.model.classifier.bias.fill_(float("nan"))
    with pytest.raises(salience.ModelOutputError, match="NaN or infinite"):
        salience.explain(toy, TOY_TEXT, method="sig")


def test_load_model_errors(tmp_path):
    with pytest.raises(salience.ModelLoadError, match="does not exist"):
        salience.load_model(str(tmp_path / "missing"))
    with pytest.raises(salience.ModelLoadError, match="no config.json"):
        salience.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(salience.ModelLoadError, match="not a sequence classifier"):
        salience.load_model(str(tmp_path))
    with pytest.raises(salience.ModelLoadError, match="unknown zoo model"):
        salience.load_model("zoo:nothing")


def test_wrapping_objects_puts_model_in_eval_mode(toy_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(toy_dir).train()
    wrapped = salience.TextClassifier(model, AutoTokenizer.from_pretrained(toy_dir))
    assert not model.training and wrapped.labels == ["negative", "positive"]
    e = salience.explain(wrapped, "good film", method="ig")
    assert e.model and e.prediction.label == "positive"


def test_hub_id_offline_is_a_clean_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(salience.ModelLoadError, match="cannot load 'no-such-org/no-such-model'"):
        salience.load_model("no-such-org/no-such-model")


def test_log_odds_is_the_default_and_does_not_saturate(toy):
    text = "the film was superb"  # p(positive) = 0.998 on the toy: saturated in probability
    odds = salience.explain(toy, text, method="occlusion")
    probability = salience.explain(toy, text, method="occlusion", output="probability")
    assert odds.target.output == "log_odds" and probability.target.output == "probability"
    p_full = odds.prediction.probabilities[odds.target.index]
    assert odds.output_value == pytest.approx(np.log(p_full / (1 - p_full)), rel=1e-9)
    # occlusion in log-odds: log-odds(x) - log-odds(x without the word), from the probabilities
    p_without = probability.output_value - probability.scores
    expected = np.log(p_full / (1 - p_full)) - np.log(p_without / (1 - p_without))
    np.testing.assert_allclose(odds.scores, expected, rtol=1e-7)  # float64 toy; log of 1 - 0.998 costs digits
    assert np.abs(odds.scores).max() > 10 * np.abs(probability.scores).max()
