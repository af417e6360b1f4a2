"""GradientSHAP with noise on: Salience against an estimator written here from its definition,
with the same random draws, on the float64 toy BERT run directly through ``inputs_embeds``.

Definition (Salience's docstring): score_t = mean_i sum_d g_i * (x - b_i), with b_i = the [MASK]
baseline embedding + stdev * noise_i (non-special tokens; [CLS]/[SEP] keep their embedding and
get no noise), g_i = dF/de at b_i + alpha_i (x - b_i); delta = sum of scores - (F(x) - mean_i F(b_i)).
Draws: one CPU generator seeded with ``seed``, first alpha ~ U(0, 1) (n,), then noise ~ N(0, 1)
(n, T, D), both float64.

Captum's GradientShap (and shap's GradientExplainer) add the noise to the INPUT instead:
points b + alpha (x + noise - b), multiplier (x + noise - b). That is a different estimator, so
Captum is not the oracle here.

Noise dtype (SmoothGrad and GradientSHAP): drawn on the seed's CPU generator in the input's dtype,
at least float32. Float64 models keep the float64 draws they always had: the implementation that
drew float64 noise for every model is kept below as the oracle, equal to 0 (same draws, same
operations). Float32 models get float32 draws (another stream of the same distribution), checked
draw for draw against ``torch.randn(float32)`` of the seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_PAIR, TOY_TEXT
from salience.methods.base import Context
from salience.methods.gradient import SmoothGrad, standard_normal
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import LABELS, build_tiny_cnn, photo, tiny_classifier
from toy import explain_probability


def _probability(model, target: int, types: torch.Tensor | None):
    def forward(embeds: torch.Tensor) -> torch.Tensor:
        kwargs = {} if types is None else {"token_type_ids": types.expand(embeds.shape[0], -1)}
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **kwargs).logits
        return torch.softmax(logits, dim=-1)[:, target]

    return forward


def _expected_gradients(toy, inputs, target: int, *, n: int, stdev: float, seed: int):
    """Token scores (T,), F(x) and mean F(b) by the definition above."""
    encoded = toy.encode(inputs)
    model = toy.model
    table = model.bert.embeddings.word_embeddings.weight.detach()
    x = table[encoded.input_ids]  # (T, D)
    movable = ~encoded.special
    x0 = torch.where(movable[:, None], table[toy.tokenizer.mask_token_id], x)
    generator = torch.Generator().manual_seed(seed)
    alphas = torch.rand(n, generator=generator, dtype=torch.float64)
    noise = torch.randn((n, *x.shape), generator=generator, dtype=torch.float64)
    forward = _probability(model, target, encoded.token_type_ids)
    scores = torch.zeros(x.shape[0], dtype=torch.float64)
    baseline_values = []
    for alpha, eps in zip(alphas, noise):  # one sample at a time: no batching shared with Salience
        b = x0 + stdev * eps * movable[:, None]
        point = (b + alpha * (x - b))[None].requires_grad_(True)
        (gradient,) = torch.autograd.grad(forward(point).sum(), point)
        scores += (gradient[0] * (x - b)).sum(-1) / n
        with torch.no_grad():
            baseline_values.append(float(forward(b[None])[0]))
    with torch.no_grad():
        output = float(forward(x[None])[0])
    return scores.numpy(), output, float(np.mean(baseline_values))


@pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR], ids=["text", "pair"])
@pytest.mark.parametrize("target", [0, 1])
def test_gradient_shap_with_noise_matches_its_definition(toy, inputs, target):
    n, stdev, seed = 12, 0.1, 5  # stdev 0.1: the toy's embedding values have std 0.07 (range -0.2..0.22)
    e = explain_probability(toy, inputs, "gradient_shap", target=target, level="token", n_samples=n, stdev=stdev,
                         baseline="mask", seed=seed)
    expected, output, baseline_value = _expected_gradients(toy, inputs, target, n=n, stdev=stdev, seed=seed)
    scale = np.abs(expected).max()
    # same draws, same float64 graph: only the order of summation differs (round-off, ~1e-15 of the
    # scale). A wrong estimator (noise on the input, multiplier x - mask, no noise) is off by > 1 %.
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=1e-10 * scale)
    # F(x) and mean F(b): probabilities from the same float64 forward passes, round-off only
    assert e.output_value == pytest.approx(output, abs=1e-12)
    assert e.baseline_value == pytest.approx(baseline_value, abs=1e-12)
    assert e.delta == pytest.approx(expected.sum() - (output - baseline_value), abs=1e-10 * scale)
    # the noise matters here: without it the estimate moves by more than the tolerance by far
    quiet, _, _ = _expected_gradients(toy, inputs, target, n=n, stdev=0.0, seed=seed)
    assert np.abs(quiet - expected).max() > 1e-3 * scale


def test_gradient_shap_without_noise_matches_its_definition(toy):
    """stdev 0 draws no noise (it would be multiplied by 0): the same numbers as the definition with
    the draw (round-off of the summation order only, as above)."""
    n, seed = 8, 2
    e = explain_probability(toy, TOY_TEXT, "gradient_shap", target=1, level="token", n_samples=n, stdev=0.0,
                            baseline="mask", seed=seed)
    expected, output, baseline_value = _expected_gradients(toy, TOY_TEXT, 1, n=n, stdev=0.0, seed=seed)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=1e-10 * scale)
    assert e.baseline_value == pytest.approx(baseline_value, abs=1e-12)


# ------------------------------------------------------------------ noise dtype and device
def _float64_noisy(self: SmoothGrad, ctx: Context) -> torch.Tensor:
    """Oracle: SmoothGrad._noisy as it was before the noise followed the input's dtype (float64
    draws for every model, cast to the input)."""
    x, _ = ctx.model.input_and_baseline(ctx.encoded, "zero")
    std = self.noise_level * float(x.max() - x.min())
    noise = torch.randn((self.n_samples, *x.shape), generator=ctx.generator(), dtype=torch.float64).to(x)
    return x[None] + std * noise


def _float32_classifier() -> ImageClassifier:
    return ImageClassifier(build_tiny_cnn(0).float(), ImagePreprocess(crop=16), LABELS, name="tiny-cnn-32")  # type: ignore[arg-type]


@pytest.mark.parametrize(("dtype", "drawn"), [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_standard_normal_draws_in_the_inputs_dtype(dtype, drawn):
    shape = (5, 40, 3)  # 600 draws: torch's vectorised path, where float32 and float64 streams differ
    noise = standard_normal(torch.Generator().manual_seed(3), shape, torch.zeros(1, dtype=dtype))
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=drawn).to(dtype)
    assert noise.dtype == dtype and noise.device.type == "cpu"
    assert torch.equal(noise, expected)  # the seed's CPU draws, exactly
    # N(0, 1): mean within 6 standard errors of 0, and the second moment near 1 (a loose check)
    assert abs(noise.double().mean().item()) < 6 / np.sqrt(noise.numel())
    assert 0.8 < noise.double().pow(2).mean().item() < 1.2


@pytest.mark.parametrize("variant", ["smoothgrad", "vargrad"])
def test_smoothgrad_float64_model_keeps_its_float64_noise(monkeypatch, variant):
    model, image = tiny_classifier(), photo()
    new = salience.explain(model, image, method="smoothgrad", target="all", n_samples=7, seed=4, variant=variant,
                           level="pixel")
    monkeypatch.setattr(SmoothGrad, "_noisy", _float64_noisy)
    old = salience.explain(model, image, method="smoothgrad", target="all", n_samples=7, seed=4, variant=variant,
                           level="pixel")
    np.testing.assert_array_equal(new.token_scores, old.token_scores)  # same draws, same operations
    # not a comparison of zeros, and the noise shows in the map: another seed moves it
    assert np.abs(old.token_scores).max() > (1e-4 if variant == "smoothgrad" else 1e-8)  # VarGrad: 3e-7 here
    other = salience.explain(model, image, method="smoothgrad", target="all", n_samples=7, seed=5, variant=variant,
                             level="pixel")
    assert np.abs(other.token_scores - old.token_scores).max() > 1e-3 * np.abs(old.token_scores).max()


def test_smoothgrad_float32_noise_is_the_seeds_float32_draws():
    model, image = _float32_classifier(), photo()
    assert model.dtype == torch.float32
    method, seed = SmoothGrad(n_samples=9, noise_level=0.2), 11
    # _noisy reads the adapter, the encoded image and the seed only
    ctx = Context(model=model, encoded=model.encode(image), targets=[], features=None,  # type: ignore[arg-type]
                  available=np.zeros((0, 0), dtype=bool), seed=seed)
    x, _ = model.input_and_baseline(ctx.encoded, "zero")
    noisy = method._noisy(ctx)
    std = 0.2 * float(x.max() - x.min())
    expected = x[None] + std * torch.randn((9, *x.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    assert noisy.dtype == torch.float32
    torch.testing.assert_close(noisy, expected, rtol=0, atol=0)
    # and the map of such a model is made of these rows: the same seed, the same map
    first = salience.explain(model, image, method="smoothgrad", n_samples=9, noise_level=0.2, seed=seed)
    again = salience.explain(model, image, method="smoothgrad", n_samples=9, noise_level=0.2, seed=seed)
    np.testing.assert_array_equal(first.token_scores, again.token_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap"])
def test_same_noise_on_cuda(method):
    """The seed's CPU draws are copied to the GPU: the float64 model on cuda gives the CPU's map up to
    float64 rounding of cuDNN's convolutions (1e-9 relative)."""
    params = {"n_samples": 6, "seed": 5, **({"stdev": 0.3} if method == "gradient_shap" else {})}
    cpu = salience.explain(tiny_classifier(), photo(), method=method, target="all", level="pixel", **params)
    gpu_model = tiny_classifier()
    gpu_model.model.to("cuda")
    gpu = salience.explain(gpu_model, photo(), method=method, target="all", level="pixel", **params)
    scale = np.abs(cpu.token_scores).max()
    np.testing.assert_allclose(gpu.token_scores, cpu.token_scores, rtol=1e-9, atol=1e-12 * scale)
