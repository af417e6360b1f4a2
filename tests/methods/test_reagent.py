"""reagent (ReAGent) on the tiny seeded Llama and the tiny BERT: Inseq 0.7.1's own ReAGent classes
(``AggregateRationalizer`` with ``DeltaProbImportanceScoreEvaluator``, ``TopKStoppingConditionEvaluator``
and ``UniformTokenReplacer``) as an oracle on the same random draws, for one target and for every
target of a generation; a planted cue ranked first; the cost in forward rows; seeded determinism
and batching; the adapters' new capabilities; bad input refused in one line; one short SmolLM2 run.

Inseq's sampler draws replacement tokens among those with the input token's part-of-speech tag
(nltk); the oracle is given a sampler with Salience's rule instead (uniform over the vocabulary
without special tokens: u ~ U(0, 1) -> vocabulary[floor(u x size)]), everything else is Inseq's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from methods.test_context_cite import Planted
from models.test_contrast import float64_llama
from oracles import require
from tiny_cnn import photo, tiny_classifier
from tiny_lm import VOCAB, build_model, build_tokenizer

PROMPT = "the capital of france is paris and it was a very old river"
CONTINUATION = " in the big city"
# Scores are means of softmaxes (~0.1) built from sums of logit(0.5 +- 0.5 d) over the steps; Inseq
# and Salience read the same float64 probabilities from rows of other lengths and batch sizes (rounding
# ~1e-15 each), each step's change amplified by at most 2 / (1 - |d|^2) (measured |d| < 0.9): 1e-10
# leaves a wide margin while a different draw or rule moves scores by > 1e-3.
TOL = 1e-10
ORACLE = dict(keep_top_n=3, stopping_condition_top_k=1, replacing_ratio=0.3, max_probe_steps=200, num_probes=6)


@pytest.fixture(scope="module")
def lm_no_bos() -> salience.CausalLM:
    """Float64 tiny Llama whose tokenizer adds no BOS: every position is a feature, as in Inseq."""
    return salience.CausalLM(float64_llama(), build_tokenizer(bos=False), name="tiny-llama")


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(build_model(), build_tokenizer(), name="tiny-llama")


def explain(lm, **options):
    """reagent on :data:`PROMPT` and 4 greedily generated tokens (each within the top 3 of the
    input, so probes stop) unless a continuation is given."""
    options = {"method": "reagent", **options}
    if "continuation" not in options:
        options["max_new_tokens"] = 4
    return salience.explain(lm, PROMPT, **options)


def sequence_ids(lm) -> torch.Tensor:
    """Prompt + the 4 generated tokens."""
    return lm.encode(PROMPT, max_new_tokens=4).input_ids


# ------------------------------------------------------------------ Inseq as the oracle
def inseq_rationalizer(model, tokenizer, vocabulary: torch.Tensor, params: dict):
    """Inseq's ReAGent pipeline (as ``inseq.attr.feat.ops.reagent.Reagent`` builds it) with a uniform sampler."""
    require("inseq")
    from inseq.attr.feat.ops.reagent_core import (
        AggregateRationalizer,
        DeltaProbImportanceScoreEvaluator,
        TopKStoppingConditionEvaluator,
        UniformTokenReplacer,
    )
    from inseq.attr.feat.ops.reagent_core.token_sampler import TokenSampler

    class UniformSampler(TokenSampler):
        def __call__(self, input_ids, **kwargs):
            uniform = torch.rand(input_ids.shape, device=input_ids.device)
            return vocabulary[(uniform * len(vocabulary)).long()]

    sampler = UniformSampler()
    keep_ratio = params.get("keep_ratio")
    keep_top_n = 0 if keep_ratio is not None else params["keep_top_n"]  # Inseq: keep_ratio is used when keep_top_n is 0
    stopping = TopKStoppingConditionEvaluator(model=model, sampler=sampler, top_k=params["stopping_condition_top_k"],
                                              keep_top_n=keep_top_n, keep_ratio=keep_ratio, invert_keep=False)
    evaluator = DeltaProbImportanceScoreEvaluator(
        model=model, tokenizer=tokenizer, token_replacer=UniformTokenReplacer(sampler=sampler, ratio=params["replacing_ratio"]),
        stopping_condition_evaluator=stopping, max_steps=params["max_probe_steps"])
    return AggregateRationalizer(importance_score_evaluator=evaluator, batch_size=params["num_probes"], overlap_threshold=0,
                                 overlap_strict_pos=True, keep_top_n=keep_top_n, keep_ratio=keep_ratio)


