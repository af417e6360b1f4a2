"""Relevance patching (RelP) vs attribution patching (AtP), both against exact activation patching:
Spearman rank and Pearson correlation and top-10 overlap of the component scores, and the time of each.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 flock /tmp/salience-cpu.lock .venv/bin/python scripts/study_relevance_patching.py

Models: the tiny seeded float64 Llama of the tests (3 layers, random weights; norms in float64) and
zoo:smollm2-135m (float32). Metric: logit(target) - logit(foil) at the position predicting the
target. Components: the residual stream after each block at every position ("all"), the same at
the positions where the clean and corrupted prompts differ ("changed"), and the attention heads.
Prints a markdown table (one row per model x pair x component set) and the timings.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

import salience
from salience.patching import attribution_patching

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "methods")]

TINY_PAIRS = [("the capital of france is", "the capital of paris is", " paris", " city"),
              ("the film was very old", "the film was very new", " and", " ."),
              ("the city on the river was big", "the city on the river was small", " and", " ,")]
SMOL_PAIRS = [("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
              ("The capital of Germany is", "The capital of Spain is", " Berlin", " Madrid"),
              ("The capital of Japan is", "The capital of China is", " Tokyo", " Beijing"),
              ("When Mary and John went to the store, John gave a drink to",
               "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")]
METHODS = ("atp", "relp")


def tiny_llama() -> salience.CausalLM:
    """The tests' tiny Llama with float64 norms and SDPA (tests/methods/test_patching.py's fixture)."""
    from test_patching import lm

    return lm.__wrapped__()


def top_overlap(estimate: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    k = min(k, estimate.size)
    mine = set(np.argsort(-np.abs(estimate), axis=None)[:k].tolist())
    truth = set(np.argsort(-np.abs(exact), axis=None)[:k].tolist())
    return len(mine & truth) / k


def compare(model: salience.CausalLM, name: str, pair: tuple[str, str, str, str]) -> list[str]:
    clean, corrupt, token, foil = pair
    options = {"continuation": token, "contrast": foil}
    results = {m: attribution_patching(model, clean, corrupt, method=m, **options) for m in (*METHODS, "exact")}
    exact = results["exact"]
    changed = [i for i, (a, b) in enumerate(zip(exact.tokens, exact.corrupted_tokens)) if a != b]
    sets = {"residual, all": lambda r: r.residual, f"residual, changed {changed}": lambda r: r.residual[:, changed],
            "heads": lambda r: r.heads}
    rows = []
    for label, pick in sets.items():
        cells = []
        for method in METHODS:
            estimate, truth = pick(results[method]).ravel(), pick(exact).ravel()
            cells += [f"{spearmanr(estimate, truth)[0]:.3f}", f"{pearsonr(estimate, truth)[0]:.3f}",
                      f"{top_overlap(pick(results[method]), pick(exact)):.1f}"]
        rows.append(f"| {name} | {corrupt.split()[-3:]} | {label} (n={pick(exact).size}) | " + " | ".join(cells) + " |")
    seconds = " / ".join(f"{results[m].cost['seconds']:.2f}" for m in (*METHODS, "exact"))
    rows.append(f"| {name} | {corrupt.split()[-3:]} | seconds atp / relp / exact: {seconds}; "
                f"m(clean) {exact.clean_metric:.3f}, m(corrupt) {exact.corrupted_metric:.3f} | | | | | | |")
    return rows


def main() -> None:
    start_load, started = os.getloadavg(), time.perf_counter()
    print("| model | corrupted (last 3 words) | components | AtP Spearman | AtP Pearson | AtP top-10 | RelP Spearman | RelP Pearson "
          "| RelP top-10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    tiny = tiny_llama()
    for pair in TINY_PAIRS:
        print("\n".join(compare(tiny, "tiny Llama", pair)), flush=True)
    smol = salience.load_model("zoo:smollm2-135m")
    for pair in SMOL_PAIRS:
        print("\n".join(compare(smol, "SmolLM2-135M", pair)), flush=True)
    print(f"\nload average at start {start_load}, at end {os.getloadavg()}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
