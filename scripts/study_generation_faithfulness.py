"""Comprehensiveness on generation (issue 14, docs/studies/propagation.md): is AttnLRP more faithful
than integrated gradients, input x gradient and occlusion on SmolLM2-135M-Instruct's continuations?

Prompts: the first ``--limit`` sentences of the held-out movie-snippets test split with at most
``--max-words`` words, each put in the fixed template :data:`TEMPLATE` (a plain prompt, no chat
template). Each prompt's continuation: ``--new-tokens`` tokens generated greedily (every method
explains the same generated tokens; each explain call generates them again, greedily, which gives
the same tokens). Every method explains each generated token's **logit** (AttnLRP explains logits
only), token-level features over the prompt and the continuation; the metrics read each generated
token's probability with the continuation teacher-forced (docs/metrics.md, "Generations") and rank,
for each token, only the prompt's tokens (``context="prompt"``), removed by deletion (the default).

Per prompt and method: comprehensiveness at 10 / 30 / 50 % (one ``aopc_comprehensiveness`` call with
those bins: its per-bin values are the comprehensiveness at each fraction) and ERASER's AOPC
(bins 1, 5, 10, 20, 50 %), each the mean over the generated tokens. A seeded random ranking
(``random``: standard normal scores, numpy default_rng(prompt index)) is scored the same way as a
floor. Means over prompts with a percentile bootstrap 95 % interval
(:func:`salience.evaluate.summary.bootstrap_ci`, 10 000 resamples, seed 0) and the paired
difference AttnLRP minus each other method (bootstrap over prompts).

Command (docs/studies/propagation.md):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 flock /tmp/salience-cpu.lock .venv/bin/python scripts/study_generation_faithfulness.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

import salience
from salience.datasets.movie_snippets import split_movie_snippets
from salience.evaluate.config import parse_method_spec
from salience.evaluate.summary import bootstrap_ci
from salience.metrics import evaluate_metric

TEMPLATE = 'Movie review: "{text}"\nIn short, the reviewer thinks the film is'
METHODS: dict[str, dict[str, object]] = {
    "attnlrp": {},
    "integrated_gradients": {"steps": 16, "rule": "gausslegendre"},
    "input_x_gradient": {},
    "occlusion": {},
}
FRACTIONS = (0.1, 0.3, 0.5)


def prompts(limit: int, max_words: int) -> list[tuple[str, str]]:
    """(snippet id, prompt) for the first ``limit`` test sentences of at most ``max_words`` words."""
    chosen = [s for s in split_movie_snippets()["test"] if len(s.text.split()) <= max_words][:limit]
    return [(s.id, TEMPLATE.format(text=s.text)) for s in chosen]


def scores_of(lm: salience.CausalLM, prompt: str, method: str, params: dict[str, object], new_tokens: int
              ) -> tuple[salience.Explanation, float]:
    start = time.perf_counter()
    options = dict(params)
    name = str(options.pop("_method", method))
    explanation = salience.explain(lm, prompt, method=name, max_new_tokens=new_tokens, output="logit", level="token",
                                   **options)
    return explanation, time.perf_counter() - start


def delta_share(explanation: salience.Explanation) -> float | None:
    """IG's completeness error: mean over targets of |delta| / |F(x) - F(baseline)| (None for other methods)."""
    if explanation.delta is None or explanation.baseline_value is None:
        return None
    gap = np.abs(np.asarray(explanation.output_value) - np.asarray(explanation.baseline_value))
    return float(np.mean(np.abs(np.asarray(explanation.delta)) / np.maximum(gap, 1e-12)))


