"""Local gradient methods in the adapter's attribution space (word embeddings for token models,
normalised pixels for images): gradient, input x gradient, SmoothGrad (and its squared and
VarGrad variants), GradientSHAP. Position scores sum the per-channel scores over channels
(embedding dimensions or colour channels); feature scores sum their positions' scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, as_array, position_attribution
from salience.methods.sharing import SharedInputs

SMOOTHGRAD_VARIANTS = ("smoothgrad", "squared", "vargrad")
# rows (images x n_samples) per shared SmoothGrad call: a paired call reads every row's target on
# each chunk, (chunk, rows, classes) values for the log-odds, so the rows of one call are bounded
SHARED_ROWS = 256


def standard_normal(generator: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) draws of ``shape`` from the CPU ``generator`` (the seed is the source of truth: a seed
    gives the same noise on every device), drawn in ``like``'s floating dtype, at least float32
    (float64 inputs keep float64 draws; float32 draws cost about a fifth of float64 ones and halve
    the copy), then cast and copied to ``like``'s dtype and device."""
    return torch.randn(shape, generator=generator, dtype=torch.promote_types(like.dtype, torch.float32)).to(like)


def gradient_at_input(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input x (P, C), every target's output F_t(x) (T,) and dF_t/dx (T, P, C): from the context
    when the prediction pass computed them, else by one forward + backward row per target."""
    x, _ = ctx.model.input_and_baseline(ctx.encoded, "zero")
    if ctx.input_gradient is not None:
        values, gradients = ctx.input_gradient
        return x, values, gradients
    values, grads = ctx.model.score_inputs(ctx.encoded, x[None], ctx.targets, grad=True, batch_size=ctx.batch_size)
    assert grads is not None
    return x, values[0], grads[0]


@register("saliency", aliases=("gradient", "grad"), kind="gradient", cost="1 forward + 1 backward per target",
          summary="Gradient of the output w.r.t. each input position (L1 norm over channels by default)")
@dataclass
class Saliency:
    """Position score = sum over channels of |dF/dx| (``abs=True``, unsigned, as Captum's Saliency)
    or of dF/dx (``abs=False``). Units: output per unit of input. No baseline."""

    abs: bool = True
    uses_input_gradient: ClassVar[bool] = True

    def attribute(self, ctx: Context) -> Attribution:
        _, values, gradients = gradient_at_input(ctx)
        per_channel = gradients.abs() if self.abs else gradients
        return position_attribution(per_channel.sum(-1), ctx, output_value=as_array(values))


@register("input_x_gradient", aliases=("ixg", "inputxgradient", "gradient_x_input"), kind="gradient",
          cost="1 forward + 1 backward per target", summary="Input times gradient, summed over channels (signed)")
@dataclass
class InputXGradient:
    """Position score = sum_c x_c * dF/dx_c (signed; a first-order estimate of the output change when
    the input is set to zero: a zero embedding, or for images the normalised value 0, the dataset mean)."""

    uses_input_gradient: ClassVar[bool] = True

    def attribute(self, ctx: Context) -> Attribution:
        x, values, gradients = gradient_at_input(ctx)
        return position_attribution((x[None] * gradients).sum(-1), ctx, output_value=as_array(values))


@register("smoothgrad", aliases=("smooth_grad", "sg"), kind="gradient", cost="n_samples forward + backward per target",
          summary="Gradient averaged over Gaussian-noised copies of the input (squared / VarGrad variants)")
@dataclass
class SmoothGrad(SharedInputs):
    """Over ``n_samples`` noisy inputs (noise std = ``noise_level`` x (max - min) of the input's
    values, as in the SmoothGrad paper) of the per-channel gradient g (|g| when ``abs``, as Captum's
    NoiseTunnel over Saliency): ``variant="smoothgrad"`` takes the mean of g, ``"squared"`` the mean
    of g^2 (SmoothGrad-Squared), ``"vargrad"`` the variance of g (mean g^2 - (mean g)^2, VarGrad);
    then summed over channels. Unsigned unless ``abs=False`` with the plain variant. Several images
    of one grid (one target each) run their noisy rows in shared model calls, each image's noise
    drawn from its own seed (the same as alone). The noise is drawn on the CPU from the seed in the
    input's dtype (float64 for float64 models, float32 for float32 and half ones: see
    :func:`standard_normal`), so a seed gives the same noise on every device."""

    n_samples: int = 20
    noise_level: float = 0.1
    abs: bool = True
    variant: str = "smoothgrad"

    def attribute(self, ctx: Context) -> Attribution:
        self._check()
        _, grads = ctx.model.score_inputs(ctx.encoded, self._noisy(ctx), ctx.targets, grad=True, batch_size=ctx.batch_size)
        assert grads is not None
        return self._combine(ctx, grads)

    def attribute_together(self, contexts: list[Context]) -> list[Attribution]:
        """The noisy rows of up to :data:`SHARED_ROWS` rows' worth of images per ``score_inputs`` call,
        each row read for its own image's target (paired)."""
        self._check()
        per_call = max(1, SHARED_ROWS // max(self.n_samples, 1))
        results: list[Attribution] = []
        for start in range(0, len(contexts), per_call):
            part = contexts[start:start + per_call]
            if len(part) == 1:
                results.append(self.attribute(part[0]))
                continue
            first, n = part[0], self.n_samples
            targets = [ctx.targets[0] for ctx in part for _ in range(n)]
            _, grads = first.model.score_inputs(first.encoded, torch.cat([self._noisy(ctx) for ctx in part]), targets,
                                                grad=True, batch_size=first.batch_size, paired=True)
            assert grads is not None  # (len(part) n, P, C)
            results += [self._combine(ctx, grads[j * n:(j + 1) * n, None]) for j, ctx in enumerate(part)]
        return results

    def _check(self) -> None:
        if self.variant not in SMOOTHGRAD_VARIANTS:
            raise ParameterError(f"unknown SmoothGrad variant {self.variant!r}; choose one of {', '.join(SMOOTHGRAD_VARIANTS)}")

    def _noisy(self, ctx: Context) -> torch.Tensor:
        """The ``n_samples`` noisy copies (N, P, C) of the context's input, from its seed."""
        x, _ = ctx.model.input_and_baseline(ctx.encoded, "zero")
        std = self.noise_level * float(x.max() - x.min())
        return x[None] + std * standard_normal(ctx.generator(), (self.n_samples, *x.shape), x)

    def _combine(self, ctx: Context, grads: torch.Tensor) -> Attribution:
        """Position scores from the gradients (N, T, P, C) of the noisy rows."""
        g = grads.abs() if self.abs else grads
        if self.variant == "smoothgrad":
            per_channel = g.mean(0)
        elif self.variant == "squared":
            per_channel = (g * g).mean(0)
        else:
            per_channel = (g * g).mean(0) - g.mean(0) ** 2
        return position_attribution(per_channel.sum(-1), ctx)


@register("gradient_shap", aliases=("gradshap", "gshap", "expected_gradients"), kind="gradient",
          cost="n_samples forward + backward per target", summary="Expected gradients: IG points at random alphas and noisy baselines")
@dataclass
class GradientShap:
    """Monte-Carlo estimate of expected gradients: mean over samples of
    dF/dx(b + a (x - b)) * (x - b), a ~ U(0, 1), b = the named ``baseline`` plus Gaussian noise of
    std ``stdev`` (positions marked special keep their value); summed over channels.
    ``delta`` = sum of scores - (F(x) - mean F(b)). ``baseline=None``: [MASK] for text, the
    adapter's default otherwise. Draws from the seed's CPU generator: alphas (float64), then the
    noise in the input's dtype (:func:`standard_normal`; not drawn when ``stdev`` is 0)."""

    n_samples: int = 20
    baseline: str | None = None
    stdev: float = 0.0

    def attribute(self, ctx: Context) -> Attribution:
        baseline = ctx.baseline(self.baseline, "mask", perturbation=False)
        x, x0 = ctx.model.input_and_baseline(ctx.encoded, baseline)
        generator = ctx.generator()
        alphas = torch.rand(self.n_samples, generator=generator, dtype=torch.float64).to(x)[:, None, None]
        movable = (~ctx.encoded.special).to(x.device)[None, :, None]  # type: ignore[attr-defined]
        if self.stdev:
            baselines = x0[None] + self.stdev * standard_normal(generator, (self.n_samples, *x.shape), x) * movable
        else:  # no noise: the last draw is skipped (x0 + 0 * noise is x0)
            baselines = x0[None].expand(self.n_samples, *x0.shape)
        points = baselines + alphas * (x[None] - baselines)
        _, grads = ctx.model.score_inputs(ctx.encoded, points, ctx.targets, grad=True, batch_size=ctx.batch_size)
        ends, _ = ctx.model.score_inputs(ctx.encoded, torch.cat([x[None], baselines]), ctx.targets, grad=False,
                                         batch_size=ctx.batch_size)
        assert grads is not None  # (N, T, P, C)
        position_scores = (grads * (x[None] - baselines)[:, None].to(grads)).mean(0).sum(-1)  # (T, P)
        output, reference = ends[0].double(), ends[1:].double().mean(0)
        delta = position_scores.double().sum(-1).cpu() - (output - reference).cpu()
        return position_attribution(position_scores, ctx, output_value=as_array(output), baseline_value=as_array(reference),
                                    delta=as_array(delta), details={"baseline": baseline})
