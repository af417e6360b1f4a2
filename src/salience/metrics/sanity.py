"""Sanity checks: does the explanation depend on the model's weights, and is it stable under small
changes of the input?

Both metrics re-run the explanation's own method (same name, parameters, target class, output,
level and seed, recovered from the Explanation) and therefore cost what that method costs, times
the number of re-runs; the passes are added to ``model.counter`` so ``evaluate_metric`` reports them.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from salience.api import SalienceWarning, explain
from salience.core.explanation import Explanation
from salience.core.grid import model_grid_scores
from salience.core.registry import get_method
from salience.errors import ParameterError
from salience.metrics.base import MetricError, MetricResult, register_metric
from salience.metrics.faithfulness import describe, encode_checked, top_k
from salience.metrics.image_input import grid_map, image_encoded
from salience.models.base import Encoded

FLAG_CORRELATION = 0.5


# ------------------------------------------------------------------ re-running the method
def method_params(explanation: Explanation) -> dict[str, Any]:
    """The method parameters recorded in the explanation (details such as ``steps_used`` dropped)."""
    known = get_method(explanation.method).parameters()
    return {k: v for k, v in explanation.params.items() if k in known}


def feature_options(model: Any, explanation: Explanation) -> dict[str, Any]:
    """The adapter's feature options recorded in the explanation (an image's ``patch_size``, SLIC
    settings; a text's ``spans``), so that a re-run scores the same kind of features."""
    return {k: explanation.params[k] for k in getattr(model, "feature_options", ()) if k in explanation.params}


def _reexplain(model: Any, encoded: Encoded, explanation: Explanation, batch_size: int | None,
               seed: int | None = None) -> np.ndarray:
    """Scores of the explanation's method, parameters, target, output, level and seed (or ``seed``)
    on ``encoded``."""
    return _reexplained(model, encoded, explanation, batch_size, seed).scores


def _explanation_seed(explanation: Explanation) -> int:
    return int(explanation.params.get("seed", 0))


def _reexplained(model: Any, encoded: Encoded, explanation: Explanation, batch_size: int | None,
                 seed: int | None = None) -> Explanation:
    """The explanation's method re-run on ``encoded`` with its parameters, feature options, target
    class, output, level and seed (``seed`` replaces the explanation's when given)."""
    with warnings.catch_warnings():
        # a randomised model or a masked input can make e.g. IG's completeness delta large; the
        # metric's value is what matters here, not the re-run's own warnings
        warnings.simplefilter("ignore", SalienceWarning)
        result = explain(model, encoded, explanation.method, target=explanation.target.index,
                         output=explanation.target.output, level=explanation.level, batch_size=batch_size,
                         seed=_explanation_seed(explanation) if seed is None else seed, progress=False,
                         params={**method_params(explanation), **feature_options(model, explanation)})
    assert isinstance(result, Explanation)
    return result


def _check_scores(explanation: Explanation, metric: str) -> np.ndarray:
    scores = np.asarray(explanation.scores, dtype=np.float64)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise MetricError(f"{metric}: the explanation of {describe(explanation)} has no (finite) scores")
    return scores


# ------------------------------------------------------------------ rank correlation
def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their average rank (scipy.stats.rankdata's default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.shape[0]]
    ranks = np.empty(values.shape[0], dtype=np.float64)
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN when either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denominator) if denominator > 0 else float("nan")


