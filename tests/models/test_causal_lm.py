"""CausalLM on a tiny seeded float64 Llama: every method's (T, F) matrix equals the same method run
separately on each target with a fresh teacher-forced prefix (slow references written here with
plain model calls); generation, deletion rows, passes, bad input, rendering; and one short test on
the bundled SmolLM2."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from rich.console import Console
from transformers import GPT2Config, GPT2LMHeadModel

import salience
from salience.methods.perturbation import constrained_kernel_regression, fit_lime, kernel_shap_design, lime_samples
from tiny_lm import build_model, build_tokenizer

PROMPT = "the city is very old"
CONTINUATION = "and it was new"  # four tokens: four targets
RTOL, ATOL = 1e-9, 1e-12  # float64: the batched, shared computation and the references differ by rounding only


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    return build_model()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def lm(hf, tokenizer) -> salience.CausalLM:
    return salience.CausalLM(hf, tokenizer, name="tiny-llama")


# ------------------------------------------------------------------ references
def next_output(hf: torch.nn.Module, prefix: torch.Tensor, token: int, output: str = "probability") -> torch.Tensor:
    """The model's output for ``token`` after ``prefix`` (ids (p,) or embeddings (p, D)), full logits."""
    kwargs = {"inputs_embeds": prefix[None]} if prefix.is_floating_point() else {"input_ids": prefix[None]}
    logits = hf(**kwargs).logits[0, -1]
    if output == "logit":
        return logits[token]
    log_p = torch.log_softmax(logits, dim=-1)[token]
    return log_p if output == "log_probability" else log_p.exp()


@dataclass
class Case:
    """One teacher-forced input, seen as plain tensors: ids (L,), embeddings x (L, D), the zero
    baseline x0 (special positions keep x), the features' positions and the targets' positions."""

    hf: torch.nn.Module
    ids: torch.Tensor
    special: torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor
    features: list[tuple[int, ...]]
    positions: list[int]
    eos: int

    @classmethod
    def build(cls, lm: salience.CausalLM, level: str = "token", prompt: str = PROMPT, continuation: str = CONTINUATION) -> Case:
        encoded = lm.encode(prompt, continuation=continuation)
        ids = encoded.input_ids
        with torch.no_grad():
            x = lm.model.get_input_embeddings()(ids).detach()
        x0 = torch.where(encoded.special[:, None], x, torch.zeros_like(x))
        start = int(encoded.extras["prompt_length"])
        return cls(lm.model, ids, encoded.special, x, x0, [f.tokens for f in encoded.features(level)],
                   list(range(start, len(ids))), int(lm.tokenizer.eos_token_id))

    def token(self, t: int) -> int:
        return int(self.ids[self.positions[t]])

    def row(self, t: int, score: Callable[[tuple[int, ...]], float]) -> np.ndarray:
        """Scores (F,) of target t: ``score(positions)`` for features before it, NaN for the others."""
        p = self.positions[t]
        return np.array([score(f) if max(f) < p else np.nan for f in self.features])

    def available(self) -> np.ndarray:
        return np.array([[max(f) < p for f in self.features] for p in self.positions])

    def gradient(self, point: torch.Tensor, t: int) -> torch.Tensor:
        """d output_t / d embeddings of the prefix of target t, at ``point`` (L, D): (p, D)."""
        prefix = point[: self.positions[t]].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(next_output(self.hf, prefix, self.token(t)), prefix)
        return grad

    def perturbed(self, t: int, removed: set[int], baseline: str) -> float:
        """Output of target t on its own prefix with the positions ``removed`` zeroed, replaced by
        EOS or deleted."""
        p = self.positions[t]
        with torch.no_grad():
            if baseline == "zero":
                rows = [q for q in removed if q < p]
                embeds = self.x[:p].clone()
                embeds[rows] = 0
                return float(next_output(self.hf, embeds, self.token(t)))
            if baseline == "eos":
                ids = self.ids[:p].clone()
                ids[[q for q in removed if q < p]] = self.eos
                return float(next_output(self.hf, ids, self.token(t)))
            kept = [q for q in range(p) if q not in removed]
            return float(next_output(self.hf, self.ids[kept], self.token(t)))

    def removed_positions(self, keep: np.ndarray) -> set[int]:
        return {q for f, k in zip(self.features, keep) if not k for q in f}


