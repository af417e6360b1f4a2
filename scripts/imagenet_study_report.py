"""Tables of the ImageNet methods study (docs/studies/imagenet_methods.md) from its database.

    python scripts/imagenet_study_report.py          # after `salience bench docs/studies/imagenet_methods.toml`
                                                     # and scripts/imagenet_study_baselines.py

Reads the latest complete run of each study of docs/studies/imagenet_methods.toml from its database
(results/imagenet_methods.db) and the reference maps of results/imagenet_methods/baselines.json,
and prints, as Markdown: the method x metric table over the 8 photos (mean [bootstrap 95 %
interval], the runner's ``summarise``), deletion/insertion over the 4 photos the model classifies
correctly, per-photo deletion/insertion of a few maps, time and passes per explanation, the
randomisation sanity check and the ranking. Writes docs/studies/imagenet_methods_summary.csv (every
summary row, with its photo subset), docs/studies/imagenet_methods_heat.png and
docs/studies/imagenet_methods_sanity.png (mean correlation after each step of the cascade).
No model is run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salience.datasets.photos import load_photos
from salience.evaluate.config import load_bench_file
from salience.evaluate.export import markdown_table, write_csv
from salience.evaluate.plots import plot_heat_table
from salience.evaluate.report import summary_markdown
from salience.evaluate.store import RunInfo, Store
from salience.evaluate.summary import SummaryRow, summarise

STUDY = Path("docs/studies/imagenet_methods.toml")
BASELINES = Path("results/imagenet_methods/baselines.json")
DOCS = Path("docs/studies")
MAIN = ("imagenet-logit", "imagenet-probability", "imagenet-scorecam-norelu")
RANKED = ("deletion AUC", "insertion AUC", "pointing game", "energy pointing game")  # the ranking's metrics
# Score-CAM's map at _bn1 is all zeros on every photo (see the write-up): its deletion curve removes
# pixels in row-major order and the pointing game's tie rule makes every constant map a hit. Shown in
# the tables, left out of the ranking.
CONSTANT_MAPS = ("Score-CAM",)
PER_PHOTO = ("Grad-CAM", "RISE", "Score-CAM", "occlusion", "random (pixels)", "random (patches)", "centre")


def study_runs(bench: Any, store: Store, names: Sequence[str]) -> dict[str, RunInfo]:
    """The stored run of each named study, found by its identity (the hash of model, dataset,
    methods, metrics and options that ``salience bench`` resumes by), not by its stored name; only
    complete runs."""
    from salience.evaluate.datasets import load_dataset
    from salience.models.loading import load_model

    found: dict[str, RunInfo] = {}
    models: dict[str, Any] = {}
    known = {run.run_id: run for run in store.runs()}
    for study in bench.studies:
        config = study.config
        if config.name not in names:
            continue
        model = models.setdefault(config.model, load_model(config.model))
        dataset = load_dataset(config.dataset, model, **dict(config.dataset_options))
        run = known.get(config.run_id(dataset.fingerprint))
        if run is not None and run.status == "complete":
            found[config.name] = run
    return found


def study_methods(bench: Any) -> list[str]:
    """The method labels of the MAIN studies in file order, a variant ("Score-CAM (no ReLU)") right
    after the method it varies."""
    labels = [s.label for study in bench.studies if study.config.name in MAIN for s in study.config.methods]
    ordered: list[str] = []
    for label in labels:
        if label not in ordered:
            ordered.append(label)
            ordered += [v for v in labels if v.startswith(label + " (") and v not in ordered]
    return ordered


def sig(value: float) -> str:
    return f"{value:.3f}"


def cost_table(store: Store, runs: Sequence[RunInfo], order: Sequence[str]) -> str:
    """Per method: output, level, mean seconds, forward and backward passes per explanation."""
    per: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for row in store.explanations(run.run_id):
            explanation = json.loads(row["explanation"]) if row["explanation"] else {}
            per.setdefault(row["method"], []).append({**row, "level": explanation.get("level", "?"),
                                                      "output": run.config.get("output", "?")})
    lines = []
    for method in order:
        rows = per.get(method)
        if not rows:
            continue
        seconds = [r["seconds"] for r in rows]
        lines.append([method, rows[0]["output"], rows[0]["level"], f"{np.mean(seconds):.2f}",
                      f"{np.min(seconds):.2f}-{np.max(seconds):.2f}", f"{np.mean([r['forward_passes'] for r in rows]):.0f}",
                      f"{np.mean([r['backward_passes'] for r in rows]):.0f}", str(len(rows))])
    return markdown_table(["method", "output", "features", "seconds (mean)", "seconds (range)", "forward passes",
                           "backward passes", "photos"], lines)


def completeness_lines(store: Store, runs: Sequence[RunInfo]) -> list[str]:
    """For methods that report a completeness delta (IG, GradientSHAP): |delta| relative to the gap
    F(x) - F(baseline) it should add up to, median and largest over the photos."""
    ratios: dict[str, list[float]] = {}
    for run in runs:
        for row in store.explanations(run.run_id):
            explanation = json.loads(row["explanation"]) if row["explanation"] else {}
            delta, out, base = (explanation.get(k) for k in ("delta", "output_value", "baseline_value"))
            if delta is not None and out is not None and base is not None and out != base:
                ratios.setdefault(row["method"], []).append(abs(delta) / abs(out - base))
    return [f"- {method}: |completeness delta| / |F(x) - F(baseline)| median {np.median(r):.1%}, largest {np.max(r):.1%} "
            f"({len(r)} photos)" for method, r in ratios.items()]


def ranking_table(summary: Sequence[SummaryRow], methods: Sequence[str], references: Sequence[str]) -> str:
    """Rank of each method per ranked metric (1 = best mean; references not ranked but placed: the
    number of methods they beat), and the mean rank."""
    cell = {(r.method, r.metric): r for r in summary}
    ranks: dict[str, list[int]] = {m: [] for m in methods}
    for metric in RANKED:
        higher = cell[(methods[0], metric)].higher_is_better
        means = {m: cell[(m, metric)].mean for m in methods}
        ordered = sorted(methods, key=lambda m: -means[m] if higher else means[m])
        for m in methods:  # equal means share the better rank
            ranks[m].append(1 + sum(1 for o in ordered if (means[o] > means[m] if higher else means[o] < means[m])))
    lines = [[m, *map(str, ranks[m]), f"{np.mean(ranks[m]):.1f}"] for m in sorted(methods, key=lambda m: np.mean(ranks[m]))]
    for reference in references:
        beats = []
        for metric in RANKED:
            higher = cell[(reference, metric)].higher_is_better
            value = cell[(reference, metric)].mean
            worse = [m for m in methods if (cell[(m, metric)].mean < value if higher else cell[(m, metric)].mean > value)]
            beats.append(f"beats {len(worse)}")
        lines.append([f"*{reference}*", *beats, ""])
    return markdown_table(["method", *RANKED, "mean rank"], lines)


def per_photo_table(rows: Sequence[dict[str, Any]], photos: Sequence[Any], probabilities: dict[str, float]) -> str:
    value = {(r["example_id"], r["method"], r["metric"]): r["value"] for r in rows}
    header = ["photo (true class, p)", *(f"{m} del / ins" for m in PER_PHOTO)]
    lines = []
    for photo in photos:
        cells = []
        for method in PER_PHOTO:
            d, i = value.get((photo.id, method, "deletion AUC")), value.get((photo.id, method, "insertion AUC"))
            cells.append("-" if d is None or i is None else f"{d:.2f} / {i:.2f}")
        mark = "" if photo.predicted == photo.label else " (wrong)"
        lines.append([f"{photo.id} ({photo.label_name}, {probabilities.get(photo.id, float('nan')):.2f}){mark}", *cells])
    return markdown_table(header, lines)


def true_class_probability(store: Store, run: RunInfo) -> dict[str, float]:
    """p(true class) per photo, read from the stored explanations' predictions (the model's
    probabilities on the unperturbed photo; the explained target is the true class)."""
    found: dict[str, float] = {}
    for row in store.explanations(run.run_id):
        if row["explanation"] and row["example_id"] not in found:
            explanation = json.loads(row["explanation"])
            found[row["example_id"]] = float(explanation["prediction"]["probabilities"][explanation["target"]["index"]])
    return found


def sanity_tables(store: Store, runs: dict[str, RunInfo], out: Path) -> str:
    """Per sanity study: final Spearman correlation per method (mean [interval]), photos, how many
    flagged, how many final re-runs gave an exactly constant map (reported as 0), and a PNG of the
    mean correlation after each step of the full-cascade studies (one panel each)."""
    lines = []
    cascades: dict[str, dict[str, list[list[float]]]] = {}
    steps: list[str] = []
    for name, run in runs.items():
        rows = store.results(run.run_id)
        summary = summarise(rows, seed=0)
        for r in summary:
            mine = [row for row in rows if row["method"] == r.method and row["value"] is not None]
            flagged = sum(bool(row["details"].get("flagged")) for row in mine)
            constant = sum(row["details"]["correlations"][-1] == 0.0 and row["details"].get("constant_reruns", 1) > 0
                           for row in mine)
            every = all(row["details"].get("every_step", True) for row in mine)
            lines.append([name.removeprefix("imagenet-sanity-"), r.method, f"{sig(r.mean)} [{sig(r.ci_low)}, {sig(r.ci_high)}]",
                          f"{r.n}" + (f" (+{r.n_errors} err)" if r.n_errors else ""), str(flagged), str(constant),
                          "every step" if every else "last only"])
            if every and mine:
                cascades.setdefault(name, {})[r.method] = [row["details"]["correlations"] for row in mine]
                steps = mine[0]["details"]["steps"]
    if cascades:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.0 * len(cascades), 4.4), dpi=110)
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(cascades), squeeze=False, sharey=True)[0]
        for axis, (name, curves) in zip(axes, cascades.items()):
            for method, values in curves.items():
                axis.plot(range(len(steps)), np.mean(values, axis=0), marker="o", markersize=3, label=method)
            axis.set_xticks(range(len(steps)), [s.replace("layer ", "b") for s in steps], rotation=90, fontsize=7)
            axis.set_title(name.removeprefix("imagenet-sanity-"), fontsize=9)
            axis.set_xlabel("randomised down to (head, blocks 15..0, stem)", fontsize=8)
            axis.axhline(0.0, color="grey", linewidth=0.5)
        axes[0].set_ylabel("Spearman rho with the original map (mean over photos)", fontsize=8)
        axes[-1].legend(fontsize=7, ncol=2)
        figure.tight_layout()
        figure.savefig(out)
    return markdown_table(["study", "method", "Spearman rho after the last step", "photos", "flagged (|rho| >= 0.5)",
                           "exactly constant re-run (rho reported 0)", "re-runs"], lines)


def extra_tables(store: Store, bench: Any, runs: dict[str, RunInfo], metrics: Sequence[str]) -> list[str]:
    """Studies that vary one method on a few photos (not MAIN, not sanity): their summary beside the
    MAIN rows of the same method on the same photos."""
    names = {s.label: s.name for study in bench.studies if study.config.name in MAIN for s in study.config.methods}
    main_rows = [r for name in MAIN if name in runs for r in store.results(runs[name].run_id)]
    out = []
    for study in bench.studies:
        name = study.config.name
        if name in MAIN or name.startswith("imagenet-sanity") or name not in runs:
            continue
        rows = store.results(runs[name].run_id)
        photos = {r["example_id"] for r in rows}
        methods = {s.name for s in study.config.methods}
        same = [r for r in main_rows if r["example_id"] in photos and names.get(r["method"]) in methods]
        summary = summarise(same + rows, metrics=metrics, seed=0)
        out.append(f"### {name} ({len(photos)} photos: {', '.join(sorted(photos))})\n\n{summary_markdown(summary)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=STUDY)
    parser.add_argument("--baselines", type=Path, default=BASELINES)
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the CSV and the PNGs go")
    args = parser.parse_args()
    bench = load_bench_file(args.study)
    names = [s.config.name for s in bench.studies]
    store = Store(bench.db or "results/salience.db")
    runs = study_runs(bench, store, names)
    missing = [n for n in names if n not in runs]
    if missing:
        print(f"note: no complete run of {', '.join(missing)}")
    methods = study_methods(bench)
    metrics = [m.label for m in bench.studies[0].config.metrics]
    baseline_data = json.loads(args.baselines.read_text(encoding="utf-8"))
    references = list(dict.fromkeys(r["method"] for r in baseline_data["rows"]))
    rows = [r for name in MAIN if name in runs for r in store.results(runs[name].run_id)] + baseline_data["rows"]
    photos = load_photos()
    correct = {p.id for p in photos if p.predicted == p.label}
    order = [*methods, *references]
    subsets = {"all 8 photos": rows,
               "4 correctly classified photos": [r for r in rows if r["example_id"] in correct],
               "4 misclassified photos": [r for r in rows if r["example_id"] not in correct]}
    csv_rows = []
    for subset, chosen in subsets.items():
        summary = summarise(chosen, methods=order, metrics=metrics, seed=0)
        csv_rows += [{"photos": subset, **r.to_dict()} for r in summary]
        faithfulness = [r for r in summary if r.metric in ("deletion AUC", "insertion AUC")]
        print(f"\n## {subset}\n\n{summary_markdown(summary if subset == 'all 8 photos' else faithfulness)}")
        if subset == "all 8 photos":
            plot_heat_table(summary, args.docs / "imagenet_methods_heat.png",
                            title="EfficientNet-Lite0, 8 photos, true class: mean [95 % bootstrap interval]")
            ranked = [m for m in methods if m not in CONSTANT_MAPS]
            print(f"\n## Ranking (all 8 photos; not ranked: {', '.join(CONSTANT_MAPS)})\n\n"
                  f"{ranking_table(summary, ranked, references)}")
    write_csv(csv_rows, args.docs / "imagenet_methods_summary.csv",
              ["photos", "method", "metric", "higher_is_better", "n", "n_errors", "mean", "ci_low", "ci_high", "first_error"])
    probabilities = true_class_probability(store, runs[MAIN[1]]) if MAIN[1] in runs else {}
    print(f"\n## Per photo: deletion / insertion AUC\n\n{per_photo_table(rows, photos, probabilities)}")
    for table in extra_tables(store, bench, runs, metrics):
        print(f"\n{table}")
    main_runs = [runs[n] for n in MAIN if n in runs]
    print(f"\n## Time and passes per explanation\n\n{cost_table(store, main_runs, methods)}")
    print("\n".join(completeness_lines(store, main_runs)))
    sanity_runs = {n: runs[n] for n in names if n in runs and n.startswith("imagenet-sanity")}
    if sanity_runs:
        print(f"\n## Randomisation sanity check\n\n{sanity_tables(store, sanity_runs, args.docs / 'imagenet_methods_sanity.png')}")
    for name in names:
        if name in runs:
            versions = runs[name].versions
            print(f"\n{name}: run {runs[name].run_id}, salience {versions.get('salience')}, torch {versions.get('torch')}")


if __name__ == "__main__":
    main()
