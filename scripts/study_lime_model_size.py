"""Tables and the plot of the model-size study (issue 11) from its results database.

Reads the runs of ``docs/studies/lime_model_size.toml`` (run it first, or while it runs: every number
is computed from the sentences done so far, and their count is printed), and writes:

* a Markdown table per method: each model's accuracy on the study's sentences and the mean of every
  metric with its percentile-bootstrap 95 % interval (2,000 resamples, seed 0);
* paired differences, largest MiniLM minus smallest, on the sentences both have (bootstrap over
  sentences);
* ``docs/studies/lime_model_size.png``: accuracy, plausibility and faithfulness against model size,
  one line per method, with the intervals.

    python scripts/study_lime_model_size.py [--db results/lime_model_size.db] [--png PATH]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from salience.evaluate.config import load_bench_file, model_fingerprint
from salience.evaluate.store import Store
from salience.evaluate.summary import bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
STUDY_FILE = ROOT / "docs" / "studies" / "lime_model_size.toml"
PNG = ROOT / "docs" / "studies" / "lime_model_size.png"
# parameters of each model (counted from the loaded weights; the SmolLM2 head adds 2 x 576)
PARAMETERS = {"minilm-l2": 15.6e6, "minilm-l4": 19.2e6, "minilm-l6": 22.7e6, "smollm2-head": 134.5e6,
              "smollm2-zero-shot": 134.5e6}
PLOTTED = (("accuracy", "accuracy on the study's sentences"), ("token F1", "plausibility: token F1 (lexicon)"),
           ("AOPC comprehensiveness", "faithfulness: AOPC comprehensiveness"))
FAITHFULNESS = ("comprehensiveness@10", "comprehensiveness@30", "comprehensiveness@50", "AOPC comprehensiveness",
                "sufficiency@10", "sufficiency@30", "sufficiency@50", "AOPC sufficiency")
PLAUSIBILITY = ("token F1", "IOU F1", "AUPRC (trapezoid)", "average precision")
PAIRED = ("token F1", "IOU F1", "average precision", "AOPC comprehensiveness", "AOPC sufficiency")


@dataclass
class ModelRun:
    name: str
    correct: dict[str, float]  # example id -> 1.0 if the predicted class is the label
    values: dict[tuple[str, str], dict[str, float]]  # (method, metric) -> example id -> value


def load_runs(db: Path) -> list[ModelRun]:
    bench = load_bench_file(STUDY_FILE)
    out = []
    with Store(db) as store:
        runs = store.runs()  # newest first
        for study in bench.studies:
            # the newest run of this study on the model's weights as they are now (a retrained or
            # repacked model is a new run; older runs of the same name stay in the database)
            weights = model_fingerprint(study.config.model)
            run = next((r for r in runs if r.name == study.config.name
                        and r.config.get("identity", {}).get("model") == weights), None)
            if run is None:
                continue
            labels = {e["example_id"]: e["label"] for e in store.examples(run.run_id)}
            correct: dict[str, float] = {}
            for row in store.explanations(run.run_id):
                if row["explanation"] and row["example_id"] not in correct:
                    prediction = json.loads(row["explanation"])["prediction"]["index"]
                    correct[row["example_id"]] = float(prediction == labels[row["example_id"]])
            values: dict[tuple[str, str], dict[str, float]] = {}
            for row in store.results(run.run_id):
                if row["value"] is not None:
                    values.setdefault((row["method"], row["metric"]), {})[row["example_id"]] = float(row["value"])
            out.append(ModelRun(study.config.name, correct, values))
    return out


def interval(values: list[float] | np.ndarray) -> tuple[float, float, float, int]:
    data = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(data)
    return (float(data.mean()) if data.size else float("nan")), low, high, int(data.size)


def fmt(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def metric_table(runs: list[ModelRun], metrics: tuple[str, ...]) -> str:
    """One row per (method, model): mean [95 % interval] of each metric; n when it is not the
    number of sentences done (plausibility is undefined on sentences without a lexicon word)."""
    methods = list(dict.fromkeys(method for run in runs for method, _ in run.values))
    lines = ["| method | model | sentences | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for method in methods:
        for run in runs:
            cells = []
            for metric in metrics:
                mean, low, high, n = interval(list(run.values.get((method, metric), {}).values()))
                cells.append(fmt(mean, low, high) + (f" n={n}" if n != len(run.correct) else ""))
            lines.append(f"| {method} | {run.name} | {len(run.correct)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_table(runs: list[ModelRun]) -> str:
    lines = ["| model | parameters | sentences | accuracy [95 %] |", "|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.name} | {PARAMETERS[run.name] / 1e6:.1f} M | {len(run.correct)} | "
                     f"{fmt(*interval(list(run.correct.values()))[:3])} |")
    return "\n".join(lines) + "\n"


def paired_differences(runs: list[ModelRun], larger: str, smaller: str) -> str:
    by_name = {run.name: run for run in runs}
    if larger not in by_name or smaller not in by_name:
        return ""
    big, small = by_name[larger], by_name[smaller]
    lines = [f"Paired differences {larger} - {smaller} (the same sentences; bootstrap over sentences):", "",
             "| method | metric | n | difference [95 %] |", "|---|---|---|---|"]
    shared = sorted(set(big.correct) & set(small.correct))
    diff = [big.correct[i] - small.correct[i] for i in shared]
    lines.append(f"| (model) | accuracy | {len(diff)} | {fmt(*interval(diff)[:3])} |")
    for method, metric in big.values:
        if metric not in PAIRED:
            continue
        a, b = big.values[(method, metric)], small.values.get((method, metric), {})
        common = sorted(set(a) & set(b))
        diff = [a[i] - b[i] for i in common]
        if diff:
            lines.append(f"| {method} | {metric} | {len(diff)} | {fmt(*interval(diff)[:3])} |")
    return "\n".join(lines) + "\n"


def _point(run: ModelRun, method: str | None, metric: str) -> tuple[float, float, float]:
    """Mean and the distances down and up to the interval's ends (method None: the accuracy)."""
    data = list(run.correct.values()) if method is None else list(run.values.get((method, metric), {}).values())
    mean, low, high, _ = interval(data)
    return mean, mean - low, high - mean