# ------------------------------------------------------------------ cascading randomisation
def cascade_steps(model: nn.Module, *, embeddings: bool = False) -> list[tuple[str, list[nn.Module]]]:
    """Groups of modules (those holding parameters directly) in the order the cascade re-initialises
    them: the head (every module registered after the layer list: pooler, classifier), then the
    layers of the largest ``nn.ModuleList`` (by parameter count) from last to first, then, with
    ``embeddings``, everything registered before the list. A model without a layer list (a plain
    ``nn.Sequential`` CNN) cascades module by module: each module holding parameters is one step,
    from the last registered (the classifier) to the first (``embeddings`` has no effect)."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        owners = [(name, module) for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
        if not owners:
            raise MetricError(f"model_randomisation: {type(model).__name__} has no parameters to randomise")
        return [(f"{name or 'model'} ({type(module).__name__})", [module]) for name, module in reversed(owners)]
    list_name, layers = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    head: list[nn.Module] = []
    below: list[nn.Module] = []
    per_layer: list[list[nn.Module]] = [[] for _ in layers]
    seen_list = False
    for name, module in model.named_modules():
        if name == list_name:
            seen_list = True
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if name.startswith(list_name + "."):
            per_layer[int(name[len(list_name) + 1:].split(".")[0])].append(module)
        elif seen_list or list_name.startswith(name + ".") or name == "":
            head.append(module)  # after the layers, or an ancestor of the list holding its own parameters
        else:
            below.append(module)
    steps = [("head", head)] if head else []
    steps += [(f"layer {i}", per_layer[i]) for i in reversed(range(len(layers))) if per_layer[i]]
    if embeddings and below:
        steps.append(("embeddings", below))
    return steps


INITS = ("auto", "reset")


def _reinitialise(root: nn.Module, modules: list[nn.Module], seed: int, *, init_mode: str = "auto") -> None:
    """Re-initialise the direct parameters of ``modules`` with the model's own ``_init_weights``
    (Hugging Face) or, where there is none or it left a module unchanged, normal(0, 0.02) weights
    and zero biases. ``init_mode="reset"`` first calls each module's own ``reset_parameters()``
    (PyTorch's default initialiser: Adebayo et al. re-initialise a layer with its initialiser;
    Quantus permutes the trained weights instead; a batch-norm layer also forgets its running
    statistics), the rest as above for modules without one. Seeded; the global torch RNG is
    restored afterwards."""
    init = getattr(root, "_init_weights", None)
    devices = sorted({p.device.index or 0 for m in modules for p in m.parameters(recurse=False) if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for module in modules:
            parameters = list(module.parameters(recurse=False))
            before = [p.detach().clone() for p in parameters]
            for parameter in parameters:  # transformers skips tensors flagged as already initialised
                if hasattr(parameter, "_is_hf_initialized"):
                    delattr(parameter, "_is_hf_initialized")
            if init_mode == "reset" and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()  # its defaults, even where they equal the current values
                continue
            if callable(init):
                init(module)
            if all(torch.equal(old, new) for old, new in zip(before, parameters, strict=True)):
                for name, parameter in module.named_parameters(recurse=False):
                    if "bias" in name:
                        parameter.zero_()
                    else:
                        parameter.normal_(0.0, 0.02)


def _network(adapter: Any) -> nn.Module:
    """The torch model an adapter runs: its ``model``, or that of an adapter it wraps (a zero-shot
    classifier's NLI model)."""
    for holder in (adapter, *vars(adapter).values()):
        network = getattr(holder, "model", None)
        if isinstance(network, nn.Module):
            return network
    raise MetricError(f"model_randomisation: cannot find the torch model inside {type(adapter).__name__}")


def _copy_with_own_network(adapter: Any) -> tuple[Any, nn.Module]:
    """A deep copy of ``adapter`` (and of any adapter it wraps) with its own copy of the torch model;
    tokenizers and pass counters stay shared, so the copy's passes count on the user's adapter."""
    shared = {id(value): value for holder in (adapter, *vars(adapter).values())
              for name, value in getattr(holder, "__dict__", {}).items() if name in ("tokenizer", "counter")}
    copied = copy.deepcopy(adapter, shared)
    return copied, _network(copied)


@register_metric("model_randomisation", higher_is_better=False,
                 summary="rank correlation with the explanation of a cascadingly randomised model (Adebayo et al.)")
def model_randomisation(model: Any, explanation: Explanation, *, seed: int = 0, embeddings: bool = True,
                        every_step: bool = True, init: str = "auto", method_seed: int | None = None,
                        batch_size: int | None = None) -> MetricResult:
    """Cascading model-parameter randomisation (Adebayo et al., 2018, "Sanity checks for saliency maps").

    On a deep copy of the adapter's torch model (the user's model is never modified; a zero-shot
    classifier's NLI model is copied with it), parameters are
    re-initialised from the top down: the classification head first (everything registered after
    the encoder's layer list, the largest ``nn.ModuleList``), then the encoder layers from last to
    first and the embeddings last (Adebayo et al.'s full cascade; ``embeddings=False`` stops
    before them); a model without a layer list (a plain ``nn.Sequential`` CNN) module by module,
    from the classifier down to the first convolution (:func:`cascade_steps`). After each step the
    explanation's method is re-run with its parameters, feature options, target class, output,
    level, and the Spearman rank correlation with the original scores (per feature: pixels,
    patches, words) is recorded (0 when the re-run's scores are constant). The re-runs use
    ``method_seed``, by default the explanation's seed + 1: with the same seed a seeded stochastic
    method (RISE's masks, SmoothGrad's noise, LIME's samples) would draw the same random part and
    correlate with itself whatever the weights (on EfficientNet-Lite0, RISE re-run with its own seed
    kept 0.48 on a randomised model). A deterministic method is unaffected.

    value: the correlation after the last step. Lower is better. ``details["flagged"]`` is True when
    its absolute value is >= 0.5: the explanation barely changes when the model's weights are
    destroyed, so it does not reflect what the model learnt (e.g. it mostly mirrors the input).
    Cost: (number of steps) x the method's passes, plus the memory of one copy of the model.
    ``every_step=False`` re-runs the method only after the last step: the same value (each step's
    re-initialisation is seeded on its own and does not depend on the re-runs) for one method
    cost; ``details["correlations"]`` then holds that one correlation.
    ``init="reset"`` re-initialises each module with its own ``reset_parameters()`` where it has
    one (PyTorch's default initialiser) instead of normal(0, 0.02): on a deep CNN with batch
    norm (EfficientNet-Lite0) the small normal weights, with batch-norm scales of about 0.02, shrink
    the signal below float32's range, so the fully randomised model's output no longer depends on
    the input, gradient maps are exactly constant and the correlation is reported as 0 without
    testing anything.
    """
    if init not in INITS:
        raise ParameterError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    scores = _check_scores(explanation, "model_randomisation")
    if np.ptp(scores) == 0:
        raise MetricError(f"model_randomisation: the explanation of {describe(explanation)} has constant scores")
    encoded = encode_checked(model, explanation)
    rerun_seed = _explanation_seed(explanation) + 1 if method_seed is None else method_seed
    randomised, clone = _copy_with_own_network(model)
    steps = cascade_steps(clone, embeddings=embeddings)
    correlations: list[float] = []
    constant = 0  # re-runs whose scores were constant (correlation undefined, reported as 0)
    for number, (_, modules) in enumerate(steps):
        _reinitialise(clone, modules, seed + number, init_mode=init)
        if not every_step and number < len(steps) - 1:
            continue
        new = _reexplain(randomised, encoded, explanation, batch_size, rerun_seed)
        rho = spearman(scores, new)
        constant += int(np.isnan(rho))
        correlations.append(0.0 if np.isnan(rho) else rho)
    final = correlations[-1]
    return MetricResult("model_randomisation", final, False,
                        {"steps": [name for name, _ in steps], "correlations": correlations,
                         "flagged": bool(abs(final) >= FLAG_CORRELATION), "flag_threshold": FLAG_CORRELATION,
                         "seed": seed, "method_seed": rerun_seed, "every_step": every_step, "init": init,
                         "constant_reruns": constant})


# ------------------------------------------------------------------ max-sensitivity
@register_metric("max_sensitivity", higher_is_better=False,
                 summary="largest relative change of the scores under small input changes (Yeh et al.)")
def max_sensitivity(model: Any, explanation: Explanation, *, n_perturbations: int = 10, fraction: float | None = None,
                    baseline: str | None = None, radius: float | None = None, seed: int = 0,
                    batch_size: int | None = None) -> MetricResult:
    """Max-sensitivity (Yeh et al., 2019, "On the (in)fidelity and sensitivity of explanations"):
    ``n_perturbations`` times the input is changed a little, the method is re-run on it with the same
    parameters, feature options, target class, output, level and seed, and value = max over
    perturbations of ``||e' - e||_2 / ||e||_2``. Lower is better. Seeded by ``seed``.
    Cost: ``n_perturbations`` x the method's passes.

    Text (discrete perturbations): the tokens of a random ``fraction`` (default 0.1) of the features
    (``max(1, round(fraction * F))``, chosen without replacement) are replaced by the ``baseline``
    token (default ``mask``: [MASK]); e is the feature scores.

    Images (as Quantus's MaxSensitivity, with 10 samples instead of its 200): uniform noise in
    ``[-radius, radius]`` (default 0.2, Quantus's, in the units of the NORMALISED model input: 10 %
    of the black-to-white range of a [-1, 1] input) is added to every value of every channel, not
    clipped; e is the map over the model grid (per-pixel scores, or each feature's score on its
    pixels), so maps over superpixels recomputed on the noisy image stay comparable.
    ``details["prediction_changed"]`` counts the samples whose predicted class changed (Quantus can
    drop those; here they count).
    """
    if n_perturbations < 1:
        raise ParameterError(f"n_perturbations must be at least 1, got {n_perturbations}")
    if explanation.kind == "image":
        if fraction is not None or baseline is not None:
            raise ParameterError("max_sensitivity: fraction and baseline are for text; images take radius")
        return _image_sensitivity(model, explanation, n_perturbations, 0.2 if radius is None else radius, seed,
                                  batch_size)
    if radius is not None:
        raise ParameterError("max_sensitivity: radius is for images; text takes fraction and baseline")
    fraction = 0.1 if fraction is None else fraction
    baseline = "mask" if baseline is None else baseline
    scores = _check_scores(explanation, "max_sensitivity")
    norm = float(np.linalg.norm(scores))
    if norm == 0:
        raise MetricError(f"max_sensitivity: the explanation of {describe(explanation)} is all zeros")
    encoded = encode_checked(model, explanation)
    n = len(explanation.features)
    m = top_k(fraction, n)
    if not callable(getattr(model, "baseline_token_id", None)):  # e.g. a zero-shot classifier's text + hypotheses
        raise MetricError(f"max_sensitivity: {type(model).__name__} cannot replace tokens of an encoded input "
                          "(it has no baseline_token_id)")
    replacement = model.baseline_token_id(baseline)
    rng = np.random.default_rng(seed)
    ratios: list[float] = []
    chosen_sets: list[list[int]] = []
    for _ in range(n_perturbations):
        chosen = sorted(int(i) for i in rng.choice(n, size=m, replace=False))
        tokens = [t for i in chosen for t in explanation.features[i].tokens]
        ids = encoded.input_ids.clone()
        ids[tokens] = replacement
        perturbed = dataclasses.replace(encoded, input_ids=ids)
        new = _reexplain(model, perturbed, explanation, batch_size)
        ratios.append(float(np.linalg.norm(new - scores)) / norm)
        chosen_sets.append(chosen)
    return MetricResult("max_sensitivity", max(ratios), False,
                        {"ratios": ratios, "masked": chosen_sets, "mean": float(np.mean(ratios)), "seed": seed})


def _image_sensitivity(model: Any, explanation: Explanation, n_perturbations: int, radius: float, seed: int,
                       batch_size: int | None) -> MetricResult:
    """Max-sensitivity of an image explanation under uniform noise of ``radius`` (see max_sensitivity)."""
    if not radius > 0 or not np.isfinite(radius):
        raise ParameterError(f"radius must be a finite number > 0, got {radius}")
    encoded = image_encoded(model, explanation, "max_sensitivity")
    reference = grid_map(explanation, "max_sensitivity")
    norm = float(np.linalg.norm(reference))
    if norm == 0:
        raise MetricError(f"max_sensitivity: the explanation of {describe(explanation)} is all zeros")
    generator = torch.Generator().manual_seed(seed)
    ratios: list[float] = []
    changed = 0
    for _ in range(n_perturbations):
        pixels = encoded.pixels.detach().double().cpu()
        noise = (torch.rand(pixels.shape, generator=generator, dtype=torch.float64) * 2 - 1) * radius
        perturbed = dataclasses.replace(encoded, pixels=(pixels + noise).to(encoded.pixels))
        new = _reexplained(model, perturbed, explanation, batch_size)
        ratios.append(float(np.linalg.norm(model_grid_scores(new) - reference)) / norm)
        if explanation.prediction is not None and new.prediction is not None:
            changed += int(new.prediction.index != explanation.prediction.index)
    return MetricResult("max_sensitivity", max(ratios), False,
                        {"ratios": ratios, "mean": float(np.mean(ratios)), "radius": radius, "seed": seed,
                         "prediction_changed": changed})
