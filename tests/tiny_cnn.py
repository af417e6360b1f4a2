"""A tiny seeded float64 CNN image classifier (smooth activations, batch norm in eval mode) and a
small non-square photo-like image, for image tests that run in milliseconds."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess

GRID = 16
LABELS = ["cat", "dog", "bird"]


def build_tiny_cnn(seed: int = 0, channels: int = 3, classes: int = 3) -> nn.Module:
    """Conv(3x3) - BatchNorm - Softplus - Conv(3x3, stride 2) - Tanh - AdaptiveAvgPool(2) - Linear, float64, eval."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Softplus(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[-1].weight.mul_(4.0)  # less flat softmax: gradients of the probability are not tiny
    return net.double().eval()


def tiny_classifier(seed: int = 0, grid: int = GRID, **options: object) -> ImageClassifier:
    """The tiny CNN behind a ``grid`` x ``grid`` resize to [-1, 1] (EfficientNet's preprocessing)."""
    return ImageClassifier(build_tiny_cnn(seed), ImagePreprocess(crop=grid), LABELS, name="tiny-cnn", **options)  # type: ignore[arg-type]


def photo(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    """A non-square H x W x 3 uint8 image: smooth colour gradients, a bright disc and mild noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    disc = ((rows - height / 3) ** 2 + (cols - width / 2) ** 2 < (min(height, width) / 4) ** 2) * 120
    red = 40 + 150 * cols / width + disc
    green = 200 - 120 * rows / height
    blue = 90 + disc / 2
    image = np.stack([red, green, blue], axis=-1) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)
