"""Shapley value sampling: Salience's ``shapley_sampling`` against Captum's ``ShapleyValueSampling``
on the zoo text classifier, in one process.

Both estimate the Shapley values of the same game: v(S) = the predicted class's probability with the
words outside S replaced by [MASK] (special tokens kept), from ``--orders`` feature orders. Per
input (a 10-word sentence, whose exact Shapley values come from ``kernel_shap``'s enumeration of all
1,024 coalitions, and a longer one): seconds (median over seeds; implementations interleaved, the
first call of each untimed), forward rows (a hook on the model), and, where the exact values are
known, the error (largest |score - exact| over the words, divided by the largest |exact|; mean over
seeds). Salience draws plain uniform orders by default (as Captum); its antithetic draw (each
order with its reverse) is timed too. Captum gets a fixed ``perturbations_per_eval``; each of ``--captum-batches`` is tried
and the fastest is reported.

    flock /tmp/salience-cpu.lock env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/shapley_sampling.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RowCounter, fmt_s, log, median, run_and_write, table  # noqa: E402

import salience  # noqa: E402

PACKAGES = ("salience", "torch", "transformers", "captum", "numpy")


def inputs() -> list[tuple[str, str]]:
    """(label, text): 10 words (exact reference) and a longer movie-snippets sentence."""
    from salience.datasets.movie_snippets import split_movie_snippets

    test = split_movie_snippets()["test"]
    long = next(s.text for s in test if 20 <= len(s.text.split()) <= 28)
    return [("10 words", "a dull film , but the cast is very good"), ("long", long)]


def captum_runner(clf: Any, text: str, target: int, orders: int, batch: int) -> Callable[[int], np.ndarray]:
    """Captum ShapleyValueSampling over Salience's word features; special tokens join word 0's group
    (their baseline is themselves, so they never change the input)."""
    from captum.attr import ShapleyValueSampling

    encoded = clf.encode(text)
    ids = encoded.input_ids[None]
    special = encoded.special
    mask = torch.zeros(ids.shape[1], dtype=torch.long)
    for index, word in enumerate(encoded.words):
        mask[list(word.tokens)] = index
    baseline = torch.where(special[None], ids, clf.tokenizer.mask_token_id)
    model = clf.model

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.softmax(-1)

    def run(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = ShapleyValueSampling(forward).attribute(ids, baselines=baseline, target=target, feature_mask=mask[None],
                                                            n_samples=orders, perturbations_per_eval=batch)
        return np.array([float(found[0, word.tokens[0]]) for word in encoded.words])

    return run


def pass_limit(clf: Any, encoded: Any, rows: int, batches: list[int]) -> tuple[float, int]:
    """Seconds of ``rows`` plain forward rows of the input at the fastest of ``batches`` (median of
    3 each), and that batch."""
    ids = encoded.input_ids[None]
    found = {}
    for batch in batches:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            with torch.no_grad():
                for start in range(0, rows, batch):
                    chunk = ids.expand(min(batch, rows - start), -1)
                    clf.model(input_ids=chunk, attention_mask=torch.ones_like(chunk))
            times.append(time.perf_counter() - started)
        found[batch] = median(times)
    best = min(found, key=found.__getitem__)
    return found[best], best


def salience_runner(clf: Any, text: str, orders: int, antithetic: bool) -> Callable[[int], np.ndarray]:
    def run(seed: int) -> np.ndarray:
        e = salience.explain(clf, text, "shapley_sampling", level="word", n_permutations=orders, antithetic=antithetic,
                             baseline="mask", output="probability", seed=seed, progress=False)
        return np.asarray(e.scores, dtype=np.float64)

    return run


def one_input(clf: Any, label: str, text: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    encoded = clf.encode(text)
    target = int(clf.predict(encoded).index)
    words = len(encoded.words)
    exact = None
    if words <= 12:
        exact = np.asarray(salience.explain(clf, text, "kernel_shap", level="word", baseline="mask", output="probability",
                                            max_exact=12, progress=False).scores, dtype=np.float64)
    runners: dict[str, Callable[[int], np.ndarray]] = {
        "Salience shapley_sampling": salience_runner(clf, text, args.orders, False),
        "Salience shapley_sampling (antithetic)": salience_runner(clf, text, args.orders, True),
        **{f"Captum ShapleyValueSampling (perturbations_per_eval={b})": captum_runner(clf, text, target, args.orders, b)
           for b in args.captum_batches},
    }
    counter = RowCounter(clf.model)
    results: dict[str, dict[str, Any]] = {name: {"seconds": [], "errors": [], "rows": 0} for name in runners}
    for warm_up in runners.values():  # untimed
        warm_up(0)
    for seed in range(1, args.seeds + 1):
        names = list(runners) if seed % 2 else list(reversed(runners))
        for name in names:
            before = counter.snapshot().forward
            started = time.perf_counter()
            scores = runners[name](seed)
            results[name]["seconds"].append(time.perf_counter() - started)
            results[name]["rows"] = counter.snapshot().forward - before
            if exact is not None:
                results[name]["errors"].append(float(np.abs(scores - exact).max() / np.abs(exact).max()))
    counter.close()
    limit, best = pass_limit(clf, encoded, results["Salience shapley_sampling"]["rows"], args.limit_batches)
    captum = min((n for n in runners if n.startswith("Captum")), key=lambda n: median(results[n]["seconds"]))
    ours = "Salience shapley_sampling"
    rows = []
    for name in runners:
        r = results[name]
        error = f"{np.mean(r['errors']):.3f}" if r["errors"] else "—"
        rows.append([name, args.orders, fmt_s(median(r["seconds"])), r["rows"], error,
                     f"{median(r['seconds']) / median(results[captum]['seconds']):.2f}",
                     f"{median(r['seconds']) / (limit * r['rows'] / results['Salience shapley_sampling']['rows']):.2f}"])
    lines = [f"## {label}: {words} words, {encoded.length} tokens", "", f"- text: {text!r}",
             f"- target: the predicted class {target}, its probability; removal: [MASK]; players: the words",
             "- error: largest |score - exact| / largest |exact| (exact: kernel_shap's enumeration of all coalitions), "
             "mean over seeds" if exact is not None else "- no exact reference (too many words to enumerate)", "",
             f"- pass limit: {results['Salience shapley_sampling']['rows']} plain forward rows of this input, no gradients, at "
             f"the fastest batch of {args.limit_batches} ({best}): {fmt_s(limit)} (each implementation's own row count priced "
             "at that rate)", "",
             *table(["implementation", "orders", "median s", "forward rows (one run)", "error", "x fastest Captum",
                     "x pass limit"], rows), ""]
    ours_s, captum_s = median(results[ours]["seconds"]), median(results[captum]["seconds"])
    key = [f"- {label} ({words} words): Salience {fmt_s(ours_s)} s against Captum's fastest {fmt_s(captum_s)} s = "
           f"**{ours_s / captum_s:.2f}x Captum's time**, {results[ours]['rows']} against {results[captum]['rows']} forward rows"
           + (f"; error {np.mean(results[ours]['errors']):.3f} against {np.mean(results[captum]['errors']):.3f} "
              f"(antithetic {np.mean(results['Salience shapley_sampling (antithetic)']['errors']):.3f})"
              if exact is not None else "")]
    log(key[0])
    return key, lines


def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    clf = salience.load_model("zoo:minilm-sentiment")
    keys, lines = [], []
    for label, text in inputs():
        key, body = one_input(clf, label, text, args)
        keys += key
        lines += body
    return keys, lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=32, help="feature orders per run (default 32, Salience's default)")
    parser.add_argument("--seeds", type=int, default=10, help="timed runs per implementation (default 10)")
    parser.add_argument("--captum-batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--limit-batches", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="batches tried for the plain forward pass limit (the fastest counts)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS-shapley-sampling.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_and_write("Shapley value sampling: Salience vs Captum", "shapley_sampling.py", argv, PACKAGES, args.output,
                  lambda: run(args))


if __name__ == "__main__":
    main()
