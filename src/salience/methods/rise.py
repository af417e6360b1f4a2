"""RISE (Petsiuk, Das and Saenko, 2018): randomised input sampling for explanation.

N random binary grids of s x s cells (each cell kept with probability p) are upsampled bilinearly
to (s + 1) x cell pixels per side (cell = ceil(H / s)), shifted by a random offset in [0, cell) on
each axis and cropped to the H x W input, as in the authors' code (eclique/RISE ``generate_masks``:
skimage ``resize(order=1, mode="reflect", anti_aliasing=False)``, reproduced here with two small
interpolation matrices). Each mask M (values in [0, 1]) keeps the input where M = 1 and takes the
baseline where M = 0: rows b + M (x - b). The saliency of pixel i is sum_n F(row_n) M_n,i / (N p).

Where the work is done: the grids and shifts are drawn on the CPU from the explanation's seed (so a
seed gives the same masks on every device); only they (N s^2 + 2 N numbers) and the two
interpolation matrices travel to the input's device, where each chunk of full-resolution masks is
built (upsample, shift, crop) in the input's dtype (float64 stays float64; float32, float16 and
bfloat16 models get float32 masks) and the saliency is accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.batching import PIXELS, choose_batch_size, map_batches
from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, position_attribution


def _mirror(coordinate: torch.Tensor, size: int) -> torch.Tensor:
    """Source coordinates reflected about the first and last sample (scipy.ndimage's "mirror",
    which skimage calls "reflect"): -c for c < 0, 2 (size - 1) - c for c > size - 1."""
    if size == 1:
        return torch.zeros_like(coordinate)
    period = 2 * (size - 1)
    folded = torch.remainder(coordinate, period)
    return torch.where(folded > size - 1, period - folded, folded)


def interpolation_matrix(size: int, out: int) -> torch.Tensor:
    """(out, size) float64 weights of linear interpolation from ``size`` samples to ``out``, with
    half-pixel centres (output o reads input (o + 1/2) size / out - 1/2) and mirrored edges: the map
    skimage's ``resize(order=1, mode="reflect", anti_aliasing=False)`` applies along one axis."""
    source = _mirror((torch.arange(out, dtype=torch.float64) + 0.5) * size / out - 0.5, size)
    low = source.floor().clamp(max=size - 1)
    frac = source - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    weights = torch.zeros(out, size, dtype=torch.float64)
    rows = torch.arange(out)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


