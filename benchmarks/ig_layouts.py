"""How many gradient steps adaptive IG needs on real sentences, for several starting layouts.

For held-out validation sentences (not the benchmark's inputs) on the zoo MiniLM classifier, runs
Salience's adaptive integrator (tolerance 1 %, atol 1e-4, pad baseline, predicted class
probability) from ``nodes`` x ``pieces`` starting layouts and a fixed 50-node Gauss-Legendre rule
(Captum's default), and prints per layout: gradient steps, the pass cost relative to the fixed
rule (forward+backward = 3 forward units, as in the benchmark's limit), the completeness error
|sum - gap| / |gap| and the relative L1 distance of token scores to a 256-node Gauss-Legendre
reference. Used to choose the default layout (8 x 2); not part of the test suite.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ig_layouts.py --sentences 40   # about 4 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from salience.core.target import resolve_target  # noqa: E402
from salience.datasets.movie_snippets import split_movie_snippets  # noqa: E402
from salience.methods.base import Context  # noqa: E402
from salience.methods.path import adaptive_path_integral, fixed_path_integral  # noqa: E402

LAYOUTS = ((8, 2), (10, 2), (12, 2), (6, 3), (4, 4), (16, 1))
FIXED_STEPS = 50
REFERENCE_STEPS = 256


def token_scores(result: object) -> np.ndarray:
    return result.per_dim.sum(-1).double().cpu().numpy()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=40)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    clf = cases.build_model("minilm", torch.device("cpu"))
    texts = [s.text for s in split_movie_snippets()["validation"]][: args.sentences]
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for text in texts:
        encoded = clf.encode(text)
        target = resolve_target(None, clf.labels, clf.predict(encoded), "probability")
        ctx = Context(clf, encoded, target, encoded.features("token"))
        x, x0 = clf.embedding_path_ends(encoded, "pad")
        reference = fixed_path_integral(ctx, x0, x, "gausslegendre", REFERENCE_STEPS)
        ref = token_scores(reference)
        gap = reference.end_value - reference.start_value
        for layout in (None, *LAYOUTS):
            before = dataclasses.replace(clf.counter)
            if layout is None:
                name, result = f"fixed {FIXED_STEPS}", fixed_path_integral(ctx, x0, x, "gausslegendre", FIXED_STEPS)
            else:
                name = f"adaptive {layout[0]} x {layout[1]}"
                result = adaptive_path_integral(ctx, x0, x, rule="gausslegendre", nodes=layout[0], pieces=layout[1],
                                                tolerance=0.01, atol=1e-4, max_steps=512)
            backward = clf.counter.backward_passes - before.backward_passes
            forward_only = clf.counter.forward_passes - before.forward_passes - backward
            scores = token_scores(result)
            rows.setdefault(name, []).append((result.steps, 3 * backward + forward_only,
                                              abs(scores.sum() - gap) / abs(gap), np.abs(scores - ref).sum() / np.abs(ref).sum()))
    fixed_cost = 3 * FIXED_STEPS + 2
    print(f"{len(texts)} validation sentences, mean {np.mean([clf.encode(t).length for t in texts]):.1f} tokens\n")
    print("| integrator | steps median | steps mean | steps max | mean cost ratio vs fixed 50 | worst cost ratio | "
          "completeness error median / max | rel. L1 to reference median / max |")
    print("|---|---|---|---|---|---|---|---|")
    for name, values in rows.items():
        a = np.array(values)
        ratios = fixed_cost / a[:, 1]
        print(f"| {name} | {np.median(a[:, 0]):.0f} | {a[:, 0].mean():.1f} | {a[:, 0].max():.0f} | {ratios.mean():.2f} | "
              f"{ratios.min():.2f} | {np.median(a[:, 2]):.1e} / {a[:, 2].max():.1e} | {np.median(a[:, 3]):.1e} / {a[:, 3].max():.1e} |")


if __name__ == "__main__":
    main()
