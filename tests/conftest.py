"""Session fixtures: a tiny planted-word BERT classifier, trained once and loaded through the real
``load_model`` path, in float64 so that identities can be checked tightly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import salience  # noqa: E402
from toy import build_toy_classifier  # noqa: E402

# One positive and one negative planted word: a tie the toy never saw in training (its sentences
# always have more of one kind). It predicts "negative" with p = 0.998, as for a plainly negative
# sentence ("the plot was dull": 0.998; logit gap 6.1 against 6.4): saturated, not a borderline case.
TOY_TEXT = "the film was good , but the plot was dull and unbelievable !"
TOY_PAIR = ("the film was superb", "the story is dull")


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_classifier(tmp_path_factory.mktemp("toy") / "model")


@pytest.fixture()
def toy(toy_dir: Path) -> salience.TextClassifier:
    """A fresh float64 adapter per test (model state cannot leak between tests)."""
    model = salience.load_model(str(toy_dir))
    model.model.double()
    return model


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
