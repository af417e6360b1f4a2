"""NeuroMask (Alzantot, Widdicombe, Julier and Srivastava, 2019; code: nesl/neuromask): a soft mask
at input resolution learnt by gradient descent so that the masked image keeps the class while as
little of it as possible, smoothly, is kept.

The mask m = sigmoid(w / T) is shared over colour channels; the masked input is b + m (x - b) with b
the "black" baseline, which is the authors' x * m for x in [0, 1]. w starts uniform in
(-weight_limit, weight_limit) and minimises

    lambda_pred * CE(f(b + m (x - b)), class) + lambda_sparse * mean |w + weight_limit|
        + lambda_smooth * mean((K * w)^2)

(CE = -log p of the explained class, K a Laplacian filter convolved "VALID"). The optimiser is
TensorFlow 1's ``RMSPropOptimizer`` as the authors ran it (see :func:`rmsprop_step`). Several masks
(targets, and images when ``explain`` gets a list) are optimised at once: one model call per
iteration scores them all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from salience.core.registry import register
from salience.core.target import Target
from salience.errors import ModelOutputError, ParameterError
from salience.methods.base import Attribution, Context, as_array, position_attribution


@dataclass(frozen=True)
class Preset:
    """The loss coefficients, temperature and iteration count the authors used for one dataset."""

    lambda_pred: float
    lambda_sparse: float
    lambda_smooth: float
    temperature: float
    iterations: int


# nesl/neuromask: NeuroMaskDemo_ImageNet.ipynb (InceptionV3, 299 px) and neuromask_cifar10_demo.py
PRESETS = {"imagenet": Preset(0.4, 0.35, 0.03, 0.3, 2000), "cifar": Preset(0.4, 0.35, 0.15, 1.0, 2000)}
RMS_DECAY, RMS_EPSILON, RMS_INIT = 0.9, 1e-10, 1.0  # tf.compat.v1.train.RMSPropOptimizer's defaults
SMALL_IMAGE = 64  # pixels on the short side below which the 3 x 3 Laplacian (CIFAR's) is used


def laplacian(size: int) -> torch.Tensor:
    """(size, size) float64 filter: -1 everywhere, size^2 - 1 in the centre (3: CIFAR, 5: ImageNet)."""
    kernel = -torch.ones(size, size, dtype=torch.float64)
    kernel[size // 2, size // 2] = size * size - 1
    return kernel


def regularisers(w: torch.Tensor, weight_limit: float, kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask (K,): sparsity mean|w + weight_limit| and smoothness mean((kernel * w)^2) over the
    "VALID" positions, for mask weights ``w`` (K, H, W)."""
    sparse = (w + weight_limit).abs().mean(dim=(1, 2))
    smooth = F.conv2d(w[:, None], kernel[None, None].to(w)).pow(2).mean(dim=(1, 2, 3))
    return sparse, smooth


def rmsprop_step(w: torch.Tensor, gradient: torch.Tensor, mean_square: torch.Tensor, learning_rate: float) -> None:
    """One in-place step of TF1's RMSProp (no momentum): ms <- 0.9 ms + 0.1 g^2, w <- w - lr g /
    sqrt(ms + 1e-10), with ms starting at 1 (not 0 as torch.optim.RMSprop, whose eps is also outside
    the square root): early steps are small, about lr x g, until ms forgets its start (0.9^k)."""
    mean_square.mul_(RMS_DECAY).add_((1 - RMS_DECAY) * gradient * gradient)
    w.sub_(learning_rate * gradient / torch.sqrt(mean_square + RMS_EPSILON))


@dataclass
class _Masks:
    """K masks of one grid optimised together: inputs x and baselines b (K, P, C), the explained
    targets (read as log-probabilities), weights w (K, H, W) and the optimiser's state."""

    model: object
    encoded: object
    batch_size: int | None
    x: torch.Tensor
    b: torch.Tensor
    targets: list[Target]
    w: torch.Tensor
    mean_square: torch.Tensor
    curves: list[list[float]]
    used: list[int]


@register("neuromask", aliases=("neuro_mask",), kind="optimisation",
          cost="iterations forward + backward per target, + 1 or 2 forward; images of one call batched together",
          summary="A smooth, sparse mask at input resolution learnt so that the masked image keeps the class")
