"""Image explanations render: a PNG overlay with a colour bar (several side by side), HTML with the
overlay as a data: URI and escaped text, a short terminal summary naming the PNG."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import salience
from salience.errors import ParameterError
from salience.models.image import ImageClassifier
from salience.render.png import explanation_png, is_signed
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import GRID, build_tiny_cnn, photo


@pytest.fixture(scope="module")
def explanations() -> list[salience.Explanation]:
    model = ImageClassifier(build_tiny_cnn(), ImagePreprocess(crop=GRID), ["<b>cat</b>", "dog & co", "bird"], name="tiny")
    image = photo(40, 60)
    return [salience.explain(model, image, method="ig", steps=8, target=0),
            salience.explain(model, image, method="saliency", target=0)]


def test_png_overlays_side_by_side_and_the_path_is_remembered(explanations, tmp_path):
    one = explanations[0].to_png(str(tmp_path / "one.png"))
    two = explanation_png(explanations, tmp_path / "two.png")
    with Image.open(one) as a, Image.open(two) as b:
        assert a.format == b.format == "PNG"
        assert b.width > 1.7 * a.width and abs(b.height - a.height) < 0.2 * a.height
    assert explanations[0].extras["_png"] == str(tmp_path / "two.png")
    assert "_png" not in explanations[0].to_dict()["extras"]


def test_signed_methods_get_a_diverging_map_and_magnitudes_a_sequential_one(explanations):
    assert is_signed(explanations[0]) and not is_signed(explanations[1])


def test_png_after_loading_from_json_with_or_without_the_picture(explanations, tmp_path):
    loaded = salience.Explanation.from_json(explanations[0].to_json())
    alone = loaded.to_png(str(tmp_path / "alone.png"))
    over = loaded.to_png(str(tmp_path / "over.png"), image=photo(40, 60))
    for path in (alone, over):
        with Image.open(path) as picture:
            assert picture.width > 100


def test_png_refuses_other_kinds_of_explanation(tmp_path):
    text = salience.Explanation(input="good film", features=[salience.Feature("good", 0, 4, 0, (1,))], scores=np.array([0.5]),
                                method="occlusion", params={}, model="m", target=salience.Target(1, "positive"), prediction=None)
    with pytest.raises(ParameterError, match="PNG output draws image explanations; this one explains a text"):
        text.to_png(str(tmp_path / "text.png"))


def test_html_embeds_the_overlay_and_escapes_text(explanations):
    html = salience.render.explanation_html(explanations)
    assert html.count('src="data:image/png;base64,') == 2
    payload = html.split('src="data:image/png;base64,')[1].split('"')[0]
    with Image.open(io.BytesIO(base64.b64decode(payload))) as picture:
        assert picture.format == "PNG"
    assert "&lt;b&gt;cat&lt;/b&gt;" in html and "<b>cat</b>" not in html
    assert "colour bar states the sign convention" in html


def test_terminal_shows_a_summary_and_the_png_path(explanations, tmp_path):
    console = Console(record=True, width=200)
    e = salience.explain(ImageClassifier(build_tiny_cnn(), ImagePreprocess(crop=GRID)), photo(), method="saliency")
    console.print(e)
    text = console.export_text()
    assert "heatmap 30x20 (W x H)" in text and "PNG: not written" in text
    e.to_png(str(tmp_path / "shown.png"))
    console.print(e)
    assert f"PNG: {tmp_path / 'shown.png'}" in console.export_text()
