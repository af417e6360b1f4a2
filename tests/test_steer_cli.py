"""``salience steer`` on the tiny seeded Llama saved to a folder (as tests/test_cli.py does): what the
command builds and saves equals :func:`salience.steer` on the same model and inputs, the printed
generations equal the Python API's, and bad input is one line.

Tolerance of the directions: 1e-12 absolute. The command and the reference run the same float
computations on the same CPU (one thread), so they agree bit for bit in practice; 1e-12 (unit
vectors of 16 values, float32 model weights read back as the saved dtype) only leaves room for a
different summation order. Token picks, alpha, strategy and generated texts: exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import salience
from salience.cli import main
from tiny_lm import build_model, build_tokenizer

PROMPTS = ["the film was very old and the plot was", "the city on the river was very", "it was a film in paris and it was"]
GOOD, BAD = " big", " small"
TOL = 1e-12
# a few fixed IG steps leave a large completeness delta on a random model (warned); the comparisons hold at any step count
pytestmark = pytest.mark.filterwarnings("ignore::salience.SalienceWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("steer") / "lm"
    build_model().save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(folder: Path) -> salience.CausalLM:
    model = salience.load_model(str(folder))
    assert isinstance(model, salience.CausalLM)
    return model


def assert_same(made: salience.Steering, expected: salience.Steering) -> None:
    assert made.layers == expected.layers and made.strategy == expected.strategy and made.alpha == expected.alpha
    for layer in expected.layers:
        np.testing.assert_allclose(made.directions[layer], expected.directions[layer], rtol=0, atol=TOL)
    assert [[p["position"] for p in pick["positive"] + pick["negative"]] for pick in made.picks] == \
        [[p["position"] for p in pick["positive"] + pick["negative"]] for pick in expected.picks]


def generations(printed: str) -> dict[str, tuple[str, str]]:
    """prompt -> (unsteered, steered) continuation as printed by --generate."""
    found = {}
    pattern = r"prompt: '(.*)'\n\s+unsteered:\s+'(.*)'\n\s+steered \(alpha [^)]*\):\s+'(.*)'"
    for prompt, plain, steered in re.findall(pattern, printed):
        found[prompt] = (plain, steered)
    return found


def test_grains_from_a_prompts_file_saved_as_safetensors_equals_the_api(folder, lm, tmp_path, capsys):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "positive.safetensors"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # a blank line is skipped
    status = main(["steer", "--model", str(folder), "--prompts", str(prompts), "--preferred", GOOD, "--dispreferred", BAD,
                   "--layers", "0-1", "--top-k", "2", "--steps", "4", "--alpha", "0.5", "--save", str(out), "--no-color"])
    assert status == 0
    printed = capsys.readouterr().out
    expected = salience.steer(lm, PROMPTS, GOOD, BAD, layers=[0, 1], top_k=2, steps=4, alpha=0.5)
    made = salience.Steering.load(out)
    assert_same(made, expected)
    assert made.method == "integrated_gradients" and made.params == {"steps": 4} and made.prompts == 3
    assert f"wrote {out}" in printed and "grains" in printed
    for pick in expected.picks:  # the chosen tokens are printed with their scores
        assert f"{pick['positive'][0]['token']!r} {pick['positive'][0]['score']:+.3g}" in printed


def test_mean_difference_with_per_prompt_continuation_files_saved_as_json(folder, lm, tmp_path):
    prompts, good, bad, out = (tmp_path / name for name in ("p.json", "good.json", "bad.txt", "plain.json"))
    goods, bads = [" big", " old", " new"], [" small", " new", " old"]
    prompts.write_text(json.dumps(PROMPTS), encoding="utf-8")
    good.write_text(json.dumps(goods), encoding="utf-8")
    bad.write_text("\n".join(bads), encoding="utf-8")  # one a line, the leading space kept
    assert main(["steer", "--model", str(folder), "--prompts", str(prompts), "--preferred-file", str(good),
                 "--dispreferred-file", str(bad), "--strategy", "mean_difference", "--layers", "1", "--save", str(out)]) == 0
    expected = salience.steer(lm, PROMPTS, goods, bads, layers=[1], strategy="mean_difference")
    made = salience.Steering.load(out)
    assert_same(made, expected)
    assert made.picks == [] and made.alpha == 1.0  # the API's default alpha


def test_generate_prints_the_unsteered_and_the_steered_continuation(folder, lm, tmp_path, capsys):
    saved = tmp_path / "s.safetensors"
    steering = salience.steer(lm, PROMPTS, GOOD, BAD, layers=[0, 1], top_k=2, steps=4, alpha=3.0)
    steering.save(saved)
    for alpha in ("20", "0"):
        assert main(["steer", "--model", str(folder), "--load", str(saved), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                     "--generate", "4", "--alpha", alpha, "--no-color"]) == 0
        found = generations(capsys.readouterr().out)
        assert sorted(found) == sorted(PROMPTS[:2])
        for prompt, (plain, steered) in found.items():
            assert plain == lm.encode(prompt, max_new_tokens=4).extras["continuation"]
            assert steered == steering.generate(lm, prompt, max_new_tokens=4, alpha=float(alpha))
            if alpha == "0":  # alpha = 0 leaves the model unchanged
                assert steered == plain
        if alpha == "20":  # the hooks were live: a strong shift changes some continuation
            assert any(plain != steered for plain, steered in found.values())
    # without --alpha the saved steering's own alpha is used
    assert main(["steer", "--model", str(folder), "--load", str(saved), "--prompt", PROMPTS[0], "--generate", "3"]) == 0
    printed = capsys.readouterr().out
    assert "steered (alpha 3)" in printed
    assert generations(printed)[PROMPTS[0]][1] == steering.generate(lm, PROMPTS[0], max_new_tokens=3)


def test_bad_input_is_one_line(folder, toy_dir, tmp_path, capsys):
    empty, saved = tmp_path / "empty.txt", tmp_path / "s.json"
    empty.write_text("\n  \n", encoding="utf-8")
    build = ["steer", "--model", str(folder), "--prompt", PROMPTS[0]]
    pair = ["--preferred", GOOD, "--dispreferred", BAD]
    assert main([*build, *pair, "--strategy", "mean_difference", "--layers", "0", "--save", str(saved)]) == 0
    capsys.readouterr()
    cases = [
        (["steer", "--model", str(folder), *pair], "at least one training prompt"),
        (["steer", "--model", str(folder), "--prompts", str(empty), *pair], "holds no texts"),
        (["steer", "--model", str(folder), "--prompts", str(tmp_path / "missing.txt"), *pair], "cannot read it"),
        ([*build, "--prompt", "  ", *pair], "is empty"),
        ([*build, "--dispreferred", BAD], "give --preferred"),
        ([*build, "--preferred", GOOD, "--preferred", " old", "--dispreferred", BAD], "2 continuations but 1 prompt;"),
        ([*build, *pair, "--layers", "7"], "layer 7 is not a decoder-layer index"),
        ([*build, *pair, "--layers", "one"], "is not a list of layer indices"),
        ([*build, *pair, "--layers", "3-1"], "is empty"),
        ([*build, *pair, "--alpha", "nan"], "--alpha must be a finite number"),
        ([*build, *pair, "--alpha", "inf"], "--alpha must be a finite number"),
        ([*build, *pair, "--generate", "0"], "--generate takes a positive number"),
        ([*build, *pair, "--load", str(saved)], "--load reads a saved steering; --preferred, --dispreferred"),
        (["steer", "--model", str(folder), "--load", str(saved), "--generate", "2"], "--generate needs at least one --prompt"),
        (["steer", "--model", str(folder), "--load", str(tmp_path / "none.json")], "no steering file"),
        (["steer", "--model", str(toy_dir), "--load", str(saved)], "needs a causal LM"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
