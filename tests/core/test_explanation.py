"""Explanation: JSON round trip without pickle, HTML escaping, terminal rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

import salience
from conftest import TOY_PAIR, TOY_TEXT


@pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR])
def test_json_round_trip(toy, inputs):
    e = salience.explain(toy, inputs, method="ig", level="token")
    back = salience.Explanation.from_json(e.to_json())
    assert back.input == e.input and back.features == e.features and back.target == e.target
    np.testing.assert_array_equal(back.scores, e.scores)
    np.testing.assert_array_equal(back.token_scores, e.token_scores)
    assert back.prediction == e.prediction and back.cost == e.cost and back.delta == e.delta
    assert json.loads(e.to_json())["schema"] == "salience.explanation/2"


def test_version_1_documents_still_load():
    v1 = {"schema": "salience.explanation/1", "input": "a good film", "input_is_pair": False, "level": "word",
          "features": [{"text": "a", "start": 0, "end": 1, "segment": 0, "tokens": [1]},
                       {"text": "good", "start": 2, "end": 6, "segment": 0, "tokens": [2]},
                       {"text": "film", "start": 7, "end": 11, "segment": 0, "tokens": [3]}],
          "scores": [0.1, 0.5, -0.2], "method": "occlusion", "params": {"baseline": "mask"}, "model": "m",
          "target": {"index": 1, "label": "positive", "output": "probability"},
          "prediction": {"index": 1, "label": "positive", "probabilities": [0.2, 0.8]},
          "output_value": 0.8, "baseline_value": None, "delta": None,
          "cost": {"forward_passes": 4, "backward_passes": 0, "model_calls": 1, "seconds": 0.01},
          "truncated": False, "tokens": ["[CLS]", "a", "good", "film", "[SEP]"], "token_scores": None, "warnings": []}
    e = salience.Explanation.from_dict(v1)
    assert e.kind == "text" and e.targets == [e.target] and e.target.label == "positive" and e.target.position is None
    np.testing.assert_array_equal(e.scores, [0.1, 0.5, -0.2])
    assert [f.text for f in e.features] == ["a", "good", "film"] and e.output_value == 0.8
    assert salience.Explanation.from_json(e.to_json()).to_dict() == e.to_dict()  # re-saved as version 2


def test_multi_target_scores_and_large_arrays_round_trip(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion", target="all", level="token")
    assert e.scores.shape == (2, len(e.features)) and [t.index for t in e.targets] == [0, 1]
    single = [salience.explain(toy, TOY_TEXT, method="occlusion", target=i, level="token").scores for i in (0, 1)]
    np.testing.assert_allclose(e.scores, np.stack(single), rtol=0, atol=1e-15)  # shared rows, same numbers
    big = np.random.default_rng(0).normal(size=(3, 400))
    from salience.core.explanation import decode_array, encode_array

    packed = encode_array(big)
    assert isinstance(packed, dict) and "base64" in packed  # 1,200 values: not a JSON list
    np.testing.assert_array_equal(decode_array(json.loads(json.dumps(packed))), big)
    back = salience.Explanation.from_json(e.to_json())
    np.testing.assert_array_equal(back.scores, e.scores)
    assert back.targets == e.targets and np.allclose(back.output_value, e.output_value)


def test_unknown_schema_is_refused(toy):
    data = salience.explain(toy, TOY_TEXT, method="sig").to_dict()
    data["schema"] = "salience.explanation/99"
    with pytest.raises(ValueError, match="unsupported explanation schema"):
        salience.Explanation.from_dict(data)


def test_html_escapes_untrusted_text(toy):
    text = 'good <script>alert("x")</script> & film'
    page = salience.explain(toy, text, method="sig").to_html()
    assert "<script" not in page and "</script" not in page
    assert "&lt;" in page and "&amp;" in page and "&quot;" in page
    assert page.startswith("<!DOCTYPE html>")


def test_terminal_shows_sign_without_colour(toy):
    e = salience.explain(toy, TOY_TEXT, method="sig")
    console = Console(no_color=True, width=120, record=True)
    console.print(e)
    text = console.export_text()
    assert "method sequential_integrated_gradients" in text
    top, score = e.top(1)[0]
    assert f"{score:+.4f}" in text and "+█" in text


def test_position_scores_equal_to_the_scores_are_stored_once():
    import dataclasses

    from tiny_cnn import photo, tiny_classifier

    e = salience.explain(tiny_classifier(), photo(), method="saliency")  # pixel level: one feature per position
    assert e.level == "pixel" and np.array_equal(e.scores, e.token_scores) and e.scores.size > 100
    other = dataclasses.replace(e, token_scores=e.token_scores * (1 + 1e-15))  # differs only in the last bits
    assert e.to_dict()["token_scores"] == {"same_as": "scores"} != other.to_dict()["token_scores"]
    assert len(e.to_json()) < 0.6 * len(other.to_json())
    for original in (e, other):
        back = salience.Explanation.from_json(original.to_json())
        np.testing.assert_array_equal(back.token_scores, original.token_scores)
        np.testing.assert_array_equal(back.scores, original.scores)
    # arrays large enough to be base64: equal ones stored once, different ones kept apart
    from salience.core.explanation import _token_scores_from_json, _token_scores_json, encode_array

    big = np.random.default_rng(2).normal(size=(1, 600))
    near = big * (1 + 1e-15)
    for positions, marker in ((big.copy(), {"same_as": "scores"}), (near, None)):
        stored = json.loads(json.dumps(_token_scores_json(positions, big)))
        assert marker is None and "base64" in stored or stored == marker
        np.testing.assert_array_equal(_token_scores_from_json(stored, encode_array(big)), positions)