def reference_gradient(case: Case, reduce: Callable[[torch.Tensor, int], torch.Tensor]) -> np.ndarray:
    """(T, F) from per-position scores ``reduce(t)`` (p,) of each target's prefix."""
    rows = []
    for t in range(len(case.positions)):
        per_position = reduce(case.x, t)
        rows.append(case.row(t, lambda f, s=per_position: float(s[list(f)].sum())))
    return np.stack(rows)


def ref_saliency(case: Case) -> np.ndarray:
    return reference_gradient(case, lambda x, t: case.gradient(x, t).abs().sum(-1))


def ref_input_x_gradient(case: Case) -> np.ndarray:
    return reference_gradient(case, lambda x, t: (x[: case.positions[t]] * case.gradient(x, t)).sum(-1))


def ref_smoothgrad(case: Case, n: int = 4, level: float = 0.1) -> np.ndarray:
    noise = torch.randn((n, *case.x.shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    points = case.x[None] + level * float(case.x.max() - case.x.min()) * noise  # std from the whole input
    return reference_gradient(case, lambda x, t: torch.stack([case.gradient(pt, t).abs() for pt in points]).mean(0).sum(-1))


def ref_integrated_gradients(case: Case, steps: int = 6) -> np.ndarray:
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas, weights = (nodes + 1) / 2, weights / 2

    def reduce(x: torch.Tensor, t: int) -> torch.Tensor:
        p = case.positions[t]
        total = sum(w * case.gradient(case.x0 + a * (x - case.x0), t) for a, w in zip(alphas, weights))
        return (total * (x - case.x0)[:p]).sum(-1)

    return reference_gradient(case, reduce)


def ref_gradient_shap(case: Case, n: int = 5, stdev: float = 0.1) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    alphas = torch.rand(n, generator=generator, dtype=torch.float64)
    noise = torch.randn((n, *case.x.shape), generator=generator, dtype=torch.float64)
    baselines = case.x0[None] + stdev * noise * (~case.special)[None, :, None]

    def reduce(x: torch.Tensor, t: int) -> torch.Tensor:
        p = case.positions[t]
        terms = [case.gradient(b + a * (x - b), t) * (x - b)[:p] for a, b in zip(alphas, baselines)]
        return torch.stack(terms).mean(0).sum(-1)

    return reference_gradient(case, reduce)


def ref_occlusion(case: Case, baseline: str) -> np.ndarray:
    """Leave-one-out by hand: output on the prefix minus output with the feature removed."""
    return np.stack([case.row(t, lambda f, t=t: case.perturbed(t, set(), baseline) - case.perturbed(t, set(f), baseline))
                     for t in range(len(case.positions))])


def ref_lime(case: Case, n_samples: int = 40) -> np.ndarray:
    """The same keep rows, each target fitted on the features before it (words deleted)."""
    keep = lime_samples(len(case.features), n_samples, np.random.default_rng(0))
    out = np.full((len(case.positions), len(case.features)), np.nan)
    for t, columns in enumerate(case.available()):
        values = np.array([case.perturbed(t, case.removed_positions(k), "delete") for k in keep])
        out[t, columns] = fit_lime(keep[:, columns], values, 25.0, 1.0)[0]
    return out


def ref_exact_shapley(case: Case) -> np.ndarray:
    """Shapley values of each target's own game over the features before it (zero baseline)."""
    out = np.full((len(case.positions), len(case.features)), np.nan)
    for t, columns in enumerate(case.available()):
        players = list(np.flatnonzero(columns))
        n = len(players)
        cache: dict[frozenset[int], float] = {}

        def value(coalition: frozenset[int], t: int = t, players: list[int] = players, cache: dict = cache) -> float:
            if coalition not in cache:
                removed = {q for i in players if i not in coalition for q in case.features[i]}
                cache[coalition] = case.perturbed(t, removed, "zero")
            return cache[coalition]

        for i in players:
            others = [j for j in players if j != i]
            out[t, i] = sum(
                math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                * (value(frozenset(s) | {i}) - value(frozenset(s)))
                for k in range(n) for s in itertools.combinations(others, k)
            )
    return out


def ref_sampled_kernel_shap(case: Case, n_samples: int = 40) -> np.ndarray:
    """The same coalitions, each target's regression over the features before it (zero baseline)."""
    n = len(case.features)
    keep, weights = kernel_shap_design(n, n_samples, np.random.default_rng(0))
    out = np.full((len(case.positions), n), np.nan)
    for t, columns in enumerate(case.available()):
        full = case.perturbed(t, set(), "zero")
        empty = case.perturbed(t, case.removed_positions(np.zeros(n, bool)), "zero")
        values = np.array([case.perturbed(t, case.removed_positions(k), "zero") for k in keep])
        out[t, columns] = constrained_kernel_regression(keep[:, columns].astype(float), values - empty, weights, full - empty)
    return out


def ref_sig_exact(case: Case) -> np.ndarray:
    """F(x) - F(x with the feature at the zero baseline), on each target's prefix."""
    return ref_occlusion(case, "zero")


METHODS: dict[str, tuple[dict[str, object], Callable[[Case], np.ndarray]]] = {
    "saliency": ({}, ref_saliency),
    "input_x_gradient": ({}, ref_input_x_gradient),
    "smoothgrad": ({"n_samples": 4, "noise_level": 0.1}, ref_smoothgrad),
    "integrated_gradients": ({"steps": 6}, ref_integrated_gradients),
    "gradient_shap": ({"n_samples": 5, "stdev": 0.1}, ref_gradient_shap),
    "occlusion": ({}, lambda case: ref_occlusion(case, "zero")),
    "lime": ({"n_samples": 40}, ref_lime),
    "kernel_shap": ({}, ref_exact_shapley),
    "sequential_integrated_gradients": ({}, ref_sig_exact),
}


# ------------------------------------------------------------ every method
@pytest.mark.filterwarnings("ignore::salience.SalienceWarning")  # IG's 6 steps leave a large delta: same nodes in both
@pytest.mark.parametrize("method", sorted(METHODS))
def test_matrix_equals_one_run_per_target_on_its_own_prefix(lm, method):
    params, reference = METHODS[method]
    e = salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION, **params)
    case = Case.build(lm)
    assert e.kind == "generation" and e.prediction is None and e.level == "token"
    assert [t.position for t in e.targets] == case.positions and [t.index for t in e.targets] == case.ids[case.positions].tolist()
    assert np.array_equal(np.isnan(e.scores), ~case.available())  # later positions are absent, not zero
    np.testing.assert_allclose(e.scores, reference(case), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("baseline", ["zero", "eos", "delete"])
def test_occlusion_is_leave_one_out_by_hand(lm, baseline):
    e = salience.explain(lm, PROMPT, method="occlusion", continuation=CONTINUATION, baseline=baseline)
    np.testing.assert_allclose(e.scores, ref_occlusion(Case.build(lm), baseline), rtol=RTOL, atol=ATOL)


def test_occlusion_of_words_deletes_every_token_of_the_word(lm):
    prompt = "the film was unbelievable , very overrated"
    e = salience.explain(lm, prompt, method="occlusion", continuation=CONTINUATION, baseline="delete", level="word")
    assert [f.text for f in e.features] == ["the", "film", "was", "unbelievable", ",", "very", "overrated", "and", "it", "was", "new"]
    assert len(e.features[3].tokens) == 3 and len(e.features[6].tokens) == 2
    case = Case.build(lm, "word", prompt)
    np.testing.assert_allclose(e.scores, ref_occlusion(case, "delete"), rtol=RTOL, atol=ATOL)


def test_sampled_kernel_shap_fits_each_target_on_its_available_features(lm):
    e = salience.explain(lm, PROMPT, method="kernel_shap", continuation=CONTINUATION, max_exact=3, n_samples=40)
    assert e.params["exact"] is False
    np.testing.assert_allclose(e.scores, ref_sampled_kernel_shap(Case.build(lm)), rtol=1e-8, atol=1e-11)


def test_sig_path_form_meets_its_exact_value_per_target(lm):
    # between two token embeddings (from the zero embedding, RMSNorm makes the integrand a spike near 0);
    # 64 Gauss-Legendre nodes per feature: 6e-6 from the exact values, whose largest is 0.2
    exact = salience.explain(lm, PROMPT, method="sig", continuation=CONTINUATION, baseline="eos")
    path = salience.explain(lm, PROMPT, method="sig", continuation=CONTINUATION, baseline="eos", form="path", steps=64)
    assert np.array_equal(np.isnan(path.scores), np.isnan(exact.scores))
    np.testing.assert_allclose(path.scores, exact.scores, rtol=0, atol=2e-5, equal_nan=True)


def test_target_subset_picks_rows_of_the_full_matrix(lm):
    full = salience.explain(lm, PROMPT, method="occlusion", continuation=CONTINUATION)
    some = salience.explain(lm, PROMPT, method="occlusion", continuation=CONTINUATION, target=[0, -1])
    assert [t.position for t in some.targets] == [full.targets[0].position, full.targets[-1].position]
    np.testing.assert_allclose(some.scores, full.scores[[0, -1]], rtol=RTOL, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("output", ["logit", "log_probability"])
def test_other_outputs(lm, output):
    e = salience.explain(lm, PROMPT, method="occlusion", continuation=CONTINUATION, output=output, baseline="eos")
    case = Case.build(lm)
    with torch.no_grad():
        expected = [float(next_output(case.hf, case.ids[:p], case.token(t), output)) for t, p in enumerate(case.positions)]
    np.testing.assert_allclose(e.output_value, expected, rtol=RTOL)


@pytest.mark.parametrize("method, params", [("occlusion", {"baseline": "delete"}), ("lime", {"n_samples": 30}), ("saliency", {})])
def test_batched_equals_unbatched_without_bos(hf, method, params):
    lm = salience.CausalLM(hf, build_tokenizer(bos=False))  # deletion chunks may each need a start row
    default = salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION, **params)
    for chunking in ({"batch_size": 1}, {"batch_size": 3}, {"max_memory": "1MB"}):
        chunked = salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION, **chunking, **params)
        np.testing.assert_allclose(chunked.scores, default.scores, rtol=RTOL, atol=ATOL, equal_nan=True)


# ------------------------------------------------------------------ passes
def test_occlusion_matrix_costs_features_plus_one_rows(lm):
    e = salience.explain(lm, PROMPT, method="occlusion", continuation=CONTINUATION)
    prompt_tokens, generated = 5, 4  # BOS is special: no feature, no row
    assert e.cost.forward_passes == prompt_tokens + generated + 1 and e.cost.backward_passes == 0
    g = salience.explain(lm, PROMPT, method="occlusion", max_new_tokens=4)
    steps = len(g.targets)  # one counted row per decoding step, then the occlusion rows
    assert g.cost.forward_passes == steps + prompt_tokens + steps + 1


# -------------------------------------------------------------- generation
@pytest.mark.parametrize("prompt", [PROMPT, "paris is a big city on the river"])
def test_greedy_generation_equals_generate(lm, hf, tokenizer, prompt):
    encoded = lm.encode(prompt, max_new_tokens=6)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert encoded.input_ids.tolist() == expected[0].tolist()
    assert encoded.extras["generated"] is True
    assert encoded.extras["continuation"] == tokenizer.decode(expected[0, ids.shape[1]:])


def test_seeded_sampling_draws_from_the_softmax(lm, hf):
    e = salience.explain(lm, PROMPT, method="occlusion", max_new_tokens=5, sample=True, seed=3)
    generator = torch.Generator().manual_seed(3)
    ids = lm.encode(PROMPT, continuation="and").input_ids[:-1]
    with torch.no_grad():
        for _ in range(5):
            probs = torch.softmax(hf(input_ids=ids[None]).logits[0, -1].double(), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, token])
            if int(token) == 2:
                break
    assert [t.index for t in e.targets] == ids[6:].tolist()
    assert e.extras["sample"] is True and e.extras["seed"] == 3


