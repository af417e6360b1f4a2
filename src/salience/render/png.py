"""PNG overlays of image explanations (matplotlib, Agg; no pyplot state): each explanation's
heatmap, in the pixel grid of the image the user gave, over that image, with a colour bar that
states the sign convention. Several explanations are drawn side by side in one figure.

Signed scores use a diverging colormap centred at 0 (red raises the explained output, blue lowers
it); unsigned ones (saliency and SmoothGrad with ``abs``, SmoothGrad-Squared, VarGrad) a sequential
one from 0. The colour scale ends at the 99.5th percentile of |score| (stated on the bar); over a
picture the heatmap's opacity grows with |score|. Pixels the model never saw (cropped away) are
left uncoloured. PNG output is for image
explanations only: any other kind raises :class:`~salience.errors.ParameterError`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from salience.core.explanation import Explanation
from salience.errors import ParameterError

PANEL_INCHES = 4.2
DPI = 110
MAX_ALPHA = 0.85  # opacity of the largest |score| over the picture; 0 is transparent
CLIP_PERCENTILE = 99.5  # colour scale: +-this percentile of |score| (a few extreme pixels would wash out the rest)


def explanation_png(explanations: Sequence[Explanation], path: str | Path, image: Any = None) -> str:
    """Write the overlays of ``explanations`` side by side to ``path``; returns the path. ``image``
    (a path, PIL image or H x W x C array) is drawn under every heatmap; by default each
    explanation's own picture (kept in memory by the process that computed it; after loading from
    JSON pass it, else the heatmap is drawn alone). Each explanation remembers the path (``_png``)."""
    data = overlay_png_bytes(explanations, image)
    Path(path).write_bytes(data)
    for explanation in explanations:
        explanation.extras["_png"] = str(path)
    return str(path)


def overlay_png_bytes(explanations: Sequence[Explanation], image: Any = None) -> bytes:
    """The PNG file :func:`explanation_png` writes, as bytes (for HTML data URIs)."""
    from matplotlib.figure import Figure

    for explanation in explanations:
        if explanation.kind != "image":
            raise ParameterError(f"PNG output draws image explanations; this one explains a {explanation.kind} "
                                 "(use to_html() or show())")
    figure = Figure(figsize=(PANEL_INCHES * len(explanations), PANEL_INCHES), layout="constrained")
    axes = figure.subplots(1, len(explanations), squeeze=False)[0]
    for axis, explanation in zip(axes, explanations):
        _panel(figure, axis, explanation, _picture(image if image is not None else explanation.extras.get("_image")))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def is_signed(explanation: Explanation) -> bool:
    """False for methods whose scores are magnitudes (``abs``, SmoothGrad-Squared, VarGrad)."""
    params = explanation.params
    return not (params.get("abs") is True or params.get("variant") in ("squared", "vargrad"))


def _panel(figure: Any, axis: Any, explanation: Explanation, picture: np.ndarray | None) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    heat = explanation.heatmap()
    magnitude = np.abs(heat[np.isfinite(heat)])
    largest = float(np.percentile(magnitude, CLIP_PERCENTILE)) if magnitude.size else 0.0
    largest = largest if largest > 0 else float(magnitude.max(initial=0.0)) or 1.0
    target = explanation.target
    signed = is_signed(explanation)
    norm = Normalize(-largest, largest) if signed else Normalize(0.0, largest)
    colours = colormaps["RdBu_r" if signed else "inferno"]
    rgba = colours(norm(np.nan_to_num(heat)))
    if picture is not None:  # the heatmap's opacity follows |score|: the picture shows where scores are small
        axis.imshow(picture, extent=(0, picture.shape[1], picture.shape[0], 0), cmap="gray" if picture.ndim == 2 else None)
        rgba[..., 3] = MAX_ALPHA * np.clip(np.abs(np.nan_to_num(heat)) / largest, 0.0, 1.0)
    rgba[~np.isfinite(heat), 3] = 0.0  # pixels the model never saw
    extent = (0, heat.shape[1], heat.shape[0], 0) if picture is None else (0, picture.shape[1], picture.shape[0], 0)
    axis.imshow(rgba, extent=extent, interpolation="nearest")
    bar = figure.colorbar(ScalarMappable(norm, colours), ax=axis, fraction=0.046, pad=0.02,
                          extend="both" if signed else "max")
    sign = (f"red +: raises the {target.output} of {target.label!r}; blue -: lowers it" if signed
            else "magnitude (unsigned): brighter = more influence")
    bar.set_label(f"{sign}\n(colour scale clipped at the {CLIP_PERCENTILE:g}th percentile of |score|)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    probability = ""
    if explanation.prediction is not None and 0 <= target.index < len(explanation.prediction.probabilities):
        probability = f" (p={explanation.prediction.probabilities[target.index]:.3f})"
    cost = explanation.cost
    axis.set_title(f"{explanation.method}, {explanation.level} level\n{target.label}{probability}\n"
                   f"{cost.forward_passes} fwd / {cost.backward_passes} bwd passes, {cost.seconds:.2f} s", fontsize=8)
    axis.set_axis_off()


def _picture(image: Any) -> np.ndarray | None:
    """``image`` as an (H, W, 3) or (H, W) float array in [0, 1] (None stays None)."""
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if image.mode in ("L", "I", "F", "1") else "RGB"))
    array = np.asarray(image)
    return array / 255.0 if array.dtype == np.uint8 else np.clip(array.astype(np.float64), 0.0, 1.0)
