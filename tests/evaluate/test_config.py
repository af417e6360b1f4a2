"""Method/metric specs, the run identity, and study files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from salience.errors import ParameterError, UnknownMethodError
from salience.evaluate.config import ConfigError, RunConfig, load_bench_file, parse_method_spec, parse_metric_spec
from salience.zoo.minilm_ladder import shipped_delta_path

STUDY = Path(__file__).parents[2] / "docs" / "studies" / "sig_minilm.toml"


def test_specs_use_canonical_names_and_json_values():
    spec = parse_method_spec("SIG:baseline=pad,steps=20")
    assert (spec.name, spec.params, spec.label) == ("sequential_integrated_gradients", {"baseline": "pad", "steps": 20},
                                                    "sequential_integrated_gradients:baseline=pad,steps=20")
    assert parse_method_spec("ig").label == "integrated_gradients"
    table = parse_method_spec({"name": "sig", "label": "SIG (pad)", "params": {"baseline": "pad"}})
    assert table.label == "SIG (pad)" and table.params == {"baseline": "pad"}
    metric = parse_metric_spec("aopc_comprehensiveness:bins=[0.1, 0.2]")
    assert metric.params == {"bins": [0.1, 0.2]}
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'"):
        parse_method_spec("nope")
    with pytest.raises(ParameterError, match="has no parameter 'stepz'"):
        parse_method_spec("ig:stepz=3")
    with pytest.raises(ParameterError, match="unknown metric"):
        parse_metric_spec("accuracy")
    with pytest.raises(ParameterError, match="rationale comes from the dataset"):
        parse_metric_spec("token_f1:rationale=[1]")
    with pytest.raises(ParameterError, match="is not KEY=VALUE"):
        parse_method_spec("ig:steps")


def _config(methods=("ig", "occlusion"), metrics=("comprehensiveness",), **kwargs):
    return RunConfig(model="m", dataset="movie-snippets", methods=tuple(map(parse_method_spec, methods)),
                     metrics=tuple(map(parse_metric_spec, metrics)), **kwargs)


def test_run_identity():
    base = _config().run_id("fp")
    assert base == _config(methods=("occlusion", "ig")).run_id("fp")  # order does not matter
    assert len(base) == 16
    for other in (_config().run_id("other-data"), _config(methods=("ig:steps=8", "occlusion")).run_id("fp"),
                  _config(metrics=("sufficiency",)).run_id("fp"), _config(seed=1).run_id("fp"),
                  _config(target="label").run_id("fp")):
        assert other != base
    with pytest.raises(ConfigError, match="given twice"):
        _config(methods=("ig", "integrated_gradients"))
    with pytest.raises(ConfigError, match="at least one metric"):
        _config(metrics=())


def test_model_identity_is_its_files(toy_dir, tmp_path):
    import shutil

    from salience.evaluate.config import model_fingerprint

    copy = shutil.copytree(toy_dir, tmp_path / "copy")
    config = RunConfig(model=str(toy_dir), dataset="d", methods=(parse_method_spec("ig"),),
                       metrics=(parse_metric_spec("log_odds"),))
    moved = RunConfig(model=str(copy), dataset="d", methods=config.methods, metrics=config.metrics)
    assert config.run_id("fp") == moved.run_id("fp")  # the same weights reached by another path
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\0")
    assert config.run_id("fp") != moved.run_id("fp")
    assert model_fingerprint("zoo:minilm-sentiment").startswith("zoo:minilm-sentiment/sha256-")
    shipped = hashlib.sha256(shipped_delta_path(6).read_bytes()).hexdigest()[:16]  # not the cache's float32 file
    assert model_fingerprint("zoo:minilm-l6-sentiment") == f"zoo:minilm-l6-sentiment/sha256-{shipped}"
    assert model_fingerprint("org/some-hub-model") == "org/some-hub-model"


def test_shipped_study_file_parses():
    bench = load_bench_file(STUDY)
    assert bench.db == "results/sig_minilm.db"
    minilm, planted = bench.studies
    assert minilm.config.model == "zoo:minilm-l6-sentiment" and minilm.limit == 500
    labels = [s.label for s in minilm.config.methods]
    assert {"IG", "SIG (mask)", "SIG (pad)", "saliency", "LIME", "KernelSHAP", "occlusion (delete)", "GradientSHAP"} <= set(labels)
    assert {s.name for s in minilm.config.metrics} >= {"log_odds", "comprehensiveness", "sufficiency", "token_f1", "auprc"}
    assert planted.config.dataset == "planted" and {s.name for s in planted.config.metrics} == {"precision_at_k", "auprc"}


def test_study_file_errors(tmp_path):
    cases = {
        "x = [": "not valid TOML",
        "[[study]]\nname='a'\nmodel='m'\ndataset='d'\nmethods=['ig']\nmetrics=['log_odds']\ncolour=1": "unknown key 'colour'",
        "[[study]]\nname='a'\ndataset='d'\nmethods=['ig']\nmetrics=['log_odds']": "'model' is required",
        "[[study]]\nname='a'\nmodel='m'\ndataset='d'\nmethods=['nope']\nmetrics=['log_odds']": "study 'a': unknown method",
        "db = 'x'": "no [[study]]",
    }
    for text, message in cases.items():
        path = tmp_path / "s.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_bench_file(path)


def test_yaml_study_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "s.yaml"
    path.write_text("study:\n  - name: a\n    model: m\n    dataset: planted\n    methods: [ig, {name: sig, label: S}]\n"
                    "    metrics: [auprc]\n    limit: 3\n")
    (study,) = load_bench_file(path).studies
    assert [s.label for s in study.config.methods] == ["integrated_gradients", "S"] and study.limit == 3
