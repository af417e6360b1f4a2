"""IG on a causal LM at equal per-feature error: Salience against Inseq on SmolLM2-135M.

The generation benchmark (benchmarks/lm.py) compares IG at equal *steps*; this script compares it
at equal *accuracy*. Input: the prompt of lm.py (test-split movie sentences cut to
``--prompt-tokens``, default 32) and its greedy continuation of ``--new-tokens`` (default 16);
features: the prompt's and the continuation's tokens; explained output: each generated token's
probability (Inseq's default attributed function), baseline: the unk token's embedding at every
position (Inseq's default; Salience's ``baseline="unk"``).

Reference (computed by neither library): for every target the straight-path integral from the
baseline embeddings to the input embeddings by composite Gauss-Legendre, ``--ref-panels`` equal
panels of 8 nodes, the model in its own dtype (float32) and the weighted sums in float64. Each
target is its own scalar (one backward per target per batch of path points), independent of
Salience's path code; the baseline embeddings come from Salience's adapter (the definition of the
baseline, not of the integral). Its nodes coincide with neither side's rule. With
``--ref-tolerance`` the reference is adaptive instead (benchmarks/adaptive_reference.py: each row
halves its own panels where a panel's 8-node value and its two halves' disagree, until its summed
estimates and its completeness error are within that fraction of its largest |value|): a sharp
feature of the integrand (SmolLM2's attention sink) costs refinement where it is, not everywhere.

Error of a run: for each target row t, max over its features f of |s_tf - ref_tf| divided by
max_f |ref_tf| (features after the target's position are not defined for it and left out); the
run's error is the worst row (max over t). The mean over rows is reported beside it. A setting
passes when its error is at most ``--target`` (default 0.01, 1 % of the row's largest |score|).

Settings searched (each error from one run; errors are deterministic):

- Salience, fixed Gauss-Legendre ``steps`` on a ladder (the same rule as Inseq's n_steps, so the
  same errors up to float32 rounding): up the ladder 16, 32, 64, ... (``--ladder-factor`` 2; at
  sqrt(2): 16, 23, 32, 45, ...) from the smallest, the first
  value that passes (the error of a fixed rule is not monotone in the steps here, so no bisection;
  every value tried is reported);
- Salience, adaptive (``steps=None``): ``tolerance`` from the tightest of ``--tolerances`` up,
  the loosest that still passes (looser tolerances spend fewer gradients);
- Inseq ``integrated_gradients`` (Captum's IG, Gauss-Legendre), ``n_steps`` on the same ladder,
  from Salience's fixed-steps answer up until it passes. The smaller values are not run: there
  Salience's fixed steps, the same rule on the same path, failed (the two agree at every value run
  on both; the table shows it).

The passing settings are then timed ``--repeats`` times each (median; the first, error-measuring
run is one of them), interleaved so that a busy moment on the shared machine falls on all. When no
Inseq setting tried passes, the key numbers give a lower bound instead of a ratio: its cheapest
passing n_steps on the ladder is larger than every one tried, so it takes longer than the largest tried
(:func:`lower_bounds`; smaller ladder values that neither Inseq nor Salience's fixed steps ran are
named, as the bound assumes they fail).

    OMP_NUM_THREADS=1 python benchmarks/lm_ig_error.py            # writes benchmarks/RESULTS-lm-ig-error.md
    OMP_NUM_THREADS=1 python benchmarks/lm_ig_error.py --quick    # 8-token prompt, 2 new tokens (smoke test)
    OMP_NUM_THREADS=1 python benchmarks/lm_ig_error.py --new-tokens 4 --zoom 3 --output /tmp/zoom.md   # one target's integrand
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from adaptive_reference import integrate  # noqa: E402
from common import (  # noqa: E402
    RowCounter,
    Rows,
    command_line,
    fmt_s,
    header,
    load_average,
    log,
    median,
    run_and_write,
    table,
    timed,
)
from lm import build_input, inseq_run  # noqa: E402

import salience  # noqa: E402

PACKAGES = ("salience", "torch", "transformers", "captum", "inseq", "numpy")


def ladder_of(factor: float, largest: int) -> list[int]:
    """Step counts 16, 16 f, 16 f^2, ... (rounded) up to ``largest``: the values both fixed-step
    searches (Salience's and Inseq's) climb; factor 2 gives 16, 32, ..., sqrt(2) halves the gaps."""
    values: list[int] = []
    while (steps := round(16 * factor ** len(values))) <= largest:
        values.append(steps)
    return values


@dataclass
class Trial:
    """One setting of one implementation: its scores, error against the reference and timed runs."""

    library: str  # "Salience" or "Inseq"
    kind: str  # "fixed" or "adaptive"
    setting: float  # steps (fixed) or tolerance (adaptive)
    run: Callable[[], tuple[np.ndarray, int]] = field(repr=False)
    scores: np.ndarray | None = None
    steps: int = 0  # gradients per target actually used (adaptive: the mean over targets of their own counts)
    row_errors: list[float] = field(default_factory=list)
    completeness: float = float("nan")  # worst row: |sum of scores - (F(x) - F(baseline))| / |F(x) - F(baseline)|
    error: float = float("nan")  # worst row
    mean_error: float = float("nan")
    rows: Rows = field(default_factory=Rows)
    runs: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.library == "Inseq":
            return f"Inseq integrated_gradients n_steps={int(self.setting)}"
        if self.kind == "fixed":
            return f"Salience ig steps={int(self.setting)} (gausslegendre)"
        return f"Salience ig adaptive tolerance={self.setting:g}"

    @property
    def seconds(self) -> float | None:
        return median(self.runs) if self.runs else None


# ------------------------------------------------------------------------------------ reference
def gauss_legendre_panels(panels: int, nodes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in [0, 1] and weights (summing to 1) of composite Gauss-Legendre: ``panels`` equal panels."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    alphas = np.concatenate([(p + (x + 1) / 2) / panels for p in range(panels)])
    weights = np.concatenate([w / 2 / panels for _ in range(panels)])
    return alphas, weights


def integrand(lm: salience.CausalLM, encoded: Any, chunk: int) -> Callable[[np.ndarray, list[int]], np.ndarray]:
    """``f(alphas, targets)``: dF_t/dx at x' + a (x - x') dotted with (x - x') per token, float64,
    (len(alphas), len(targets), L); ``chunk`` path points per forward pass, one backward per target
    (each target its own scalar: the generated token's probability)."""
    start = int(encoded.extras["prompt_length"])
    ids = encoded.input_ids
    x, x0 = lm.input_and_baseline(encoded, "unk")
    direction = (x - x0).detach()
    positions = torch.arange(start - 1, len(ids) - 1, device=lm.device)  # logits at p predict token p + 1
    wanted = ids[start:].to(lm.device)

    def f(alphas: np.ndarray, targets: list[int]) -> np.ndarray:
        out = np.empty((len(alphas), len(targets), len(ids)))
        for first in range(0, len(alphas), chunk):
            a = torch.as_tensor(alphas[first:first + chunk], dtype=x.dtype, device=x.device)
            points = (x0[None] + a[:, None, None] * direction[None]).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=points, use_cache=False).logits[:, positions[targets]]  # (n, targets, V)
            chosen = wanted[targets][None, :, None].expand(len(a), -1, 1)
            probs = torch.softmax(logits.float(), -1).gather(-1, chosen)[..., 0]
            for j in range(len(targets)):
                (grad,) = torch.autograd.grad(probs[:, j].sum(), points, retain_graph=j < len(targets) - 1)
                out[first:first + len(a), j] = (grad.double() * direction.double()[None]).sum(-1).cpu().numpy()
        return out

    return f


def reference(lm: salience.CausalLM, encoded: Any, panels: int, cache: Path | None, batch: int = 1,
              tolerance: float = 0.0, gap: np.ndarray | None = None, max_points: int = 1 << 17,
              completeness_floor: float = 1e-4) -> tuple[np.ndarray, float, str]:
    """IG matrix (T, L) of each generated token's probability, float64 sums; its seconds and a line
    describing it. ``tolerance`` 0: composite Gauss-Legendre, ``panels`` equal panels of 8 nodes
    (``batch`` panels per forward pass); else :func:`adaptive_reference.integrate` from ``panels``
    panels, to that tolerance, checked against ``gap`` (F(x) - F(baseline) per target)."""
    limit = max_points if tolerance > 0 else 0  # (the uniform reference has none)
    uniform = f"composite Gauss-Legendre, {panels} panels x 8 = {8 * panels} gradients per target"
    if cache is not None and cache.is_file():
        saved = np.load(cache)
        settings = tuple(float(saved[k]) if k in saved else 0.0 for k in ("tolerance", "max_points"))
        if saved["ids"].tolist() == encoded.input_ids.tolist() and int(saved["panels"]) == panels \
                and settings == (tolerance, limit):
            log(f"reference read from {cache}")
            return saved["scores"], float(saved["seconds"]), str(saved["described"]) if "described" in saved else uniform
    started = time.perf_counter()
    start = int(encoded.extras["prompt_length"])
    targets = encoded.length - start
    f = integrand(lm, encoded, 8 * batch)
    if tolerance > 0:
        assert gap is not None
        found = integrate(f, targets, panels, tolerance, gap, max_points=max_points, completeness_floor=completeness_floor,
                          progress=lambda m: log(f"  reference {m}"))
        scores = found.scores
        open_rows = [t for t, closed in enumerate(found.closed) if not closed]
        described = (f"adaptive composite Gauss-Legendre written here (benchmarks/adaptive_reference.py: 8 nodes a panel, a "
                     f"panel's error estimated against its two halves, each row halving its own panels from {panels} until "
                     f"its summed estimates and its completeness are within {tolerance:g} x its largest |value|, the completeness "
                     f"at least {completeness_floor:g} x |F(x) - F(baseline)|: float32 rounding), "
                     f"{found.rounds} rounds; gradients per target: {', '.join(str(p) for p in found.points)}; "
                     f"rows not closed: {open_rows or 'none'}")
    else:
        alphas, weights = gauss_legendre_panels(panels)
        total = np.zeros((targets, encoded.length))
        for panel in range(0, panels, batch):
            nodes = slice(panel * 8, min(panel + batch, panels) * 8)
            values = f(alphas[nodes], list(range(targets)))  # (8 batch, T, L)
            total += np.einsum("n,ntl->tl", weights[nodes], values)
            log(f"  reference panels {panel + 1}-{min(panel + batch, panels)}/{panels} ({time.perf_counter() - started:.0f} s)")
        scores, described = total, uniform
    for t in range(targets):  # positions at or after the target's own are not its features
        scores[t, start + t:] = np.nan
    seconds = time.perf_counter() - started
    if cache is not None:
        np.savez(cache, ids=encoded.input_ids.numpy(), panels=panels, tolerance=tolerance, max_points=limit,
                 scores=scores, seconds=seconds, described=described)
    return scores, seconds, described


def gaps(lm: salience.CausalLM, encoded: Any) -> np.ndarray:
    """F_t(input) - F_t(baseline) for every target t (two forward rows): what each row of an exact
    IG sums to."""
    start, ids = int(encoded.extras["prompt_length"]), encoded.input_ids
    x, x0 = lm.input_and_baseline(encoded, "unk")
    with torch.no_grad():
        logits = lm.model(inputs_embeds=torch.stack([x0, x]), use_cache=False).logits[:, start - 1:-1]
    probs = torch.softmax(logits.double(), -1).gather(-1, ids[start:].to(logits.device)[None, :, None].expand(2, -1, 1))[..., 0]
    return (probs[1] - probs[0]).cpu().numpy()


def completeness(scores: np.ndarray, gap: np.ndarray) -> float:
    """Worst row: |sum of the row's scores - gap| / |gap|."""
    return float(np.max(np.abs(np.nansum(scores, axis=1) - gap) / np.maximum(np.abs(gap), 1e-300)))


def row_errors(scores: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per target row: max |scores - ref| over the row's defined features / max |ref| of the row."""
    out = []
    for s, r in zip(scores, ref):
        both = ~np.isnan(r)
        if np.isnan(s[both]).any():
            raise RuntimeError("a run left a defined feature without a score")
        out.append(np.abs(s[both] - r[both]).max() / max(np.abs(r[both]).max(), 1e-300))
    return np.asarray(out)


# ------------------------------------------------------------------------------------ the sides
def salience_trial(lm: salience.CausalLM, encoded: Any, kind: str, setting: float, max_steps: int | None = None) -> Trial:
    params: dict[str, Any] = {"steps": int(setting)} if kind == "fixed" else {"tolerance": setting}
    if kind == "adaptive" and max_steps is not None:
        params["max_steps"] = max_steps

    def run() -> tuple[np.ndarray, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # completeness / max_steps warnings: the error is measured instead
            e = salience.explain(lm, encoded, "integrated_gradients", output="probability", baseline="unk", **params)
        # adaptive: each target refines its own pieces; the cost per target is the mean of their gradients
        per_target = e.params.get("steps_per_target") or [e.params.get("steps_used") or params.get("steps") or 0]
        return np.asarray(e.scores, dtype=np.float64), round(float(np.mean(per_target)))

    return Trial("Salience", kind, setting, run)


def inseq_trial(lm: salience.CausalLM, prompt: str, encoded: Any, counter: RowCounter, width: int, steps: int,
                batch: int | None = None) -> Trial:
    def run() -> tuple[np.ndarray, int]:
        result = inseq_run(lm, prompt, encoded, "integrated_gradients", counter, width, n_steps=steps,
                           internal_batch_size=min(steps, batch or steps))
        assert result.scores is not None
        return result.scores, steps

    return Trial("Inseq", "fixed", steps, run)


@dataclass
class Ref:
    """The reference matrix (T, L), NaN where a feature is not a target's, and F(x) - F(baseline) (T,)."""

    scores: np.ndarray
    gap: np.ndarray
    described: str = ""  # how it was computed (report)


def measure(trial: Trial, ref: Ref, counter: RowCounter) -> Trial:
    """The first run: scores, steps, error, rows and its seconds."""
    seconds, (scores, steps), rows = timed(trial.run, counter)
    trial.scores, trial.steps, trial.rows = scores, steps, rows
    errors = row_errors(scores[:, : ref.scores.shape[1]], ref.scores)
    trial.error, trial.mean_error, trial.row_errors = float(errors.max()), float(errors.mean()), errors.tolist()
    trial.completeness = completeness(scores[:, : ref.scores.shape[1]], ref.gap)
    trial.runs.append(seconds)
    log(f"  {trial.label}: {trial.steps} gradients, error {trial.error:.2e} (mean {trial.mean_error:.2e}), "
        f"{fmt_s(seconds)} s (load {load_average()})")
    return trial


def search_up(make: Callable[[int], Trial], ladder: list[int], first: int, target: float, ref: Ref,
              counter: RowCounter, tried: list[Trial]) -> Trial | None:
    """From ``first`` up the ladder: the first value whose error <= target. (The values below
    ``first`` are not run: Salience's fixed steps, the same Gauss-Legendre rule, failed there.)"""
    for steps in ladder[ladder.index(first):]:
        trial = measure(make(steps), ref, counter)
        tried.append(trial)
        if trial.error <= target:
            return trial
    return None


def scan_ladder(make: Callable[[int], Trial], ladder: list[int], target: float, ref: Ref, counter: RowCounter,
                tried: list[Trial]) -> Trial | None:
    """Up the ladder from its smallest value: the first value whose error <= target. (On this
    model the error of a fixed rule does not fall monotonically with the steps: narrow peaks of the
    integrand are hit or missed by the nodes, so bisection would be wrong.)"""
    for steps in ladder:
        trial = measure(make(steps), ref, counter)
        tried.append(trial)
        if trial.error <= target:
            return trial
    return None


def zoom(lm: salience.CausalLM, encoded: Any, target: int, levels: int = 3, points: int = 42) -> list[str]:
    """Where the integrand dF_t/dx . (x - x') of one target changes fastest: ``points`` gradients on
    [0, 1], then on the two cells around the largest change between neighbouring points, ``levels``
    times. A smooth integrand's largest change shrinks in proportion to the spacing; a spike's does not."""
    start, ids = int(encoded.extras["prompt_length"]), encoded.input_ids
    x, x0 = lm.input_and_baseline(encoded, "unk")
    direction = (x - x0).detach()
    lines, low, high = [], 0.0, 1.0
    for _ in range(levels):
        alphas = torch.linspace(low, high, points, dtype=x.dtype, device=x.device)
        values = []
        for chunk in alphas.split(21):
            path = (x0[None] + chunk[:, None, None] * direction[None]).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=path, use_cache=False).logits[:, start - 1 + target]
            (grad,) = torch.autograd.grad(torch.softmax(logits.double(), -1)[:, ids[start + target]].sum(), path)
            values.append((grad.double() * direction.double()[None]).sum(-1).cpu())
        integrand = torch.cat(values).numpy()  # (points, L)
        change = np.abs(np.diff(integrand, axis=0))
        j = int(change.max(1).argmax())
        f = int(change[j].argmax())
        spacing = (high - low) / (points - 1)
        lines.append(f"- [{low:.5f}, {high:.5f}], spacing {spacing:.2e}: largest change {change[j, f]:.3g} (feature {f}: "
                     f"{integrand[j, f]:.3g} -> {integrand[j + 1, f]:.3g}) between a = {alphas[j].item():.5f} and "
                     f"{alphas[j + 1].item():.5f}; median change {np.median(change.max(1)):.3g}; max |integrand| "
                     f"{np.abs(integrand).max():.3g}")
        low, high = alphas[j].item() - spacing, alphas[j + 1].item() + spacing
    return lines


# ----------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    lm = salience.load_model("zoo:smollm2-135m")
    if args.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as on the CPU
        torch.backends.cudnn.allow_tf32 = False
        lm.model.to(args.device)
    base = getattr(lm.model, lm.model.base_model_prefix)
    counter = RowCounter(base)
    prompt, encoded, _prefixes, _seconds, _rows = build_input(lm, args.prompt_tokens, args.new_tokens, counter)
    P, L = int(encoded.extras["prompt_length"]), encoded.length
    log(f"prompt {P} tokens, continuation {L - P} tokens: {encoded.extras['continuation']!r} (load {load_average()})")
    if args.zoom is not None:
        return [f"- zoom on target {args.zoom} ({lm.tokenizer.decode(encoded.input_ids[P + args.zoom:P + args.zoom + 1])!r}):"], \
            zoom(lm, encoded, args.zoom)
    short = lm.encode("The capital of France is", continuation=" Paris.")
    salience.explain(lm, short, "saliency")  # warm-up, not timed

    log(f"reference: {args.ref_panels} panels x 8 nodes" + (f", adaptive to {args.ref_tolerance:g}" if args.ref_tolerance else "")
        + " ...")
    gap = gaps(lm, encoded)
    ref_scores, ref_seconds, ref_described = reference(lm, encoded, args.ref_panels, args.cache, args.ref_batch,
                                                       args.ref_tolerance, gap, args.ref_max_points)
    ref = Ref(ref_scores, gap, ref_described)
    ladder = ladder_of(args.ladder_factor, args.max_steps)
    found: dict[str, Trial | None] = {"fixed": None, "adaptive": None, "inseq": None}
    started, load_start = time.perf_counter(), load_average()

    def checkpoint() -> None:  # the results so far, rewritten after every run (a long run may be cut short)
        summary, body = report(args, prompt, encoded, ref, ref_seconds, tried, **found)
        lines = header("IG at equal per-feature error, SmolLM2-135M: Salience vs Inseq (PARTIAL: run in progress)",
                       command_line("lm_ig_error.py", sys.argv[1:]), started, PACKAGES, load_start)
        args.output.write_text("\n".join([*lines, "## Key numbers so far", *summary, "", *body, ""]), encoding="utf-8")

    tried: list[Trial] = Checkpointed(checkpoint)
    if not args.no_fixed:
        log("Salience fixed steps ...")
        found["fixed"] = scan_ladder(lambda k: salience_trial(lm, encoded, "fixed", k), ladder, args.target, ref, counter, tried)
    tolerances = sorted(args.tolerances)  # from the tightest: the loosest that still passes is the cheapest
    log("Salience adaptive ...")
    first = measure(salience_trial(lm, encoded, "adaptive", tolerances[0], args.adaptive_max_steps), ref, counter)
    tried.append(first)
    found["adaptive"] = first if first.error <= args.target else None
    if not args.no_inseq:
        log("Inseq ...")
        start = args.inseq_start or (int(found["fixed"].setting) if found["fixed"] is not None else ladder[-1])
        found["inseq"] = search_up(lambda k: inseq_trial(lm, prompt, encoded, counter, L, k, args.inseq_batch), ladder, start,
                                   args.target,
                                   ref, counter, tried)
    for tolerance in tolerances[1:] if found["adaptive"] is not None else []:
        trial = measure(salience_trial(lm, encoded, "adaptive", tolerance, args.adaptive_max_steps), ref, counter)
        tried.append(trial)
        if trial.error > args.target:
            break
        found["adaptive"] = trial

    chosen = [t for t in found.values() if t is not None]
    for round_ in range(1, args.repeats):
        for trial in chosen if round_ % 2 else chosen[::-1]:
            seconds, _result, _rows = timed(trial.run, counter)
            trial.runs.append(seconds)
        checkpoint()
        log(f"  timing round {round_ + 1}/{args.repeats} done (load {load_average()})")

    if args.save_scores is not None:
        np.savez(args.save_scores, reference=ref.scores, gap=ref.gap, ids=encoded.input_ids.numpy(),
                 **{t.label: t.scores for t in tried if t.scores is not None})
    return report(args, prompt, encoded, ref, ref_seconds, tried, **found)


class Checkpointed(list):  # type: ignore[type-arg]
    """A list of trials that calls ``checkpoint`` after each append."""

    def __init__(self, checkpoint: Callable[[], None]) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def append(self, item: Any) -> None:
        super().append(item)
        self.checkpoint()


def lower_bounds(args: argparse.Namespace, tried: list[Trial], inseq: Trial | None, mine: tuple[Trial | None, ...]) -> list[str]:
    """When no Inseq setting tried passed: its cheapest passing n_steps on the ladder (the settings
    every comparison here searches) lies above the largest tried, so it costs more than that run
    (Inseq's time grows with n_steps), and each passing Salience setting is at least that many times
    faster. The smaller ladder values must fail too: none may have passed with Salience's fixed
    steps (the same rule), and those run by neither are named."""
    failed = [t for t in tried if t.library == "Inseq" and t.seconds]
    if inseq is not None or not failed:
        return []
    top = max(failed, key=lambda t: t.setting)
    smaller = [t for t in tried if t.kind == "fixed" and t.setting < top.setting]  # Inseq's and Salience's fixed rule
    if any(t.error <= args.target for t in smaller):  # the same rule passed lower down: no bound
        return []
    ran = {int(t.setting) for t in smaller}
    below = [k for k in ladder_of(args.ladder_factor, args.max_steps) if k < top.setting]
    unchecked = [k for k in below if k not in ran]
    caveat = (f"; n_steps {', '.join(map(str, unchecked))} were not run here: the bound holds if they fail too" if unchecked
              else "; every smaller ladder value failed here (Inseq, or Salience's fixed steps: the same rule)" if below else "")
    return [f"- at error <= {args.target:g}: no Inseq n_steps tried passed (largest {int(top.setting)}: error {top.error:.1e}, "
            f"{fmt_s(top.seconds)} s), so its cheapest passing n_steps on the ladder is larger and {trial.label} is at "
            f"least {top.seconds / trial.seconds:.2f}x faster than Inseq (lower bound, the same run{caveat})"
            for trial in mine if trial is not None and trial.seconds]


def report(args: argparse.Namespace, prompt: str, encoded: Any, ref: Ref, ref_seconds: float, tried: list[Trial],
           fixed: Trial | None, adaptive: Trial | None, inseq: Trial | None) -> tuple[list[str], list[str]]:
    P, L = int(encoded.extras["prompt_length"]), encoded.length
    target = f"{args.target:g}"
    summary: list[str] = []

    def line(trial: Trial | None, what: str) -> str:
        if trial is None:
            return f"- {what}: no setting tried reached error <= {target}"
        return (f"- {what}: {trial.label}, {trial.steps} gradients per target, error {trial.error:.1e}, "
                f"median {fmt_s(trial.seconds)} s of {len(trial.runs)}")

    summary += [line(inseq, "Inseq, cheapest passing"), line(fixed, "Salience fixed steps, cheapest passing"),
                line(adaptive, "Salience adaptive, loosest passing tolerance")]
    for mine in (fixed, adaptive):
        if inseq is not None and mine is not None and inseq.seconds and mine.seconds:
            summary.append(f"- at error <= {target}: {mine.label} is {inseq.seconds / mine.seconds:.2f}x faster than "
                           f"{inseq.label} (median seconds, the same run)")
    summary += lower_bounds(args, tried, inseq, (fixed, adaptive))
    body = ["## Input and reference", "",
            f"- zoo:smollm2-135m; prompt {P} tokens (lm.py's: test-split movie sentences cut at a word boundary): {prompt!r}",
            f"- continuation: {L - P} tokens generated greedily: {encoded.extras['continuation']!r}",
            f"- output: each generated token's probability; baseline: the unk token's embedding at every position; "
            f"features: the {L} tokens (those at or after a target's position left out of its row)",
            f"- reference: {ref.described}, float64 sums, {ref_seconds:.0f} s; F(x) - F(baseline) per target: "
            f"{', '.join(f'{g:.3g}' for g in ref.gap)}; the reference's completeness error per row (|row sum - gap| / "
            f"|gap|): {', '.join(f'{c:.1e}' for c in np.abs(np.nansum(ref.scores, 1) - ref.gap) / np.abs(ref.gap))}",
            f"- error of a run: per target row, max_f |s - ref| / max_f |ref|; the run's error is the worst row (the mean "
            f"over rows is shown beside it); target: <= {target}", "",
            "## Every setting tried", "",
            "Rows: counted by a forward hook on the base model (fwd rows / of which took part in a backward). Seconds: "
            "the median of the runs listed (the first run measured the error; the passing settings were rerun, "
            "interleaved).", ""]
    head = ["implementation", "gradients per target", "error (worst row)", "mean row error", "error per row",
            "completeness error (worst row)", "passes", "fwd / bwd rows", "runs", "median s"]
    rows = [[t.label, t.steps, f"{t.error:.1e}", f"{t.mean_error:.1e}", " ".join(f"{e:.1e}" for e in t.row_errors),
             f"{t.completeness:.1e}",
             "yes" if t.error <= args.target else "no",
             f"{t.rows.forward} / {t.rows.backward}", len(t.runs), fmt_s(t.seconds)] for t in tried]
    body += table(head, rows)
    best = min(tried, key=lambda t: t.error)
    agree = [t for t in tried if t.error <= 0.1 * args.target]
    body += ["", f"Check of the reference: the most accurate run tried ({best.label}) is within {best.error:.1e} of it; "
             f"{len(agree)} run(s) of {len(tried)} are within a tenth of the target (independent rules converging on it)."]
    return summary, body


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="IG at equal per-feature error: Salience vs Inseq on SmolLM2-135M.")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8-token prompt, 2 new tokens, 2 panels, 1 repeat")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--ref-panels", type=int, help="reference panels of 8 Gauss-Legendre nodes (default 32: 256 nodes)")
    parser.add_argument("--target", type=float, default=0.01, help="largest allowed error (fraction of a row's max |score|)")
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.01, 0.02, 0.05],
                        help="Salience adaptive tolerances, tried from the tightest until one fails")
    parser.add_argument("--max-steps", type=int, default=256, help="largest fixed-step count on the ladder")
    parser.add_argument("--ladder-factor", type=float, default=2.0, help="ratio of neighbouring step counts on the fixed-step "
                        "ladder, Salience's and Inseq's alike (default 2: 16, 32, 64, ...; 1.4142 halves the gaps)")
    parser.add_argument("--adaptive-max-steps", type=int, help="Salience adaptive's max_steps (default: the method's, 600)")
    parser.add_argument("--ref-tolerance", type=float, default=0.0,
                        help="an adaptive reference (benchmarks/adaptive_reference.py) from --ref-panels panels, each row "
                        "refined until its estimated error and completeness error are within this fraction of its largest "
                        "|value| (default 0: --ref-panels equal panels)")
    parser.add_argument("--ref-max-points", type=int, default=1 << 17, help="the adaptive reference's gradients per target "
                        "at most (a row that reaches it is reported as not closed)")
    parser.add_argument("--ref-batch", type=int, default=1, help="reference panels per forward pass (default 1: 8 path points)")
    parser.add_argument("--inseq-batch", type=int, help="Inseq's internal_batch_size cap (default: n_steps, all in one batch)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda); errors do not depend on it "
                        "beyond float32 rounding, times do")
    parser.add_argument("--repeats", type=int, help="timed runs of each passing setting (default 3)")
    parser.add_argument("--no-inseq", action="store_true")
    parser.add_argument("--no-fixed", action="store_true", help="skip Salience's fixed-steps ladder (e.g. when another run "
                        "found its answer)")
    parser.add_argument("--inseq-start", type=int, help="Inseq's first n_steps on the ladder (default: Salience's fixed "
                        "answer; e.g. the one a GPU run found with the same reference)")
    parser.add_argument("--zoom", type=int, metavar="T", help="only print where target T's integrand changes fastest (see zoom)")
    parser.add_argument("--cache", type=Path, help="an .npz file keeping the reference between runs")
    parser.add_argument("--save-scores", type=Path, help="an .npz file for the reference's and every run's scores")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (8 if args.quick else 32)
    args.new_tokens = args.new_tokens or (2 if args.quick else 16)
    args.ref_panels = args.ref_panels or (2 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.output = args.output or HERE / ("RESULTS-lm-ig-error-quick.md" if args.quick else "RESULTS-lm-ig-error.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    run_and_write("IG at equal per-feature error, SmolLM2-135M: Salience vs Inseq", "lm_ig_error.py", argv, PACKAGES,
                  args.output, lambda: run(args))


if __name__ == "__main__":
    main()
