"""Values of an image classifier's input space (the normalised C x H x W tensor): its black and
white levels, the named baselines built from them, and the input shown as an image.

Baselines (a feature removed = its pixels set to the baseline's values, every channel):

* ``black``: pixel value 0 before normalisation (the preprocessing applied to an all-black image);
* ``mean``: 0 after normalisation, i.e. the dataset mean the preprocessing subtracts (``zero`` too);
* ``blur`` / ``blur:S``: the input blurred by a Gaussian of ``S`` model-grid pixels (default
  :data:`BLUR_SIGMA`), edges reflected;
* ``noise`` / ``noise:N``: uniform noise between the black and white levels per channel (between
  the input's per-channel minimum and maximum without preprocessing), seeded with ``N`` (default
  :data:`NOISE_SEED`), so every call of one explanation sees the same noise;
* a user tensor (C, H, W) in the normalised space, recorded by its shape and a hash, never its values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from salience.errors import InputError, ParameterError

BLUR_SIGMA = 10.0  # model-grid pixels (Fong & Vedaldi, 2017, blurred with sigma 10 at 224 x 224)
NOISE_SEED = 0
NAMED = ("black", "mean", "blur", "noise")
BLACK_UNKNOWN = "the black level is unknown for a model without preprocessing; use mean, blur, noise or a tensor"


@dataclass
class Levels:
    """Black and white levels (C, H, W) of the normalised input: the preprocessing applied to an
    all-black and an all-white image (None when there is no preprocessing)."""

    black: torch.Tensor | None = None
    white: torch.Tensor | None = None

    def value_range(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) broadcastable to ``pixels`` (C, H, W): the black and white levels, else the
        input's per-channel minimum and maximum."""
        if self.black is not None and self.white is not None:
            return self.black.to(pixels), self.white.to(pixels)
        flat = pixels.reshape(pixels.shape[0], -1)
        return flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]

    def display(self, pixels: torch.Tensor) -> np.ndarray:
        """``pixels`` (C, H, W) as an (H, W, C) float image in [0, 1] (black -> 0, white -> 1)."""
        low, high = self.value_range(pixels)
        unit = (pixels - low) / torch.where(high > low, high - low, torch.ones_like(high))
        return unit.clamp(0, 1).permute(1, 2, 0).detach().double().cpu().numpy()


def tensor_name(baseline: torch.Tensor | np.ndarray) -> str:
    """A short, stable name of a user's baseline tensor: its shape and a hash of its values."""
    values = np.ascontiguousarray(torch.as_tensor(baseline).detach().double().cpu().numpy())
    digest = hashlib.sha1(values.tobytes() + str(values.shape).encode()).hexdigest()[:10]
    return f"tensor {'x'.join(map(str, values.shape))} sha1:{digest}"


def check_name(baseline: str, named: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> str:
    """``baseline`` if it names a baseline this adapter can build, else a one-line ParameterError."""
    kind, _, argument = baseline.partition(":")
    if baseline in tensors or baseline == "zero" or (kind in named and not argument):
        return baseline
    if kind in ("blur", "noise") and kind in named and _number(argument, float if kind == "blur" else int) is not None:
        return baseline
    if baseline == "black":
        raise ParameterError(BLACK_UNKNOWN)
    raise ParameterError(f"unknown image baseline {baseline!r}; choose {', '.join(named)} (blur:SIGMA, noise:SEED) "
                         "or pass a (C, H, W) tensor")


def build(baseline: str, pixels: torch.Tensor, levels: Levels, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The baseline image (C, H, W) for the input ``pixels`` (C, H, W), same dtype and device."""
    kind, _, argument = baseline.partition(":")
    if baseline in tensors:
        given = tensors[baseline]
        if tuple(given.shape) != tuple(pixels.shape):
            raise InputError(f"the baseline tensor has shape {tuple(given.shape)}; the model input has {tuple(pixels.shape)}")
        return given.to(pixels)
    if kind in ("mean", "zero"):
        return torch.zeros_like(pixels)
    if kind == "black":
        if levels.black is None:
            raise ParameterError(BLACK_UNKNOWN)
        return levels.black.to(pixels)
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = _number(argument, float)
        sigma = BLUR_SIGMA if sigma is None else sigma
        blurred = gaussian_filter(pixels.detach().double().cpu().numpy(), sigma=(0, sigma, sigma), mode="reflect")
        return torch.from_numpy(blurred).to(pixels)
    if kind == "noise":
        seed = _number(argument, int)
        generator = torch.Generator().manual_seed(NOISE_SEED if seed is None else seed)
        low, high = levels.value_range(pixels.double().cpu())
        uniform = torch.rand(pixels.shape, generator=generator, dtype=torch.float64)
        return (low + uniform * (high - low)).to(pixels)
    raise ParameterError(f"unknown image baseline {baseline!r}")


def _number(text: str, kind: type) -> float | int | None:
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if value >= 0 else None