def plot(runs: list[ModelRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(method for run in runs for method, _ in run.values))
    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.6))
    ladder = [run for run in runs if run.name.startswith("minilm")]
    others = [run for run in runs if not run.name.startswith("minilm")]
    markers = {"smollm2-head": "s", "smollm2-zero-shot": "^"}
    for axis, (metric, title) in zip(axes, PLOTTED):
        series = [("model", None)] if metric == "accuracy" else [(m, m) for m in methods]
        for offset, (label, method) in enumerate(series):
            jitter = 1 + 0.03 * (offset - (len(series) - 1) / 2)
            x = [PARAMETERS[r.name] * jitter for r in ladder]
            y = np.array([_point(r, method, metric) for r in ladder])
            line = axis.errorbar(x, y[:, 0], yerr=y[:, 1:].T, marker="o", capsize=3, label=label)
            for run in others:
                mean, below, above = _point(run, method, metric)
                axis.errorbar([PARAMETERS[run.name] * jitter], [mean], yerr=[[below], [above]], marker=markers[run.name],
                              color=line[0].get_color(), capsize=3, linestyle="none")
        axis.set_xscale("log")
        sizes = sorted(set(PARAMETERS.values()))
        axis.set_xticks(sizes, [f"{size / 1e6:.1f}M" for size in sizes], fontsize=7, rotation=45, ha="right")
        axis.minorticks_off()
        axis.set_xlabel("parameters (o MiniLM 2/4/6 layers; s SmolLM2 head; ^ zero-shot)", fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=None, help="results database (default: the study file's)")
    parser.add_argument("--png", type=Path, default=PNG)
    args = parser.parse_args(argv)
    db = args.db or ROOT / (load_bench_file(STUDY_FILE).db or "results/salience.db")
    runs = load_runs(db)
    if not runs:
        raise SystemExit(f"no run of {STUDY_FILE.name} in {db}: run `salience bench {STUDY_FILE}` first")
    print(accuracy_table(runs))
    print(metric_table(runs, FAITHFULNESS))
    print(metric_table(runs, PLAUSIBILITY))
    print(paired_differences(runs, "minilm-l6", "minilm-l2"))
    print(paired_differences(runs, "smollm2-head", "minilm-l6"))
    plot(runs, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