@pytest.mark.parametrize("bos", [True, False])
def test_deletion_rows_read_the_last_kept_position(hf, bos):
    tokenizer = build_tokenizer(bos=bos)
    lm = salience.CausalLM(hf, tokenizer)
    encoded = lm.encode(PROMPT, continuation=CONTINUATION)
    features = lm.features(encoded, "token")
    targets = lm.resolve_targets(encoded, None, None, "probability")
    rng = np.random.default_rng(1)
    keep = np.vstack([rng.random((10, len(features))) < 0.5, np.zeros((1, len(features)), bool), np.ones((1, len(features)), bool)])
    values = lm.score_perturbed(encoded, torch.as_tensor(keep), features, "delete", targets).numpy()
    start = tokenizer.bos_token_id if bos else tokenizer.eos_token_id
    expected = np.zeros_like(values)
    empty_prefixes = 0
    with torch.no_grad():
        for r, row in enumerate(keep):
            removed = {q for f, k in zip(features, row) if not k for q in f.tokens}
            for t, target in enumerate(targets):
                prefix = [int(encoded.input_ids[q]) for q in range(target.position) if q not in removed]
                empty_prefixes += not prefix
                expected[r, t] = float(next_output(hf, torch.tensor(prefix or [start]), target.index))
    assert (empty_prefixes > 0) == (not bos)  # without BOS, a target whose prefix is all deleted reads the start token
    np.testing.assert_allclose(values, expected, rtol=RTOL, atol=ATOL)