@dataclass
class NeuroMask:
    """NeuroMask: position score = the learnt mask m in [0, 1] per pixel (1 = kept: needed for the
    class; unitless, one value shared by the colour channels); a feature sums its pixels' values.

    ``preset`` "imagenet" (default: lambda_pred 0.4, lambda_sparse 0.35, lambda_smooth 0.03,
    temperature 0.3, 2,000 iterations) or "cifar" (0.4, 0.35, 0.15, temperature 1, 2,000); a
    parameter given explicitly overrides its preset value. ``laplacian``: 3 or 5 (default: 3 for
    images under 64 pixels on a side, 5 otherwise, as the authors' CIFAR and ImageNet settings).
    The prediction term is the cross-entropy of the target class (the predicted one by default),
    whatever ``output`` is asked; ``output_value`` is that output for the masked image.
    ``patience``: stop a mask once its loss has not gone below its best for that many iterations
    (off by default). ``baseline``: what a removed pixel becomes (default "black", the paper's).
    ``images_per_batch``: images of one ``explain`` call optimised together (rows per model call:
    images x targets). Records the iterations used and the final loss terms; ``extras["loss_curve"]``
    holds the total loss before each update, per target. A NaN loss stops with an error."""

    preset: str = "imagenet"
    lambda_pred: float | None = None
    lambda_sparse: float | None = None
    lambda_smooth: float | None = None
    temperature: float | None = None
    iterations: int | None = None
    learning_rate: float = 0.03
    weight_limit: float = 10.0
    laplacian: int | None = None
    patience: int | None = None
    baseline: str | None = None
    images_per_batch: int = 8
    needs: ClassVar[tuple[str, ...]] = ("pixel_grid",)
    default_output: ClassVar[str] = "log_probability"

    @property
    def group_size(self) -> int:
        """Inputs ``explain`` hands to :meth:`attribute_many` at once."""
        return self.images_per_batch

    def settings(self) -> Preset:
        """The preset with the parameters given explicitly put in, checked."""
        if self.preset not in PRESETS:
            raise ParameterError(f"unknown neuromask preset {self.preset!r}; choose {', '.join(PRESETS)}")
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(Preset) if getattr(self, f.name) is not None}
        chosen = dataclasses.replace(PRESETS[self.preset], **given)
        for name in ("lambda_pred", "lambda_sparse", "lambda_smooth"):
            _check_number(getattr(chosen, name), name, low=0.0)
        _check_number(chosen.temperature, "temperature")
        _check_number(self.learning_rate, "learning_rate")
        _check_number(self.weight_limit, "weight_limit")
        _check_count(chosen.iterations, "iterations")
        _check_count(self.images_per_batch, "images_per_batch")
        if self.patience is not None:
            _check_count(self.patience, "patience")
        if self.laplacian not in (None, 3, 5):
            raise ParameterError(f"neuromask's laplacian is 3 or 5 (filter side), got {self.laplacian!r}")
        return chosen

    def attribute(self, ctx: Context) -> Attribution:
        return self.attribute_many([ctx])[0]

    def attribute_many(self, contexts: list[Context]) -> list[Attribution]:
        """One attribution per context; the masks of every context and target of one grid are
        optimised together (one model call per iteration scores them all)."""
        settings = self.settings()
        grids = [ctx.model.pixel_grid(ctx.encoded) for ctx in contexts]  # type: ignore[attr-defined]
        baselines = [ctx.baseline(self.baseline, "black", perturbation=True) for ctx in contexts]
        attributions: dict[int, Attribution] = {}
        for grid in dict.fromkeys(grids):
            members = [i for i, g in enumerate(grids) if g == grid]
            found = self._explain_grid([contexts[i] for i in members], [baselines[i] for i in members], grid, settings)
            attributions.update(zip(members, found))
        return [attributions[i] for i in range(len(contexts))]

    def _explain_grid(self, contexts: list[Context], baselines: list[str], grid: tuple[int, int],
                      settings: Preset) -> list[Attribution]:
        size = self.laplacian or (3 if min(grid) < SMALL_IMAGE else 5)
        if min(grid) < size:
            raise ParameterError(f"neuromask's {size}x{size} Laplacian needs images of at least {size} pixels a side, "
                                 f"got {grid[0]}x{grid[1]}")
        masks = self._start(contexts, baselines, grid)
        self._optimise(masks, settings, laplacian(size))
        final, terms = self._evaluate(masks, settings, laplacian(size))
        values = self._outputs(masks, final, terms, contexts[0].targets[0].output)
        attributions, start = [], 0
        for ctx, baseline in zip(contexts, baselines):
            piece = slice(start, start + len(ctx.targets))
            start = piece.stop
            details = {**dataclasses.asdict(settings), "baseline": baseline, "laplacian": size,
                       "iterations_used": masks.used[piece], "loss": "cross-entropy of the target class",
                       "final_loss": {name: term[piece].tolist() for name, term in terms.items()}}
            attributions.append(position_attribution(final[piece].reshape(len(ctx.targets), -1), ctx,
                                                     output_value=as_array(values[piece]), details=details,
                                                     extras={"loss_curve": masks.curves[piece]}))
        return attributions

    # ------------------------------------------------------------------ internals
    def _start(self, contexts: list[Context], baselines: list[str], grid: tuple[int, int]) -> _Masks:
        """Inputs, baselines, log-probability targets and initial weights, context by context (each
        context's weights from its own seed, so batched equals one at a time)."""
        xs, bs, targets, weights = [], [], [], []
        for ctx, baseline in zip(contexts, baselines):
            x, b = ctx.model.input_and_baseline(ctx.encoded, baseline)
            generator = ctx.generator()
            for target in ctx.targets:
                xs.append(x)
                bs.append(b)
                targets.append(dataclasses.replace(target, output="log_probability"))
                weights.append((2 * torch.rand(grid, generator=generator, dtype=torch.float64) - 1) * self.weight_limit)
        w = torch.stack(weights)
        return _Masks(contexts[0].model, contexts[0].encoded, contexts[0].batch_size, torch.stack(xs), torch.stack(bs),
                      targets, w, torch.full_like(w, RMS_INIT), [[] for _ in targets], [0] * len(targets))

    def _optimise(self, masks: _Masks, settings: Preset, kernel: torch.Tensor) -> None:
        """The iterations: each scores every active mask, records its loss and takes one step;
        with ``patience``, a mask whose loss has not gone below its best for that long stops."""
        active = list(range(len(masks.targets)))
        best = [math.inf] * len(active)
        since = [0] * len(active)
        for iteration in range(1, settings.iterations + 1):
            w = masks.w[active].clone().requires_grad_(True)
            terms, gradient = self._loss(masks, active, w, settings, kernel, iteration)
            for j, k in enumerate(active):
                loss = float(terms["total"][j])
                masks.curves[k].append(loss)
                masks.used[k] = iteration
                best[k], since[k] = (loss, 0) if loss < best[k] else (best[k], since[k] + 1)
            w_now, mean_square = masks.w[active], masks.mean_square[active]
            rmsprop_step(w_now, gradient, mean_square, self.learning_rate)
            masks.w[active], masks.mean_square[active] = w_now, mean_square
            if self.patience is not None:
                active = [k for k in active if since[k] < self.patience]
                if not active:
                    return

    def _evaluate(self, masks: _Masks, settings: Preset, kernel: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The final masks (K, H, W) and their loss terms (K,) each: one forward pass."""
        terms, _ = self._loss(masks, list(range(len(masks.targets))), masks.w.clone(), settings, kernel, None)
        return torch.sigmoid(masks.w / settings.temperature), terms

    def _loss(self, masks: _Masks, active: list[int], w: torch.Tensor, settings: Preset, kernel: torch.Tensor,
              iteration: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss terms (A,) of the ``active`` masks at weights ``w`` (A, H, W) and, at an
        ``iteration`` (None: the final evaluation, no gradient), d total / d w (A, H, W): the
        model's gradient w.r.t. the rows chained through the mask, plus the regularisers', by autograd."""
        grad = iteration is not None
        x, b = masks.x[active], masks.b[active]
        with torch.enable_grad() if grad else torch.no_grad():
            m = torch.sigmoid(w / settings.temperature).reshape(len(active), -1)  # (A, P)
            rows = b + m.detach()[:, :, None].to(x) * (x - b)
            try:
                log_p, d_rows = masks.model.score_inputs(  # type: ignore[attr-defined]
                    masks.encoded, rows, [masks.targets[k] for k in active], grad=grad, batch_size=masks.batch_size, paired=True)
            except ModelOutputError as error:
                raise ModelOutputError(f"neuromask diverged at {_when(iteration)}: {error}") from error
            sparse, smooth = regularisers(w, self.weight_limit, kernel)
            regular = settings.lambda_sparse * sparse + settings.lambda_smooth * smooth
            pred = -log_p.double().cpu()
            total = settings.lambda_pred * pred + regular.detach()
            if not torch.isfinite(total).all():
                raise ModelOutputError(f"neuromask diverged at {_when(iteration)}: the loss is NaN or infinite; "
                                       "lower learning_rate or check the model")
            terms = {"prediction": pred, "sparsity": sparse.detach(), "smoothness": smooth.detach(), "total": total}
            if d_rows is None:
                return terms, torch.empty(0)
            d_mask = -(d_rows * (x - b)).sum(-1).double().cpu()  # d CE / d m, (A, P)
            (gradient,) = torch.autograd.grad(settings.lambda_pred * (m * d_mask).sum() + regular.sum(), w)
        if not torch.isfinite(gradient).all():
            raise ModelOutputError(f"neuromask diverged at {_when(iteration)}: the gradient is NaN or infinite")
        return terms, gradient

    def _outputs(self, masks: _Masks, final: torch.Tensor, terms: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        """Each target's ``output`` on its masked image (K,): minus the final prediction term for
        "log_probability", else one more forward pass."""
        if output == "log_probability":
            return -terms["prediction"]
        wanted = [dataclasses.replace(t, output=output) for t in masks.targets]
        rows = masks.b + final.reshape(final.shape[0], -1)[:, :, None].to(masks.x) * (masks.x - masks.b)
        values, _ = masks.model.score_inputs(masks.encoded, rows, wanted, grad=False,  # type: ignore[attr-defined]
                                             batch_size=masks.batch_size, paired=True)
        return values.double().cpu()


def _when(iteration: int | None) -> str:
    return f"iteration {iteration}" if iteration is not None else "the final mask"


def _check_number(value: object, name: str, *, low: float | None = None) -> None:
    """A finite number, > 0 (or >= ``low`` when given)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < low if low is not None else value <= 0):  # type: ignore[operator]
        bound = f">= {low:g}" if low is not None else "> 0"
        raise ParameterError(f"neuromask's {name} must be a finite number {bound}, got {value!r}")


def _check_count(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"neuromask's {name} must be a positive integer, got {value!r}")
