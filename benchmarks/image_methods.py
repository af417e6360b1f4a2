"""Image-method benchmark: EfficientNet-Lite0 on the 8 built-in ``imagenet-photos`` at 224 x 224.

For each method: Salience's time for the list of images (one ``explain`` call), the rows the network
ran (a forward hook, the same for every implementation), its pass limit at the best batch size,
and the peer on the same inputs and targets in the same process, with its best batch: Captum
LayerGradCam (+ interpolate), Occlusion, NoiseTunnel(Saliency), GuidedBackprop; pytorch-grad-cam
GradCAM, GradCAMPlusPlus, ScoreCAM and AblationCAM with ``--grad-cam-path``; RISE against its pass
limit; NeuroMask's seconds per iteration against one forward + backward call of its batch. Maps are
compared with the peer's (the benchmark's correctness check). See benchmarks/README.md.

    flock /tmp/salience-cpu.lock env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/image_methods.py \\
        --grad-cam-path /tmp/gcpkgs                # writes benchmarks/RESULTS-image-methods.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/image_methods.py --quick   # smoke test, 2 images

Model and inputs go to ``--device`` (default: cuda when available, else cpu); benchmarks/gpu_run.sh
runs it on a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM and AblationCAM progress bars (read on import)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cases import Limit  # noqa: E402
from common import RowCounter, fmt_s, load_average, log, run_and_write, table, timed  # noqa: E402
from images import Row, captum_occlusion, interleaved, measure_limit, warm_up  # noqa: E402
from torch import nn  # noqa: E402

import salience  # noqa: E402
from salience.core.grid import model_grid_scores  # noqa: E402
from salience.datasets.photos import load_photos  # noqa: E402
from salience.models.passes import frozen_parameters  # noqa: E402

PACKAGES = ("salience", "torch", "captum", "grad-cam", "opencv-python-headless", "numpy", "scikit-image", "scikit-learn",
            "pillow")
BATCHES = (1, 2, 4, 8, 16, 32)
LAYER = "_conv_head"  # EfficientNet-Lite0's last convolution (1280 channels, 7 x 7): every CAM implementation's layer
GROUPS = ("grad_cam", "grad_cam_plus_plus", "guided_backprop", "smoothgrad", "occlusion", "score_cam", "ablation_cam", "rise",
          "neuromask")
REFERENCE = "one forward + backward call of the images (reference)"
GRAD_CAM_GOAL, PASS_GOAL, NEUROMASK_GOAL = 1.1, 1.2, 1.1
Maps = np.ndarray  # (N, H, W) float64, one map per image on the model grid


# ------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    """The photos as Salience's encoded inputs and as one batch (N, C, H, W) for the peers, their black
    baselines and the predicted classes (the targets of every implementation)."""

    ids: list[str]
    encoded: list[Any]
    x: torch.Tensor
    x0: torch.Tensor
    targets: list[int]
    labels: list[str]

    def first(self, n: int) -> Inputs:
        return Inputs(self.ids[:n], self.encoded[:n], self.x[:n], self.x0[:n], self.targets[:n], self.labels[:n])


def load_inputs(clf: Any, count: int) -> Inputs:
    photos = load_photos()[:count]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # camera is greyscale: converted to RGB, noted in the encoded input
        encoded = [clf.encode(str(photo.path)) for photo in photos]
    x = torch.stack([e.pixels for e in encoded]).to(clf.device, clf.dtype)
    height, width = encoded[0].grid
    x0 = torch.stack([clf.input_and_baseline(e, "black")[1].T.reshape(-1, height, width) for e in encoded])
    with torch.no_grad():
        targets = [int(t) for t in clf.model(x).argmax(-1)]
    return Inputs([p.id for p in photos], encoded, x, x0.contiguous(), targets, [clf.labels[t] for t in targets])


# ------------------------------------------------------------------------------ implementations
def salience_list(clf: Any, inputs: Inputs, method: str, **params: Any) -> Callable[[], list[salience.Explanation]]:
    """One ``explain`` call on the list of encoded images (their predictions included in the time)."""
    def run() -> list[salience.Explanation]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kept in Explanation.warnings
            return salience.explain(clf, list(inputs.encoded), method, progress=False, **params)  # type: ignore[return-value]

    return run


def salience_one_by_one(clf: Any, inputs: Inputs, method: str, **params: Any) -> Callable[[], list[salience.Explanation]]:
    """One ``explain`` call per image (no sharing between images), for comparison."""
    def run() -> list[salience.Explanation]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [salience.explain(clf, e, method, **params) for e in inputs.encoded]  # type: ignore[misc]

    return run


def channels(reduce: str, attribution: torch.Tensor) -> Maps:
    """Captum's (N, C, H, W) attributions as one map per image: summed over channels (gradients) or
    their mean (occlusion gives every channel of a window the window's output drop)."""
    values = attribution.detach().double()
    return (values.sum(1) if reduce == "sum" else values.mean(1)).cpu().numpy()


def captum_grad_cam(net: nn.Module, inputs: Inputs) -> Callable[[], Maps]:
    from captum.attr import LayerAttribution, LayerGradCam

    def run() -> Maps:
        layer = LayerGradCam(net, net.get_submodule(LAYER)).attribute(inputs.x, target=inputs.targets, relu_attributions=True)
        maps = LayerAttribution.interpolate(layer, tuple(inputs.x.shape[-2:]), interpolate_mode="bilinear")
        return maps[:, 0].detach().double().cpu().numpy()

    return run


def captum_smoothgrad(net: nn.Module, inputs: Inputs, samples: int, stdev: float, batch: int) -> Callable[[], Maps]:
    from captum.attr import NoiseTunnel, Saliency

    def run() -> Maps:
        tunnel = NoiseTunnel(Saliency(net))
        return channels("sum", tunnel.attribute(inputs.x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=batch,
                                                stdevs=stdev, target=inputs.targets, abs=True))

    return run


class CaptumVisibleReLU6(nn.ReLU):
    """ReLU6 written as an ``nn.ReLU`` subclass: Captum's guided backpropagation hooks ``nn.ReLU``
    modules only, so with this swap it guides EfficientNet-Lite0's units as Salience does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x)


@contextmanager
def relu6_visible_to_captum(net: nn.Module) -> Iterator[None]:
    """Every ``nn.ReLU6`` of ``net`` replaced by :class:`CaptumVisibleReLU6` inside the block."""
    swapped = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
               if type(child) is nn.ReLU6]
    for parent, name, _ in swapped:
        setattr(parent, name, CaptumVisibleReLU6())
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def captum_guided(net: nn.Module, inputs: Inputs, *, swap: bool) -> Callable[[], Maps]:
    from captum.attr import GuidedBackprop

    def run() -> Maps:
        with relu6_visible_to_captum(net) if swap else nullcontext():
            return channels("sum", GuidedBackprop(net).attribute(inputs.x.clone(), target=inputs.targets))

    return run


def captum_occlusion_maps(net: nn.Module, inputs: Inputs, size: int, stride: int, per_eval: int) -> Callable[[], Maps]:
    run = captum_occlusion(net, inputs.x, inputs.x0, inputs.targets, size, stride, per_eval)  # type: ignore[arg-type]
    return lambda: channels("mean", run())


def import_grad_cam(path: str) -> types.ModuleType:
    """pytorch-grad-cam from ``path`` (``pip install --target PATH --no-deps grad-cam==1.5.7 ttach
    opencv-python-headless``). It imports torchvision at module level for helpers the CAM classes do
    not use (image transforms, ``transforms.functional.resize``, ``ops.box_iou``); where torchvision
    is not installed, a stub module stands in for it, whose functions raise if called."""
    if path not in sys.path:
        sys.path.append(path)  # after the virtualenv: its numpy, scipy, matplotlib and tqdm are used
    try:
        importlib.import_module("torchvision")
    except ImportError:
        def unavailable(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("torchvision is a stub in this benchmark")

        stub = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        ops = types.ModuleType("torchvision.ops")
        for name in ("Compose", "Normalize", "ToTensor"):
            setattr(transforms, name, unavailable)
        functional.resize = unavailable  # type: ignore[attr-defined]
        ops.box_iou = unavailable  # type: ignore[attr-defined]
        transforms.functional = functional  # type: ignore[attr-defined]
        stub.transforms, stub.ops = transforms, ops  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": stub, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional, "torchvision.ops": ops})
    return importlib.import_module("pytorch_grad_cam")


def grad_cam_library(module: types.ModuleType, name: str, net: nn.Module, inputs: Inputs, batch: int | None = None) -> Callable[[], Maps]:
    """pytorch-grad-cam's ``name`` on the batch with per-image ClassifierOutputTarget (the logit);
    its maps are ReLU'd, min-max normalised and resized with cv2 (then normalised again)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def run() -> Maps:
        options = {"batch_size": batch} if name == "AblationCAM" and batch else {}
        with getattr(module, name)(model=net, target_layers=[net.get_submodule(LAYER)], **options) as cam:
            if name == "ScoreCAM" and batch:
                cam.batch_size = batch
            maps = cam(input_tensor=inputs.x, targets=[ClassifierOutputTarget(t) for t in inputs.targets])
        net.zero_grad(set_to_none=True)  # its backward fills the parameters' .grad
        return np.asarray(maps, dtype=np.float64)

    return run


def reference_call(net: nn.Module, inputs: Inputs) -> Callable[[], Maps]:
    """One forward + backward call of the N images (the gradient of each image's target logit w.r.t.
    its pixels, parameters frozen): the cost the Grad-CAM and NeuroMask goals are stated against,
    timed in the same rounds as the methods (so a busy moment affects both)."""
    rows = torch.arange(len(inputs.targets))

    def run() -> Maps:
        with frozen_parameters(net):
            images = inputs.x.clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(net(images)[rows, inputs.targets].sum(), images)
        return gradient.detach().double().sum(1).cpu().numpy()

    return run


# ------------------------------------------------------------------------------------ measuring
def timer(row: Row, fn: Callable[[], Any], counter: RowCounter) -> Any:
    """One timed run of ``fn`` added to ``row``, its rows counted; Salience's explanations become maps
    (and their summed ``Explanation.cost``), a peer's maps are kept as returned."""
    seconds, result, rows = timed(fn, counter)
    row.runs.append(seconds)
    row.rows = rows
    if isinstance(result, list) and result and isinstance(result[0], salience.Explanation):
        row.cost = tuple(sum(getattr(e.cost, f) for e in result) for f in ("forward_passes", "backward_passes", "model_calls"))  # type: ignore[assignment]
        row.pixel_map = np.stack([model_grid_scores(e) for e in result])
        layer = result[0].params.get("layer")
        row.extra = f"layer used: {layer}" if layer is not None else row.extra
    else:
        row.pixel_map = np.asarray(result, dtype=np.float64)
    log(f"    {row.name}: {seconds:.2f} s, {rows.forward} fwd / {rows.backward} bwd rows in {rows.calls} calls "
        f"(load {load_average()})")
    return result


def minmax(maps: Maps) -> Maps:
    """Each map shifted and scaled to [0, 1] as pytorch-grad-cam's scale_cam_image (eps 1e-7)."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(-1)[:, None, None]
    return (maps - low) / (flat.max(-1)[:, None, None] - low + 1e-7)


def difference(ours: Maps | None, peer: Maps | None, how: str) -> str:
    """How far a map is from the peer's: ``raw`` max |diff| over the peer's max |value| (each image;
    the worst image); ``minmax`` max |diff| of the min-max normalised maps (in [0, 1]); ``noisy``
    the same as raw plus the lowest Pearson correlation over the images (random noise differs)."""
    if ours is None or peer is None:
        return ""
    if how == "minmax":
        each = np.abs(minmax(ours) - minmax(peer)).reshape(ours.shape[0], -1).max(-1)
        flat = [i for i in range(ours.shape[0]) if np.ptp(ours[i]) == 0 or np.ptp(peer[i]) == 0]
        shown = f"{each.max():.1e}" + (f" (per image {', '.join(f'{v:.1e}' for v in each)})" if len(each) <= 4 else "")
        return shown + " (min-max normalised)" + (f"; all-zero map (ReLU) for image {flat}" if flat else "")
    scale = np.maximum(np.abs(peer).reshape(peer.shape[0], -1).max(-1), 1e-300)
    relative = float((np.abs(ours - peer).reshape(ours.shape[0], -1).max(-1) / scale).max())
    if how == "noisy":
        correlation = min(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ours, peer, strict=True))
        return f"{relative:.1e}; correlation >= {correlation:.3f}"
    return f"{relative:.1e}"


@dataclass
class Group:
    """One method: its rows (Salience's first), its goal, and the comparisons (row, peer row, how)."""

    method: str
    images: int
    rows: list[Row]
    goal: str = "pass"  # "pass": within 1.2x of the rows' limit; "one_pass": 1.1x of one fwd+bwd of N rows; "none"
    verdict: bool = True  # False: the ratio is reported without a goal
    compare: list[tuple[Row, Row, str]] = field(default_factory=list)

    @property
    def reference(self) -> Row | None:
        """The interleaved reference row (one forward + backward call of N rows), if the group has one."""
        return next((r for r in self.rows if r.name == REFERENCE), None)


def ratio(row: Row, limit: Limit) -> float:
    seconds = limit.seconds(row.rows.forward - row.rows.backward, row.rows.backward)
    return row.seconds / seconds if row.seconds and seconds else math.nan


# ----------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    clf = salience.load_model("zoo:efficientnet-lite0", device=args.device)
    net = clf.model
    counter = RowCounter(net, sequence=False)
    inputs = load_inputs(clf, args.images)
    n = len(inputs.ids)
    log(f"{n} photos {inputs.ids}; predicted {inputs.labels} (load {load_average()})")
    grad_cam_lib = import_grad_cam(args.grad_cam_path) if args.grad_cam_path else None

    log("warm-up (2 calls of 32 rows, forward and forward + backward; not timed) ...")
    warm_up(net, inputs.x[:1], inputs.targets[0], max(args.batches))
    log("pass limit ...")
    limit = measure_limit(net, inputs.x[:1], inputs.targets[0], args.batches)
    fwd_batch, bwd_batch = limit.best_batch(False), limit.best_batch(True)
    log(f"  {limit.describe()}")
    salience.explain(clf, inputs.encoded[:2], "grad_cam", progress=False)  # warm-up of the adapter's paths, not timed
    groups: list[Group] = []
    failed: list[str] = []  # key-number lines of methods that raised

    def wanted(key: str) -> bool:
        return not args.only or key in args.only

    def group(method: str, count: int, goal: str, pairs: list[tuple[Row, Callable[[], Any]]], repeats: int,
              compare: list[tuple[int, int, str]]) -> list[Any]:
        log(f"{method} ({count} images, {repeats} runs) ...")
        try:
            results = interleaved(pairs, counter, repeats, timer)
        except Exception as error:  # noqa: BLE001 - one method failing (e.g. on another device) must not lose the others
            failed.append(f"- {method}: **failed** on {args.device}: {type(error).__name__}: {error}"[:400])
            log(failed[-1])
            return []
        rows = [row for row, _ in pairs]
        groups.append(Group(method, count, rows, goal, method != "Grad-CAM++", [(rows[a], rows[b], how) for a, b, how in compare]))
        return results

    # ------------------------------------------------------------ Grad-CAM family (8 images)
    cam = {"layer": LAYER, "output": "logit"}
    pairs = [(Row("Grad-CAM", "Salience grad_cam", f"layer={LAYER}, output logit, {n} images in one explain() call"),
              salience_list(clf, inputs, "grad_cam", **cam)),
             (Row("Grad-CAM", "Salience grad_cam (automatic layer)", "layer chosen by a probe row, output logit"),
              salience_list(clf, inputs, "grad_cam", output="logit")),
             (Row("Grad-CAM", "Salience grad_cam, one image per explain() call", f"layer={LAYER}, output logit"),
              salience_one_by_one(clf, inputs, "grad_cam", **cam)),
             (Row("Grad-CAM", "Captum LayerGradCam + interpolate", f"layer {LAYER}, relu_attributions=True, bilinear, "
                  f"the batch of {n} with per-image targets"), captum_grad_cam(net, inputs)),
             (Row("Grad-CAM", REFERENCE, f"{n} rows in one call, gradient of each target logit w.r.t. the pixels"),
              reference_call(net, inputs))]
    compare = [(0, 3, "raw"), (2, 3, "raw")]  # the automatic layer is another layer: its map is not compared
    if grad_cam_lib is not None:
        pairs.append((Row("Grad-CAM", "pytorch-grad-cam GradCAM", f"target_layers=[{LAYER}], ClassifierOutputTarget, the batch"),
                      grad_cam_library(grad_cam_lib, "GradCAM", net, inputs)))
        compare.append((0, 5, "minmax"))
    if wanted("grad_cam"):
        group("Grad-CAM", n, "one_pass", pairs, args.repeats, compare)
    if grad_cam_lib is not None and wanted("grad_cam_plus_plus"):
        group("Grad-CAM++", n, "one_pass",
              [(Row("Grad-CAM++", "Salience grad_cam_plus_plus", f"layer={LAYER}, output logit"),
                salience_list(clf, inputs, "grad_cam_plus_plus", **cam)),
               (Row("Grad-CAM++", "pytorch-grad-cam GradCAMPlusPlus", f"target_layers=[{LAYER}], the batch"),
                grad_cam_library(grad_cam_lib, "GradCAMPlusPlus", net, inputs)),
               (Row("Grad-CAM++", REFERENCE, f"{n} rows in one call"), reference_call(net, inputs))],
              args.repeats, [(0, 1, "minmax")])

    # ------------------------------------------------------------ guided backpropagation (8 images)
    if wanted("guided_backprop"):
        group("guided backprop", n, "none",
              [(Row("guided backprop", "Salience guided_backprop", "output logit, signed, summed over channels"),
                salience_list(clf, inputs, "guided_backprop", output="logit")),
               (Row("guided backprop", "Captum GuidedBackprop", "the model as it is: Captum hooks nn.ReLU only, so its "
                    "ReLU6 units are not guided (the plain gradient: another quantity)"), captum_guided(net, inputs, swap=False)),
               (Row("guided backprop", "Captum GuidedBackprop, ReLU6 as an nn.ReLU subclass",
                    "ReLU6 modules swapped for an nn.ReLU subclass computing ReLU6, so Captum guides them"),
                captum_guided(net, inputs, swap=True)),
               (Row("guided backprop", REFERENCE, f"{n} rows in one call (plain gradient)"), reference_call(net, inputs))],
              args.repeats, [(0, 1, "raw"), (0, 2, "raw")])

    # ------------------------------------------------------------ SmoothGrad (8 images)
    ranges = (inputs.x.amax((1, 2, 3)) - inputs.x.amin((1, 2, 3))).double()
    stdev = args.noise * float(ranges.mean())
    if wanted("smoothgrad"):
        group("SmoothGrad", n, "pass",
              [(Row("SmoothGrad", "Salience smoothgrad", f"n_samples={args.samples}, noise_level={args.noise} (std = "
                    f"{args.noise} x each image's range: {float(ranges.min()):.3g}..{float(ranges.max()):.3g}), abs, output logit"),
                salience_list(clf, inputs, "smoothgrad", n_samples=args.samples, noise_level=args.noise, output="logit")),
               (Row("SmoothGrad", "Captum NoiseTunnel(Saliency)", f"nt_type smoothgrad, nt_samples={args.samples}, stdevs="
                    f"{stdev:.3g} (one value for the batch), abs, nt_samples_batch_size={max(1, bwd_batch // n)} "
                    f"({max(1, bwd_batch // n) * n} rows per call)"),
                captum_smoothgrad(net, inputs, args.samples, stdev, max(1, bwd_batch // n)))], args.sg_repeats, [(0, 1, "noisy")])

    # ------------------------------------------------------------ occlusion
    occ = inputs.first(args.occlusion_images)
    per_eval = max(1, fwd_batch // len(occ.ids))
    if wanted("occlusion"):
        group("occlusion", len(occ.ids), "pass",
              [(Row("occlusion", "Salience occlusion", f"patch_size={args.patch}, stride={args.stride}, baseline black, "
                    "output probability"),
                salience_list(clf, occ, "occlusion", patch_size=args.patch, stride=args.stride, baseline="black", output="probability")),
               (Row("occlusion", "Captum Occlusion", f"sliding_window_shapes=(3,{args.patch},{args.patch}), strides=(3,{args.stride},"
                    f"{args.stride}), black baseline, probability, perturbations_per_eval={per_eval} ({per_eval * len(occ.ids)} rows "
                    "per call)"), captum_occlusion_maps(net, occ, args.patch, args.stride, per_eval))],
              args.occlusion_repeats, [(0, 1, "raw")])

    # ------------------------------------------------------------ Score-CAM, Ablation-CAM, RISE (fewer images)
    few = inputs.first(args.score_cam_images)
    pairs = [(Row("Score-CAM", "Salience score_cam", f"layer={LAYER} (1,280 channels: 1,280 masked rows per image), "
                  "output logit, baseline mean (x * mask)"), salience_list(clf, few, "score_cam", **cam))]
    if grad_cam_lib is not None:
        pairs.append((Row("Score-CAM", "pytorch-grad-cam ScoreCAM", f"target_layers=[{LAYER}], batch_size={fwd_batch}; its "
                          "masks are upsampled with align_corners=True, Salience's with False"),
                      grad_cam_library(grad_cam_lib, "ScoreCAM", net, few, fwd_batch)))
    if wanted("score_cam"):
        group("Score-CAM", len(few.ids), "pass", pairs, 1, [(0, 1, "minmax")] if len(pairs) > 1 else [])
    if grad_cam_lib is not None and wanted("ablation_cam"):
        one = inputs.first(args.ablation_images)
        group("Ablation-CAM", len(one.ids), "none",
              [(Row("Ablation-CAM", "Salience ablation_cam", f"layer={LAYER}: 1,280 ablated rows per image (channel set to 0), "
                    "output logit"), salience_list(clf, one, "ablation_cam", **cam)),
               (Row("Ablation-CAM", "pytorch-grad-cam AblationCAM", f"target_layers=[{LAYER}], batch_size={fwd_batch}; it sets a "
                    "channel to (layer minimum - 1e7) when the layer's minimum is not 0, as here"),
                grad_cam_library(grad_cam_lib, "AblationCAM", net, one, fwd_batch))], 1, [(0, 1, "minmax")])
    rise = inputs.first(args.rise_images)
    if wanted("rise"):
        group("RISE", len(rise.ids), "pass",
              [(Row("RISE", "Salience rise", f"n_masks={args.rise_masks} (default 4,000), grid_size 7, p_keep 0.5, output probability"),
                salience_list(clf, rise, "rise", n_masks=args.rise_masks))], 1, [])

    # ------------------------------------------------------------ NeuroMask: seconds per iteration
    if wanted("neuromask"):
        pairs = [(Row("NeuroMask", f"Salience neuromask, {k} iterations", f"images_per_batch={n}, preset imagenet"),
                  salience_list(clf, inputs, "neuromask", iterations=k, images_per_batch=n)) for k in args.neuromask_iterations]
        pairs.append((Row("NeuroMask", REFERENCE, f"{n} rows in one call"), reference_call(net, inputs)))
        group("NeuroMask", n, "none", pairs, args.neuromask_repeats, [])

    log(f"pass limit again ... (load {load_average()})")
    again = measure_limit(net, inputs.x[:1], inputs.targets[0], args.batches)
    spread = (again.per_row(False) / limit.per_row(False), again.per_row(True) / limit.per_row(True))
    first = Limit(dict(limit.forward), dict(limit.backward))
    limit.merge(again)
    counter.close()
    summary, body = report(args, inputs, groups, limit, first, again, spread, (fwd_batch, bwd_batch), grad_cam_lib is not None)
    return summary + failed, body


# ---------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace, inputs: Inputs, groups: list[Group], limit: Limit, first: Limit, again: Limit,
           spread: tuple[float, float], given: tuple[int, int], with_grad_cam: bool) -> tuple[list[str], list[str]]:
    n = len(inputs.ids)
    one_pass = limit.seconds(0, n)
    head = ["method", "implementation", "images", "runs", "median s", "fwd rows", "bwd rows", "calls",
            "Salience cost fwd / bwd / calls", "limit s (its rows)", "actual/limit", "Salience/peer",
            "map difference to the peer", "settings"]
    lines: list[list[str]] = []
    summary: list[str] = []
    for g in groups:
        for r in g.rows:
            lim = limit.seconds(r.rows.forward - r.rows.backward, r.rows.backward)
            mine = next(((peer, how) for ours, peer, how in g.compare if ours is r), None)
            versus = f"{r.seconds / mine[0].seconds:.2f}" if mine and r.seconds and mine[0].seconds else ""
            diff = difference(r.pixel_map, mine[0].pixel_map, mine[1]) + f" (to {mine[0].name})" if mine else ""
            cost = " / ".join(map(str, r.cost)) if r.cost else "—"
            lines.append([g.method, r.name, str(g.images), str(len(r.runs)), fmt_s(r.seconds), str(r.rows.forward),
                          str(r.rows.backward), str(r.rows.calls), cost, fmt_s(lim), f"{ratio(r, limit):.2f}", versus,
                          diff, r.settings + (f"; {r.extra}" if r.extra else "")])
        summary += goal_lines(g, limit, one_pass, n)
    limits = []
    for label, measured in (("1st", first), ("2nd", again), ("kept (faster)", limit)):
        for kind, backward in (("forward (no gradients)", False), ("forward + backward", True)):
            times = measured.backward if backward else measured.forward
            limits.append([f"{kind}, {label}", *[per_row_ms(times[b] / b) for b in args.batches],
                           str(given[int(backward)]) if measured is first else "",
                           f"{spread[int(backward)]:.2f}" if measured is limit else ""])
    stubbed = getattr(sys.modules.get("torchvision"), "__file__", None) is None  # import_grad_cam's stub has no file
    torchvision = ("torchvision is not installed here, so a stub module stands in for the helpers it imports at module level "
                   "and the CAM classes never call (image transforms, `transforms.functional.resize`, `ops.box_iou`)"
                   if stubbed else "torchvision is installed here and imported by it")
    grad_cam_note = ("pytorch-grad-cam 1.5.7 from `--grad-cam-path` (installed with `pip install --target DIR --no-deps "
                     f"grad-cam==1.5.7 ttach opencv-python-headless`); {torchvision}" if with_grad_cam else
                     "pytorch-grad-cam: not run (give `--grad-cam-path`)")
    body = ["## Inputs", "",
            f"- the built-in `imagenet-photos` dataset: {n} photos ({', '.join(inputs.ids)}) through the zoo preprocessing "
            "(224 x 224, scaled to [-1, 1]); camera is greyscale, converted to RGB",
            f"- targets: each photo's predicted class ({', '.join(inputs.labels)}), given to every peer as a per-image target "
            "list; Salience's time includes its own prediction of each image (one forward row per image), the peers' does not",
            "- Score-CAM, Ablation-CAM, RISE and occlusion run on the first photos only (the images column), to keep the run "
            "within about 20 minutes: they cost about a thousand rows per image",
            "- passes: rows through the network counted by a forward hook on it (the same counter for every implementation; a "
            "backward row is one whose output took part in a backward pass, also when that pass stops at a layer); "
            "Salience's own `Explanation.cost` summed over the images next to it",
            "- maps compared on the model grid, one per image, the worst image reported: Salience's per-pixel scores (CAM, "
            "gradients) or each pixel's mean over the patches covering it (occlusion); Captum's attributions summed over "
            "channels (gradients), their channel mean (occlusion), LayerGradCam interpolated bilinearly; pytorch-grad-cam's "
            "maps are ReLU'd, min-max normalised at the layer, resized with cv2 and normalised again, so both sides are "
            "min-max normalised per image (eps 1e-7, as pytorch-grad-cam) before the difference is taken",
            f"- {grad_cam_note}",
            "", "## Pass limit", "",
            "Milliseconds per row of one call at each batch size (best of several calls on copies of the first photo; the "
            "limit of N rows is the least time over the batch sizes b of ceil(N / b) calls of b rows). The faster of two "
            "measurements (before and after the runs) is kept; the last column is the best time per row of the second over "
            "the first (far from 1.00: the machine was busy). Peers get the largest batch within 10 % of the best time per "
            "row (the 1st measurement).", "",
            *table(["call", *[f"batch {b}" for b in args.batches], "batch given to peers", "2nd / 1st"], limits), "",
            "## Methods", "",
            "Medians over runs interleaved with the peers' in this process. limit s = the pass limit of the rows the run made; "
            "actual/limit = median / that limit. Salience/peer < 1: Salience faster. NeuroMask is timed at two iteration "
            "counts; the difference gives the seconds per iteration (see the key numbers).", "", *table(head, lines)]
    return summary, body


def per_row_ms(seconds: float) -> str:
    """Milliseconds per row: whole numbers from 10 ms (a CPU's), 3 significant digits below (a GPU's)."""
    return f"{1e3 * seconds:.0f}" if seconds >= 0.01 else f"{1e3 * seconds:.3g}"


def goal_lines(g: Group, limit: Limit, one_pass: float, n: int) -> list[str]:
    """The key-number lines of one method: its goal met or not, with the ratio, and its peers. The
    Grad-CAM and NeuroMask goals are judged against the reference call timed in the same rounds
    (the ratio to the measured limit is given too)."""
    lines = []
    ours, reference = g.rows[0], g.reference
    if g.method == "NeuroMask" and reference is not None:
        low, high = g.rows[0], g.rows[1]
        iterations = [int(r.name.split(", ")[1].split()[0]) for r in (low, high)]
        per_iteration = (high.seconds - low.seconds) / (iterations[1] - iterations[0])  # type: ignore[operator]
        value = per_iteration / reference.seconds  # type: ignore[operator]
        verdict = "met" if value <= NEUROMASK_GOAL else "not met"
        call = limit.backward.get(n, limit.seconds(0, n))
        return [f"- NeuroMask ({n} images per batch): {per_iteration:.3f} s per iteration ((median time at {iterations[1]} - at "
                f"{iterations[0]} iterations) / {iterations[1] - iterations[0]}) against {reference.seconds:.3f} s for the reference "
                f"forward + backward call of {n} rows: {value:.2f}x, goal <= {NEUROMASK_GOAL}x **{verdict}** "
                f"({per_iteration / call:.2f}x the measured limit of one call of {n} rows, {call:.3f} s)"]
    if g.goal == "one_pass" and reference is not None:
        value = ours.seconds / reference.seconds  # type: ignore[operator]
        verdict = (f"goal <= {GRAD_CAM_GOAL}x **{'met' if value <= GRAD_CAM_GOAL else 'not met'}**" if g.verdict
                   else "no goal of its own (Grad-CAM's cost)")
        lines.append(f"- {g.method}, {ours.name} ({n} images, its predictions included): {fmt_s(ours.seconds)} s = {value:.2f}x "
                     f"the reference forward + backward call of {n} rows ({fmt_s(reference.seconds)} s, same rounds); {verdict} "
                     f"({ours.seconds / one_pass:.2f}x the measured limit of {n} fwd+bwd rows, {fmt_s(one_pass)} s; "  # type: ignore[operator]
                     f"{ratio(ours, limit):.2f}x that of the rows it ran: {ours.rows.forward} fwd / {ours.rows.backward} bwd)")
    elif g.goal == "pass":
        value = ratio(ours, limit)
        verdict = "met" if value <= PASS_GOAL else "not met"
        lines.append(f"- {g.method}, {ours.name} ({g.images} images): {fmt_s(ours.seconds)} s, {ours.rows.forward} fwd / "
                     f"{ours.rows.backward} bwd rows, {value:.2f}x its pass limit; goal <= {PASS_GOAL}x **{verdict}**")
    else:
        versus = f", {ours.seconds / reference.seconds:.2f}x the reference call of {n} rows" if reference else ""  # type: ignore[operator]
        lines.append(f"- {g.method}, {ours.name} ({g.images} images): {fmt_s(ours.seconds)} s, {ours.rows.forward} fwd / "
                     f"{ours.rows.backward} bwd rows, {ratio(ours, limit):.2f}x its pass limit{versus} (no goal)")
    for mine, peer, how in g.compare:
        if mine is ours:
            lines.append(f"  - {mine.name} vs {peer.name}: {mine.seconds / peer.seconds:.2f}x its time (the peer: "  # type: ignore[operator]
                         f"{ratio(peer, limit):.2f}x its limit); map difference {difference(mine.pixel_map, peer.pixel_map, how)}")
    for r in g.rows[1:]:
        if reference is not None and r.name.startswith("Salience"):
            lines.append(f"  - {r.name}: {fmt_s(r.seconds)} s = {r.seconds / reference.seconds:.2f}x the reference call")  # type: ignore[operator]
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Image methods on EfficientNet-Lite0 (8 photos) against Captum and "
                                     "pytorch-grad-cam, and against the pass limit.")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 images, small settings, 1 run each")
    parser.add_argument("--grad-cam-path", help="folder holding pytorch-grad-cam 1.5.7 (pip install --target)")
    parser.add_argument("--images", type=int, help="photos for the cheap methods (default 8)")
    parser.add_argument("--occlusion-images", type=int)
    parser.add_argument("--score-cam-images", type=int)
    parser.add_argument("--ablation-images", type=int)
    parser.add_argument("--rise-images", type=int)
    parser.add_argument("--rise-masks", type=int)
    parser.add_argument("--samples", type=int, default=20, help="SmoothGrad samples (default 20)")
    parser.add_argument("--noise", type=float, default=0.1, help="SmoothGrad noise level (default 0.1)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--neuromask-iterations", type=int, nargs=2)
    parser.add_argument("--neuromask-repeats", type=int)
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--sg-repeats", type=int)
    parser.add_argument("--occlusion-repeats", type=int)
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run only these methods")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--device", default="auto", help="torch device of the model and the inputs (default auto: "
                        "cuda when torch.cuda.is_available(), else cpu)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    args.images = args.images or (2 if quick else 8)
    args.occlusion_images = args.occlusion_images or (1 if quick else 8)
    args.score_cam_images = args.score_cam_images or (1 if quick else 2)
    args.ablation_images = args.ablation_images or 1
    args.rise_images = args.rise_images or (1 if quick else 4)
    args.rise_masks = args.rise_masks or (100 if quick else 1000)
    args.stride = args.stride or (16 if quick else 8)
    args.neuromask_iterations = tuple(args.neuromask_iterations or ((2, 6) if quick else (5, 25)))
    args.batches = tuple(args.batches or ((1, 2, 4, 8) if quick else BATCHES))
    args.repeats = args.repeats or (1 if quick else 5)
    args.sg_repeats = args.sg_repeats or (1 if quick else 3)
    args.occlusion_repeats = args.occlusion_repeats or 1
    args.neuromask_repeats = args.neuromask_repeats or (1 if quick else 2)
    args.output = args.output or HERE / ("RESULTS-image-methods-quick.md" if quick else "RESULTS-image-methods.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run_and_write("Image methods on EfficientNet-Lite0 (8 photos)", "image_methods.py", argv, PACKAGES, args.output,
                  lambda: run(args))


if __name__ == "__main__":
    main()