def test_model_in_bfloat16_is_neither_moved_nor_cast(tokenizer):
    hf = build_model().to(torch.bfloat16)
    lm = salience.CausalLM(hf, tokenizer)
    for method in ("occlusion", "saliency"):
        e = salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION)
        assert np.isfinite(e.scores[~np.isnan(e.scores)]).all()
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}


# -------------------------------------------------------------- features
def test_word_and_token_offsets_point_into_prompt_and_continuation(lm):
    prompt = "The city is unbelievable!"
    encoded = lm.encode(prompt, continuation="and it was overrated")
    texts = {0: prompt, 1: encoded.extras["continuation"]}
    assert [(w.text, w.segment) for w in encoded.words] == [
        ("The", 0), ("city", 0), ("is", 0), ("unbelievable", 0), ("!", 0), ("and", 1), ("it", 1), ("was", 1), ("overrated", 1)]
    for word in encoded.words:
        assert texts[word.segment][word.start:word.end] == word.text
    for token in encoded.token_features:
        assert texts[token.segment][token.start:token.end].lower() == token.text.removeprefix("##")
    assert bool(encoded.special[0]) and all(0 not in f.tokens for f in encoded.token_features)  # BOS is no feature
    assert encoded.tokens[4] == "un" and int(encoded.input_ids[4]) != lm.tokenizer.unk_token_id


