"""Chat messages as a causal LM's prompt: the tokenizer's chat template applied, its own tokens
out of the features (or in, on request), each message's characters kept as segments; checked on
the tiny Llama with a small template set on its tokenizer, and once on SmolLM2's own template."""

from __future__ import annotations

import numpy as np
import pytest

import salience
from salience.core.explanation import Explanation
from salience.models.chat import turn_of
from tiny_lm import build_model, build_tokenizer

# a default system prompt when none is given ("a city ." also occurs in the user message below)
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}{{ '<s> system : a city . </s> ' }}{% endif %}"
            "{% for m in messages %}{{ '<s> ' + m['role'] + ' : ' + m['content'] + ' </s> ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<s> assistant :' }}{% endif %}")
USER = [{"role": "user", "content": "is paris a city ."}]
TURNS = [{"role": "system", "content": "the river is old"}, {"role": "user", "content": "the capital of france ?"},
         {"role": "assistant", "content": "paris"}, {"role": "user", "content": "is it big ?"}]


def chat_tokenizer(template: str = TEMPLATE):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(build_model(context=64), chat_tokenizer(), name="tiny-chat")


def test_the_template_is_applied_and_its_tokens_are_no_features(lm):
    e = salience.explain(lm, USER, method="occlusion", max_new_tokens=3)
    rendered = lm.tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    ids = lm.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    encoded = lm.encode(USER, max_new_tokens=3)
    assert e.input == e.extras["prompt"] == rendered and encoded.input_ids.tolist()[:len(ids)] == ids
    user, assistant = e.extras["segments"]
    assert user == {"role": "user", "message": 0, "segment": 0, "start": rendered.rindex("is paris"), "end": rendered.rindex(" </s>")}
    assert assistant == {"role": "assistant", "message": None, "segment": 1, "start": 0, "end": len(e.extras["continuation"])}
    prompt_features = [f for f in e.features if f.segment == 0]
    # only the user's words, found in the user turn (not in the template's "a city ." before it)
    assert [f.text for f in prompt_features] == ["is", "paris", "a", "city", "."]
    assert all(user["start"] <= f.start < f.end <= user["end"] for f in prompt_features)
    assert all(encoded.special[p] for p in e.extras["template_positions"])
    assert len(e.extras["template_positions"]) == len(ids) - 5 and e.extras["messages"] == USER
    assert e.scores.shape == (3, 5 + 3)


def test_template_tokens_on_request_leave_the_content_scores_unchanged(lm):
    plain = salience.explain(lm, USER, method="occlusion", max_new_tokens=3, baseline="eos")
    every = salience.explain(lm, USER, method="occlusion", max_new_tokens=3, baseline="eos", template_tokens=True)
    encoded = lm.encode(USER, max_new_tokens=3, template_tokens=True)
    features = {f.tokens: f for f in every.features}
    template = set(every.extras["template_positions"])
    # every template token that is not the tokenizer's own special token (<s>, </s>) is a feature now
    assert {p for f in every.features for p in f.tokens} - {p for f in plain.features for p in f.tokens} == {
        p for p in template if not encoded.special[p]}
    for f, feature in enumerate(plain.features):  # occlusion of a content token: the same rows either way
        g = list(features).index(feature.tokens)
        np.testing.assert_allclose(every.scores[:, g], plain.scores[:, f], rtol=0, atol=1e-12, equal_nan=True)
    assert features[feature.tokens].text == feature.text


def test_turns_are_segments(lm):
    e = salience.explain(lm, TURNS, method="saliency", continuation=" paris is big")
    segments = e.extras["segments"]
    assert [(s["role"], s["message"]) for s in segments] == [("system", 0), ("user", 1), ("assistant", 2), ("user", 3),
                                                              ("assistant", None)]
    for s, message in zip(segments, TURNS):
        assert e.input[s["start"]:s["end"]] == message["content"]
    words = [f.text for f in e.features if f.segment == 0]
    assert words == " ".join(m["content"] for m in TURNS).split()
    turns = [turn_of(segments, f.segment, f.start) for f in e.features]
    assert [(t["role"], t["message"]) for t in turns] == [("system", 0)] * 4 + [("user", 1)] * 5 + [("assistant", 2)] + [
        ("user", 3)] * 4 + [("assistant", None)] * 3
    assert e.extras["continuation"] == " paris is big" and e.scores.shape == (3, len(words) + 3)