def inseq_scores(lm, ids: torch.Tensor, position: int, params: dict) -> tuple[np.ndarray, int]:
    """Inseq's mean importance over the prefix ``ids[:position]`` for the token at ``position``, and its steps."""
    rationalizer = inseq_rationalizer(lm.model, lm.tokenizer, lm.replacement_ids(), params)
    rationalizer(ids[None, :position], ids[position:position + 1])
    return rationalizer.mean_importance_score.double().numpy(), rationalizer.importance_score_evaluator.num_steps


@pytest.mark.parametrize("keep", [{}, {"keep_ratio": 0.2}])
def test_one_target_equals_inseq_with_the_same_seed(lm_no_bos, keep):
    """With one target, token features and no special token, Salience draws what Inseq draws from
    the global generator seeded alike: the same initial scores, masks and replacement tokens. Also
    with keep_ratio (ceil(0.2 x 13) = 3 features kept)."""
    params = {**ORACLE, **keep}
    e = explain(lm_no_bos, target=1, seed=7, **params)  # the second generated token
    ids, position = sequence_ids(lm_no_bos), e.targets[0].position
    torch.manual_seed(7)
    theirs, steps = inseq_scores(lm_no_bos, ids, position, params)
    ours = e.scores[0, :position]
    assert steps == e.params["steps"][0] >= 5, steps  # several probe steps: the stopping rule is exercised
    assert np.isnan(e.scores[0, position:]).all() and abs(ours.sum() - 1) < 1e-12
    assert np.max(np.abs(ours - theirs)) < TOL, (ours, theirs)


