"""The command line: explain to terminal/HTML/JSON, list methods, one-line errors."""

from __future__ import annotations

import json

import salience
from salience.cli import main


def test_explain_writes_html_and_json(toy_dir, tmp_path, capsys):
    html, out = tmp_path / "e.html", tmp_path / "e.json"
    status = main(["explain", "--model", str(toy_dir), "--text", "the film was good", "--pair", "good", "dull",
                   "--method", "sig", "--method", "ig", "--param", "ig.steps=16", "--html", str(html), "--json", str(out),
                   "--no-color"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "method integrated_gradients" in printed and "good" in printed
    bundle = json.loads(out.read_text())
    assert bundle["schema"] == "salience.explanations/1" and len(bundle["explanations"]) == 4
    restored = salience.Explanation.from_dict(bundle["explanations"][2])
    assert restored.method == "integrated_gradients" and restored.params["steps"] == 16
    assert "<!DOCTYPE html>" in html.read_text()


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    for info in salience.methods():
        assert info.name[:10] in printed


def test_errors_are_one_line(toy_dir, capsys):
    cases = [
        (["explain", "--model", str(toy_dir), "--text", "  "], "empty"),
        (["explain", "--model", str(toy_dir), "--text", "good", "--method", "nope"], "unknown method"),
        (["explain", "--model", str(toy_dir), "--text", "good", "--target", "neutral"], "unknown target label"),
        (["explain", "--model", "/no/such/dir", "--text", "good"], "does not exist"),
        (["explain", "--model", str(toy_dir), "--text", "good", "--param", "steps=3", "--method", "lime"], "no chosen method"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_target_index_from_cli(toy_dir, tmp_path):
    out = tmp_path / "e.json"
    assert main(["explain", "--model", str(toy_dir), "--text", "good film", "--target", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["explanations"][0]["target"]["label"] == "negative"


def test_zero_shot_from_cli(toy_dir, tmp_path):
    import shutil

    nli = tmp_path / "nli"
    shutil.copytree(toy_dir, nli)
    config = json.loads((nli / "config.json").read_text())
    config["id2label"] = {"0": "contradiction", "1": "entailment"}
    config["label2id"] = {"contradiction": 0, "entailment": 1}
    (nli / "config.json").write_text(json.dumps(config))
    out = tmp_path / "z.json"
    assert main(["explain", "--model", str(nli), "--text", "the film was good", "--zero-shot", "good,awful",
                 "--template", "it is {} .", "--json", str(out)]) == 0
    explanation = json.loads(out.read_text())["explanations"][0]
    assert explanation["target"]["label"] in ("good", "awful") and len(explanation["prediction"]["probabilities"]) == 2


def test_explain_an_image_writes_png_and_html(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    photo, png, html = tmp_path / "cat.png", tmp_path / "o.png", tmp_path / "o.html"
    Image.fromarray(data.chelsea()).save(photo)
    status = main(["explain", "--model", "zoo:efficientnet-lite0", "--image", str(photo), "--method", "occlusion",
                   "--level", "patch", "--patch-size", "56", "--png", str(png), "--html", str(html), "--no-color"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Egyptian cat" in printed and str(png) in printed
    assert png.read_bytes().startswith(b"\x89PNG") and "data:image/png;base64," in html.read_text()


def test_explain_a_generation(tmp_path, capsys):
    from tiny_lm import build_model, build_tokenizer

    folder = tmp_path / "lm"
    build_model().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    out = tmp_path / "g.json"
    status = main(["explain", "--model", str(folder), "--prompt", "the capital of france is", "--max-new-tokens", "3",
                   "--method", "occlusion", "--json", str(out), "--no-color"])
    assert status == 0
    e = salience.Explanation.from_dict(json.loads(out.read_text())["explanations"][0])
    assert e.kind == "generation" and e.scores.shape == (3, len(e.features)) and e.target.output == "probability"


def test_an_input_for_another_kind_of_model_is_one_line(toy_dir, capsys):
    assert main(["explain", "--model", str(toy_dir), "--image", "cat.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image was given" in err and "text classifier" in err


def test_classifiers_explain_the_log_odds_by_default(toy_dir, tmp_path):
    out = tmp_path / "e.json"
    assert main(["explain", "--model", str(toy_dir), "--text", "the film was good", "--method", "occlusion",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())["explanations"][0]
    assert data["target"]["output"] == "log_odds"


def test_spans_from_the_cli(toy_dir, tmp_path):
    out = tmp_path / "s.json"
    assert main(["explain", "--model", str(toy_dir), "--text", "the film was good", "--method", "occlusion",
                 "--level", "span", "--span", "0:8", "--span", "9:17", "--json", str(out)]) == 0
    features = json.loads(out.read_text())["explanations"][0]["features"]
    assert [f["text"] for f in features] == ["the film", "was good"]
