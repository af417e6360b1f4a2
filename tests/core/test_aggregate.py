"""Explanation.aggregate / aggregate_targets: features into words, sentences and character spans,
targets into spans, from the scores alone. Checked against sums written out by hand (membership
found here from the raw character offsets), against explanations computed directly at word level
for additive methods, and for target spans against the gradient of the summed log-probabilities
taken here with plain torch calls on the tiny float64 Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import salience
from salience.core.aggregate import sentence_spans, word_spans
from salience.core.explanation import Explanation
from salience.core.features import Feature
from salience.core.target import Target
from salience.errors import ParameterError
from tiny_cnn import photo, tiny_classifier
from tiny_lm import build_model, build_tokenizer

TEXT = "the film was good . but the plot was dull and unbelievable !"  # two sentences; "unbelievable" is 3 tokens
PROMPT = "the city is very old . it was unbelievable"
CONTINUATION = "and it was unbelievable"  # targets: and, it, was, un, ##believ, ##able
# float64 throughout: aggregation only adds numbers, so sums agree with hand sums up to rounding of
# a few terms (~1e-17 relative); explanations computed at word level go through the model again,
# where summing per-position scores in another order differs by rounding only.
EXACT = 1e-12


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(build_model(), build_tokenizer(), name="tiny-llama")


def hand_members(features, text: str, spans: list[tuple[int, int]], segment: int = 0) -> list[list[int]]:
    """Membership by the stated rule, written plainly: the span holding the feature's first
    character, else (whitespace) the span starting at the next non-space character."""
    members: list[list[int]] = [[] for _ in spans]
    for i, f in enumerate(features):
        if f.segment != segment or f.end <= f.start:
            continue
        anchor = f.start
        while anchor < len(text) and text[anchor].isspace():
            anchor += 1
        for g, (a, b) in enumerate(spans):
            if a <= f.start < b or (not any(x <= f.start < y for x, y in spans) and a <= anchor < b):
                members[g].append(i)
    return members


def by_hand(scores: np.ndarray, members: list[list[int]]) -> np.ndarray:
    """Sum over available parts, column by column, in a plain loop."""
    rows = np.atleast_2d(scores)
    out = np.full((rows.shape[0], len(members)), np.nan)
    for t in range(rows.shape[0]):
        for g, m in enumerate(members):
            parts = [rows[t, i] for i in m if not np.isnan(rows[t, i])]
            if parts:
                out[t, g] = sum(parts)
    return out if scores.ndim == 2 else out[0]


# ----------------------------------------------------------------- splitting
def test_sentence_rule():
    text = "Hi there! Is it 3.5 or 4?  Yes.\nNo line end here \"quoted.\" Last"
    pieces = [text[a:b] for a, b in sentence_spans(text)]
    assert pieces == ["Hi there!", "Is it 3.5 or 4?", "Yes.", "No line end here \"quoted.\"", "Last"]
    assert sentence_spans("   ") == [] and sentence_spans("one") == [(0, 3)]
    words = "don't stop!"
    assert [words[a:b] for a, b in word_spans(words)] == ["don't", "stop", "!"]


# ---------------------------------------------------------------- classifier
@pytest.mark.parametrize("method, params", [("input_x_gradient", {}), ("saliency", {}), ("integrated_gradients", {"steps": 16})])
def test_tokens_to_words_equal_word_level_for_additive_methods(toy, method, params):
    tokens = salience.explain(toy, TEXT, method=method, level="token", params=params)
    words = salience.explain(toy, TEXT, method=method, level="word", params=params)
    joined = tokens.aggregate("word")
    assert [(f.text, f.start, f.end, f.tokens) for f in joined.features] == [(f.text, f.start, f.end, f.tokens) for f in words.features]
    np.testing.assert_allclose(joined.scores, words.scores, rtol=0, atol=EXACT)
    np.testing.assert_allclose(joined.scores, by_hand(tokens.scores, hand_members(tokens.features, TEXT, word_spans(TEXT))),
                               rtol=0, atol=EXACT)
    assert joined.level == "word" and joined.params["aggregation"] == {"level": "word", "rule": "sum", "strict": False, "from": "token"}
    assert tokens.level == "token" and "aggregation" not in tokens.params  # the original is untouched


def test_occlusion_is_not_additive(toy):
    """The documented caveat: occluding a 3-token word is not the sum of occluding its tokens."""
    tokens = salience.explain(toy, TEXT, method="occlusion", level="token")
    words = salience.explain(toy, TEXT, method="occlusion", level="word")
    joined = tokens.aggregate("word")
    index = [f.text for f in words.features].index("unbelievable")
    assert abs(joined.scores[index] - words.scores[index]) > 1e-6


def test_words_to_sentences_by_hand(toy):
    e = salience.explain(toy, TEXT, method="input_x_gradient")
    cut = TEXT.index(". ") + 1  # first sentence: up to and with the full stop
    members = [[i for i, f in enumerate(e.features) if f.start < cut], [i for i, f in enumerate(e.features) if f.start > cut]]
    s = e.aggregate("sentence")
    assert [f.text for f in s.features] == [TEXT[:cut], TEXT[cut + 1:]]
    assert s.features[1].tokens == tuple(sorted(t for i in members[1] for t in e.features[i].tokens))
    np.testing.assert_allclose(s.scores, [sum(e.scores[i] for i in m) for m in members], rtol=0, atol=EXACT)
    np.testing.assert_allclose(s.scores.sum(), e.scores.sum(), rtol=0, atol=EXACT)  # the groups cover every feature
    assert s.level == "sentence" and s.params["aggregation"]["from"] == "word"


def test_pair_spans_and_sentences(toy):
    premise, hypothesis = "the film was superb . it was good", "the story is dull"
    e = salience.explain(toy, (premise, hypothesis), method="input_x_gradient", level="token")
    spans = [(0, 20), (21, len(premise)), (1, 4, 17)]
    s = e.aggregate(spans=spans)
    expected = [hand_members(e.features, premise, [(0, 20), (21, len(premise))])[0],
                hand_members(e.features, premise, [(0, 20), (21, len(premise))])[1],
                hand_members(e.features, hypothesis, [(4, 17)], segment=1)[0]]
    assert [f.segment for f in s.features] == [0, 0, 1] and s.features[2].text == "story is dull"
    np.testing.assert_allclose(s.scores, by_hand(e.scores, expected), rtol=0, atol=EXACT)
    assert s.level == "span" and s.params["aggregation"]["spans"] == [[0, 0, 20], [0, 21, len(premise)], [1, 4, 17]]
    sentences = e.aggregate("sentence")
    assert [(f.segment, f.text) for f in sentences.features] == [(0, "the film was superb ."), (0, "it was good"), (1, hypothesis)]
    np.testing.assert_allclose(sentences.scores.sum(), e.scores.sum(), rtol=0, atol=EXACT)


def test_overlapping_spans_count_a_feature_in_each(toy):
    e = salience.explain(toy, TEXT, method="input_x_gradient")
    s = e.aggregate(spans=[(0, 17), (9, 17)])  # "the film was good" and "was good"
    members = [[i for i, f in enumerate(e.features) if a <= f.start < b] for a, b in [(0, 17), (9, 17)]]
    np.testing.assert_allclose(s.scores, [sum(e.scores[i] for i in m) for m in members], rtol=0, atol=EXACT)


# ------------------------------------------------------------ rules by hand
def built(features: list[Feature], scores: np.ndarray, text: str, level: str = "token") -> Explanation:
    targets = [Target(i, f"t{i}") for i in range(len(scores))] if np.ndim(scores) == 2 else []
    return Explanation(input=text, features=features, scores=scores, method="input_x_gradient", params={}, model="m",
                       target=Target(0, "t0"), targets=targets, prediction=None, level=level)


def test_max_abs_mean_and_membership_by_first_character():
    text = "good film.\nBad end"
    features = [Feature("[CLS]", 0, 0, 0, (0,)),          # no characters: in no group
                Feature("go", 0, 2, 0, (1,)), Feature("od", 2, 4, 0, (2,)),
                Feature(" fi", 4, 7, 0, (3,)),            # whitespace first: the next word, "film"
                Feature("lm.", 7, 10, 0, (4,)),           # straddles "film" and ".": goes by its first character
                Feature("\n", 10, 11, 0, (5,)),           # a line-break token: the next word, "Bad"
                Feature("Bad", 11, 14, 0, (6,)), Feature(" end", 14, 18, 0, (7,))]
    scores = np.array([[9.0, 1.0, -3.0, 2.0, -2.0, 0.5, 1.5, 4.0],
                       [9.0, -1.0, 1.0, 2.0, 2.0, -7.0, 1.0, 0.0]])
    e = built(features, scores, text)
    words = e.aggregate("word", rule="max_abs")
    assert [f.text for f in words.features] == ["good", "film", "Bad", "end"]  # "." gets no token: left out
    assert [f.tokens for f in words.features] == [(1, 2), (3, 4), (5, 6), (7,)]
    np.testing.assert_array_equal(words.scores, [[-3.0, 2.0, 1.5, 4.0], [-1.0, 2.0, -7.0, 0.0]])  # ties: the first
    mean = e.aggregate("word", rule="mean")
    np.testing.assert_allclose(mean.scores, [[-1.0, 0.0, 1.0, 4.0], [0.0, 2.0, -3.0, 0.0]], rtol=0, atol=EXACT)
    sentences = e.aggregate("sentence")
    assert [f.text for f in sentences.features] == ["good film.", "Bad end"]
    np.testing.assert_allclose(sentences.scores, [[-2.0, 6.0], [4.0, -6.0]], rtol=0, atol=EXACT)
    assert words.params["aggregation"]["rule"] == "max_abs"
    twice = words.aggregate("sentence")
    assert twice.params["aggregation"]["previous"]["level"] == "word"


def test_nan_rule_by_hand():
    text = "a bc d"
    features = [Feature("a", 0, 1, 0, (0,)), Feature("b", 2, 3, 0, (1,)), Feature("c", 3, 4, 0, (2,)), Feature("d", 5, 6, 0, (3,))]
    scores = np.array([[1.0, 2.0, np.nan, np.nan], [np.nan, np.nan, np.nan, 4.0]])
    e = built(features, scores, text)
    loose = e.aggregate("word")
    np.testing.assert_array_equal(loose.scores, [[1.0, 2.0, np.nan], [np.nan, np.nan, 4.0]])  # NaN only when all parts are
    strict = e.aggregate("word", strict=True)
    np.testing.assert_array_equal(strict.scores, [[1.0, np.nan, np.nan], [np.nan, np.nan, 4.0]])  # NaN when any part is
    for rule in ("mean", "max_abs"):
        np.testing.assert_array_equal(e.aggregate("word", rule=rule).scores, [[1.0, 2.0, np.nan], [np.nan, np.nan, 4.0]])


# -------------------------------------------------------------- causal LM
def test_lm_tokens_to_words_nan_pattern(lm):
    kwargs = {"continuation": CONTINUATION, "method": "input_x_gradient", "output": "log_probability"}
    tokens = salience.explain(lm, PROMPT, level="token", **kwargs)
    words = salience.explain(lm, PROMPT, level="word", **kwargs)
    strict = tokens.aggregate("word", strict=True)
    assert [(f.text, f.segment, f.tokens) for f in strict.features] == [(f.text, f.segment, f.tokens) for f in words.features]
    # the adapter's own rule: a word holding the target's token or a later one is NaN
    np.testing.assert_allclose(strict.scores, words.scores, rtol=0, atol=EXACT)
    assert np.array_equal(np.isnan(strict.scores), np.isnan(words.scores)) and np.isnan(words.scores).any()
    loose = tokens.aggregate("word")
    members = hand_members(tokens.features, PROMPT, word_spans(PROMPT)) + \
        hand_members(tokens.features, CONTINUATION, word_spans(CONTINUATION), segment=1)
    np.testing.assert_allclose(loose.scores, by_hand(tokens.scores, members), rtol=0, atol=EXACT)
    # "unbelievable" of the continuation, for its last token's target: its first two tokens count
    last = [f.text for f in loose.features].index("unbelievable", 9)
    assert np.isnan(words.scores[-1, last]) and not np.isnan(loose.scores[-1, last])
    continuation = tokens.aggregate(spans=[(1, 0, 10)])  # "and it was" in the continuation
    assert continuation.features[0].text == "and it was" and continuation.features[0].segment == 1


def test_target_spans_are_the_attribution_of_the_summed_log_probability(lm):
    e = salience.explain(lm, PROMPT, continuation=CONTINUATION, method="input_x_gradient", output="log_probability", level="token")
    spans = [(0, 3), (3, 6)]
    joined = e.aggregate_targets(spans)
    assert [t.label for t in joined.targets] == ["and it was", "unbelievable"]
    assert all(t.index == -1 and t.position is None for t in joined.targets)
    # reference: d/dx of sum over the span of log p(token | prefix), times x, summed over embedding dims
    encoded = lm.encode(PROMPT, continuation=CONTINUATION)
    ids = encoded.input_ids
    x = lm.embedding_layer(ids[None]).detach()[0].requires_grad_(True)
    logits = lm.model(inputs_embeds=x[None]).logits[0]
    log_p = torch.log_softmax(logits, dim=-1)
    positions = [t.position for t in e.targets]
    for row, (a, b) in enumerate(spans):
        total = sum(log_p[p - 1, ids[p]] for p in positions[a:b])
        (grad,) = torch.autograd.grad(total, x, retain_graph=True)
        per_position = (grad * x).sum(-1).detach().numpy()
        reference = np.array([per_position[f.tokens[0]] for f in e.features])
        available = ~np.isnan(joined.scores[row])
        # transformers' eager Llama attention takes its softmax in float32, so the gradient of a sum and
        # the sum of gradients differ at float32 rounding: measured 4.7e-7 on scores up to 0.3
        np.testing.assert_allclose(joined.scores[row][available], reference[available], rtol=0,
                                   atol=1e-5 * np.abs(reference).max())
        assert np.all(reference[~available] == 0.0)  # NaN exactly where the span's tokens cannot be reached
        np.testing.assert_allclose(joined.output_value[row], float(total.detach()), rtol=1e-12)
    hand = by_hand(e.scores.T, [list(range(a, b)) for a, b in spans]).T  # rows summed over available targets
    np.testing.assert_allclose(joined.scores, hand, rtol=0, atol=EXACT)
    both = e.aggregate("word", target_spans=spans)
    assert both.scores.shape == (2, len(both.features)) and both.params["aggregation"]["previous"]["target_spans"] == [[0, 3], [3, 6]]
    np.testing.assert_allclose(both.scores, e.aggregate("word").aggregate_targets(spans).scores, rtol=0, atol=EXACT)  # order is immaterial
    words = e.aggregate("word").aggregate_targets([(0, 3), (3, 4)])
    # labels from the word features lying wholly inside a span; else the tokens' texts joined
    assert [t.label for t in words.targets] == ["and it was", e.targets[3].label]


def test_probability_target_spans_warn(lm):
    e = salience.explain(lm, PROMPT, continuation=CONTINUATION, method="input_x_gradient", level="token")
    assert any("not the probability of the span" in w for w in e.aggregate_targets([(0, 2)]).warnings)
    assert e.aggregate_targets([(0, 2)], rule="max_abs").output_value is None


def test_json_round_trip_and_rendering(lm):
    e = salience.explain(lm, PROMPT, continuation=CONTINUATION, method="input_x_gradient", output="log_probability", level="token")
    joined = e.aggregate("sentence").aggregate_targets([(0, 3), (3, 6)])
    back = Explanation.from_json(joined.to_json())
    assert [(f.text, f.start, f.end, f.segment, f.tokens) for f in back.features] == \
        [(f.text, f.start, f.end, f.segment, f.tokens) for f in joined.features]
    np.testing.assert_array_equal(back.scores, joined.scores)
    assert back.level == "sentence" and back.targets == joined.targets
    assert json.loads(json.dumps(back.params)) == json.loads(json.dumps(joined.params))
    assert "unbelievable" in joined.to_html() and "and it was" in joined.to_html()
    loaded = Explanation.from_json(e.to_json()).aggregate("sentence")  # offsets and texts survive JSON
    np.testing.assert_array_equal(loaded.scores, e.aggregate("sentence").scores)


# ------------------------------------------------------------------- errors
def test_errors(toy, lm):
    e = salience.explain(toy, TEXT, method="input_x_gradient")
    cases = [
        (lambda: e.aggregate(spans=[(0, 999)]), "outside text 0"),
        (lambda: e.aggregate(spans=[(5, 5)]), "outside text 0"),
        (lambda: e.aggregate(spans=[(1, 0, 3)]), "names text 1"),
        (lambda: e.aggregate(spans=[(0, 1.5)]), "a span is"),
        (lambda: e.aggregate(spans=[]), "spans is empty"),
        (lambda: e.aggregate(spans=[(3, 4)]), "holds no feature"),
        (lambda: e.aggregate("paragraph"), "unknown aggregation level"),
        (lambda: e.aggregate("word", rule="median"), "unknown aggregation rule"),
        (lambda: e.aggregate(), "needs a level"),
        (lambda: e.aggregate("span"), "needs spans"),
        (lambda: e.aggregate("word", spans=[(0, 3)]), "not both"),
        (lambda: e.aggregate("sentence").aggregate("word"), "cannot be aggregated to words"),
        (lambda: e.aggregate_targets([(0, 1)]), "one target"),
    ]
    g = salience.explain(lm, PROMPT, continuation=CONTINUATION, method="input_x_gradient", level="token")
    cases += [(lambda: g.aggregate_targets([(0, 7)]), "outside the 6 targets"),
              (lambda: g.aggregate_targets([(2, 2)]), "outside the 6 targets"),
              (lambda: g.aggregate_targets([]), "empty")]
    image = salience.explain(tiny_classifier(), photo(), method="saliency")
    cases += [(lambda: image.aggregate("word"), "level='patch'")]
    odd = Explanation(input=["not", "text"], features=e.features, scores=e.scores, method="m", params={}, model="m",
                      target=e.target, prediction=None)
    cases += [(lambda: odd.aggregate("word"), "is a list, not text")]
    for call, message in cases:
        with pytest.raises(ParameterError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_cli_aggregate(toy_dir, tmp_path):
    from salience.cli import main

    out = tmp_path / "e.json"
    assert main(["explain", "--model", str(toy_dir), "--text", TEXT, "--method", "input_x_gradient", "--level", "token",
                 "--aggregate", "sentence", "--json", str(out), "--no-color"]) == 0
    document = json.loads(out.read_text())["explanations"][0]
    assert document["level"] == "sentence" and len(document["features"]) == 2
    assert document["params"]["aggregation"] == {"level": "sentence", "rule": "sum", "strict": False, "from": "token"}


def test_smollm2_byte_level_tokens_to_words_and_sentences():
    """A real byte-level BPE tokenizer: tokens carry their leading space (" Paris" starts at the
    space), and there are lone "\\n" and " " tokens; aggregation groups them as the adapter's word
    features do, so the strict aggregate equals the word-level explanation."""
    lm = salience.load_model("zoo:smollm2-135m")
    prompt = "The capital of France is a city.\n It is old!  Paris, they say."
    kwargs = {"continuation": " Paris is big", "method": "input_x_gradient", "output": "log_probability"}
    tokens = salience.explain(lm, prompt, level="token", **kwargs)
    words = salience.explain(lm, prompt, level="word", **kwargs)
    assert {"\n", " "} <= {f.text for f in tokens.features}
    joined = tokens.aggregate("word", strict=True)
    assert [(f.text, f.segment, f.tokens) for f in joined.features] == [(f.text, f.segment, f.tokens) for f in words.features]
    np.testing.assert_allclose(joined.scores, words.scores, rtol=0, atol=EXACT)  # float32 model, same sums: measured 0.0
    assert np.array_equal(np.isnan(joined.scores), np.isnan(words.scores))
    assert [f.text for f in tokens.aggregate("sentence").features] == \
        ["The capital of France is a city.", "It is old!", "Paris, they say.", "Paris is big"]
