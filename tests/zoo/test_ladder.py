"""The size ladder: cutting a BERT to k layers, the LM + linear head classifier, and the built models.

The cut and the head are checked on tiny seeded float64 models (always run); the trained ladder
MiniLMs are checked only where ``scripts/train_size_ladder.py minilm`` has built them on this
machine (their weights live in the cache, not in the repository), the SmolLM2 head where the
SmolLM2 asset is installed.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import salience
from salience.datasets.movie_snippets import split_movie_snippets
from salience.errors import AssetMissingError, ModelLoadError, ParameterError
from salience.models.loading import ZOO, load_model
from salience.zoo import minilm_ladder as ladder
from tiny_lm import build_model, build_tokenizer

README = Path(__file__).resolve().parents[2] / "README.md"
TIGHT = 1e-12  # float64, the same operations in the same order: only summation-order rounding


def tiny_bert(layers: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).double().eval()


def test_cut_keeps_the_first_layers() -> None:
    full = tiny_bert(3)
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = full.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for k in (1, 2, 3):
            cut = ladder.cut_to_layers(copy.deepcopy(full), k)
            assert cut.config.num_hidden_layers == k and len(cut.bert.encoder.layer) == k
            out = cut.bert(input_ids=ids, attention_mask=mask)
            # hidden_states[k] is the output of layer k - 1: the cut model's last hidden state
            torch.testing.assert_close(out.last_hidden_state, hidden[k], rtol=0, atol=TIGHT)
            expected = full.classifier(full.bert.pooler(hidden[k]))
            torch.testing.assert_close(cut(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=TIGHT)


@pytest.mark.parametrize("layers", [0, 4])
def test_cut_refuses_impossible_depths(layers: int) -> None:
    with pytest.raises(ParameterError, match=f"cannot cut a 3-layer model to {layers} layers"):
        ladder.cut_to_layers(tiny_bert(3), layers)


def test_cut_refuses_a_model_without_bert_layers() -> None:
    with pytest.raises(ParameterError, match="no BERT encoder layer list"):
        ladder.cut_to_layers(build_model(), 1)


def test_lm_head_classifier_reads_the_last_real_token() -> None:
    lm = build_model(seed=1)
    torch.manual_seed(2)
    weight = torch.randn(2, lm.config.hidden_size, dtype=torch.float64)
    pad = 2  # "</s>" in tests.tiny_lm
    clf = ladder.lm_head_classifier(lm, weight, pad_token_id=pad)
    assert clf.model is lm.model  # the body is shared, not copied
    assert not any(p.is_meta for p in clf.parameters())
    rows = [[1, 5, 6, 7, 8, 9], [1, 10, 11]]
    ids = torch.tensor([rows[0], rows[1] + [pad] * 3])  # right padding
    with torch.no_grad():
        logits = clf(input_ids=ids, attention_mask=(ids != pad).long()).logits
        for i, row in enumerate(rows):
            last = lm.model(input_ids=torch.tensor([row])).last_hidden_state[0, -1]  # after the final norm
            torch.testing.assert_close(logits[i], weight @ last, rtol=0, atol=1e-10)


def test_lm_head_classifier_through_the_text_adapter() -> None:
    lm = build_model(seed=1)
    tokenizer = build_tokenizer()
    tokenizer.pad_token = "</s>"
    torch.manual_seed(3)
    weight = torch.randn(2, lm.config.hidden_size, dtype=torch.float64)
    adapter = salience.TextClassifier(ladder.lm_head_classifier(lm, weight, pad_token_id=tokenizer.pad_token_id), tokenizer)
    assert adapter.labels == ["negative", "positive"]
    text = "the film was very old"
    with torch.no_grad():
        last = lm.model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0, -1]
    expected = torch.softmax(weight @ last, -1)
    got = adapter.predict(adapter.encode(text)).probabilities
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, rtol=0, atol=1e-10)


def test_lm_head_classifier_refuses_a_wrong_weight() -> None:
    with pytest.raises(ParameterError, match=r"head weight must be \(classes, 16\)"):
        ladder.lm_head_classifier(build_model(), torch.zeros(2, 8), pad_token_id=2)


def test_registered_in_the_zoo() -> None:
    for name in ("minilm-l2-sentiment", "minilm-l4-sentiment", "minilm-l6-sentiment", "smollm2-sentiment-head"):
        assert name in ZOO


def test_missing_ladder_weights_name_the_script(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"zoo:minilm-l4-sentiment is not built on this machine .*"
                                             r"python scripts/train_size_ladder.py minilm --layers 4"):
        load_model("zoo:minilm-l4-sentiment")
    with pytest.raises(ParameterError, match="not 3"):
        ladder.build_minilm_ladder(3)


def _record(layers: int) -> dict:
    path = ladder.ladder_metadata_path(layers)
    if ladder.shipped_delta_path(layers).is_file():
        pytest.skip(f"zoo:minilm-l{layers}-sentiment ships in the package (checked by the shipped-model test)")
    if not ladder.ladder_weights_path(layers).is_file() or not path.is_file():
        pytest.skip(f"zoo:minilm-l{layers}-sentiment is not built on this machine "
                    f"(python scripts/train_size_ladder.py minilm --layers {layers})")
    return json.loads(path.read_text())


@pytest.mark.parametrize("layers", ladder.LADDER_LAYERS)
def test_built_ladder_model_reproduces_its_record(layers: int) -> None:
    record = _record(layers)
    adapter = load_model(f"zoo:minilm-l{layers}-sentiment")
    model, tokenizer = adapter.model, adapter.tokenizer
    assert len(model.bert.encoder.layer) == layers and not model.training
    assert sum(p.numel() for p in model.parameters()) == record["n_parameters"]
    test = split_movie_snippets(seed=record["seed"])["test"][:100]
    with torch.no_grad():
        enc = tokenizer([s.text for s in test], padding=True, truncation=True, max_length=128, return_tensors="pt")
        predicted = "".join(map(str, model(**enc).logits.argmax(-1).tolist()))
    assert predicted == record["test_predictions"][:100]  # the written weights are the measured ones
    assert record["test"]["accuracy"] > 0.7


def test_shipped_l6_reproduces_its_record() -> None:
    """The zoo default, rebuilt from its int8 weight difference and the MiniLM asset, gives the test
    predictions recorded when it was packed (which equal the float32 model's on all 2,000)."""
    try:
        adapter = load_model("zoo:minilm-l6-sentiment")
    except AssetMissingError as error:
        pytest.skip(f"the MiniLM asset is not installed here: {error}")
    record = json.loads(ladder.shipped_metadata_path(6).read_text())
    shipped = record["shipped"]
    assert shipped["test_predictions_changed_by_packing"] == 0 and shipped["test"]["accuracy"] > 0.85
    assert len(shipped["base_checksums"]) > 30  # the loader checks the MiniLM asset against them
    model, tokenizer = adapter.model, adapter.tokenizer
    assert len(model.bert.encoder.layer) == 6 and not model.training
    assert sum(p.numel() for p in model.parameters()) == record["n_parameters"]
    test = split_movie_snippets(seed=record["seed"])["test"][:64]
    with torch.no_grad():
        enc = tokenizer([s.text for s in test], padding=True, truncation=True, max_length=128, return_tensors="pt")
        predicted = "".join(map(str, model(**enc).logits.argmax(-1).tolist()))
    assert predicted == shipped["test_predictions"][:64]


@pytest.mark.slow  # 2,000 sentences through the 6-layer model: about 30 s on 2 cores
def test_shipped_l6_held_out_accuracy_is_what_the_readme_states() -> None:
    """Recompute the default's held-out accuracy from the shipped weights (not from the record) on all
    2,000 test sentences, and compare it with the README and the record."""
    try:
        adapter = load_model("zoo:minilm-l6-sentiment")
    except AssetMissingError as error:
        pytest.skip(f"the MiniLM asset is not installed here: {error}")
    model, tokenizer = adapter.model, adapter.tokenizer
    test = split_movie_snippets(seed=0)["test"]
    labels = torch.tensor([s.label for s in test])
    predicted = []
    with torch.no_grad():
        for start in range(0, len(test), 64):
            enc = tokenizer([s.text for s in test[start:start + 64]], truncation=True, max_length=128, padding=True,
                            return_tensors="pt")
            predicted.append(model(**enc).logits.argmax(-1))
    accuracy = round(float((torch.cat(predicted) == labels).float().mean()), 4)  # a multiple of 0.0005: exact
    section = README.read_text().split("**`zoo:minilm-l6-sentiment`**", 1)[-1]
    stated = re.search(r"Held-out test accuracy \*\*([0-9.]+)\*\* on ([0-9,]+) sentences", section)
    assert stated is not None, "the README no longer states the default's held-out accuracy in the expected words"
    assert int(stated.group(2).replace(",", "")) == len(test) == 2000
    shipped = json.loads(ladder.shipped_metadata_path(6).read_text())["shipped"]
    assert accuracy == float(stated.group(1)) == shipped["test"]["accuracy"]


def test_missing_head_names_the_script(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ladder, "HEAD_WEIGHTS_PATH", tmp_path / "absent.safetensors")
    with pytest.raises(ModelLoadError, match=r"run `python scripts/train_size_ladder.py smollm2-head`"):
        ladder.build_smollm2_sentiment_head()


def test_shipped_smollm2_head_reproduces_its_record() -> None:
    """The committed head (2 x 576) on SmolLM2's frozen body gives the recorded test predictions in
    padded batches (they were measured on unpadded, cached features)."""
    try:
        adapter = load_model("zoo:smollm2-sentiment-head")
    except AssetMissingError as error:
        pytest.skip(f"SmolLM2 is not installed here: {error}")
    record = ladder.load_head_metadata()
    model, tokenizer = adapter.model, adapter.tokenizer
    assert type(model).__name__ == "LlamaForSequenceClassification" and not model.training
    assert model.config.pad_token_id == tokenizer.pad_token_id
    test = split_movie_snippets(seed=record["seed"])["test"][:16]
    with torch.no_grad():
        enc = tokenizer([s.text for s in test], padding=True, return_tensors="pt")
        predicted = "".join(map(str, model(**enc).logits.argmax(-1).tolist()))
    assert predicted == record["test_predictions"][:16]
    assert adapter.predict(adapter.encode(test[0].text)).index == int(record["test_predictions"][0])
    assert record["test"]["accuracy"] > 0.8
