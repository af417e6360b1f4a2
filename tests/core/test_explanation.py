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
    assert json.loads(e.to_json())["schema"] == "salience.explanation/1"


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
