"""Image benchmark: EfficientNet-Lite0 on one 224 x 224 image (scikit-image's chelsea). Measures the
model's pass limit (forward-only and forward + backward calls at batch sizes 1..32), then times
Salience's IG (fixed 32 steps and adaptive) and occlusion (16 x 16 patches, stride 8) against
Captum's IntegratedGradients and Occlusion given the best measured batch. See benchmarks/README.md.

    OMP_NUM_THREADS=1 python benchmarks/images.py            # writes benchmarks/RESULTS-images.md
    OMP_NUM_THREADS=1 python benchmarks/images.py --quick    # patch stride 16, 1 run each (smoke test)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from cases import Limit, _time_call  # noqa: E402
from common import RowCounter, Rows, fmt_s, load_average, log, median, run_and_write, table, timed  # noqa: E402

import salience  # noqa: E402
from salience.core.grid import model_grid_scores  # noqa: E402

PACKAGES = ("salience", "torch", "captum", "numpy", "scikit-image", "pillow")
BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass
class Row:
    method: str
    name: str
    settings: str
    runs: list[float] = field(default_factory=list)
    rows: Rows = field(default_factory=Rows)
    cost: tuple[int, int, int] | None = None  # Salience's Explanation.cost
    pixel_map: np.ndarray | None = None  # (H, W) on the model grid
    extra: str = ""

    @property
    def seconds(self) -> float | None:
        return median(self.runs) if self.runs else None


# ------------------------------------------------------------------------------------ the limit
def warm_up(net: torch.nn.Module, x: torch.Tensor, target: int, batch: int = 32, calls: int = 2) -> None:
    """A few forward and forward + backward calls of ``batch`` copies of ``x`` before anything is
    timed. A fresh process runs its first large calls much slower (measured: 121 ms per fwd+bwd row at
    batch 8 in a new process, best of 3, against 74 after two calls at batch 32): the allocator and
    the kernels settle during the first large calls, so a limit measured cold is too slow."""
    saved = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        for _ in range(calls):
            with torch.no_grad():
                net(x.expand(batch, -1, -1, -1).contiguous())
            images = x.expand(batch, -1, -1, -1).clone().requires_grad_(True)
            torch.autograd.grad(net(images)[:, target].sum(), images)
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def measure_limit(net: torch.nn.Module, x: torch.Tensor, target: int, batches: tuple[int, ...]) -> Limit:
    """Seconds per call at each batch size of copies of ``x`` (1, C, H, W): forward without gradients,
    and forward + backward (gradient w.r.t. the inputs, parameters frozen) of the target's probability."""
    limit = Limit()
    saved = [(p, p.requires_grad) for p in net.parameters()]

    def forward(batch: int) -> None:
        with torch.no_grad():
            net(x.expand(batch, -1, -1, -1))

    def backward(batch: int) -> None:
        images = x.expand(batch, -1, -1, -1).clone().requires_grad_(True)
        probs = net(images).softmax(-1)[:, target]
        torch.autograd.grad(probs.sum(), images)

    for p, _ in saved:
        p.requires_grad_(False)
    try:
        for table_, call in ((limit.forward, forward), (limit.backward, backward)):
            call(1)  # warm-up
            for batch in batches:
                table_[batch] = _time_call(lambda batch=batch, call=call: call(batch), x.device,
                                           min_seconds=1.0, max_calls=5)
                log(f"  {'fwd+bwd' if table_ is limit.backward else 'fwd'} batch {batch}: "
                    f"{1e3 * table_[batch] / batch:.0f} ms/row")
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return limit


# ------------------------------------------------------------------------------ implementations
def salience_run(clf: Any, encoded: Any, method: str, **params: Any) -> Callable[[], Any]:
    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kept in Explanation.warnings, reported in the notes
            return salience.explain(clf, encoded, method, output="probability", **params)

    return run


