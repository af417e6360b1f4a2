"""Sanity metrics: cascading model randomisation and max-sensitivity, on the toy BERT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

import salience
from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from salience.metrics import evaluate_metric, sanity
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


# ------------------------------------------------------------------ the randomisation is real
def _record_reruns(monkeypatch) -> list[tuple[object, dict[str, torch.Tensor], np.ndarray]]:
    """For each re-run of the method inside model_randomisation: the adapter it ran on, a copy of
    that adapter's parameters at that moment, and the scores it returned."""
    runs = []
    rerun = sanity._reexplain

    def recording(model, encoded, explanation, batch_size, seed=None):
        scores = rerun(model, encoded, explanation, batch_size, seed)
        runs.append((model, {k: v.detach().clone() for k, v in model.model.named_parameters()}, scores))
        return scores

    monkeypatch.setattr(sanity, "_reexplain", recording)
    return runs


def test_model_randomisation_reinitialises_a_copy_step_by_step(toy, monkeypatch):
    runs = _record_reruns(monkeypatch)
    e = salience.explain(toy, TOY_PAIR, method="occlusion")
    original = {k: v.detach().clone() for k, v in toy.model.named_parameters()}
    r = evaluate_metric("model_randomisation", toy, e)
    names = {id(module): name for name, module in toy.model.named_modules()}
    groups = [[names[id(m)] for m in modules] for _, modules in cascade_steps(toy.model, embeddings=True)]
    assert len(runs) == len(groups) == 4
    for step, (adapter, parameters, scores) in enumerate(runs):
        assert adapter is not toy and adapter.model is not toy.model
        for group_index, group in enumerate(groups):
            for module in group:
                keys = [k for k in parameters if k.rsplit(".", 1)[0] == module]  # the module's own tensors
                changed = [not torch.equal(parameters[k], original[k]) for k in keys]
                assert keys and (all(changed) if group_index <= step else not any(changed)), (step, module)
        # the explanation of the randomised copy is not the original one (scores here are probability
        # differences up to 0.997; a randomised head alone already moves them by far more than 10 %)
        assert np.abs(scores - e.scores).max() > 0.1 * np.abs(e.scores).max()
    assert all(torch.equal(v, original[k]) for k, v in toy.model.named_parameters())  # the user's model
    # the reported correlations are Spearman's rho of exactly these re-runs, and the flag follows
    stats = require("scipy.stats")
    expected = [stats.spearmanr(e.scores, scores).statistic for _, _, scores in runs]
    np.testing.assert_allclose(r.details["correlations"], expected, rtol=0, atol=1e-12)  # round-off of ranks
    assert r.value == expected[-1] and r.details["flagged"] == (abs(expected[-1]) >= 0.5)


class TableClassifier(BertForSequenceClassification):
    """A BERT whose body runs but whose logits ignore it: positive logit = g x the sum over tokens of
    a fixed per-token value (a buffer: randomisation leaves it alone), negative logit = minus that.
    ``gated=False``: g = 1, the output does not depend on any parameter. ``gated=True``: g = the bias
    of a Linear(1, 1) head layer, 1 here; re-initialisation sets biases to 0, so the randomised
    model's output is 0 for every input."""

    def __init__(self, config, *, gated: bool) -> None:
        super().__init__(config)
        self.register_buffer("token_values", torch.linspace(-2.0, 3.0, config.vocab_size), persistent=False)
        self.gate = nn.Linear(1, 1)
        with torch.no_grad():
            self.gate.weight.fill_(0.5)
            self.gate.bias.fill_(1.0)
        self.gated = gated

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        total = (self.token_values[input_ids] * attention_mask).sum(-1, keepdim=True)
        g = self.gate(torch.zeros_like(total)) if self.gated else 1.0  # = the bias
        return SequenceClassifierOutput(logits=torch.cat([-g * total, g * total], dim=-1))


@pytest.mark.parametrize("gated, expected, flagged", [(False, 1.0, True), (True, 0.0, False)])
def test_model_randomisation_flag_on_models_with_known_answers(toy, gated, expected, flagged):
    """Known answers: an output that no parameter affects gives the same explanation after every
    step (rho = 1, flagged); an output that re-initialisation makes constant gives constant scores
    (rho undefined, reported as 0; not flagged)."""
    adapter = salience.TextClassifier(TableClassifier(toy.model.config, gated=gated), toy.tokenizer)
    e = salience.explain(adapter, TOY_TEXT, method="occlusion", output="logit")
    assert np.ptp(e.scores) > 0.1  # distinct token values: a ranking to compare
    r = evaluate_metric("model_randomisation", adapter, e)
    # rho of identical rankings is 1 up to round-off; the constant case is exactly the 0 convention
    np.testing.assert_allclose(r.details["correlations"], [expected] * 4, rtol=0, atol=1e-12)
    assert r.details["flagged"] is flagged


def test_model_randomisation_of_a_zero_shot_classifier(toy):
    """A zero-shot adapter wraps an NLI classifier: its model is copied and randomised too."""
    toy.labels = ["contradiction", "entailment"]  # the toy stands in for an NLI model
    zero_shot = salience.ZeroShotClassifier(toy, ["good", "awful", "story"], template="it is about {} .")
    e = salience.explain(zero_shot, "the film was good but the plot was dull", method="occlusion")
    before = snapshot(toy.model)
    r = evaluate_metric("model_randomisation", zero_shot, e, embeddings=False)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(toy.model).items())
    assert r.details["steps"] == ["head", "layer 1", "layer 0"]
    assert r.details["correlations"][0] != pytest.approx(1.0)  # the head really changed
    assert r.forward_passes == 3 * e.cost.forward_passes  # the copy's passes count on the user's adapter


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
    toy.labels = ["contradiction", "entailment"]
    zero_shot = salience.ZeroShotClassifier(toy, ["good", "awful"], template="it is about {} .")
    e = salience.explain(zero_shot, "the film was good", method="occlusion")
    with pytest.raises(MetricError, match="cannot replace tokens"):
        evaluate_metric("max_sensitivity", zero_shot, e)


def test_model_randomisation_reruns_with_a_new_seed_unless_told(toy, monkeypatch):
    # with the explanation's own seed a seeded stochastic method (RISE's masks, LIME's samples)
    # would redraw its random part and correlate with itself whatever the weights
    e = salience.explain(toy, TOY_TEXT, method="lime", n_samples=16, seed=7)
    seeds = []
    rerun = sanity._reexplained
    monkeypatch.setattr(sanity, "_reexplained", lambda *a: seeds.append(a[4]) or rerun(*a))
    default = evaluate_metric("model_randomisation", toy, e, every_step=False)
    told = evaluate_metric("model_randomisation", toy, e, every_step=False, method_seed=7)
    assert seeds == [8, 7] and default.details["method_seed"] == 8 and told.details["method_seed"] == 7
