"""The runner: one row per (example, method, metric), stored explanations, reuse of stored units,
per-example metric errors, and configuration errors before any work."""

from __future__ import annotations

import pytest
from evalkit import toy_records, write_jsonl

import salience
from salience.evaluate.config import RunConfig, parse_method_spec, parse_metric_spec
from salience.evaluate.runner import EvaluationError, run_evaluation
from salience.evaluate.store import Store

METRICS = ("comprehensiveness", "token_f1", "deletion_auc")


@pytest.fixture()
def toy_data(tmp_path):
    return write_jsonl(tmp_path / "toy.jsonl", toy_records(6))


def _config(dataset, methods=("occlusion", "saliency"), metrics=METRICS, **kwargs):
    return RunConfig(model="toy", dataset=str(dataset), methods=tuple(map(parse_method_spec, methods)),
                     metrics=tuple(map(parse_metric_spec, metrics)), **kwargs)


def test_rows_explanations_and_reuse(toy, toy_data, tmp_path):
    store = Store(tmp_path / "r.db")
    config = _config(toy_data)
    first = run_evaluation(config, store, model=toy, limit=4, progress=False, log=lambda _: None)
    assert first.created and (first.computed, first.reused) == (8, 0)
    rows = store.results(first.run_id)
    assert len(rows) == 4 * 2 * 3 and len({(r["example_id"], r["method"], r["metric"]) for r in rows}) == len(rows)
    assert all(r["value"] is not None for r in rows)
    curve = next(r for r in rows if r["metric"] == "deletion_auc")
    assert curve["details"]["x"][0] == 0.0 and len(curve["details"]["x"]) == len(curve["details"]["y"])
    stored = store.explanations(first.run_id)[0]
    restored = salience.Explanation.from_json(stored["explanation"])
    assert restored.method == "occlusion" and stored["forward_passes"] >= 1
    assert store.run(first.run_id).status == "complete" and store.run(first.run_id).writer is None
    again = run_evaluation(config, store, model=toy, limit=4, progress=False, log=lambda _: None)
    assert (again.run_id, again.created, again.computed, again.reused) == (first.run_id, False, 0, 8)
    more = run_evaluation(config, store, model=toy, limit=6, progress=False, log=lambda _: None)  # a larger limit extends
    assert (more.run_id, more.computed, more.reused) == (first.run_id, 4, 8)
    assert len(store.results(first.run_id)) == 6 * 2 * 3


def test_metric_errors_are_stored_per_example(toy, tmp_path):
    records = toy_records(3)
    del records[1]["rationale"]
    records[2]["rationale"] = []  # annotated, but nothing marked
    path = write_jsonl(tmp_path / "d.jsonl", records)
    store = Store(tmp_path / "r.db")
    outcome = run_evaluation(_config(path, methods=("occlusion",)), store, model=toy, progress=False, log=lambda _: None)
    f1 = {r["example_id"]: r for r in store.results(outcome.run_id) if r["metric"] == "token_f1"}
    assert f1["ex0"]["value"] is not None
    assert f1["ex1"]["value"] is None and "example ex1: token_f1 needs a human rationale" in f1["ex1"]["error"]
    assert f1["ex2"]["value"] is None and "marks no feature" in f1["ex2"]["error"]
    assert all(r["value"] is not None for r in store.results(outcome.run_id) if r["metric"] != "token_f1")


def test_configuration_errors_stop_before_any_work(toy, tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", toy_records(2, rationale=False))
    store = Store(tmp_path / "r.db")
    with pytest.raises(EvaluationError, match=r"metric token_f1 needs a rationale .* plain.jsonl has none"):
        run_evaluation(_config(plain), store, model=toy, progress=False)
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"id": "x", "text": "good film"}])
    with pytest.raises(EvaluationError, match="example 'x' has none"):
        run_evaluation(_config(unlabelled, metrics=("comprehensiveness",), target="label"), store, model=toy, progress=False)
    wrong = write_jsonl(tmp_path / "w.jsonl", [{"id": "y", "text": "good film", "label": "neutral"}])
    with pytest.raises(EvaluationError, match="example 'y': unknown target label 'neutral'"):
        run_evaluation(_config(wrong, metrics=("comprehensiveness",), target="label"), store, model=toy, progress=False)
    assert store.runs() == []


def test_gold_label_target(toy, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "n", "text": "the film was good", "label": "negative"}])
    store = Store(tmp_path / "r.db")
    outcome = run_evaluation(_config(path, methods=("occlusion",), metrics=("comprehensiveness",), target="label"), store,
                             model=toy, progress=False)
    explanation = salience.Explanation.from_json(store.explanations(outcome.run_id)[0]["explanation"])
    assert explanation.target.label == "negative" and explanation.prediction.label == "positive"
