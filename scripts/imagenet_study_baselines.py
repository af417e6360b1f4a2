"""Reference maps for the ImageNet methods study (docs/studies/imagenet_methods.md): the study's
metrics on maps that know nothing of the model, so that a method's score can be read against chance.

    OMP_NUM_THREADS=1 python scripts/imagenet_study_baselines.py            # -> results/imagenet_methods/baselines.json

Three maps per photo of ``imagenet-photos``, scored with the metrics (and their parameters) of the
study file's first study, for the photo's true class (the study's ``target = "label"``):

- ``random (pixels)``: independent uniform scores per pixel of the 224 x 224 model grid
  (``numpy.random.default_rng(photo number)``), ranked like a pixel map (deletion removes scattered
  pixels);
- ``random (patches)``: independent uniform scores per 16 x 16 patch (the patch methods' features;
  seed 100 + photo number): deletion removes whole patches in random order;
- ``centre``: minus the distance of each pixel from the grid's centre: the "objects are in the
  middle" prior of photographs, a classic pointing-game baseline.

The runner cannot express these (there is no "random" method); the maps are given the features and
geometry of a real explanation of the photo (a Grad-CAM explanation is computed once per photo as
the template, 2 forward + 1 backward passes) and scored with ``salience.metrics.evaluate_metric``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import salience
from salience.core.explanation import Explanation
from salience.datasets.photos import Photo, load_photos
from salience.evaluate.config import Spec, load_bench_file
from salience.metrics import evaluate_metric, get_metric

STUDY = Path("docs/studies/imagenet_methods.toml")
OUT = Path("results/imagenet_methods/baselines.json")


def pixel_map(template: Explanation, values: np.ndarray, name: str) -> Explanation:
    """``template`` (a pixel-level image explanation) with ``values`` (H x W) as its scores."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    return dataclasses.replace(template, scores=flat, token_scores=flat, method=name, extras=dict(template.extras))


def patch_map(model: Any, template: Explanation, values: np.ndarray, name: str) -> Explanation:
    """``template``'s input with one score per default patch (the level the patch methods use)."""
    features = model.features(template.extras["_encoded"], "patch")
    return dataclasses.replace(template, features=features, scores=np.asarray(values, dtype=np.float64),
                               token_scores=None, level="patch", params={"level": "patch"}, method=name,
                               extras=dict(template.extras))


def reference_maps(model: Any, template: Explanation, number: int) -> list[Explanation]:
    height, width = template.extras["geometry"]["grid"]
    rows, cols = np.mgrid[0:height, 0:width]
    centre = -np.hypot(rows - (height - 1) / 2, cols - (width - 1) / 2)
    patches = len(model.features(template.extras["_encoded"], "patch"))
    return [pixel_map(template, np.random.default_rng(number).random((height, width)), "random (pixels)"),
            patch_map(model, template, np.random.default_rng(100 + number).random(patches), "random (patches)"),
            pixel_map(template, centre, "centre")]


def score(model: Any, explanation: Explanation, metric: Spec, photo: Photo) -> dict[str, Any]:
    params = dict(metric.params)
    if "box" in get_metric(metric.name).needs:
        params["box"] = photo.box
    result = evaluate_metric(metric.name, model, explanation, **params)
    kept = {k: result.details[k] for k in ("region_share", "maxima") if k in result.details}
    return {"example_id": photo.id, "method": explanation.method, "metric": metric.label, "value": float(result.value),
            "higher_is_better": result.higher_is_better, "forward_passes": result.forward_passes, "details": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=STUDY, help="study file whose first study's metrics are used")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos (a check)")
    args = parser.parse_args()
    config = load_bench_file(args.study).studies[0].config
    model = salience.load_model(config.model)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for number, photo in enumerate(load_photos()[:args.limit]):
        template = salience.explain(model, str(photo.path), "grad_cam", target=photo.label, output="probability",
                                    layer="_bn1", seed=config.seed)
        assert isinstance(template, Explanation)
        for explanation in reference_maps(model, template, number):
            rows += [score(model, explanation, metric, photo) for metric in config.metrics]
        print(f"{photo.id}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"study": str(args.study), "target": "label", "rows": rows,
                                    "seconds": time.perf_counter() - started}, indent=1), encoding="utf-8")
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
