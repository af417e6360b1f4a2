"""A causal LM as a zero-shot classifier (PromptClassifier), checked on the tiny float64 Llama against
class scores computed by hand from its logits, and the classifier identities (IG completeness, SIG
exact = occlusion, Shapley efficiency); one short check on SmolLM2-135M."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import salience
from salience.core.target import read_outputs
from salience.metrics import evaluate_metric
from salience.models.prompt_classifier import _in_text
from tiny_lm import build_model, build_tokenizer

TEMPLATE = "the film {text} . it was"
TEXT = "was big and the plot was unbelievable"
# two multi-token verbalisations (two LM rows per evaluation) and one single-token one
LABELS = {"old": " very old", "new": " new", "city": " a city"}
TOL = 1e-10  # float64 throughout: batched / shared computations and the references differ by rounding only
CHAT = ("{% for m in messages %}{{ '<s> ' + m['role'] + ' : ' + m['content'] + ' </s> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s> it was' }}{% endif %}")


def float64_llama(model: torch.nn.Module) -> torch.nn.Module:
    """The tiny Llama computed in float64 throughout. transformers casts to float32 in RMSNorm, the
    rotary angles and the eager attention softmax, and its vectorised kernels round differently by
    sequence length, so one prefix in sequences of other lengths (a label read from another
    label's row, a deletion row) differed by ~2e-7 in log-probability. Here the norms and angles are
    recomputed in float64 and attention runs SDPA (float64 on the CPU)."""
    rotary = model.model.rotary_emb

    def angles(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].double() * rotary.inv_freq.to(device=x.device, dtype=torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rotary.attention_scaling).to(x.dtype), (emb.sin() * rotary.attention_scaling).to(x.dtype)

    def norm(module: torch.nn.Module) -> None:
        def forward(hidden: torch.Tensor) -> torch.Tensor:
            variance = hidden.double().pow(2).mean(-1, keepdim=True)
            return module.weight * (hidden.double() * torch.rsqrt(variance + module.variance_epsilon)).to(hidden.dtype)

        module.forward = forward

    rotary.forward = angles
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            norm(module)
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    return float64_llama(build_model(context=64))


@pytest.fixture()
def lm(hf) -> salience.CausalLM:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT
    return salience.CausalLM(hf, tokenizer, name="tiny-llama")


@pytest.fixture()
def pc(lm) -> salience.PromptClassifier:
    return salience.PromptClassifier(lm, TEMPLATE, LABELS)


# ------------------------------------------------------------------ references
def hand_scores(lm, prompt_ids: list[int], embeds: torch.Tensor | None = None) -> torch.Tensor:
    """s_c = sum_j log p(v_c,j | prompt, v_c,<j), one full forward of prompt + v_c per label, from
    the LM's logits (ids, or the prompt's word embeddings (L, D) with gradients flowing)."""
    table = lm.model.get_input_embeddings()
    scores = []
    for verbalisation in LABELS.values():
        v = lm.tokenizer(verbalisation, add_special_tokens=False)["input_ids"]
        prompt = table(torch.tensor(prompt_ids)) if embeds is None else embeds
        full = torch.cat([prompt, table(torch.tensor(v))])[None]
        log_p = torch.log_softmax(lm.model(inputs_embeds=full).logits[0], dim=-1)
        start = prompt.shape[0]
        scores.append(sum(log_p[start - 1 + j, token] for j, token in enumerate(v)))
    return torch.stack(scores)


def prompt_ids(lm, text: str) -> list[int]:
    return lm.tokenizer(TEMPLATE.replace("{text}", text))["input_ids"]


# ------------------------------------------------------------------ scores
def test_probabilities_equal_softmax_of_hand_verbalisation_log_probabilities(pc, lm):
    prediction = pc.predict(pc.encode(TEXT))
    with torch.no_grad():
        expected = torch.softmax(hand_scores(lm, prompt_ids(lm, TEXT)), dim=0).numpy()
    np.testing.assert_allclose(prediction.probabilities, expected, rtol=0, atol=TOL)
    assert prediction.label == list(LABELS)[int(np.argmax(expected))]
    assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-12)  # renormalised over the labels


def test_word_features_are_the_texts_and_template_tokens_special(pc):
    encoded = pc.encode(TEXT)
    e = salience.explain(pc, TEXT, method="occlusion")
    assert [f.text for f in e.features] == TEXT.split()  # 'unbelievable' is one word of three tokens
    assert all(TEXT[f.start:f.end] == f.text for f in e.features) and e.input == TEXT
    in_features = sorted(t for f in encoded.words for t in f.tokens)
    assert in_features == (~encoded.special).nonzero()[:, 0].tolist()  # exactly the non-special tokens
    template_tokens = [encoded.tokens[t] for t in encoded.special.nonzero()[:, 0].tolist()]
    assert template_tokens == ["<s>", "the", "film", ".", "it", "was"]
    tokens = salience.explain(pc, TEXT, method="occlusion", level="token")
    assert [f.text for f in tokens.features] == ["was", "big", "and", "the", "plot", "was", "un", "##believ", "##able"]
    assert e.extras["verbalisations"] == LABELS and e.extras["filled_template"] == TEMPLATE.replace("{text}", TEXT)


def test_occlusion_delete_is_leave_one_word_out_by_hand(pc, lm):
    e = salience.explain(pc, TEXT, method="occlusion", baseline="delete", target="new", output="log_odds")
    ids = prompt_ids(lm, TEXT)
    encoded = pc.encode(TEXT)
    target = e.target

    def output(row_ids: list[int]) -> float:
        with torch.no_grad():
            return float(read_outputs(hand_scores(lm, row_ids)[None], [target])[0, 0])

    full = output(ids)
    for word, score in zip(encoded.words, e.scores):
        kept = [i for t, i in enumerate(ids) if t not in word.tokens]
        assert score == pytest.approx(full - output(kept), abs=TOL)


@pytest.mark.parametrize("output", ["log_odds", "probability", "logit", "log_probability"])
def test_gradient_equals_autograd_through_the_lm(pc, lm, output):
    encoded = pc.encode(TEXT)
    x, x0 = pc.input_and_baseline(encoded, "zero")
    point = (0.3 * x0 + 0.7 * x).detach()
    targets = [salience.Target(c, label, output) for c, label in enumerate(LABELS)]
    values, gradients = pc.score_inputs(encoded, point[None], targets, grad=True)
    for t, target in enumerate(targets):
        leaf = point.clone().requires_grad_(True)
        value = read_outputs(hand_scores(lm, [], embeds=leaf)[None], [target])[0, 0]
        (expected,) = torch.autograd.grad(value, leaf)
        assert float(values[0, t]) == pytest.approx(value.item(), abs=TOL)
        np.testing.assert_allclose(gradients[0, t].numpy(), expected.numpy(), rtol=0, atol=TOL)


# ------------------------------------------------------------------ identities
@pytest.mark.parametrize("output", ["log_odds", "probability"])
def test_ig_completeness(pc, output):
    e = salience.explain(pc, TEXT, method="ig", output=output, tolerance=0.01)
    gap = e.output_value - e.baseline_value
    # the scores sum to F(x) - F(baseline) up to the reported delta, which IG's adaptive rule keeps
    # within 1 % of the gap (atol 1e-4 for gaps under 0.01)
    assert e.scores.sum() == pytest.approx(gap + e.delta, abs=TOL)
    assert abs(e.delta) <= max(0.01 * abs(gap), 1e-4)


@pytest.mark.parametrize("baseline", ["zero", "eos", "unk"])
def test_sig_exact_equals_occlusion_with_the_same_baseline(pc, baseline):
    sig = salience.explain(pc, TEXT, method="sig", baseline=baseline)
    occlusion = salience.explain(pc, TEXT, method="occlusion", baseline=baseline)
    np.testing.assert_allclose(sig.scores, occlusion.scores, rtol=0, atol=1e-12)
    # one evaluation = 2 LM rows (two multi-token verbalisations; ' new' is read from the first)
    assert sig.cost.forward_passes == 2 * (len(sig.features) + 2) and sig.cost.backward_passes == 0


def test_kernel_shap_exact_is_efficient(pc):
    e = salience.explain(pc, TEXT, method="kernel_shap", target="old")
    assert e.params["exact"] is True
    assert e.scores.sum() == pytest.approx(e.output_value - e.baseline_value, abs=1e-12)


def test_batched_equals_unbatched(pc):
    for method in ("occlusion", "saliency"):
        one = salience.explain(pc, TEXT, method=method, batch_size=1)
        many = salience.explain(pc, TEXT, method=method)
        np.testing.assert_allclose(one.scores, many.scores, rtol=0, atol=1e-12)


def test_single_token_labels_share_one_row(lm):
    pc = salience.PromptClassifier(lm, TEMPLATE, {"big": " big", "small": " small", "old": " old"})
    e = salience.explain(pc, TEXT, method="sig")
    assert e.cost.forward_passes == len(e.features) + 2  # prediction + F(x) + one per word, one LM row each
    saliency = salience.explain(pc, TEXT, method="saliency")
    assert saliency.cost.backward_passes == 3  # one backward row per label


def test_chat_template_words_are_not_features(lm):
    messages = [{"role": "user", "content": "the film {text} ."}]
    pc = salience.PromptClassifier(lm, messages, LABELS)
    e = salience.explain(pc, TEXT, method="sig")
    filled = [{"role": "user", "content": f"the film {TEXT} ."}]
    rendered = lm.tokenizer.apply_chat_template(filled, tokenize=False, add_generation_prompt=True)
    assert e.extras["filled_template"] == rendered and rendered.endswith("<s> it was")
    assert [f.text for f in e.features] == TEXT.split()
    with torch.no_grad():
        expected = torch.softmax(hand_scores(lm, lm.tokenizer(rendered)["input_ids"]), dim=0).numpy()
    np.testing.assert_allclose(e.prediction.probabilities, expected, rtol=0, atol=TOL)


def test_metrics_and_json_round_trip(pc):
    e = salience.explain(pc, TEXT, method="occlusion")
    comprehensiveness = evaluate_metric("comprehensiveness", pc, e)
    assert np.isfinite(comprehensiveness.value) and comprehensiveness.forward_passes > 0
    back = salience.Explanation.from_json(e.to_json())
    np.testing.assert_array_equal(back.scores, e.scores)
    assert back.extras["verbalisations"] == LABELS


def test_replaced_ids_are_scored_as_they_are(pc, lm):
    # max-sensitivity replaces token ids of an encoded input and re-explains it
    encoded = pc.encode(TEXT)
    ids = encoded.input_ids.clone()
    ids[list(encoded.words[1].tokens)] = pc.baseline_token_id("unk")
    prediction = pc.predict(dataclasses.replace(encoded, input_ids=ids))
    with torch.no_grad():
        expected = torch.softmax(hand_scores(lm, ids.tolist()), dim=0).numpy()
    np.testing.assert_allclose(prediction.probabilities, expected, rtol=0, atol=TOL)
    e = salience.explain(pc, TEXT, method="occlusion")
    result = evaluate_metric("max_sensitivity", pc, e, baseline="unk", n_perturbations=3)
    assert np.isfinite(result.value) and result.value > 0


def test_truncation(lm):
    pc = salience.PromptClassifier(salience.CausalLM(build_model(context=16), build_tokenizer()), TEMPLATE, LABELS)
    long_text = "the plot was very old and the film was new and big"
    with pytest.raises(salience.InputError, match="context length of 16"):
        pc.encode(long_text)
    cut = pc.encode(long_text, truncate=True)
    assert cut.truncated and long_text.startswith(cut.input) and cut.length + 2 <= 16  # 2: longest verbalisation


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("template", "labels", "message"), [
    ("the film was", LABELS, "no {text} slot"),
    ("{text} and {text} .", LABELS, "2 {text} slots"),
    ([{"role": "user", "content": "the film"}], LABELS, "no {text} slot"),
    (TEMPLATE, {}, "at least two labels"),
    (TEMPLATE, {"old": " old"}, "at least two labels"),
    (TEMPLATE, {"old": " old", "new": ""}, "verbalisation of label 'new' is empty"),
    (TEMPLATE, {"old": " old", "aged": " old"}, "same verbalisation"),
    (TEMPLATE, {"old": " old", "aged": "OLD"}, "same tokens"),  # the tokenizer lower-cases
    (TEMPLATE, {"old": " old", "nothing": " "}, "tokenises to no token"),
    ("{text} . it was un", {"big": " big", "unbelievable": "believable"}, "'believable' of label 'unbelievable' merges"),
])
def test_bad_setups_are_refused(lm, template, labels, message):
    with pytest.raises(salience.ParameterError, match=message.replace("{", r"\{").replace("}", r"\}")):
        salience.PromptClassifier(lm, template, labels)


def test_bad_inputs_are_refused(lm, pc):
    with pytest.raises(salience.ParameterError, match="wraps a causal LM"):
        salience.PromptClassifier(pc, TEMPLATE, LABELS)
    with pytest.raises(salience.InputError, match="the text is empty"):
        pc.encode("  ")
    with pytest.raises(salience.InputError, match="single text"):
        salience.explain(pc, ("the film", "the plot"), method="occlusion")
    glued = salience.PromptClassifier(lm, "the film un{text} . it was", LABELS)
    with pytest.raises(salience.InputError, match="words run into the template's"):
        glued.encode("believable")  # WordPiece reads 'unbelievable': one word across the slot
    assert glued.encode("!").words[0].text == "!"  # punctuation after 'un' is its own word
    with pytest.raises(salience.TargetError, match="unknown target label"):
        salience.explain(pc, TEXT, method="occlusion", target="music")


def test_a_token_across_the_slot_is_refused():
    # prompt 'ab|cd|' with the text at [3, 5): a token [2, 4) holds ' c' (text) -> inside; [1, 4)
    # holds 'b c' (template and text) -> refused; [0, 2) 'ab' -> template
    assert _in_text("ab cd.", 2, 4, 3, 5) is True
    assert _in_text("ab cd.", 0, 2, 3, 5) is False
    with pytest.raises(salience.InputError, match="spans the text and the template"):
        _in_text("ab cd.", 1, 4, 3, 5)
    with pytest.raises(salience.InputError, match="spans the text and the template"):
        _in_text("ab cd.", 4, 6, 3, 5)


# ------------------------------------------------------------------ CLI
def test_cli_prompt_template_and_labels(tmp_path, capsys):
    from salience.cli import main

    folder = tmp_path / "lm"
    build_model(context=64).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    out = tmp_path / "e.json"
    # what the shell leaves of --labels old=" very old",new=" new",city=" a city"; '\\n' as typed in quotes
    status = main(["explain", "--model", str(folder), "--prompt-template", "the film {text} .\\nit was",
                   "--labels", "old= very old,new= new,city= a city", "--text", TEXT, "--method", "occlusion",
                   "--json", str(out), "--no-color"])
    assert status == 0
    e = salience.Explanation.from_dict(__import__("json").loads(out.read_text())["explanations"][0])
    assert e.extras["verbalisations"] == LABELS and e.extras["filled_template"] == f"the film {TEXT} .\nit was"
    assert [f.text for f in e.features] == TEXT.split() and e.target.output == "log_odds"
    assert main(["explain", "--model", str(folder), "--prompt-template", "the film {text}", "--labels", "old,new",
                 "--text", TEXT, "--method", "occlusion", "--target", "new"]) == 0  # bare names: ' old', ' new'
    capsys.readouterr()
    for extra, message in ((["--labels", "a,b"], "go together"), (["--prompt-template", "x", "--labels", "a,b"], "no {text}"),
                           (["--prompt-template", "{text}", "--labels", "a,,b"], "empty label name"),
                           (["--prompt-template", "[{", "--labels", "a,b"], "not valid JSON")):
        assert main(["explain", "--model", str(folder), "--text", TEXT, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


# ------------------------------------------------------------------ SmolLM2
def test_smollm2_zero_shot_sentiment():
    lm = salience.load_model("zoo:smollm2-135m")
    pc = salience.PromptClassifier(lm, "Review: {text}\nSentiment:", {"negative": " negative", "positive": " positive"})
    e = salience.explain(pc, "A dull, lifeless film.", method="occlusion")
    assert e.prediction.label == "negative" and e.prediction.probabilities[0] > 0.5
    assert [f.text for f in e.features] == ["A", "dull", ",", "lifeless", "film", "."]
    bad = {"negative": "negative", "positive": " positive"}
    with pytest.raises(salience.ParameterError, match="merges with the template's end"):
        salience.PromptClassifier(lm, "Review: {text}\nSentiment: ", bad)  # ': ' + 'negative' reads ': negative'