def probability(net: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(images: torch.Tensor) -> torch.Tensor:
        return net(images).softmax(-1)

    return forward


def captum_ig(net: torch.nn.Module, x: torch.Tensor, x0: torch.Tensor, target: int, steps: int, batch: int) -> Callable[[], Any]:
    from captum.attr import IntegratedGradients

    def run() -> torch.Tensor:
        ig = IntegratedGradients(probability(net))
        return ig.attribute(x, baselines=x0, target=target, n_steps=steps, method="gausslegendre", internal_batch_size=batch)

    return run


def captum_occlusion(net: torch.nn.Module, x: torch.Tensor, x0: torch.Tensor, target: int, size: int, stride: int,
                     batch: int) -> Callable[[], Any]:
    from captum.attr import Occlusion

    def run() -> torch.Tensor:
        with torch.no_grad():
            return Occlusion(probability(net)).attribute(x, sliding_window_shapes=(3, size, size), strides=(3, stride, stride),
                                                         baselines=x0, target=target, perturbations_per_eval=batch)

    return run


def measure(row: Row, fn: Callable[[], Any], counter: RowCounter) -> Any:
    """One timed run of ``fn`` added to ``row``; its rows counted; returns its result."""
    seconds, result, rows = timed(fn, counter)
    row.runs.append(seconds)
    row.rows = rows
    if isinstance(result, salience.Explanation):
        row.cost = (result.cost.forward_passes, result.cost.backward_passes, result.cost.model_calls)
        row.pixel_map = model_grid_scores(result)
    elif row.method == "occlusion":  # Captum gives each element of a window the window's output drop: one channel
        row.pixel_map = result.detach().double().mean(1)[0].numpy()
    else:
        row.pixel_map = result.detach().double().sum(1)[0].numpy()  # Captum IG: (1, C, H, W) summed over channels
    log(f"    {row.name}: {seconds:.2f} s, {rows.forward} fwd / {rows.backward} bwd rows (load {load_average()})")
    return result


def interleaved(pairs: list[tuple[Row, Callable[[], Any]]], counter: RowCounter, repeats: int,
                timer: Callable[[Row, Callable[[], Any], RowCounter], Any] = measure) -> list[Any]:
    """``repeats`` rounds, each running every implementation once (order alternating per round) and
    timed by ``timer`` (default :func:`measure`); the last result of each."""
    last: list[Any] = [None] * len(pairs)
    for round_ in range(repeats):
        order = range(len(pairs)) if round_ % 2 == 0 else reversed(range(len(pairs)))
        for i in order:
            last[i] = timer(pairs[i][0], pairs[i][1], counter)
    return last


# ---------------------------------------------------------------------------------------- report
def rel_max_diff(ours: np.ndarray | None, peer: np.ndarray | None) -> str:
    if ours is None or peer is None:
        return ""
    return f"{np.abs(ours - peer).max() / max(np.abs(peer).max(), 1e-300):.1e}"


def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from skimage import data

    clf = salience.load_model("zoo:efficientnet-lite0")
    net = clf.model
    counter = RowCounter(net, sequence=False)
    image = data.chelsea()
    encoded = clf.encode(image)
    prediction = clf.predict(encoded)
    target = int(prediction.index)
    xs, x0s = clf.input_and_baseline(encoded, "black")
    height, width = encoded.grid
    x = encoded.pixels[None].to(clf.device, clf.dtype)
    x0 = x0s.T.reshape(1, -1, height, width).contiguous()  # (P, C) -> (1, C, H, W)
    log(f"chelsea {image.shape} -> {tuple(x.shape)}; predicted {prediction.label!r} (p = {float(prediction.probabilities[target]):.3f})")

    log(f"pass limit ... (load {load_average()})")
    limit = measure_limit(net, x, target, args.batches)
    fwd_batch, bwd_batch = limit.best_batch(False), limit.best_batch(True)
    log(f"  {limit.describe()}")
    salience.explain(clf, encoded, "saliency", output="probability")  # warm-up of the adapter's path, not timed

    ig_rows = [Row("IG", "Salience integrated_gradients", f"steps={args.steps} gausslegendre, baseline black, pixel level"),
               Row("IG", "Captum IntegratedGradients", f"n_steps={args.steps} gausslegendre, black baseline, "
                   f"internal_batch_size={bwd_batch}")]
    log("IG (fixed) ...")
    results = interleaved([(ig_rows[0], salience_run(clf, encoded, "integrated_gradients", steps=args.steps)),
                           (ig_rows[1], captum_ig(net, x, x0, target, args.steps, bwd_batch))], counter, args.ig_repeats)
    fixed = results[0]
    adaptive = Row("IG", "Salience integrated_gradients (adaptive)", "default: tolerance 0.01 per feature, Gauss-Kronrod "
                   "7/15 pieces, baseline black, pixel level")
    log("IG (adaptive) ...")
    found = interleaved([(adaptive, salience_run(clf, encoded, "integrated_gradients"))], counter, args.adaptive_repeats)[0]
    gap = float(fixed.output_value) - float(fixed.baseline_value)
    ig_rows[0].extra = f"completeness error {abs(float(fixed.delta)) / abs(gap):.1e} of gap {gap:.3g}"
    bound = found.params.get("error_bound")
    adaptive.extra = (f"{found.params.get('steps_used')} steps; per-feature error bound {bound:.2g}; completeness error "
                      f"{abs(float(found.delta)) / abs(gap):.1e}" if bound is not None else f"{found.params.get('steps_used')} steps")
    adaptive.extra += "".join(f"; warning: {w}" for w in found.warnings)
    ig_rows.append(adaptive)

    occ_rows = [Row("occlusion", "Salience occlusion", f"patch_size={args.patch}, stride={args.stride}, baseline black"),
                Row("occlusion", "Captum Occlusion", f"sliding_window_shapes=(3,{args.patch},{args.patch}), "
                    f"strides=(3,{args.stride},{args.stride}), black baseline, perturbations_per_eval={fwd_batch}")]
    log("occlusion ...")
    interleaved([(occ_rows[0], salience_run(clf, encoded, "occlusion", patch_size=args.patch, stride=args.stride)),
                 (occ_rows[1], captum_occlusion(net, x, x0, target, args.patch, args.stride, fwd_batch))], counter,
                args.occlusion_repeats)

    log(f"pass limit again ... (load {load_average()})")
    again = measure_limit(net, x, target, args.batches)
    spread = (again.per_row(False) / limit.per_row(False), again.per_row(True) / limit.per_row(True))
    first = Limit(dict(limit.forward), dict(limit.backward))
    limit.merge(again)

    head = ["method", "implementation", "runs", "median s", "fwd rows", "bwd rows", "calls", "Salience cost fwd / bwd / calls",
            "limit s", "actual/limit", "Salience/peer", "max abs diff of per-pixel map to the peer (rel. to its max)", "settings",
            "notes"]
    lines: list[list[str]] = []
    summary: list[str] = []
    for group in (ig_rows, occ_rows):
        peer = next(r for r in group if r.name.startswith("Captum"))
        for r in group:
            lim = limit.seconds(r.rows.forward - r.rows.backward, r.rows.backward)
            ratio = r.seconds / lim if r.seconds and lim else math.nan
            versus = f"{r.seconds / peer.seconds:.2f}" if r is not peer and r.seconds and peer.seconds else ""
            cost = " / ".join(map(str, r.cost)) if r.cost else "—"
            lines.append([r.method, r.name, str(len(r.runs)), fmt_s(r.seconds), str(r.rows.forward), str(r.rows.backward),
                          str(r.rows.calls), cost, fmt_s(lim), f"{ratio:.2f}", versus,
                          rel_max_diff(r.pixel_map, peer.pixel_map) if r is not peer else "", r.settings, r.extra])
            summary.append(f"- {r.method}, {r.name}: {fmt_s(r.seconds)} s, {r.rows.forward} fwd / {r.rows.backward} bwd "
                           f"rows, {ratio:.2f}x its pass limit ({'within' if ratio <= 1.2 else 'over'} 1.2x)"
                           + (f", {versus}x Captum's time, map differs by {rel_max_diff(r.pixel_map, peer.pixel_map)} of "
                              "Captum's largest value" if versus else ""))
    limits = []
    for label, measured in (("1st", first), ("2nd", again), ("kept (faster)", limit)):
        for kind, backward in (("forward (no gradients)", False), ("forward + backward", True)):
            times = measured.backward if backward else measured.forward
            given = str(bwd_batch if backward else fwd_batch) if measured is first else ""
            limits.append([f"{kind}, {label}", *[f"{1e3 * times[b] / b:.0f}" for b in args.batches], given,
                           f"{spread[int(backward)]:.2f}" if measured is limit else ""])
    body = ["## Input", "",
            f"- scikit-image `data.chelsea()` ({image.shape[1]} x {image.shape[0]}) through the zoo preprocessing "
            f"(resized to {width} x {height}, scaled to [-1, 1]); target: the predicted class {prediction.label!r} "
            f"(p = {float(prediction.probabilities[target]):.3f}); explained output: its softmax probability",
            "- baseline: black (the preprocessed black image, -1 in every channel) for every implementation",
            "- passes: rows through the network counted by a forward hook (the same counter for every implementation; a "
            "backward row is one whose output took part in a backward pass); Salience's own `Explanation.cost` next to it",
            "- per-pixel maps on the model grid: Salience's per-pixel scores (IG) or each pixel's mean over the patches "
            "covering it (occlusion, as Captum averages overlapping windows); Captum's IG attributions summed over channels, "
            "its occlusion attributions of one channel (Captum gives every element of a window, each channel, the "
            "window's output drop)",
            "", "## Pass limit", "",
            "Milliseconds per row of one call at each batch size (best of several calls; the limit of N rows is the least "
            "time over the batch sizes b of ceil(N / b) calls of b rows). The faster of two measurements (before and after "
            "the runs) is kept; the last column is the best time per row of the second over the first (far from 1.00: the "
            "machine was busy). Captum gets the largest batch within 10 % of the best time per row. A run can come out "
            "under its limit (actual/limit < 1) when the machine was quieter during the run than during both "
            "measurements.", "",
            *table(["call", *[f"batch {b}" for b in args.batches], "batch given to Captum", "2nd / 1st"], limits), "",
            "The batch sizes given to Captum come from the first measurement (taken before the runs).", "",
            "## Methods", "",
            "Medians over runs interleaved with the peer's in this process. actual/limit = median / the limit of the rows "
            "the run made (target: at most 1.2). Salience/peer < 1: Salience faster.", "", *table(head, lines)]
    return summary, body


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Salience vs Captum on EfficientNet-Lite0 (IG, occlusion) and the pass limit.")
    parser.add_argument("--quick", action="store_true", help="smoke test: stride 16, batch sizes up to 8, 1 run each")
    parser.add_argument("--steps", type=int, default=32, help="IG fixed steps (default 32)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--ig-repeats", type=int)
    parser.add_argument("--adaptive-repeats", type=int)
    parser.add_argument("--occlusion-repeats", type=int)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    quick = args.quick
    args.stride = args.stride or (16 if quick else 8)
    args.batches = tuple(args.batches or ((1, 2, 4, 8) if quick else BATCHES))
    args.ig_repeats = args.ig_repeats or (1 if quick else 3)
    args.adaptive_repeats = args.adaptive_repeats or (1 if quick else 2)
    args.occlusion_repeats = args.occlusion_repeats or (1 if quick else 3)
    args.output = args.output or HERE / ("RESULTS-images-quick.md" if quick else "RESULTS-images.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run_and_write("Image benchmark (EfficientNet-Lite0)", "images.py", argv, PACKAGES, args.output, lambda: run(args))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
