"""Sanity metrics: cascading model randomisation and max-sensitivity, on the toy BERT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import salience
from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from salience.metrics import evaluate_metric
from salience.metrics.base import MetricError
from salience.metrics.sanity import _reinitialise, cascade_steps, method_params, rankdata, spearman


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ rank correlation
def test_spearman_and_ranks_match_scipy():
    stats = require("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = np.round(rng.normal(size=11), 1), rng.normal(size=11)
        np.testing.assert_allclose(rankdata(a), stats.rankdata(a))
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.array([1.0, 1, 1]), np.array([1.0, 2, 3])))


# ------------------------------------------------------------------ cascade
class Tiny(nn.Module):
    """No ``_init_weights``: the cascade falls back to normal(0, 0.02) weights and zero biases."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.small = nn.ModuleList([nn.Linear(4, 1)])
        self.head = nn.Linear(4, 2)


def test_cascade_order_and_fallback_init():
    model = Tiny()
    steps = cascade_steps(model, embeddings=True)
    assert [name for name, _ in steps] == ["head", "layer 2", "layer 1", "layer 0", "embeddings"]
    # "small" is registered after the largest list (by parameters), so it counts as part of the head
    assert steps[0][1] == [model.small[0], model.head] and steps[1][1] == [model.blocks[2]] and steps[-1][1] == [model.embed]
    sequential = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]), nn.Linear(2, 1))
    assert [name for name, _ in cascade_steps(sequential)] == ["head", "layer 0"]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    _reinitialise(model, [model.head], seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the user's RNG is left alone
    assert torch.all(model.head.bias == 0) and 0.005 < model.head.weight.std() < 0.05
    again = Tiny()
    _reinitialise(again, [again.head], seed=7)
    assert torch.equal(again.head.weight, model.head.weight)  # seeded


def test_cascade_steps_of_toy_bert(toy):
    steps = cascade_steps(toy.model)
    assert [name for name, _ in steps] == ["head", "layer 1", "layer 0"]
    assert toy.model.classifier in steps[0][1] and toy.model.bert.pooler.dense in steps[0][1]
    assert toy.model.bert.embeddings.word_embeddings not in [m for _, group in steps for m in group]


def test_model_randomisation_leaves_the_users_model_untouched(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    before = snapshot(toy.model)
    flags = [p.requires_grad for p in toy.model.parameters()]
    rng = torch.random.get_rng_state()
    r = evaluate_metric("model_randomisation", toy, e, embeddings=True)
    after = snapshot(toy.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in toy.model.parameters()]
    assert torch.equal(rng, torch.random.get_rng_state())
    assert not toy.model.training
    # and the explanation still reproduces on it
    np.testing.assert_array_equal(salience.explain(toy, TOY_TEXT, method="occlusion").scores, e.scores)
    assert r.details["steps"] == ["head", "layer 1", "layer 0", "embeddings"]


def test_model_randomisation_result_and_cost(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    r = evaluate_metric("model_randomisation", toy, e)
    assert not r.higher_is_better
    assert r.details["steps"] == ["head", "layer 1", "layer 0", "embeddings"]  # the full cascade by default
    assert len(r.details["correlations"]) == 4 and r.value == r.details["correlations"][-1]
    assert all(-1.0 <= c <= 1.0 for c in r.details["correlations"])
    assert r.details["flagged"] == (abs(r.value) >= 0.5)
    # each step re-runs occlusion on the copy; the copy's passes are counted on the user's model
    assert r.forward_passes == 4 * e.cost.forward_passes


@pytest.mark.filterwarnings("ignore::salience.SalienceWarning")  # 8 IG steps: a large delta, on purpose cheap
def test_model_randomisation_reruns_the_same_method_and_is_seeded(toy):
    e = salience.explain(toy, TOY_PAIR, method="ig", steps=8, target="negative", output="logit")
    assert method_params(e) == {"baseline": "pad", "steps": 8, "rule": "gausslegendre", "tolerance": 0.01, "atol": 1e-5,
                                "pieces": 2, "max_steps": 600}
    a = evaluate_metric("model_randomisation", toy, e, seed=1)
    b = evaluate_metric("model_randomisation", toy, e, seed=1)
    assert a.details["correlations"] == b.details["correlations"]
    assert a.forward_passes == 4 * (e.cost.forward_passes)  # same method, parameters and target on each step


def test_model_randomisation_refuses_constant_scores(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    with pytest.raises(MetricError, match="constant"):
        evaluate_metric("model_randomisation", toy, dataclasses.replace(e, scores=np.ones(len(e.features))))
    with pytest.raises(MetricError, match="features do not match"):
        evaluate_metric("model_randomisation", toy, dataclasses.replace(e, input="the film was superb"))


# ------------------------------------------------------------------ max-sensitivity
def test_max_sensitivity_by_hand(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    r = evaluate_metric("max_sensitivity", toy, e, n_perturbations=3, seed=5)
    encoded = toy.encode(TOY_TEXT)
    ids_before = encoded.input_ids.clone()
    rng = np.random.default_rng(5)
    m = max(1, round(0.1 * len(e.features)))
    expected = []
    for _ in range(3):
        chosen = rng.choice(len(e.features), size=m, replace=False)
        ids = encoded.input_ids.clone()
        ids[[t for i in chosen for t in e.features[i].tokens]] = toy.tokenizer.mask_token_id
        new = salience.explain(toy, dataclasses.replace(encoded, input_ids=ids), method="occlusion", target=e.target.index)
        expected.append(np.linalg.norm(new.scores - e.scores) / np.linalg.norm(e.scores))
    assert torch.equal(encoded.input_ids, ids_before)
    np.testing.assert_allclose(r.details["ratios"], expected, rtol=1e-10)
    assert r.value == pytest.approx(max(expected)) and not r.higher_is_better
    assert r.forward_passes == 3 * e.cost.forward_passes


def test_max_sensitivity_is_seeded(toy):
    e = salience.explain(toy, TOY_TEXT, method="saliency")
    a = evaluate_metric("max_sensitivity", toy, e, n_perturbations=4, seed=2)
    b = evaluate_metric("max_sensitivity", toy, e, n_perturbations=4, seed=2)
    c = evaluate_metric("max_sensitivity", toy, e, n_perturbations=4, seed=3)
    assert a.details == b.details and a.value == b.value
    assert a.details["masked"] != c.details["masked"]


def test_max_sensitivity_errors(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    with pytest.raises(MetricError, match="all zeros"):
        evaluate_metric("max_sensitivity", toy, dataclasses.replace(e, scores=np.zeros(len(e.features))))
    with pytest.raises(MetricError, match="features do not match"):
        evaluate_metric("max_sensitivity", toy, dataclasses.replace(e, level="token"))
