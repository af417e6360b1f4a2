"""The overlay grid of the ImageNet methods study: photos x methods, each map over the photo as the
model saw it (the 224 x 224 centre crop), with the hand-made box. From the study's database; no
model pass.

    python scripts/imagenet_study_grid.py            # -> docs/studies/imagenet_methods_grid.png

Colours follow salience.render.png: signed maps on a diverging scale centred at 0 (red raises the
explained output, blue lowers it), unsigned ones (saliency, SmoothGrad: |gradient|) on a sequential
scale from 0; each tile's scale ends at the 99.5th percentile of its |score| and the map's opacity
grows with |score|, so the photo shows through where scores are small (a map of one sign only, as
RISE's, all positive, is drawn from its minimum, else it would be one flat colour). The box is outlined in
green; a white ring marks the map's maximum (the pointing game's pick; the first in row-major order
when several pixels share it). The figure is downscaled and saved with a 256-colour palette to stay
near 1 MB.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from imagenet_study_report import MAIN, study_methods, study_runs  # scripts/ is on the path when run as a script
from PIL import Image
from scipy.ndimage import binary_erosion

import salience
from salience.core.explanation import Explanation
from salience.core.grid import model_grid_scores
from salience.datasets.photos import Photo, load_photos
from salience.evaluate.config import load_bench_file
from salience.evaluate.store import Store
from salience.metrics.image_input import grid_region
from salience.render.png import CLIP_PERCENTILE, MAX_ALPHA, is_signed

STUDY = Path("docs/studies/imagenet_methods.toml")
OUT = Path("docs/studies/imagenet_methods_grid.png")
TILE_INCHES = 0.95
BOX_COLOUR = np.array([0.1, 0.9, 0.2])


def tile(picture: np.ndarray, explanation: Explanation | None, box: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1]: the picture, the map over it (as render/png.py colours it), the box
    outline and the maximum's ring."""
    from matplotlib import colormaps

    out = picture.copy()
    if explanation is not None:
        heat = np.nan_to_num(model_grid_scores(explanation))
        if heat.min() > 0 or heat.max() < 0:  # one sign only (RISE's E[p | pixel kept], Score-CAM without
            heat = heat - heat.min()          # ReLU): drawn from its minimum, else one flat colour
        largest = float(np.percentile(np.abs(heat), CLIP_PERCENTILE)) or float(np.abs(heat).max()) or 1.0
        signed = is_signed(explanation)
        scaled = np.clip(heat / largest, -1.0, 1.0)
        colours = colormaps["RdBu_r"]((scaled + 1) / 2) if signed else colormaps["inferno"](np.clip(scaled, 0.0, 1.0))
        alpha = MAX_ALPHA * np.abs(scaled)[..., None]
        out = (1 - alpha) * out + alpha * colours[..., :3]
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        rows, cols = np.ogrid[:heat.shape[0], :heat.shape[1]]
        ring = np.abs(np.hypot(rows - row, cols - col) - 7) < 1.6
        out[ring] = 1.0
    edge = box & ~binary_erosion(box, iterations=2)
    out[edge] = BOX_COLOUR
    return out


def stored_explanations(store: Store, runs: dict[str, Any]) -> dict[tuple[str, str], Explanation]:
    found = {}
    for run in runs.values():
        for row in store.explanations(run.run_id):
            if row["explanation"]:
                found[(row["example_id"], row["method"])] = Explanation.from_dict(json.loads(row["explanation"]))
    return found


def row_label(photo: Photo, labels: list[str]) -> str:
    if photo.predicted == photo.label:
        return f"{photo.id}\n{photo.label_name}\n(predicted)"
    return f"{photo.id}\n{photo.label_name}\n(model: {labels[photo.predicted]})"


def main() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=STUDY)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()
    bench = load_bench_file(args.study)
    store = Store(bench.db or "results/salience.db")
    runs = study_runs(bench, store, MAIN)
    methods = study_methods(bench)
    explanations = stored_explanations(store, runs)
    model = salience.load_model(bench.studies[0].config.model)
    photos = [p for p in load_photos() if any(pid == p.id for pid, _ in explanations)]  # those the run has
    figure = Figure(figsize=(TILE_INCHES * (len(methods) + 1) + 0.9, TILE_INCHES * len(photos) + 0.7))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(photos), len(methods) + 1, squeeze=False)
    for r, photo in enumerate(photos):
        encoded = model.encode(str(photo.path))
        picture = encoded.levels.display(encoded.pixels)
        first = next(e for (pid, _), e in explanations.items() if pid == photo.id)
        box = grid_region(first, photo.box, None, "grid")
        for c, method in enumerate([None, *methods]):
            axis = axes[r, c]
            axis.imshow(tile(picture, None if method is None else explanations.get((photo.id, method)), box))
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title("photo + box" if method is None else method, fontsize=6.5, rotation=30, loc="left")
        axes[r, 0].set_ylabel(row_label(photo, model.labels), fontsize=6)
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=0.7 / width, right=0.995, top=1 - 0.6 / height, bottom=0.005, wspace=0.03, hspace=0.03)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=args.dpi)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {image.width} x {image.height})")


if __name__ == "__main__":
    main()
