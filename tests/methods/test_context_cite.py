"""context_cite (ContextCite) on the tiny seeded float64 Llama: a planted source is found, the
ablation rows and scores equal the ``context-cite`` package's (0.0.4, a test-only oracle) on the
package's own masks, the Lasso equals scikit-learn's, batched = unbatched, a sub-span re-scored from
the cache equals a fresh run on that span, passes counted, bad input refused in one line; one short
test on SmolLM2."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import salience
from oracles import require
from salience.core.aggregate import sentence_spans
from salience.methods import context_cite as cc
from salience.models.context_query import context_prompt
from tiny_lm import VOCAB, build_model, build_tokenizer

CONTEXT = "the capital of france is paris . the river is very old . it was a big city . the film was new ."
QUERY = "the capital of france is ?"
RESPONSE = "it is a small city"  # five tokens, teacher-forced; no "paris" (the planted cue)
TIGHT = 1e-10  # float64 model, same rows computed in other chunks / other logit slices: rounding only


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(build_model(context=64), build_tokenizer(), name="tiny-llama")


def explain(lm, **options):
    options = {"context": CONTEXT, "query": QUERY, "continuation": RESPONSE, "method": "context_cite", **options}
    return salience.explain(lm, **options)


# ------------------------------------------------------------------ a planted source
class Planted(LlamaForCausalLM):
    """The tiny Llama plus ``bonus`` on the logits of ``boosted`` tokens at every position that sees
    the ``cue`` token (at or after it, among the row's real tokens): by construction, the response
    is more likely exactly when the source holding the cue is kept."""

    cue: int = VOCAB.index("paris")
    bonus: float = 3.0
    boosted: tuple[int, ...] = ()

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):  # type: ignore[override]
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs)
        seen = ((input_ids == self.cue).long().cumsum(dim=1) > 0).double()  # (B, L)
        if isinstance(logits_to_keep, torch.Tensor):
            seen = seen.gather(1, logits_to_keep) if logits_to_keep.dim() == 2 else seen[:, logits_to_keep]
        elif logits_to_keep:
            seen = seen[:, -logits_to_keep:]
        boost = torch.zeros(self.config.vocab_size, dtype=torch.float64)
        boost[list(self.boosted)] = self.bonus
        output.logits = output.logits + seen[..., None] * boost
        return output


def test_the_planted_source_ranks_first():
    tokenizer = build_tokenizer()
    model = Planted(build_model(context=64).config).double().eval()
    model.load_state_dict(build_model(context=64).state_dict())
    model.boosted = tuple(tokenizer(RESPONSE, add_special_tokens=False)["input_ids"])
    e = explain(salience.CausalLM(model, tokenizer, name="planted"))
    scores = e.scores[0]
    assert [f.text.strip() for f in e.features] == [CONTEXT[a:b] for a, b in sentence_spans(CONTEXT)]
    assert "paris" in e.features[0].text and int(np.argmax(scores)) == 0
    # the cue adds 3 to every response token's logit: the planted source dominates the others
    # (measured: 9.86 against at most 2.51 in magnitude)
    assert scores[0] > 3 * np.max(np.abs(scores[1:])), scores


# ------------------------------------------------------------------ the package as an oracle
@pytest.fixture()
def package(monkeypatch):
    """``context_cite`` 0.0.4 imported with stand-ins for what its modules import but the parts
    used here never call (nltk, whose import also downloads data; spaCy; ``datasets.Dataset``, a
    list of rows here). Its own modules are removed again afterwards."""
    require("sklearn")
    if importlib.util.find_spec("context_cite") is None:
        require("context_cite")  # skips locally, fails in CI
    nltk = types.ModuleType("nltk")
    nltk.download = lambda *args, **kwargs: True  # type: ignore[attr-defined]
    spacy_en = types.ModuleType("spacy.lang.en")
    spacy_en.English = object  # type: ignore[attr-defined]
    datasets = types.ModuleType("datasets")
    datasets.Dataset = types.SimpleNamespace(  # type: ignore[attr-defined]
        from_dict=lambda d: [dict(zip(d, row)) for row in zip(*d.values())])
    for name, module in {"nltk": nltk, "spacy": types.ModuleType("spacy"), "spacy.lang": types.ModuleType("spacy.lang"),
                         "spacy.lang.en": spacy_en, "datasets": datasets}.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield importlib.import_module("context_cite")
    for name in [m for m in sys.modules if m == "context_cite" or m.startswith("context_cite.")]:
        del sys.modules[name]


@pytest.mark.filterwarnings("ignore:CUDA is not available", "ignore:`torch.cuda.amp.autocast")  # the package's CUDA autocast
def test_equals_the_context_cite_package_on_its_masks(lm, package, monkeypatch):
    """The package ablates the tiny model itself (its masks, its rebuilt context texts, its forward
    passes; the tiny tokenizer splits on whitespace, so deleting a sentence's tokens and
    re-tokenising the text without it give the same ids) and fits its Lasso; our method run on the
    same masks gives the same per-token log-probabilities (rtol 1e-6: the package returns them in
    float32) and scores (atol 2e-5, 2.3e-6 measured: the package fits in float32 to scikit-learn's default tolerance
    1e-4 on the dual gap; ours is converged in float64, see the sklearn test below)."""
    utils, solver = package.utils, package.solver
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as ContextCiter sets it
    partitioner = package.context_partitioner.SimpleContextPartitioner(CONTEXT)
    spans = sentence_spans(CONTEXT)  # the package splits with nltk; these are the same four sentences
    partitioner._cache.update(parts=[CONTEXT[a:b] for a, b in spans],
                              separators=[CONTEXT[(spans[i - 1][1] if i else 0):a] for i, (a, _) in enumerate(spans)])

    def prompt_ids(mask=None):
        context = partitioner.get_context(mask)
        return tokenizer.encode(package.context_citer.DEFAULT_PROMPT_TEMPLATE.format(context=context, query=QUERY))

    response = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    n = 24
    masks, logit_probs = utils.get_masks_and_logit_probs(lm.model, tokenizer, n, len(spans), prompt_ids, response, 0.5, 1)
    outputs = utils.aggregate_logit_probs(logit_probs)  # log-odds of the whole response
    weights, bias = solver.LassoRegression().fit(masks, outputs, len(response))

    monkeypatch.setattr(cc, "ablation_masks", lambda s, count, p, rng: masks)
    e = explain(lm, n_ablations=n)
    cache = e.extras["context_cite"]
    ours = np.asarray(cache["log_probs"])[1:]
    theirs = -np.logaddexp(0.0, -logit_probs.astype(np.float64))  # log p = log sigmoid(log-odds)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_allclose(e.scores[0], weights, atol=2e-5)
    np.testing.assert_allclose(cache["intercepts"][0], bias, atol=2e-5)


def test_the_lasso_equals_scikit_learn():
    """Same standardised masks and targets: our coordinate descent (converged to 1e-14) against
    scikit-learn's Lasso run to tol 1e-12 in float64: 1e-9."""
    sklearn = require("sklearn.linear_model")
    rng = np.random.default_rng(3)
    masks = rng.random((64, 7)) < 0.5
    values = masks @ np.array([2.0, 0.0, -1.0, 0.03, 0.5, 0.0, 1.5]) + 0.3 * rng.standard_normal(64)
    weights, intercept = cc.fit_surrogate(masks, values, 5, 0.01)
    x = masks.astype(float)
    scale = x.std(axis=0)
    reference = sklearn.Lasso(alpha=0.01, tol=1e-12, max_iter=1_000_000).fit((x - x.mean(0)) / scale, values / 5)
    np.testing.assert_allclose(weights, 5 * reference.coef_ / scale, atol=1e-9)
    assert intercept == pytest.approx(5 * (reference.intercept_ - (x.mean(0) / scale) @ reference.coef_), abs=1e-9)
    assert np.sum(weights == 0) >= 1  # the penalty zeroes the small ones


# ------------------------------------------------------------------ batching, cache, passes
def test_batched_equals_unbatched_and_passes_are_n_plus_one(lm):
    runs = [explain(lm, n_ablations=12, batch_size=size) for size in (1, 5, None)]
    for other in runs[1:]:
        np.testing.assert_allclose(other.scores, runs[0].scores, rtol=TIGHT, atol=TIGHT)
    assert runs[0].cost.forward_passes == 12 + 1  # a given response: no generation pass
    assert runs[0].cost.model_calls == 13 and runs[1].cost.model_calls < 13


def test_a_sub_span_rescored_from_the_cache_equals_a_fresh_run(lm):
    whole = explain(lm, n_ablations=16, seed=4)
    assert len(whole.targets) == 1 and whole.targets[0].span is not None and len(whole.targets[0].span) == 5
    np.testing.assert_allclose(cc.rescore(whole, (0, 5)), whole.scores[0], rtol=TIGHT, atol=TIGHT)
    fresh = explain(lm, n_ablations=16, seed=4, target_span=(1, 3))
    np.testing.assert_allclose(cc.rescore(whole, (1, 3)), fresh.scores[0], rtol=TIGHT, atol=TIGHT)
    # the cache survives JSON
    back = salience.Explanation.from_dict(whole.to_dict())
    np.testing.assert_allclose(cc.rescore(back, (1, 3)), fresh.scores[0], rtol=TIGHT, atol=TIGHT)
    one = explain(lm, n_ablations=16, seed=4, target=2)  # a token target: the same as its one-token span
    np.testing.assert_allclose(cc.rescore(whole, (2, 3)), one.scores[0], rtol=TIGHT, atol=TIGHT)


def test_targets_and_outputs(lm):
    """The default target is the whole response's log-odds; its value at the full context is the
    logit of exp(sum of token log-probabilities) computed from the cached row 0."""
    e = explain(lm, n_ablations=8)
    assert e.targets[0].output == "log_odds" and e.params["sources"] == 4
    s = np.sum(e.extras["context_cite"]["log_probs"][0])
    assert e.output_value[0] == pytest.approx(s - np.log1p(-np.exp(s)), rel=1e-12)
    log_p = explain(lm, n_ablations=8, output="log_probability")
    assert log_p.output_value[0] == pytest.approx(s, rel=1e-12)
    words = explain(lm, n_ablations=8, sources="word")
    assert len(words.features) == len(CONTEXT.split())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("options, error, words", [
    ({"context": "the capital of france is paris ."}, salience.InputError, "at least 2 sources"),
    ({"output": "logit"}, salience.ParameterError, "'logit'"),
    ({"n_ablations": 1}, salience.ParameterError, "n_ablations"),
    ({"keep_prob": 1.0}, salience.ParameterError, "keep_prob"),
    ({"sources": "paragraph"}, salience.ParameterError, "unknown sources"),
    ({"sources": [(0, 3), (90, 200)]}, salience.ParameterError, "outside the context"),
    ({"level": "word"}, salience.ParameterError, "sources="),
    ({"context": "  "}, salience.InputError, "context is empty"),
])
def test_bad_input_is_one_line(lm, options, error, words):
    with pytest.raises(error) as info:
        explain(lm, **options)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_an_empty_query_is_allowed_and_inputs_are_one_or_the_other(lm):
    e = explain(lm, query="", n_ablations=8)
    assert e.extras["prompt"].endswith("Query: ") and np.isfinite(e.scores).all()
    with pytest.raises(salience.ParameterError, match="not both"):
        salience.explain(lm, "a prompt", context=CONTEXT, method="context_cite")
    with pytest.raises(salience.ParameterError, match="go with a context"):
        salience.explain(lm, query=QUERY, method="context_cite")
    with pytest.raises(salience.ParameterError, match="nothing to explain"):
        salience.explain(lm, method="context_cite")


def test_a_prompt_without_context_scores_its_features_and_leaves_later_ones_nan(lm):
    """On a plain prompt every target (token) is fitted on the features before the response; the
    continuation's own words are not sources (NaN)."""
    e = salience.explain(lm, "the city is very old . it was new .", continuation="and it", method="context_cite",
                         n_ablations=8)
    prompt_words = sum(f.segment == 0 for f in e.features)
    assert e.scores.shape == (2, len(e.features))
    assert np.isfinite(e.scores[:, :prompt_words]).all() and np.isnan(e.scores[:, prompt_words:]).all()


def test_the_chat_template_locates_the_context():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "<s>user: {{ messages[0]['content'] }}\nassistant:"
    built = context_prompt(tokenizer, CONTEXT, QUERY)
    assert built.prompt == [{"role": "user", "content": f"Context: {CONTEXT}\n\nQuery: {QUERY}"}]
    assert built.text.startswith("<s>user: Context: ") and built.text[built.context_start:].startswith(CONTEXT)
    assert [built.text[a:b].strip() for a, b in built.spans] == [CONTEXT[a:b] for a, b in sentence_spans(CONTEXT)]
    assert context_prompt(tokenizer, CONTEXT, QUERY, chat=False).prompt == f"Context: {CONTEXT}\n\nQuery: {QUERY}"


def test_a_classifier_has_no_context_input():
    classifier = types.SimpleNamespace(kind="text classifier", encode_options=(), tokenizer=build_tokenizer())
    with pytest.raises(salience.ParameterError, match="inputs of causal LMs, not of a text classifier"):
        salience.explain(classifier, context=CONTEXT, query=QUERY, method="context_cite")


# ------------------------------------------------------------------ a real model
def test_smollm2_cites_the_sentence_that_states_the_fact():
    lm = salience.load_model("zoo:smollm2-135m")
    context = ("The museum opened in 1902 on the east bank of the river. Its first director was Anna Berg, a painter "
               "from Oslo. The building was enlarged twice in the 1960s. Entry is free on Sundays.")
    e = salience.explain(lm, context=context, query="Who was the first director of the museum?",
                         continuation="The first director was Anna Berg.", method="context_cite", n_ablations=16)
    assert int(np.argmax(e.scores[0])) == 1, e.scores  # "Its first director was Anna Berg, ..."
    assert e.scores[0, 1] > 5  # this test: 5.8-7.8 s with the model's loading, on 2 loaded cores


def test_rescore_refuses_a_bad_span_and_another_method(lm):
    e = explain(lm, n_ablations=8)
    with pytest.raises(salience.TargetError, match="outside the continuation"):
        cc.rescore(e, (3, 9))
    with pytest.raises(salience.ParameterError, match="no ContextCite ablations"):
        cc.rescore(explain(lm, method="occlusion"), (0, 2))


def test_a_response_not_given_is_generated_first(lm):
    e = salience.explain(lm, context=CONTEXT, query=QUERY, max_new_tokens=3, method="context_cite", n_ablations=10)
    assert e.extras["generated"] and len(e.targets[0].span) == 3
    assert e.cost.forward_passes == 3 + 10 + 1  # greedy decoding, then n + 1 ablation rows


def test_a_classifier_target_is_its_class_log_odds(lm):
    """Without positions (a classifier's class) a target is its own token: its log-probability is
    read; the batching test (tests/methods/test_batching.py) runs it on the toy BERT."""
    tokens, groups = cc.response_tokens([salience.Target(1, "positive", "log_odds"), salience.Target(0, "negative", "log_odds")])
    assert [(t.index, t.output, t.position) for t in tokens] == [(1, "log_probability", None), (0, "log_probability", None)]
    assert groups == [[0], [1]]


def test_the_cli_takes_context_and_query(tmp_path):
    import json

    from salience.cli import main

    folder = tmp_path / "lm"
    build_model(context=64).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    out = tmp_path / "c.json"
    status = main(["explain", "--model", str(folder), "--context", CONTEXT, "--query", QUERY, "--continuation", RESPONSE,
                   "--method", "context_cite", "--param", "n_ablations=8", "--json", str(out), "--no-color"])
    assert status == 0
    e = salience.Explanation.from_dict(json.loads(out.read_text())["explanations"][0])
    assert e.method == "context_cite" and e.scores.shape == (1, 4) and e.level == "span"
