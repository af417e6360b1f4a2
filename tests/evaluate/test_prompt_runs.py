"""A causal LM as a zero-shot classifier in an evaluation run: a study's ``prompt_template`` and
``labels`` wrap the loaded LM in a PromptClassifier, and they are part of the run's identity."""

from __future__ import annotations

from pathlib import Path

import pytest
from evalkit import write_jsonl

import salience
from salience.evaluate.config import ConfigError, RunConfig, load_bench_file, parse_method_spec, parse_metric_spec
from salience.evaluate.runner import load_run_model, run_evaluation
from salience.evaluate.store import Store
from tiny_lm import build_model, build_tokenizer

TEMPLATE = "the film {text} . it was"
LABELS = {"old": " old", "new": " new"}
STUDY = Path(__file__).parents[2] / "docs" / "studies" / "lime_model_size.toml"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_model(context=64).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def _config(model: str, **prompt: object) -> RunConfig:
    return RunConfig(model=model, dataset="data.jsonl", methods=(parse_method_spec("occlusion"),),
                     metrics=(parse_metric_spec("comprehensiveness"),), **prompt)  # type: ignore[arg-type]


def test_prompt_is_part_of_the_identity_and_absent_without_one():
    plain = _config("m")
    assert "prompt_template" not in plain.identity("fp")  # ids of runs on plain classifiers unchanged
    prompted = _config("m", prompt_template=TEMPLATE, labels=LABELS)
    other_template = _config("m", prompt_template="a {text} b", labels=LABELS)
    other_labels = _config("m", prompt_template=TEMPLATE, labels={"old": " aged", "new": " new"})
    ids = {c.run_id("fp") for c in (plain, prompted, other_template, other_labels)}
    assert len(ids) == 4
    with pytest.raises(ConfigError, match="'prompt_template' and 'labels' go together"):
        _config("m", prompt_template=TEMPLATE)


def test_run_on_a_prompt_classifier_equals_explaining_it_directly(lm_dir, tmp_path):
    config = _config(str(lm_dir), prompt_template=TEMPLATE, labels=LABELS)
    model = load_run_model(config)
    assert isinstance(model, salience.PromptClassifier) and model.labels == ["old", "new"]
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "text": "red house in town", "label": "old"},
                                                {"id": "b", "text": "a big new city", "label": "new"}])
    config = RunConfig(model=str(lm_dir), dataset=str(data), methods=config.methods, metrics=config.metrics,
                       prompt_template=TEMPLATE, labels=LABELS)
    with Store(tmp_path / "runs.db") as store:
        run_evaluation(config, store, progress=False, log=lambda _: None)
        stored = store.explanations(store.runs()[0].run_id)
    assert [row["error"] for row in stored] == [None, None]
    direct = salience.explain(model, "red house in town", method="occlusion", output=config.output)
    first = salience.Explanation.from_json(stored[0]["explanation"])
    assert first.scores.tolist() == direct.scores.tolist()  # the run explained the prompt classifier


def test_a_prompt_needs_a_causal_lm(toy_dir):
    with pytest.raises(salience.errors.ParameterError, match="a prompt template needs a causal LM"):
        load_run_model(_config(str(toy_dir), prompt_template=TEMPLATE, labels=LABELS))


def test_study_file_prompt_keys(tmp_path):
    bench = load_bench_file(STUDY)
    zero_shot = {s.config.name: s for s in bench.studies}["smollm2-zero-shot"]
    assert zero_shot.config.prompt_template == "Review: {text}\nSentiment:"
    assert zero_shot.config.labels == {"negative": " negative", "positive": " positive"}
    path = tmp_path / "s.toml"
    head = "[[study]]\nname='a'\nmodel='m'\ndataset='d'\nmethods=['ig']\nmetrics=['log_odds']\n"
    for extra, message in (("prompt_template = 3\nlabels = {a = ' a'}", "'prompt_template' must be a string"),
                           ("prompt_template = '{text}'\nlabels = ['a']", "'labels' must be a table"),
                           ("labels = {a = ' a'}", "go together")):
        path.write_text(head + extra)
        with pytest.raises(ConfigError, match=message):
            load_bench_file(path)


def test_evaluate_command_takes_a_prompt(lm_dir, tmp_path, capsys):
    from salience.cli import main

    data = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "text": "red house in town", "label": "old"}])
    db = tmp_path / "runs.db"
    argv = ["evaluate", "--model", str(lm_dir), "--dataset", str(data), "--method", "occlusion",
            "--metric", "comprehensiveness", "--db", str(db), "--no-progress"]
    assert main([*argv, "--prompt-template", TEMPLATE, "--labels", "old= old,new= new"]) == 0
    with Store(db) as store:
        (run,) = store.runs()
        assert store.explanations(run.run_id)[0]["error"] is None
    assert main([*argv, "--prompt-template", TEMPLATE]) == 2
    assert "--prompt-template and --labels go together" in capsys.readouterr().err
