#!/usr/bin/env python
"""The binarized-network saliency study (docs/studies/bnn_saliency.md): gradient-based maps of the
full-precision ``zoo:fmnist-cnn`` ("FP") and the binarized ``zoo:fmnist-bnn`` ("BNN") on the same
Fashion-MNIST test images, compared with numbers (Widdicombe and Julier, 2021, arXiv:2106.12569,
compared them by eye).

On the first ``--images`` test images (default 1,000) each network explains the TRUE class (the same
target on both networks, so that a difference between the two maps is never a difference of the
explained class; images are explained class by class, so that ``explain`` batches them) with:

* Gradient (``saliency``: sum over the one channel of |d logit / d pixel|),
* Input x Gradient (signed; input in the normalised space, whose 0 is the mean grey),
* DeepLIFT (Rescale rule, black reference, signed; on the BNN its sign units take the secant
  (sign(x) - sign(x_ref)) / (x - x_ref) of the true binary network, not the STE),
* SmoothGrad (``--smoothgrad-samples`` 50 noisy copies, noise std ``--noise-level`` 0.15 x the
  input's range, mean |gradient|), also with a second seed on the first ``--repeat-images`` images,
  to measure its own Monte-Carlo noise,
* Grad-CAM of ``block3`` (the 7 x 7 map of both networks, after the activation), ReLU, bilinear
  upsampling to 28 x 28, no normalisation,
* a random map (independent uniform pixel scores, seeded per image) as the chance reference,

all of the class logit (``output="logit"``); and NeuroMask (CIFAR preset: lambda 0.4 / 0.35 / 0.15,
temperature 1, 3 x 3 Laplacian, ``--neuromask-iterations`` 2,000 RMSProp steps, black baseline) on
the first ``--neuromask-images`` (200) images (its random start from seed ``--seed`` on the FP
network and ``--seed`` + 1 on the BNN, so that no compared pair of masks shares its start; every
image of one network starts from the same weights). On the BNN the gradient is the straight-through
estimator's (see :mod:`salience.zoo.fmnist`).

Per image and method: the measures of :mod:`bnn_saliency_measures` (rank correlation, also of
4 x 4-pixel block means, and SSIM between the FP and the BNN map, and between the FP map of one image and the BNN map of another image
(any class, and the same class) as references; TV / L1; garment mass; peak on the garment) and,
on each map's own network, deletion and insertion AUC of the true class's probability at pixel
level, ``--step`` 28 pixels per point (29 points), removed / inserted pixels black (Fashion-MNIST's
background is exactly black: black is "no garment"; a sigma-5 blur of a 28-pixel image, RISE's
insertion substrate, is an almost uniform grey). NeuroMask also: sparsity (share of mask < 0.5) and
whether the masked image keeps the class.

Writes ``--out`` (results/bnn_saliency): maps.csv (one row per image x network x method),
pairs.csv (one row per compared pair of maps), maps.npz (every map), run.json (settings, accuracy,
timings); then the tables into ``--doc`` between its generated-section markers and the figure
``--grid`` (see :mod:`bnn_saliency_report`). Seeded: a rerun gives the same numbers.

    flock /tmp/salience-cpu.lock env OMP_NUM_THREADS=2 .venv/bin/python scripts/study_bnn_saliency.py
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import salience
from salience.core.target import Target
from salience.datasets.fashion_mnist import load_fashion_mnist
from salience.metrics import evaluate_metric
from salience.zoo.fmnist import GRAD_CAM_LAYER, images_to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bnn_saliency_measures as measures  # noqa: E402
import bnn_saliency_report as report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NETS = {"FP": "zoo:fmnist-cnn", "BNN": "zoo:fmnist-bnn"}
SIDE = 28
BLOCK = 4  # coarse similarity: Spearman of 4 x 4-pixel block means (7 x 7 cells)
REMOVAL = "black"
RANDOM = "Random"
NEUROMASK = "NeuroMask"
SMOOTHGRAD = "SmoothGrad"
REPEAT = "SmoothGrad (seed 1)"


@dataclass(frozen=True)
class Settings:
    """What one run computes (the command-line options)."""

    images: int = 1000
    neuromask_images: int = 200
    neuromask_iterations: int = 2000
    smoothgrad_samples: int = 50
    noise_level: float = 0.15
    repeat_images: int = 1000
    step: int = 28
    seed: int = 0
    out: str = "results/bnn_saliency"
    doc: str = "docs/studies/bnn_saliency.md"
    grid: str = "docs/studies/bnn_saliency_grid.png"

    def methods(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Table name -> (registered method, its parameters) of the methods run on every image."""
        return {"Gradient": ("saliency", {"output": "logit"}),
                "Input x Gradient": ("input_x_gradient", {"output": "logit"}),
                "DeepLIFT": ("deeplift", {"output": "logit", "baseline": "black"}),
                SMOOTHGRAD: ("smoothgrad", {"output": "logit", "n_samples": self.smoothgrad_samples,
                                            "noise_level": self.noise_level}),
                "Grad-CAM": ("grad_cam", {"output": "logit", "layer": GRAD_CAM_LAYER})}

    def neuromask(self) -> dict[str, Any]:
        return {"preset": "cifar", "iterations": self.neuromask_iterations, "images_per_batch": 32}


