"""Datasets: JSONL validation (line numbers, --skip-invalid, rationale errors), movie-snippets with
the lexicon reference, and the planted task's ground truth."""

from __future__ import annotations

import pytest
from evalkit import toy_records, write_jsonl

from salience.evaluate.datasets import DatasetError, load_dataset, marks_from_json, text_words


def test_jsonl_texts_pairs_labels_and_rationales(toy, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "text": "the film was good , but dull", "label": 1, "rationale": [3, 6]},
        {"text": "a lovely story", "label": "positive", "rationale": [[2, 8]]},  # span of "lovely"
        "",  # blank lines are not examples
        {"premise": "the plot is dull", "hypothesis": "it was great", "rationale": [[0, 12, 16], [1, 7, 12]]},
        {"id": 7, "text": "the actor is superb"},
    ])
    data = load_dataset(str(path), toy)
    assert [e.id for e in data.examples] == ["a", "line-2", "line-4", "7"]
    first, second, pair, plain = data.examples
    assert first.rationale == (0, 0, 0, 1, 0, 0, 1) and first.label == 1 and first.line == 1
    assert second.rationale == (0, 1, 0) and second.label == "positive"
    assert pair.input == ("the plot is dull", "it was great")
    assert pair.rationale == (0, 0, 0, 1, 0, 0, 1)
    assert plain.rationale is None and plain.label is None
    assert data.reference == "annotated" and data.total == 4 and data.fingerprint.startswith("jsonl/sha256-")
    assert len(first.rationale) == len(toy.encode(first.input).words)


def test_malformed_lines_are_reported_with_line_numbers(toy, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "the film was good"},
        "{not json",
        {"txt": "typo"},
        ["a", "list"],
        {"text": "the plot was dull", "rationale": [9]},
        {"text": "good", "rational": [0]},
        {"text": "   "},
        {"label": 1},
    ])
    with pytest.raises(DatasetError) as caught:
        load_dataset(str(path), toy)
    message = str(caught.value)
    assert "7 invalid lines" in message and "--skip-invalid" in message and "\n" not in message
    for expected in ("line 2: not valid JSON", "line 3: unknown field 'txt' (did you mean 'text'?)",
                     "line 4: expected a JSON object", "line 5: example 'line-5': rationale word index 9 is out of range",
                     "line 6: unknown field 'rational'",
                     "(2 more)"):
        assert expected in message
    data = load_dataset(str(path), toy, skip_invalid=True)
    assert [e.id for e in data.examples] == ["line-1"]
    assert len(data.skipped) == 7 and data.skipped[-2].startswith("line 7: example 'line-7': the text is empty")
    assert data.skipped[-1] == 'line 8: no "text" (or "premise" and "hypothesis") field'


def test_rationale_must_match_the_words(toy, tmp_path):
    cases = [
        ({"id": "cut", "text": "the film was good", "rationale": [[4, 6]]}, "cuts through the word 'film'"),
        ({"id": "gap", "text": "the film  was good", "rationale": [[8, 9]]}, "covers no word"),
        ({"id": "far", "text": "the film", "rationale": [[4, 40]]}, "outside the text"),
        ({"id": "seg", "text": "the film", "rationale": [[0, 0, 3]]}, "are for premise/hypothesis pairs"),
        ({"id": "kind", "text": "the film", "rationale": ["film"]}, "neither a word index nor"),
        ({"id": "dup", "text": "the film"}, None),
    ]
    for record, expected in cases:
        path = write_jsonl(tmp_path / "r.jsonl", [record, {"id": "dup", "text": "a film"}] if record["id"] == "dup" else [record])
        with pytest.raises(DatasetError) as caught:
            load_dataset(str(path), toy)
        assert (expected or "id 'dup' repeats line 1") in str(caught.value)
        if expected:
            assert f"example {record['id']!r}" in str(caught.value)


def test_words_follow_the_adapter(toy):
    text = "unbelievable, isn't it?"
    assert [text[s:e] for _, s, e in text_words(text)] == [w.text for w in toy.encode(text).words]
    assert marks_from_json(text, [[0, 13]]) == {0, 1}


def test_unknown_dataset_and_missing_file(toy, tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'sst2'"):
        load_dataset("sst2", toy)
    with pytest.raises(DatasetError, match="cannot read dataset"):
        load_dataset(str(tmp_path / "missing.jsonl"), toy)
    with pytest.raises(DatasetError, match="holds no valid example"):
        load_dataset(str(write_jsonl(tmp_path / "empty.jsonl", [""])), toy)


def test_limit_keeps_the_first_examples(toy, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", toy_records(5))
    assert [e.id for e in load_dataset(str(path), toy, limit=2).examples] == ["ex0", "ex1"]


def test_movie_snippets_marks_lexicon_words(toy):
    from salience.datasets.movie_snippets import load_vader_lexicon, split_movie_snippets

    data = load_dataset("movie-snippets", toy, limit=30)
    test = split_movie_snippets()["test"][:30]
    assert [e.id for e in data.examples] == [s.id for s in test]  # the held-out split, in its fixed order
    lexicon = {w.lower(): v for w, v in load_vader_lexicon().items()}
    for example in data.examples:
        words = toy.encode(example.input).words
        marked = {w.text.lower() for w, r in zip(words, example.rationale) if r}
        expected = {w.text.lower() for w in words if abs(lexicon.get(w.text.lower(), 0)) >= 1.5}
        assert marked == expected
    assert sum(any(e.rationale) for e in data.examples) > 15
    looser = load_dataset("movie-snippets", toy, limit=30, lexicon_threshold=1.0)
    assert sum(map(sum, (e.rationale for e in looser.examples))) > sum(map(sum, (e.rationale for e in data.examples)))
    assert looser.fingerprint != data.fingerprint and data.reference == "lexicon"
    with pytest.raises(DatasetError, match="no split 'dev'"):
        load_dataset("movie-snippets", toy, split="dev")


def test_planted_rationale_marks_the_planted_tokens(toy):
    from salience.zoo.planted import PLANTED

    data = load_dataset("planted", toy, limit=50)
    planted_words = set(PLANTED[0] + PLANTED[1])
    for example in data.examples:
        words = example.input.split()
        assert {w for w, r in zip(words, example.rationale) if r} <= planted_words
        assert sum(example.rationale) == sum(w in planted_words for w in words) >= 1
        assert example.label in ("A", "B")
        assert {w for w in words if w in planted_words} <= set(PLANTED["AB".index(example.label)])


def test_examples_round_trip_through_json_without_pickle():
    """The Ray engine sends examples to its workers as JSON: every kind of input comes back equal."""
    import numpy as np

    from salience.evaluate.datasets import DatasetError, Example

    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    cases = [Example("t", "a text", "positive", (0.0, 1.0), line=3),
             Example("p", ("premise", "hypothesis"), 1),
             Example("f", image, 7, reference="fashion-mnist:test:7"),
             Example("i", "/photos/cat.jpg", 281, box=(1, 2, 30, 40), reference="/photos/cat.jpg")]
    for example in cases:
        back = Example.from_json(example.to_json())
        if isinstance(example.input, np.ndarray):
            assert back.input.dtype == np.uint8 and np.array_equal(back.input, example.input)
            assert back.input.flags.writeable
            assert (back.id, back.label, back.reference) == (example.id, example.label, example.reference)
        else:
            assert back == example
    with pytest.raises(DatasetError, match="only uint8 image arrays"):
        Example("x", image.astype(np.float32)).to_json()
