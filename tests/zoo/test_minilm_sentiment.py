"""zoo:minilm-sentiment loads, is what its metadata says, and predicts sensibly (needs the fetched assets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from salience.datasets.movie_snippets import split_movie_snippets
from salience.zoo.minilm_sentiment import MAX_LENGTH, WEIGHTS_PATH, build_minilm_sentiment, load_metadata

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def zoo_model():
    return build_minilm_sentiment()


def _positive_probability(zoo_model, texts: list[str]) -> torch.Tensor:
    model, tokenizer = zoo_model
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return model(**enc).logits.softmax(-1)[:, 1]


def test_loads_in_eval_mode_with_labels(zoo_model) -> None:
    model, tokenizer = zoo_model
    assert not model.training
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    assert tokenizer.is_fast
    assert tokenizer.convert_tokens_to_ids("film") != tokenizer.unk_token_id
    assert tokenizer.unk_token_id not in tokenizer("A gripping film.")["input_ids"]


def test_shipped_weights_are_loaded(zoo_model) -> None:
    model, _ = zoo_model
    shipped = load_file(WEIGHTS_PATH)
    state = model.state_dict()
    assert set(shipped) == set(load_metadata()["trained_parameters"])
    assert any(name.startswith("bert.encoder.layer.5.") for name in shipped)
    for name, tensor in shipped.items():
        assert name in state
        assert torch.equal(state[name], tensor)
    assert WEIGHTS_PATH.stat().st_size < 10 * 2**20


def test_metadata_claims() -> None:
    meta = load_metadata()
    assert meta["dataset"]["split_sizes"] == {"train": 7_568, "validation": 1_000, "test": 2_000}
    assert meta["accuracy"]["test"] >= 0.75


def test_obvious_held_out_sentences(zoo_model) -> None:
    """The 4 most negative and 4 most positive held-out test sentences: at least 6 of 8 right."""
    test = sorted(split_movie_snippets()["test"], key=lambda s: (s.valence, int(s.id)))
    picked = test[:4] + test[-4:]
    predicted = (_positive_probability(zoo_model, [s.text for s in picked]) > 0.5).long().tolist()
    assert sum(p == s.label for p, s in zip(predicted, picked, strict=True)) >= 6


def test_hand_written_sentences(zoo_model) -> None:
    model, _ = zoo_model
    p = _positive_probability(zoo_model, ["A gripping, beautifully acted film.", "A dull, lifeless mess."])
    assert model.config.id2label[int(p[0] > 0.5)] == "positive"
    assert model.config.id2label[int(p[1] > 0.5)] == "negative"


@pytest.mark.slow
def test_held_out_accuracy_is_what_the_readme_states(zoo_model) -> None:
    """Recompute the README's held-out accuracy from the shipped weights (not from the JSON the
    training wrote): the seed-0 "test" split, label = sign of the mean human valence, batches of 64
    in split order truncated to the training length, as scripts/train_zoo_minilm.py measured it."""
    model, tokenizer = zoo_model
    test = split_movie_snippets(seed=0)["test"]
    assert len(test) == 2000 and all(s.valence != 0 for s in test)  # zero-valence sentences were dropped
    labels = torch.tensor([int(s.valence > 0) for s in test])
    predicted = []
    with torch.no_grad():
        for start in range(0, len(test), 64):
            enc = tokenizer([s.text for s in test[start:start + 64]], truncation=True, max_length=MAX_LENGTH,
                            padding=True, return_tensors="pt")
            predicted.append(model(**enc).logits.argmax(-1))
    correct = int((torch.cat(predicted) == labels).sum())
    section = README.read_text().split("**`zoo:minilm-sentiment`**", 1)[-1]  # this model's paragraph
    stated = re.search(r"Held-out test accuracy \*\*([0-9.]+)\*\* on ([0-9,]+) sentences", section)
    assert stated is not None, "the README no longer states the held-out accuracy in the expected words"
    assert int(stated.group(2).replace(",", "")) == len(test)
    # a count out of 2,000: the accuracy is a multiple of 0.0005, so 4 decimals are exact
    assert round(correct / len(test), 4) == float(stated.group(1)) == load_metadata()["accuracy"]["test"]