@dataclass
class RiseMasks:
    """The N masks of one explanation, drawn up front as s x s grids and shifts (a few numbers per
    mask), built at full resolution chunk by chunk: mask n does not depend on the chunk size."""

    cells: torch.Tensor  # (N, s, s) float64, 1 = kept
    shifts: torch.Tensor  # (N, 2) long: row and column offset of the crop, in [0, cell)
    rows_matrix: torch.Tensor  # ((s + 1) cell_h, s)
    cols_matrix: torch.Tensor  # ((s + 1) cell_w, s)
    grid: tuple[int, int]

    @classmethod
    def draw(cls, generator: torch.Generator, n: int, grid: tuple[int, int], cells: int, p_keep: float) -> RiseMasks:
        height, width = grid
        cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
        kept = (torch.rand((n, cells, cells), generator=generator, dtype=torch.float64) < p_keep).double()
        shift_h = torch.randint(0, cell_h, (n,), generator=generator)
        shift_w = torch.randint(0, cell_w, (n,), generator=generator)
        return cls(kept, torch.stack([shift_h, shift_w], dim=1), interpolation_matrix(cells, (cells + 1) * cell_h),
                   interpolation_matrix(cells, (cells + 1) * cell_w), grid)

    @property
    def cell(self) -> tuple[int, int]:
        """(cell_h, cell_w) in pixels."""
        cells = self.cells.shape[1]
        return self.rows_matrix.shape[0] // (cells + 1), self.cols_matrix.shape[0] // (cells + 1)

    def to(self, like: torch.Tensor) -> RiseMasks:
        """The same masks, to be built on ``like``'s device in its floating dtype (at least float32):
        the grids, shifts and interpolation matrices are copied there (a few numbers per mask)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        return RiseMasks(self.cells.to(like.device, dtype), self.shifts.to(like.device),
                         self.rows_matrix.to(like.device, dtype), self.cols_matrix.to(like.device, dtype), self.grid)

    def masks(self, chunk: slice) -> torch.Tensor:
        """Masks ``chunk`` of the N as (B, H, W) in [0, 1] (the grids' dtype and device): upsample,
        shift, crop."""
        height, width = self.grid
        offsets = self.shifts[chunk]
        rows = self.rows_matrix[offsets[:, :1] + torch.arange(height, device=offsets.device)]  # (B, H, s)
        cols = self.cols_matrix[offsets[:, 1:] + torch.arange(width, device=offsets.device)]  # (B, W, s)
        return rows @ self.cells[chunk] @ cols.transpose(1, 2)


@register("rise", aliases=("randomized_input_sampling",), kind="perturbation",
          cost="n_masks forward passes (every target shares them)",
          summary="Randomised input sampling: outputs of randomly masked inputs averaged onto the kept pixels")
@dataclass
class Rise:
    """RISE: position score of pixel i = sum_n F(b + M_n (x - b)) M_n,i / (N p) over ``n_masks``
    (N) random masks of ``grid_size`` (s) x s cells kept with probability ``p_keep`` (p), smoothed
    and randomly shifted as in the paper's code (see the module). With binary masks this is
    E[F | pixel i kept]; it is in units of the explained output (the probability by default, as in
    the paper: unsigned there), not normalised. A mask covers every channel of a pixel, so each
    pixel has one score; a feature (patch, superpixel) sums its pixels' scores.
    ``baseline``: what a masked pixel becomes; default "mean" (0 in the normalised input, the
    paper's x * M). Masks come from the explanation's seed; chunked like every perturbation."""

    n_masks: int = 4000
    grid_size: int = 7
    p_keep: float = 0.5
    baseline: str | None = None
    needs: ClassVar[tuple[str, ...]] = ("pixel_grid",)
    default_output: ClassVar[str] = "probability"

    def attribute(self, ctx: Context) -> Attribution:
        self._check()
        grid = ctx.model.pixel_grid(ctx.encoded)  # type: ignore[attr-defined]
        baseline = ctx.baseline(self.baseline, "mean", perturbation=True)
        x, x0 = ctx.model.input_and_baseline(ctx.encoded, baseline)
        # drawn on the CPU from the seed, built chunk by chunk on the input's device
        masks = RiseMasks.draw(ctx.generator(), self.n_masks, grid, self.grid_size, self.p_keep).to(x)
        total = torch.zeros(len(ctx.targets), x.shape[0], dtype=torch.float64, device=x.device)
        size = choose_batch_size(x.shape[0], backward=False, batch_size=ctx.batch_size, budget=PIXELS)

        def run(chunk: slice) -> torch.Tensor:
            kept = masks.masks(chunk).reshape(chunk.stop - chunk.start, -1)  # (B, P) on x's device
            rows = x0[None] + kept[:, :, None].to(x.dtype) * (x - x0)[None]
            values, _ = ctx.model.score_inputs(ctx.encoded, rows, ctx.targets, grad=False, batch_size=size)
            total.add_(values.to(total).T @ kept.to(total))
            return values

        map_batches(run, self.n_masks, size)
        cell_h, cell_w = masks.cell
        return position_attribution(total / (self.n_masks * self.p_keep), ctx, details={
            "baseline": baseline, "n_masks": self.n_masks, "grid_size": self.grid_size, "p_keep": self.p_keep,
            "cell": [cell_h, cell_w]})

    def _check(self) -> None:
        if isinstance(self.n_masks, bool) or not isinstance(self.n_masks, int) or self.n_masks < 1:
            raise ParameterError(f"rise needs n_masks >= 1, got {self.n_masks!r}")
        if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int) or self.grid_size < 1:
            raise ParameterError(f"rise needs grid_size >= 1 (cells per side), got {self.grid_size!r}")
        if not 0 < self.p_keep <= 1:
            raise ParameterError(f"rise needs 0 < p_keep <= 1 (the probability a cell is kept), got {self.p_keep!r}")