def test_every_target_equals_inseq_on_the_shared_draws(lm_no_bos, monkeypatch):
    """All targets share each step's draws; each target's scores are Inseq's on its own prefix fed
    those draws restricted to its features (initial scores, masks, probe and stopping tokens)."""
    drawn: list[torch.Tensor] = []
    real_rand = torch.rand

    def recording(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        drawn.append(out.clone())
        return out

    monkeypatch.setattr(torch, "rand", recording)
    e = explain(lm_no_bos, seed=3, **ORACLE)
    monkeypatch.setattr(torch, "rand", real_rand)
    ids = sequence_ids(lm_no_bos)
    assert len(drawn) == 1 + 3 * max(e.params["steps"])
    for t, target in enumerate(e.targets):
        width = target.position
        monkeypatch.setattr(torch, "rand", replaying([d[:, :width] for d in drawn]))
        theirs, steps = inseq_scores(lm_no_bos, ids, width, ORACLE)
        monkeypatch.setattr(torch, "rand", real_rand)
        assert steps == e.params["steps"][t]
        assert np.max(np.abs(e.scores[t, :width] - theirs)) < TOL, t
    assert max(e.params["steps"]) >= 5


def replaying(queue: list[torch.Tensor]):
    """A stand-in for ``torch.rand`` returning the tensors of ``queue`` in order (shapes checked)."""
    def rand(shape, **kwargs):
        out = queue.pop(0)
        assert tuple(out.shape) == tuple(shape)
        return out

    return rand


# ------------------------------------------------------------------ the update and stopping rules
def test_a_planted_cue_ranks_first():
    """The tiny Llama plus 10 on the target token's logit wherever the cue ("paris") has been seen:
    the target's probability drops when the cue is replaced and the stopping test (k = 1) passes
    when the cue is kept. With 16 probes the mean is noisy (the random initial scores weigh a lot
    in probes that stop after a step or two); with 64 the cue leads by 1.6-2.1x at seeds 0-3."""
    tokenizer = build_tokenizer()
    model = Planted(build_model().config).double().eval()
    model.load_state_dict(build_model().state_dict())
    model.boosted, model.bonus = (VOCAB.index("city"),), 10.0
    lm = salience.CausalLM(model, tokenizer, name="planted")
    for seed in (0, 1):
        e = salience.explain(lm, PROMPT, continuation=" city", method="reagent", seed=seed, num_probes=64,
                             stopping_condition_top_k=1)
        scores, cue = e.scores[0], [f.text for f in e.features].index("paris")
        assert int(np.nanargmax(scores)) == cue, scores
        assert scores[cue] > 1.4 * np.nanmax(np.delete(scores, cue)), scores
        assert e.params["stopped_probes"] == [64]


def test_the_cost_is_the_rows_counted():
    lm = salience.CausalLM(build_model(), build_tokenizer(), name="tiny-llama")
    generated = lm.encode(PROMPT, max_new_tokens=4).extras["continuation"]
    e = explain(lm, continuation=generated, max_probe_steps=4)  # teacher-forced: no generation passes
    assert e.cost.forward_passes == 1 + e.params["probe_rows"] + e.params["stopping_rows"]
    assert e.params["probe_rows"] <= 4 * 16 and e.params["stopping_rows"] <= 4 * 16 * 4


def test_no_probe_stopping_is_a_warning_and_the_mean_of_all(lm):
    """A target that is never within the top k (a continuation the model finds unlikely, k = 1 and
    one feature kept) runs all steps; its scores are the mean of every probe's softmax."""
    with pytest.warns(salience.SalienceWarning, match="no probe met the stopping condition"):
        e = explain(lm, continuation=" small", keep_top_n=1, stopping_condition_top_k=1, max_probe_steps=3)
    assert e.params["original_rank"][0] > 0 and e.params["stopped_probes"] == [0] and e.params["steps"] == [3]
    assert abs(np.nansum(e.scores[0]) - 1) < 1e-12


# ------------------------------------------------------------------ determinism and batching
def test_seeded_and_batching_does_not_change_scores(lm):
    first, again = explain(lm, seed=5), explain(lm, seed=5)
    np.testing.assert_array_equal(first.scores, again.scores)
    other = explain(lm, seed=6)
    assert np.nanmax(np.abs(first.scores - other.scores)) > 1e-3
    # rows in chunks of 3: the tiny Llama computes norms in float32, so rows in other batches may differ by rounding
    chunked = explain(lm, seed=5, batch_size=3)
    assert first.params["steps"] == chunked.params["steps"]
    np.testing.assert_allclose(chunked.scores, first.scores, atol=1e-6)


def test_generation_api_and_words(lm):
    e = salience.explain(lm, "the capital of france is", method="reagent", max_new_tokens=3)
    assert e.scores.shape == (3, len(e.features)) and e.params["replacements"].startswith("uniform")
    sums = np.nansum(e.scores, axis=1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-12)
    back = salience.Explanation.from_json(e.to_json())  # the details recorded are JSON-ready
    np.testing.assert_array_equal(back.scores, e.scores)
    assert back.params["steps"] == e.params["steps"]
    words = salience.explain(lm, "the capital of france is unbelievable", method="reagent", level="word", max_new_tokens=2)
    texts = [f.text for f in words.features]
    assert texts[5] == "unbelievable" and len(words.features[5].tokens) == 3  # its tokens replaced together
    assert np.isfinite(words.scores[0, :6]).all() and np.isnan(words.scores[0, 6:]).all()


# ------------------------------------------------------------------ a classifier
def test_a_classifier_stops_on_the_predicted_class(toy):
    """Two classes: the stopping test is "the target is the predicted class" (k = min(3, 2 - 1)).
    The one sentiment word of the sentence ranks first (64 probes; measured at seeds 0-3: 0.119-0.139
    against at most 0.106 for any other word); with two such words and 16 probes the scores are
    close to uniform: the predicted class survives most rows keeping 5 words, so probes stop after
    2-7 steps."""
    text = "the actor and the plot and the story was quite awful"
    e = salience.explain(toy, text, method="reagent", seed=0, num_probes=64)
    assert e.params["stopping_top_k"] == 1 and e.target.label == "negative"
    assert abs(float(np.sum(e.scores)) - 1) < 1e-12
    assert e.features[int(np.argmax(e.scores))].text == "awful", dict(zip([f.text for f in e.features], e.scores))


def test_score_replaced_matches_plain_forward_calls(lm, toy):
    """The capability: outputs and ranks of rows with tokens replaced, against the model called by hand."""
    encoded = lm.encode(PROMPT, continuation=CONTINUATION)
    targets = lm.resolve_targets(encoded, None, None, "probability")
    replaced = torch.zeros(2, encoded.length, dtype=torch.bool)
    replaced[1, [2, 4]] = True
    ids = torch.full((2, encoded.length), VOCAB.index("river"))
    values, ranks = lm.score_replaced(encoded, replaced, ids, targets)
    rows = torch.where(replaced, ids, encoded.input_ids)
    with torch.no_grad():
        logits = lm.model(input_ids=rows).logits.double()
    for t, target in enumerate(targets):
        row_logits = logits[:, target.position - 1]
        np.testing.assert_allclose(values[:, t], torch.softmax(row_logits, -1)[:, target.index], atol=1e-12)
        np.testing.assert_array_equal(ranks[:, t], (row_logits > row_logits[:, [target.index]]).sum(-1))
    one_value, one_rank = lm.score_replaced(encoded, replaced, ids, targets, which=torch.tensor([3, 1]))
    np.testing.assert_allclose(one_value, [values[0, 3], values[1, 1]], atol=1e-12)
    np.testing.assert_array_equal(one_rank, [ranks[0, 3], ranks[1, 1]])
    assert not (set(lm.replacement_ids().tolist()) & set(lm.tokenizer.all_special_ids))

    text = toy.encode("the plot was awful")
    prediction = toy.predict(text)
    target = salience.core.target.Target(1 - prediction.index, "other", "probability")
    value, rank = toy.score_replaced(text, torch.zeros(1, text.length, dtype=torch.bool),
                                     torch.zeros(1, text.length, dtype=torch.long), [target])
    assert abs(float(value[0, 0]) - prediction.probabilities[1 - prediction.index]) < 1e-12 and rank[0, 0] == 1


@pytest.mark.filterwarnings("ignore:reagent:UserWarning")  # the teacher-forced span may not stop in 5 steps
def test_a_span_target_reads_its_probability_and_its_worst_rank(lm):
    encoded = lm.encode(PROMPT, continuation=CONTINUATION, target_span=(1, 3))
    (span,) = lm.resolve_targets(encoded, None, None, "probability")
    replaced = torch.zeros(1, encoded.length, dtype=torch.bool)
    value, rank = lm.score_replaced(encoded, replaced, torch.zeros_like(encoded.input_ids)[None], [span])
    with torch.no_grad():
        logits = lm.model(input_ids=encoded.input_ids[None]).logits[0].double()
    at = [span.position - 1 + k for k in range(2)]
    log_p = torch.log_softmax(logits[at], -1)[[0, 1], list(span.span)]
    assert abs(float(value[0, 0]) - float(log_p.sum().exp())) < 1e-12
    assert rank[0, 0] == max(int((logits[p] > logits[p, k]).sum()) for p, k in zip(at, span.span))
    e = salience.explain(lm, PROMPT, method="reagent", continuation=CONTINUATION, target_span=(1, 3), max_probe_steps=5)
    assert e.scores.shape[0] == 1 and abs(np.nansum(e.scores[0]) - 1) < 1e-12


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("params, message", [
    ({"replacing_ratio": 0.0}, "replacing_ratio must be in"),
    ({"replacing_ratio": 1.0}, "replacing_ratio must be in"),
    ({"keep_ratio": 1.5}, "keep_ratio must be in"),
    ({"max_probe_steps": 0}, "max_probe_steps must be an integer >= 1"),
    ({"num_probes": 0}, "num_probes must be an integer >= 1"),
    ({"stopping_condition_top_k": True}, "stopping_condition_top_k must be an integer"),
    ({"keep_top_n": 0}, "give keep_ratio"),
    ({"output": "logit"}, "output='probability'"),
    ({"contrast": " small big river city"}, "not a contrast"),
])
def test_bad_input_is_one_line(lm, params, message):
    with pytest.raises(salience.ParameterError, match=message) as raised:
        explain(lm, **params)
    assert "\n" not in str(raised.value)


def test_an_image_classifier_is_refused_in_one_line():
    with pytest.raises(salience.ParameterError, match="reagent' needs .* text classifiers and causal LMs") as raised:
        salience.explain(tiny_classifier(), photo(), method="reagent")
    assert "\n" not in str(raised.value)


def test_the_cli_runs_it(toy_dir, capsys):
    from salience.cli import main

    assert main(["explain", "--model", str(toy_dir), "--text", "the plot was awful", "--method", "reagent",
                 "--param", "num_probes=4"]) == 0
    assert "reagent" in capsys.readouterr().out


# ------------------------------------------------------------------ a real model
def test_smollm2_runs_a_few_steps():
    lm = salience.load_model("zoo:smollm2-135m")
    e = salience.explain(lm, "The capital of France is", method="reagent", max_new_tokens=2, num_probes=4,
                         max_probe_steps=20)
    assert e.scores.shape[0] == 2 and np.isfinite(e.scores[0, :5]).all()
    np.testing.assert_allclose(np.nansum(e.scores, axis=1), 1.0, atol=1e-9)