def test_a_list_of_chats_is_several_inputs(lm):
    results = salience.explain(lm, [USER, TURNS], method="occlusion", max_new_tokens=2)
    assert isinstance(results, list) and [r.extras["messages"] for r in results] == [USER, TURNS]


def test_json_round_trip_and_word_aggregation(lm):
    e = salience.explain(lm, TURNS, method="occlusion", continuation=" paris is big")
    back = Explanation.from_json(e.to_json())
    assert back.extras == e.extras and back.input == e.input
    np.testing.assert_array_equal(back.scores, e.scores)
    words = back.aggregate("word")
    np.testing.assert_allclose(np.nansum(words.scores), np.nansum(e.scores), rtol=1e-12)  # one token a word here


@pytest.mark.parametrize("messages, match", [
    ([{"role": "bot", "content": "hi"}], "message 0 has role 'bot'; roles are system, user, assistant"),
    ([{"role": "user", "content": "  "}], "message 0 \\(user\\) has no text content"),
    ([{"role": "user", "content": 3}], "has no text content"),
    ([{"role": "user", "content": "hi", "name": "x"}], "keys other than role and content: name"),
    ([{"role": "user", "content": "is it"}, {"role": "assistant", "content": "paris"}], "last message is the assistant's"),
])
def test_bad_messages_are_one_line_errors(lm, messages, match):
    with pytest.raises(salience.InputError, match=match):
        salience.explain(lm, messages, method="saliency", max_new_tokens=2)


def test_a_tokenizer_without_a_template_is_refused():
    lm = salience.CausalLM(build_model(), build_tokenizer())
    with pytest.raises(salience.InputError, match="no chat template; give the prompt as a text"):
        salience.explain(lm, USER, method="saliency", max_new_tokens=2)


def test_a_template_that_rewrites_the_content_is_refused():
    upper = TEMPLATE.replace("m['content']", "m['content'] | upper")
    lm = salience.CausalLM(build_model(), chat_tokenizer(upper))
    with pytest.raises(salience.InputError, match="rewrites the messages"):
        salience.explain(lm, USER, method="saliency", max_new_tokens=2)


def test_a_template_that_trims_the_content_is_located():
    trim = TEMPLATE.replace("m['content']", "m['content'] | trim")
    lm = salience.CausalLM(build_model(), chat_tokenizer(trim))
    e = salience.explain(lm, [{"role": "user", "content": "  is paris a city .  "}], method="saliency", max_new_tokens=2)
    user = e.extras["segments"][0]
    assert e.input[user["start"]:user["end"]] == "is paris a city ."


def test_smollm2_chat_excludes_its_template():
    lm = salience.load_model("zoo:smollm2-135m")
    messages = [{"role": "user", "content": "Is this review positive? 'A dull film.'"}]
    e = salience.explain(lm, messages, method="occlusion", max_new_tokens=2)
    user = e.extras["segments"][0]
    assert e.input.startswith("<|im_start|>system\nYou are a helpful AI assistant") and e.input.endswith("<|im_start|>assistant\n")
    assert e.input[user["start"]:user["end"]] == messages[0]["content"]
    prompt = [f for f in e.features if f.segment == 0]
    assert "".join(f.text for f in prompt) == messages[0]["content"]  # the user's tokens only: no system prompt, no headers
    assert set(e.extras["step_scores"]) == {"probability", "entropy", "surprisal"}
    assert e.cost.forward_passes == 2 + len(e.features) + 1  # decoding, then features + 1 rows


def test_cli_chat_inline_and_from_a_file(tmp_path, capsys):
    import json

    from salience.cli import main

    folder = tmp_path / "lm"
    build_model(context=64).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    (tmp_path / "chat.json").write_text(json.dumps({"messages": TURNS[:2]}))
    out = tmp_path / "g.json"
    status = main(["explain", "--model", str(folder), "--chat", json.dumps(USER), "--chat", str(tmp_path / "chat.json"),
                   "--max-new-tokens", "2", "--method", "occlusion", "--json", str(out), "--no-color"])
    assert status == 0
    first, second = (Explanation.from_dict(d) for d in json.loads(out.read_text())["explanations"])
    assert first.extras["messages"] == USER and second.extras["messages"] == TURNS[:2]
    assert main(["explain", "--model", str(folder), "--chat", "[{'role': 'user'}]"]) == 2
    assert main(["explain", "--model", str(folder), "--chat", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not valid JSON" in err[-2] and "neither JSON messages nor a readable file" in err[-1]
