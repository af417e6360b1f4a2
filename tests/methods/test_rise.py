"""RISE: the masks are the authors' (skimage's bilinear resize, shift, crop), the saliency is
sum_n F(masked_n) M_n / (N p) on those masks, it converges to the exact expectation on a model where
that is known in closed form, and it is the same batched, unbatched and for the same seed.

Tolerances: mask construction and the formula are float64 computations of the same quantities in a
different order (1e-12). Monte-Carlo checks use Hoeffding's inequality: an average of N independent
terms in a range of width R is within R sqrt(ln(2 K / delta) / (2 N)) of its mean for all K pixels at
once with probability 1 - delta (delta = 1e-6): a bound, not a fitted number.

Where the masks are built: the grids are drawn on the CPU and the full-resolution masks built on the
input's device in its dtype (at least float32). The implementation before that change (float64
masks built on the CPU, cast for the rows) is kept below as the oracle: on float64 models the new
code computes the same numbers in the same order (1e-12); on float32 models the masks are built in
float32 (a few float32 ulps of 1 apart: 1e-6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.transform import resize
from torch import nn

import salience
from conftest import TOY_TEXT
from salience.core.batching import PIXELS, choose_batch_size, map_batches
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, position_attribution
from salience.methods.rise import Rise, RiseMasks, interpolation_matrix
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import LABELS, build_tiny_cnn, photo, tiny_classifier


def _hoeffding(width: float, n: int, count: int, delta: float = 1e-6) -> float:
    return width * math.sqrt(math.log(2 * count / delta) / (2 * n))


def _skimage_mask(cells: np.ndarray, shift: tuple[int, int], cell: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """eclique/RISE generate_masks for one mask: resize (order 1, reflect, no anti-aliasing), crop."""
    s = cells.shape[0]
    up = resize(cells, ((s + 1) * cell[0], (s + 1) * cell[1]), order=1, mode="reflect", anti_aliasing=False)
    return up[shift[0]:shift[0] + grid[0], shift[1]:shift[1] + grid[1]]


def _cpu_masks(masks: RiseMasks, chunk: slice) -> torch.Tensor:
    """Oracle: RiseMasks.masks as it was before the masks moved to the device (float64, CPU)."""
    height, width = masks.grid
    offsets = masks.shifts[chunk]
    rows = masks.rows_matrix[offsets[:, :1] + torch.arange(height)]  # (B, H, s)
    cols = masks.cols_matrix[offsets[:, 1:] + torch.arange(width)]  # (B, W, s)
    return rows @ masks.cells[chunk] @ cols.transpose(1, 2)


def _cpu_attribute(self: Rise, ctx: Context) -> Attribution:
    """Oracle: Rise.attribute as it was before the masks moved to the device (masks float64 on the
    CPU, cast to the rows' dtype; outputs brought to the CPU and accumulated there in float64)."""
    grid = ctx.model.pixel_grid(ctx.encoded)  # type: ignore[attr-defined]
    baseline = ctx.baseline(self.baseline, "mean", perturbation=True)
    x, x0 = ctx.model.input_and_baseline(ctx.encoded, baseline)
    masks = RiseMasks.draw(ctx.generator(), self.n_masks, grid, self.grid_size, self.p_keep)
    total = torch.zeros(len(ctx.targets), x.shape[0], dtype=torch.float64)
    size = choose_batch_size(x.shape[0], backward=False, batch_size=ctx.batch_size, budget=PIXELS)

    def run(chunk: slice) -> torch.Tensor:
        kept = _cpu_masks(masks, chunk).reshape(chunk.stop - chunk.start, -1)
        rows = x0[None] + kept[:, :, None].to(x) * (x - x0)[None]
        values, _ = ctx.model.score_inputs(ctx.encoded, rows, ctx.targets, grad=False, batch_size=size)
        total.add_(values.double().cpu().T @ kept)
        return values

    map_batches(run, self.n_masks, size)
    return position_attribution(total / (self.n_masks * self.p_keep), ctx)


def _float32_classifier() -> ImageClassifier:
    return ImageClassifier(build_tiny_cnn(0).float(), ImagePreprocess(crop=16), LABELS, name="tiny-cnn-32")  # type: ignore[arg-type]


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize(("cells", "out"), [(7, 256), (7, 24), (3, 8), (2, 9), (1, 4)])
def test_interpolation_matrix_is_skimage_resize(cells, out):
    grid = np.random.default_rng(cells).random((cells, cells))
    weights = interpolation_matrix(cells, out).numpy()
    expected = resize(grid, (out, out), order=1, mode="reflect", anti_aliasing=False)
    np.testing.assert_allclose(weights @ grid @ weights.T, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("grid", "cells"), [((16, 20), 7), ((12, 12), 3), ((9, 5), 4)])
def test_masks_are_the_authors_upsampled_shifted_crops(grid, cells):
    masks = RiseMasks.draw(torch.Generator().manual_seed(1), 40, grid, cells, 0.5)
    cell = (math.ceil(grid[0] / cells), math.ceil(grid[1] / cells))
    assert masks.cell == cell
    built = masks.masks(slice(0, 40)).numpy()
    assert built.shape == (40, *grid)
    for n in range(40):
        shift = tuple(int(v) for v in masks.shifts[n])
        np.testing.assert_allclose(built[n], _skimage_mask(masks.cells[n].numpy(), shift, cell, grid), rtol=0, atol=1e-12)
    # a chunk of masks is the same masks, whatever the chunk
    np.testing.assert_array_equal(masks.masks(slice(7, 19)).numpy(), built[7:19])


@pytest.mark.parametrize(("dtype", "built", "tolerance"), [
    (torch.float64, torch.float64, 0.0),  # the same float64 products in the same order
    (torch.float32, torch.float32, 1e-6),  # float32 weights and products: a few ulps of 1 (1.2e-7)
    (torch.float16, torch.float32, 1e-6),  # half models get float32 masks, not half ones
    (torch.bfloat16, torch.float32, 1e-6),
])
def test_masks_are_built_in_the_inputs_dtype(dtype, built, tolerance):
    drawn = RiseMasks.draw(torch.Generator().manual_seed(4), 30, (16, 20), 7, 0.5)
    moved = drawn.to(torch.zeros(2, dtype=dtype))
    assert moved.cells.dtype == moved.rows_matrix.dtype == moved.cols_matrix.dtype == built
    assert moved.shifts.dtype == torch.long and torch.equal(moved.shifts, drawn.shifts)
    assert torch.equal(moved.cells.double(), drawn.cells)  # 0/1 grids travel exactly
    chunk = moved.masks(slice(5, 23))
    assert chunk.dtype == built and chunk.shape == (18, 16, 20)
    expected = _cpu_masks(drawn, slice(5, 23))
    np.testing.assert_allclose(chunk.double().numpy(), expected.numpy(), rtol=0, atol=tolerance)
    assert expected.max() > 0.5 and expected.min() < 0.5  # masks, not zeros


@pytest.mark.parametrize("target", [0, "all"])
def test_same_as_the_cpu_float64_implementation(monkeypatch, target):
    """float64: the numbers of the implementation that built float64 masks on the CPU, to 1e-12
    (same operations in the same order: equal in practice)."""
    model, image = tiny_classifier(), photo()
    new = salience.explain(model, image, method="rise", target=target, n_masks=50, batch_size=16, seed=6, level="pixel")
    monkeypatch.setattr(Rise, "attribute", _cpu_attribute)
    old = salience.explain(model, image, method="rise", target=target, n_masks=50, batch_size=16, seed=6, level="pixel")
    np.testing.assert_allclose(new.token_scores, old.token_scores, rtol=1e-12, atol=1e-15)
    assert np.abs(old.token_scores).max() > 0.1


def test_float32_model_close_to_the_cpu_float64_masks(monkeypatch):
    """float32 model: masks built in float32 instead of float64 then cast. Mask values move by a few
    float32 ulps of 1 (~1e-7), the float32 rows and outputs by about as much, and the saliency (an
    average of output x mask / p over the masks, accumulated in float64 on both sides) by about
    1e-7 / p: 1e-6 against probabilities of order 0.3 / p."""
    model, image = _float32_classifier(), photo()
    assert model.dtype == torch.float32
    new = salience.explain(model, image, method="rise", target="all", n_masks=60, batch_size=16, seed=8, level="pixel")
    monkeypatch.setattr(Rise, "attribute", _cpu_attribute)
    old = salience.explain(model, image, method="rise", target="all", n_masks=60, batch_size=16, seed=8, level="pixel")
    np.testing.assert_allclose(new.token_scores, old.token_scores, rtol=0, atol=1e-6)
    assert np.abs(old.token_scores).max() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_masks_and_scores_on_cuda():
    """Masks from the seed on the CPU, built on the GPU: the float64 model on cuda gives the CPU's
    scores up to float64 rounding of cuDNN's convolutions (1e-9 relative)."""
    image = photo()
    cpu = salience.explain(tiny_classifier(), image, method="rise", target="all", n_masks=64, seed=9, level="pixel")
    gpu_model = tiny_classifier()
    gpu_model.model.to("cuda")
    gpu = salience.explain(gpu_model, image, method="rise", target="all", n_masks=64, seed=9, level="pixel")
    np.testing.assert_allclose(gpu.token_scores, cpu.token_scores, rtol=1e-9, atol=1e-12)


def test_mask_statistics():
    n, p, grid, cells = 4000, 0.3, (16, 20), 7
    masks = RiseMasks.draw(torch.Generator().manual_seed(0), n, grid, cells, p)
    built = masks.masks(slice(0, n))
    assert set(masks.cells.unique().tolist()) == {0.0, 1.0}
    assert built.min() >= 0 and built.max() <= 1
    # cells: n * 49 Bernoulli(p) draws; masks: each pixel a weighted average of cells, so E[M] = p
    assert abs(masks.cells.mean().item() - p) < _hoeffding(1.0, n * cells * cells, 1)
    np.testing.assert_array_less(np.abs(built.mean(0).numpy() - p), _hoeffding(1.0, n, grid[0] * grid[1]))
    # shifts uniform in [0, cell) on each axis: every offset occurs, none outside
    cell = masks.cell
    for axis in (0, 1):
        assert sorted(masks.shifts[:, axis].unique().tolist()) == list(range(cell[axis]))


# ------------------------------------------------------------------ the formula
def test_saliency_is_the_weighted_sum_of_the_masks():
    model, image = tiny_classifier(), photo()
    n, cells, p = 64, 5, 0.4
    e = salience.explain(model, image, method="rise", target="all", output="probability", n_masks=n, grid_size=cells,
                         p_keep=p, seed=3, level="pixel")
    masks = RiseMasks.draw(torch.Generator().manual_seed(3), n, (16, 16), cells, p).masks(slice(0, n))
    x = model.encode(image).pixels  # (C, H, W); baseline "mean" = 0 in the normalised space: rows x * M
    with torch.no_grad():
        probabilities = torch.softmax(model.model(x[None] * masks[:, None]), dim=-1)  # (N, classes)
    expected = torch.einsum("nk,nhw->khw", probabilities, masks).reshape(3, -1) / (n * p)
    np.testing.assert_allclose(e.token_scores, expected.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(e.scores, e.token_scores, rtol=0, atol=0)  # pixel features: the same numbers
    assert e.params["baseline"] == "mean" and e.cost.forward_passes == n + 1


class _Linear(nn.Module):
    """logit 0 = sum over pixels and channels of a * x (a linear model: RISE's expectation is exact)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        value = (images * self.a).sum(dim=(1, 2, 3))
        return torch.stack([value, torch.zeros_like(value)], dim=1)


def _exact_rise(weights: np.ndarray, grid: tuple[int, int], cells: int, p: float) -> np.ndarray:
    """E[F(x * M) M_i] / p for F = sum_j c_j M_j, c_j = sum_channels a x (``weights``, (P,)), over the
    authors' mask distribution: cells iid Bernoulli(p), shifts uniform; the mask of a shift is
    linear in the cells with coefficients from skimage's resize of each unit cell, so
    E[M_i M_j | shift] = p (1 - p) <w_i, w_j> + p^2 (a mask's coefficients sum to 1)."""
    cell = (math.ceil(grid[0] / cells), math.ceil(grid[1] / cells))
    total = np.zeros(grid[0] * grid[1])
    for u in range(cell[0]):
        for v in range(cell[1]):
            basis = np.stack([_skimage_mask(np.eye(cells * cells)[k].reshape(cells, cells), (u, v), cell, grid).ravel()
                              for k in range(cells * cells)], axis=1)  # (P, s*s)
            second = p * (1 - p) * basis @ basis.T + p * p
            total += second @ weights / p
    return total / (cell[0] * cell[1])


def _linear_setup(seed: int = 0) -> tuple[ImageClassifier, torch.Tensor, np.ndarray]:
    grid = (6, 7)
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand((1, 3, *grid), generator=generator, dtype=torch.float64) + 0.5
    x = torch.rand((3, *grid), generator=generator, dtype=torch.float64) + 0.5
    model = ImageClassifier(_Linear(a).double(), labels=["a", "b"], input_shape=(3, *grid))
    return model, x, (a[0] * x).sum(0).reshape(-1).numpy()


def test_converges_to_the_exact_expectation_on_a_linear_model():
    model, x, weights = _linear_setup()
    cells, p = 3, 0.5
    exact = _exact_rise(weights, (6, 7), cells, p)
    errors = []
    for n in (250, 1000, 4000, 16000):
        e = salience.explain(model, x, method="rise", target=0, output="logit", n_masks=n, grid_size=cells, p_keep=p,
                             level="pixel", seed=5)
        errors.append(np.abs(e.token_scores - exact).max())
    # |F| <= sum_j c_j (c_j > 0 here): each term F M_i / p lies in [0, sum c / p]
    assert errors[-1] < _hoeffding(weights.sum() / p, 16000, weights.size)
    assert errors[-1] < errors[1] < errors[0] and errors[-1] < errors[2]
    # the bound is loose (5.9 here); the measured error: 10.7 % of the largest score at N = 250, 0.57 % at 16,000
    assert errors[-1] < 0.02 * np.abs(exact).max()


def test_batched_equals_unbatched_and_seeded():
    model, image = tiny_classifier(), photo()
    one = salience.explain(model, image, method="rise", n_masks=40, batch_size=1, seed=2)
    many = salience.explain(model, image, method="rise", n_masks=40, seed=2)
    np.testing.assert_allclose(one.token_scores, many.token_scores, rtol=1e-12, atol=1e-15)  # summation order only
    assert one.cost.forward_passes == many.cost.forward_passes == 41
    assert one.cost.model_calls == 41 and many.cost.model_calls == 2
    again = salience.explain(model, image, method="rise", n_masks=40, seed=2)
    other = salience.explain(model, image, method="rise", n_masks=40, seed=7)
    np.testing.assert_array_equal(again.token_scores, many.token_scores)
    assert not np.allclose(other.token_scores, many.token_scores)


def test_targets_share_the_masks():
    model, image = tiny_classifier(), photo()
    every = salience.explain(model, image, method="rise", target="all", n_masks=30, seed=4)
    for k in range(3):
        alone = salience.explain(model, image, method="rise", target=k, n_masks=30, seed=4)
        np.testing.assert_allclose(every.scores[k], alone.scores, rtol=1e-12, atol=1e-15)
    assert every.cost.forward_passes == 31  # one pass per mask serves every class


def test_defaults_recorded_and_the_paper_output():
    e = salience.explain(tiny_classifier(), photo(), method="rise")
    assert {k: e.params[k] for k in ("n_masks", "grid_size", "p_keep", "baseline", "cell")} == {
        "n_masks": 4000, "grid_size": 7, "p_keep": 0.5, "baseline": "mean", "cell": [3, 3]}
    assert e.target.output == "probability"  # the paper's, not the classifier default (log-odds)
    assert e.level == "patch" and e.token_scores.shape == (256,)
    # probabilities in [0, 1] and E[M] = p: the map is an average probability, about the output at x
    assert np.all(e.token_scores >= 0) and e.token_scores.max() <= 1 / 0.5
    asked = salience.explain(tiny_classifier(), photo(), method="rise", n_masks=8, output="logit")
    assert asked.target.output == "logit"


@pytest.mark.parametrize(("params", "message"), [
    ({"n_masks": 0}, "n_masks >= 1"), ({"grid_size": 0}, "grid_size >= 1"), ({"p_keep": 0.0}, "0 < p_keep <= 1"),
    ({"p_keep": 1.5}, "0 < p_keep <= 1"), ({"baseline": "purple"}, "unknown image baseline"),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(ParameterError, match=message) as caught:
        salience.explain(tiny_classifier(), photo(), method="rise", **params)
    assert "\n" not in str(caught.value)


def test_text_classifiers_have_no_pixel_grid(toy):
    with pytest.raises(ParameterError, match="needs a pixel grid, which a text classifier does not provide; it works on image classifiers"):
        salience.explain(toy, TOY_TEXT, method="rise", n_masks=4)