def test_generated_words_map_into_the_generated_text(lm):
    encoded = lm.encode(PROMPT, max_new_tokens=6)
    continuation = encoded.extras["continuation"]
    for word in encoded.words:
        if word.segment == 1:
            assert continuation[word.start:word.end] == word.text


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("options, error, match", [
    ({"max_new_tokens": 0}, salience.ParameterError, "max_new_tokens must be at least 1"),
    ({"continuation": ""}, salience.InputError, "tokenises to no token"),
    ({"continuation": "   "}, salience.InputError, "tokenises to no token"),
    ({"continuation": "new", "max_new_tokens": 2}, salience.ParameterError, "either a continuation"),
    ({"max_new_tokens": 3, "target": 7}, salience.TargetError, "out of range"),
    ({"max_new_tokens": 3, "target": "paris"}, salience.TargetError, "index of a continuation token"),
    ({"max_new_tokens": 3, "method": "sig", "baseline": "delete"}, salience.ParameterError,
     "perturbation methods only; use zero, eos, unk"),
])
def test_bad_input_raises_one_line_errors(lm, options, error, match):
    with pytest.raises(error, match=match) as raised:
        salience.explain(lm, PROMPT, **{"method": "occlusion", **options})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_empty_prompt(lm, prompt):
    with pytest.raises(salience.InputError, match="the prompt is empty"):
        salience.explain(lm, prompt, method="occlusion")


def test_prompt_plus_new_tokens_over_the_context(lm):
    prompt = " ".join(["the big old city"] * 7)  # 28 words + BOS; context 32
    with pytest.raises(salience.InputError, match="29 tokens.*plus 4 new tokens.*context length of 32.*truncate"):
        salience.explain(lm, prompt, method="occlusion", max_new_tokens=4)
    with pytest.warns(salience.SalienceWarning, match="truncated"):
        e = salience.explain(lm, prompt, method="occlusion", max_new_tokens=4, truncate=True)
    assert e.truncated and e.tokens[0] == "<s>" and e.extras["prompt_length"] == 28