class Study:
    """The run: data, both networks, the maps and rows as they are computed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.images, self.labels = load_fashion_mnist("test", settings.images)
        if len(self.images) < 2:
            raise SystemExit("the study needs at least 2 images")
        self.garment = self.images > 0
        self.models = {net: salience.load_model(name) for net, name in NETS.items()}
        self.predictions = {net: self._predict(model.model) for net, model in self.models.items()}
        self.maps: dict[tuple[str, str], np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []
        self.seconds: dict[str, float] = {}

    def _predict(self, net: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return net(images_to_tensor(self.images)).argmax(1).numpy()

    # ------------------------------------------------------------------ explaining
    def explain(self, net: str, method: str, params: dict[str, Any], indices: np.ndarray, seed: int,
                label: str) -> dict[int, salience.Explanation]:
        """``indices`` explained for their true class, class by class (``explain`` batches one call's images)."""
        model, found = self.models[net], {}
        with tqdm(total=len(indices), desc=f"{net} {label}", unit="image") as bar:
            for c in np.unique(self.labels[indices]):
                chosen = indices[self.labels[indices] == c]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", salience.SalienceWarning)
                    results = salience.explain(model, [self.images[i] for i in chosen], method, target=int(c), seed=seed,
                                               progress=False, **params)
                found.update(zip(chosen.tolist(), results))
                bar.update(len(chosen))
        return found

    def curves(self, net: str, explanation: salience.Explanation) -> tuple[float, float]:
        """Deletion and insertion AUC of ``explanation`` on its own network (pixels, black)."""
        model, step = self.models[net], self.settings.step
        deletion = evaluate_metric("deletion_auc", model, explanation, step=step, baseline=REMOVAL).value
        insertion = evaluate_metric("insertion_auc", model, explanation, step=step, baseline=REMOVAL).value
        return float(deletion), float(insertion)

    def record(self, net: str, method: str, i: int, m: np.ndarray, explanation: salience.Explanation | None,
               **extra: Any) -> None:
        """Store map ``m`` of image ``i`` and its row (with deletion / insertion when ``explanation``)."""
        self.maps.setdefault((net, method), np.full((len(self.images), SIDE, SIDE), np.nan, dtype=np.float32))[i] = m
        deletion, insertion = self.curves(net, explanation) if explanation is not None else (np.nan, np.nan)
        peak = measures.peak_on_garment(m, self.garment[i])
        self.rows.append({"image": i, "label": int(self.labels[i]), "network": net, "method": method,
                          "prediction": int(self.predictions[net][i]), "correct": bool(self.predictions[net][i] == self.labels[i]),
                          "constant_map": measures.is_constant(m), "tv_ratio": measures.tv_ratio(m),
                          "garment_mass": measures.garment_mass(m, self.garment[i]), "garment_share": float(self.garment[i].mean()),
                          "peak_on_garment": np.nan if peak is None else float(peak),
                          "deletion_auc": deletion, "insertion_auc": insertion, **extra})

    def run_method(self, name: str, method: str, params: dict[str, Any]) -> dict[str, dict[int, salience.Explanation]]:
        """``method`` on every image and both networks; returns the explanations by network and image."""
        everything, explanations = np.arange(len(self.images)), {}
        for net in NETS:
            started = time.perf_counter()
            found = explanations[net] = self.explain(net, method, params, everything, self.settings.seed, name)
            for i in tqdm(everything, desc=f"{net} {name}: deletion / insertion", unit="image", leave=False):
                # DeepLIFT: its summation-to-delta error and F(x) - F(black), per image
                extra = {"summation_delta": float(found[i].delta), "output_gap": float(found[i].output_value - found[i].baseline_value)} \
                    if method == "deeplift" else {}
                self.record(net, name, i, found[i].scores.reshape(SIDE, SIDE), found[i], **extra)
            self.seconds[f"{name} {net}"] = time.perf_counter() - started
        return explanations

    def run_random(self, template: dict[str, dict[int, salience.Explanation]]) -> None:
        """Uniform random pixel scores (seeded by image), the same map on both networks, scored through
        a copy of each image's ``template`` explanation with the scores replaced."""
        for net in NETS:
            started = time.perf_counter()
            for i in tqdm(range(len(self.images)), desc=f"{net} {RANDOM}", unit="image"):
                m = np.random.default_rng([self.settings.seed, i]).random((SIDE, SIDE))
                self.record(net, RANDOM, i, m, replace(template[net][i], scores=m.ravel()))
            self.seconds[f"{RANDOM} {net}"] = time.perf_counter() - started

    def run_repeat(self, params: dict[str, Any]) -> None:
        """SmoothGrad with seed + 1 on the first ``repeat_images`` images (maps only)."""
        chosen = np.arange(min(self.settings.repeat_images, len(self.images)))
        for net in NETS:
            started = time.perf_counter()
            found = self.explain(net, "smoothgrad", params, chosen, self.settings.seed + 1, REPEAT)
            for i in chosen:
                self.maps.setdefault((net, REPEAT), np.full((len(self.images), SIDE, SIDE), np.nan, dtype=np.float32))[i] = \
                    found[i].scores.reshape(SIDE, SIDE)
            self.seconds[f"{REPEAT} {net}"] = time.perf_counter() - started

    def run_neuromask(self) -> None:
        chosen = np.arange(min(self.settings.neuromask_images, len(self.images)))
        for offset, net in enumerate(NETS):  # another seed per network: the two masks never share their start
            started = time.perf_counter()
            found = self.explain(net, "neuromask", self.settings.neuromask(), chosen, self.settings.seed + offset, NEUROMASK)
            for i in tqdm(chosen, desc=f"{net} {NEUROMASK}: deletion / insertion", unit="image", leave=False):
                m = found[i].scores.reshape(SIDE, SIDE)
                kept_class = self.masked_prediction(net, i, m)
                self.record(net, NEUROMASK, i, m, found[i], sparsity=float((m < 0.5).mean()),
                            keeps_class=bool(kept_class == self.labels[i]),
                            masked_probability=float(np.exp(found[i].output_value)),
                            iterations_used=int(found[i].params["iterations_used"][0]))
            self.seconds[f"{NEUROMASK} {net}"] = time.perf_counter() - started

    def masked_prediction(self, net: str, i: int, m: np.ndarray) -> int:
        """The class ``net`` predicts for image ``i`` masked as NeuroMask does: black + m (x - black)."""
        model = self.models[net]
        encoded = model.encode(self.images[i])
        x, black = model.input_and_baseline(encoded, REMOVAL)
        rows = black + torch.as_tensor(m.ravel(), dtype=x.dtype)[:, None] * (x - black)
        every_class = [Target(k, label, "logit") for k, label in enumerate(model.labels)]
        logits, _ = model.score_inputs(encoded, rows[None], every_class, grad=False)
        return int(logits[0].argmax())

    # ------------------------------------------------------------------ pairs
    def pairs(self) -> list[dict[str, Any]]:
        """FP-vs-BNN comparisons per method: the same image, another image, another image of the
        same class; SmoothGrad seed 0 vs seed 1 per network."""
        rng = np.random.default_rng(self.settings.seed)
        correct = (self.predictions["FP"] == self.labels) & (self.predictions["BNN"] == self.labels)
        out: list[dict[str, Any]] = []

        def add(method: str, comparison: str, i: int, a: np.ndarray, b: np.ndarray, j: int) -> None:
            out.append({"method": method, "comparison": comparison, "image": i, "other_image": j,
                        "both_correct": bool(correct[i]), "spearman": measures.rank_correlation(a, b),
                        "spearman_blocks": measures.rank_correlation(measures.block_means(a, BLOCK), measures.block_means(b, BLOCK)),
                        "ssim": measures.ssim01(a, b)})

        methods = [name for (net, name) in self.maps if net == "FP" and name not in (REPEAT, RANDOM)]
        for name in methods:  # the references pair images among those the method explained
            fp, bnn = self.maps[("FP", name)], self.maps[("BNN", name)]
            done = np.flatnonzero(~np.isnan(fp[:, 0, 0]))
            other = done[measures.derangement(len(done), rng)]
            same_class = measures.same_class_derangement(self.labels[done], rng)
            for k, i in enumerate(done):
                add(name, report.SAME, i, fp[i], bnn[i], i)
                add(name, report.OTHER, i, fp[i], bnn[other[k]], int(other[k]))
                if same_class[k] >= 0:
                    j = int(done[same_class[k]])
                    add(name, report.SAME_CLASS, i, fp[i], bnn[j], j)
        if ("FP", REPEAT) in self.maps:
            for net in NETS:
                first, second = self.maps[(net, SMOOTHGRAD)], self.maps[(net, REPEAT)]
                for i in np.flatnonzero(~np.isnan(second[:, 0, 0])):
                    add(SMOOTHGRAD, f"{report.SEEDS} {net}", i, first[i], second[i], i)
        return out


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def parse(argv: Sequence[str] | None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, value in asdict(defaults).items():
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    return Settings(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse(argv)
    started, load_start = time.perf_counter(), load_average()
    torch.manual_seed(settings.seed)
    study = Study(settings)
    methods = settings.methods()
    templates: dict[str, dict[int, salience.Explanation]] = {}
    for name, (method, params) in methods.items():
        found = study.run_method(name, method, params)
        templates = found if name == "Gradient" else templates  # keeps one method's explanations only
    study.run_random(templates)
    if settings.repeat_images > 0:
        study.run_repeat(methods[SMOOTHGRAD][1])
    if settings.neuromask_images > 0:
        study.run_neuromask()
    pairs = study.pairs()
    out = ROOT / settings.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "maps.csv", study.rows)
    write_csv(out / "pairs.csv", pairs)
    np.savez_compressed(out / "maps.npz", images=study.images, labels=study.labels,
                        **{f"{net}|{name}": maps for (net, name), maps in study.maps.items()})
    threads = os.environ.get("OMP_NUM_THREADS")
    run = {"settings": asdict(settings), "methods": {k: [v[0], v[1]] for k, v in methods.items()},
           "neuromask": settings.neuromask(),
           "accuracy": {net: float((study.predictions[net] == study.labels).mean()) for net in NETS},
           "both_correct": int(((study.predictions["FP"] == study.labels) & (study.predictions["BNN"] == study.labels)).sum()),
           "seconds": {k: round(v, 1) for k, v in study.seconds.items()},
           "wall_minutes": round((time.perf_counter() - started) / 60, 1), "load_average_start": load_start,
           "load_average_end": load_average(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={threads or 'unset'})",
           "command": " ".join(["python", "scripts/study_bnn_saliency.py", *(sys.argv[1:] if argv is None else argv)])}
    (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    report.write(out, ROOT / settings.doc, ROOT / settings.grid)
    print(f"done in {run['wall_minutes']} min; results in {out}")


if __name__ == "__main__":
    main()