def measure(lm: salience.CausalLM, explanation: salience.Explanation) -> dict[str, float]:
    at = evaluate_metric("aopc_comprehensiveness", lm, explanation, bins=FRACTIONS)
    aopc = evaluate_metric("aopc_comprehensiveness", lm, explanation)
    row = {f"comprehensiveness@{int(f * 100)}": float(v) for f, v in zip(FRACTIONS, at.details["values"], strict=True)}
    row["aopc"] = aopc.value
    row["metric_rows"] = at.forward_passes + aopc.forward_passes
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=18)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--output", default="results/study_generation_faithfulness.json")
    parser.add_argument("--method", action="append", metavar="NAME[:KEY=VALUE]",
                        help="run these methods instead of the four of the study (repeatable), e.g. occlusion:baseline=delete")
    args = parser.parse_args()
    if args.method:
        METHODS.clear()
        # the project's method specs (checked against the registry); the row keeps the spec's label
        METHODS.update({spec.label: {"_method": spec.name, **spec.params} for spec in map(parse_method_spec, args.method)})
    load_start = os.getloadavg()
    started = time.perf_counter()
    lm = salience.load_model("zoo:smollm2-135m")
    chosen = prompts(args.limit, args.max_words)
    rows: list[dict[str, object]] = []
    for number, (snippet, prompt) in enumerate(chosen):
        reference = None
        for method, params in METHODS.items():
            explanation, seconds = scores_of(lm, prompt, method, params, args.new_tokens)
            if reference is None:
                reference = explanation
            elif explanation.tokens != reference.tokens:
                raise SystemExit(f"{method} explained other tokens than {next(iter(METHODS))} on {snippet}")
            rows.append({"id": snippet, "method": method, "seconds": seconds, "delta_share": delta_share(explanation),
                         **measure(lm, explanation)})
            print(f"[{number + 1}/{len(chosen)}] {snippet} {method}: {rows[-1]}", flush=True)
        assert reference is not None
        noise = np.random.default_rng(number).standard_normal(np.shape(reference.scores))
        random = dataclasses.replace(reference, scores=np.where(np.isfinite(reference.scores), noise, np.nan))
        rows.append({"id": snippet, "method": "random", "seconds": 0.0, **measure(lm, random)})
        print(f"  continuation: {reference.extras['continuation']!r}", flush=True)
        rows[-1]["continuation"] = reference.extras["continuation"]
    elapsed = time.perf_counter() - started
    report(rows, chosen, args, elapsed, load_start, os.getloadavg())


def report(rows: list[dict[str, object]], chosen: list[tuple[str, str]], args: argparse.Namespace, elapsed: float,
           load_start: tuple[float, float, float], load_end: tuple[float, float, float]) -> None:
    columns = [f"comprehensiveness@{int(f * 100)}" for f in FRACTIONS] + ["aopc"]
    methods = [*METHODS, "random"]
    table = ["| method | " + " | ".join(c.replace("comprehensiveness@", "compr. ") + (" %" if "@" in c else "") + " ↑"
                                        for c in columns) + " | s per prompt |",
             "|---" * (len(columns) + 2) + "|"]
    summary: dict[str, dict[str, object]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        cells = []
        for column in columns:
            values = [float(r[column]) for r in mine]  # type: ignore[arg-type]
            low, high = bootstrap_ci(values)
            cells.append(f"{np.mean(values):.3f} [{low:.3f}, {high:.3f}]")
            summary.setdefault(method, {})[column] = {"mean": float(np.mean(values)), "ci": [low, high]}
        seconds = float(np.mean([float(r["seconds"]) for r in mine]))  # type: ignore[arg-type]
        table.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    paired = ["| AttnLRP minus | " + " | ".join(c.replace("comprehensiveness@", "compr. ") for c in columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for other in [m for m in methods if m != "attnlrp"] if "attnlrp" in methods else []:
        cells = []
        for column in columns:
            a = {r["id"]: float(r[column]) for r in rows if r["method"] == "attnlrp"}  # type: ignore[arg-type]
            b = {r["id"]: float(r[column]) for r in rows if r["method"] == other}  # type: ignore[arg-type]
            diff = [a[k] - b[k] for k in a]
            low, high = bootstrap_ci(diff)
            cells.append(f"{np.mean(diff):+.3f} [{low:+.3f}, {high:+.3f}]")
        paired.append(f"| {other} | " + " | ".join(cells) + " |")
    print(f"\n{len(chosen)} prompts, {args.new_tokens} generated tokens each; {elapsed / 60:.1f} min; load average "
          f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")
    print("\n".join(table))
    print()
    print("\n".join(paired))
    shares = [float(r["delta_share"]) for r in rows  # type: ignore[arg-type]
              if r["method"] == "integrated_gradients" and r.get("delta_share") is not None]
    if shares:
        print(f"\nIG completeness error |delta| / |F(x) - F(baseline)|: median {np.median(shares):.2f}, "
              f"mean {np.mean(shares):.2f} over {len(shares)} prompts")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"rows": rows, "summary": summary, "prompts": chosen, "minutes": elapsed / 60,
                                             "load_average": [load_start, load_end]}, indent=1))


if __name__ == "__main__":
    main()