def test_a_list_of_prompts_gives_a_list(lm):
    results = salience.explain(lm, [PROMPT, "paris is old"], method="occlusion", max_new_tokens=2)
    assert isinstance(results, list) and [r.input for r in results] == [PROMPT, "paris is old"]


# --------------------------------------------------------------- outputs
def test_json_round_trip_and_renderers_cope_with_no_prediction(lm):
    e = salience.explain(lm, "the <b>city</b> is old", method="occlusion", continuation=CONTINUATION)
    back = salience.Explanation.from_json(e.to_json())
    assert back.prediction is None and back.targets == e.targets and back.extras == e.extras and back.kind == "generation"
    np.testing.assert_array_equal(back.scores, e.scores)  # NaN where unavailable, in the same places
    html = e.to_html()
    assert html.count("<tr>") == len(e.targets) + 1 and "&lt;b&gt;city&lt;/b&gt;" in html and "<b>city" not in html
    wide, narrow = Console(width=200, file=io.StringIO(), record=True), Console(width=44, file=io.StringIO(), record=True)
    wide.print(e)
    narrow.print(e)
    assert "not shown" not in wide.export_text()
    text = narrow.export_text()
    assert "feature columns not shown" in text and max(len(line) for line in text.splitlines()) <= 44


# ----------------------------------------------------------------- loading
def test_local_causal_lm_directory_loads_as_causal_lm(lm, hf, tokenizer, tmp_path):
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = salience.load_model(str(tmp_path))
    assert isinstance(loaded, salience.CausalLM)
    assert loaded.encode(PROMPT, max_new_tokens=4).input_ids.tolist() == lm.encode(PROMPT, max_new_tokens=4).input_ids.tolist()


def test_local_gpt2_directory_loads_as_causal_lm(tokenizer, tmp_path):
    """GPT-2's class is GPT2LMHeadModel, not *ForCausalLM: transformers' causal-LM mapping decides."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=2, n_head=4, n_positions=64, n_inner=32,
                        bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = salience.load_model(str(tmp_path))
    assert isinstance(loaded, salience.CausalLM) and type(loaded.model).__name__ == "GPT2LMHeadModel"
    e = salience.explain(loaded, PROMPT, method="saliency", max_new_tokens=2)
    assert len(e.targets) == 2


def test_smollm2_continues_with_paris_and_occlusion_runs():
    lm = salience.load_model("zoo:smollm2-135m")
    assert isinstance(lm, salience.CausalLM) and lm.baselines == ("zero", "delete", "eos", "unk")
    e = salience.explain(lm, "The capital of France is", method="occlusion", max_new_tokens=2)
    assert e.extras["continuation"].startswith(" Paris") and e.targets[0].label == " Paris"
    assert e.scores.shape == (2, 7) and np.isnan(e.scores[0, 5:]).all() and np.isfinite(e.scores[0, :5]).all()
    assert e.cost.forward_passes == 2 + 7 + 1  # two decoding steps, then features + 1 rows


def test_shapley_sampling_walks_each_order_on_each_targets_prefix(lm):
    """Shapley value sampling on a generation: the same seeded orders walked by hand per target
    (zero baseline); a later token is a null player (0 along every order), shown as absent."""
    from salience.methods.shapley_sampling import feature_orders

    e = salience.explain(lm, PROMPT, method="shapley_sampling", continuation=CONTINUATION, n_permutations=6, seed=3)
    case = Case.build(lm)
    n = len(case.features)
    orders, exact = feature_orders(n, 6, np.random.default_rng(3), antithetic=False)
    assert not exact and e.params["exact"] is False
    expected = np.zeros((len(case.positions), n))
    for t in range(len(case.positions)):
        for order in orders:
            keep = np.zeros(n, bool)
            before = case.perturbed(t, case.removed_positions(keep), "zero")
            for feature in order:
                keep[feature] = True
                after = case.perturbed(t, case.removed_positions(keep), "zero")
                expected[t, feature] += (after - before) / len(orders)
                before = after
    expected[~case.available()] = np.nan
    np.testing.assert_allclose(e.scores, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(e.delta, 0, atol=1e-12)
