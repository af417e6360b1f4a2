"""Integrated gradients: speed at equal per-token error, Salience against Captum, on the trained model.

The main benchmark compares Salience's adaptive IG (it stops when every token's error bound,
|K15 - G7| on Gauss-Kronrod pieces, is within 1 % of the largest score) with Captum's default 50
steps: unequal work and unequal accuracy. This script runs,
on the zoo MiniLM classifier and the benchmark's inputs (movie sentences cut to 32 and 128 tokens):

- Salience: ``salience.explain(model, text, method="ig", level="token")`` with its defaults
  (adaptive) and with fixed ``steps`` (16, 32, 50);
- Captum ``LayerIntegratedGradients`` on the word-embedding layer at a ladder of ``n_steps``
  (Gauss-Legendre, its default rule; 16, 32 and 50 among them), ``internal_batch_size`` from the
  model's measured throughput, as in the main benchmark;

against a reference computed by neither: composite Gauss-Legendre with ``--ref-nodes`` gradients
(panels of 8 nodes), accumulated in float64 (``impls.ig_reference``). Captum itself at
``--check-steps`` steps is reported against that reference as a check of it. Errors: per-token =
max |scores - ref| / max |ref|, and relative L1 = sum |scores - ref| / sum |ref| (token scores at
the output of the word-embedding layer, summed over the embedding dimension; baseline pad,
explained output the predicted class's probability, as everywhere in the benchmark).

Times are medians over ``--repeats`` rounds; each round runs every implementation once, in turn, so
that a busy moment on a shared machine falls on all of them. Passes are counted by the benchmark's
forward hook. Then, for each Salience row, the cheapest Captum row whose per-token error is at most
as large gives the speed at equal (or better) error.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ig_accuracy.py      # about 5-10 minutes on 2 cores

Writes benchmarks/RESULTS-ig-accuracy.md (``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402
import impls  # noqa: E402
import numpy as np  # noqa: E402
from impls import Case, Settings  # noqa: E402
from run import fmt_s, machine  # noqa: E402

import salience  # noqa: E402


@dataclass
class Entry:
    library: str
    label: str
    steps: str
    run: Callable[[], np.ndarray]
    times: list[float] = field(default_factory=list)
    forward: int = 0
    backward: int = 0
    scores: np.ndarray | None = None
    per_token: float = float("nan")
    rel_l1: float = float("nan")
    completeness: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def salience_run(case: Case, steps: int | None) -> Callable[[], np.ndarray]:
    params = {} if steps is None else {"steps": steps}
    used: dict[str, int] = {}

    def run() -> np.ndarray:
        e = salience.explain(case.clf, case.text, method="ig", level="token", output="probability", **params)
        assert e.target.index == case.target
        used["steps"] = e.params.get("steps_used") or steps or 0
        return np.asarray(e.token_scores, dtype=np.float64)

    run.used = used  # type: ignore[attr-defined]
    return run


def captum_run(case: Case, steps: int) -> Callable[[], np.ndarray]:
    from captum.attr import LayerIntegratedGradients

    def run() -> np.ndarray:
        lig = LayerIntegratedGradients(impls.forward_ids(case), case.clf.embedding_layer)
        attr = lig.attribute(case.ids, baselines=case.baseline_ids(case.pad_id), target=case.target, n_steps=steps,
                             internal_batch_size=case.limit.best_batch(True))
        return impls._np(attr[0].sum(-1))

    return run


def interpolate(ladder: list[Entry], error: float) -> tuple[float, float] | None:
    """Steps and seconds a fixed-step ladder (sorted by steps) needs for ``error``: log(error) is
    interpolated linearly in log(steps) between the first two neighbouring rows that bracket it, the
    seconds linearly in steps. None when no pair of neighbours brackets it."""
    for low, high in zip(ladder, ladder[1:]):
        if low.per_token > error >= high.per_token:
            a, b = np.log(int(low.steps)), np.log(int(high.steps))
            t = (np.log(error) - np.log(low.per_token)) / (np.log(high.per_token) - np.log(low.per_token))
            steps = float(np.exp(a + t * (b - a)))
            share = (steps - int(low.steps)) / (int(high.steps) - int(low.steps))
            return steps, low.median + share * (high.median - low.median)
    return None


def fmt_e(value: float) -> str:
    return f"{value:.1e}"


def one_length(clf: salience.TextClassifier, counter: cases.PassCounter, length: int,
               args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Run every implementation on the ``length``-token input; return (table lines, summary lines)."""
    text = cases.text_of_length(clf.tokenizer, length)
    encoded = clf.encode(text)
    target = clf.predict(encoded).index
    limit = cases.measure_limit(clf, encoded.input_ids, target=target, max_call_seconds=3.0)
    print(f"== minilm/{length}: {limit.describe()}", file=sys.stderr, flush=True)
    case = Case("minilm", clf, length, text, encoded, target, limit, Settings(ref_panels=args.ref_nodes // 8))

    started = time.perf_counter()
    reference = impls.ig_reference(case)
    ref_seconds = time.perf_counter() - started
    check = captum_run(case, args.check_steps)()
    f_x, f_0 = impls.ig_ends(case)
    gap = f_x - f_0
    print(f"   reference {ref_seconds:.0f} s; Captum {args.check_steps} steps vs reference: per-token "
          f"{impls.max_rel(check, reference):.1e}", file=sys.stderr, flush=True)

    entries = [Entry("salience", "Salience ig (adaptive, default)", "", salience_run(case, None))]
    entries += [Entry("salience", f"Salience ig steps={k}", str(k), salience_run(case, k)) for k in args.salience_steps]
    entries += [Entry("captum", f"Captum LayerIntegratedGradients n_steps={k}", str(k), captum_run(case, k))
                for k in args.captum_steps]
    for entry in entries:  # warm-up; scores and passes
        counter.reset()
        entry.scores = entry.run()
        passes = counter.reset()
        entry.forward, entry.backward = passes.forward, passes.backward
        used = getattr(entry.run, "used", None)
        if used and not entry.steps:
            entry.steps = str(used["steps"])
        entry.per_token = impls.max_rel(entry.scores, reference)
        entry.rel_l1 = impls.rel_l1(entry.scores, reference)
        entry.completeness = abs(entry.scores.sum() - gap) / abs(gap)
    for round_ in range(args.repeats):
        order = entries if round_ % 2 == 0 else entries[::-1]
        for entry in order:
            started = time.perf_counter()
            entry.run()
            entry.times.append(time.perf_counter() - started)
        print(f"   round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    lines = [f"### {length} tokens", "",
             f"Predicted class {clf.labels[target]}, F(x) - F(pad baseline) = {gap:.4f}. Reference: composite "
             f"Gauss-Legendre, {args.ref_nodes} gradients, float64 sums ({ref_seconds:.0f} s). Check: Captum at "
             f"{args.check_steps} steps differs from it by {fmt_e(impls.max_rel(check, reference))} per token "
             f"(rel. L1 {fmt_e(impls.rel_l1(check, reference))}). Captum internal_batch_size="
             f"{limit.best_batch(True)}; best measured {1e3 * limit.per_row(True):.1f} ms per forward+backward row.", "",
             "| implementation | steps | passes (fwd / of which fwd+bwd) | median s | per-token error | rel. L1 | "
             "completeness error |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e.label} | {e.steps} | {e.forward} / {e.backward} | {fmt_s(e.median)} | {fmt_e(e.per_token)} | "
                     f"{fmt_e(e.rel_l1)} | {fmt_e(e.completeness)} |")

    summary = []
    for mine, other in (("salience", "captum"), ("captum", "salience")):
        name, peer_name = ("Salience", "Captum") if mine == "salience" else ("Captum", "Salience")
        rows = [e for e in entries if e.library == mine and (mine == "salience" or e.steps in map(str, args.compare))]
        peers = sorted((e for e in entries if e.library == other), key=lambda e: e.median)
        interpolated = mine == "salience"
        lines += ["", f"{name} rows against the fastest {peer_name} row whose per-token error is at most theirs "
                  f"(within 1 %, so that equal rules at equal steps match); speed-up = {peer_name}'s median / "
                  f"{name}'s (> 1: {name} is faster)."
                  + (" Interpolated: the Captum steps that reach the same error, log(error) linear in log(steps) "
                     "between the two ladder rows around it, and their seconds, linear in steps (an estimate; "
                     "the ladder rows themselves are measured)." if interpolated else ""), "",
                  f"| {name} row | its error | its s | fastest {peer_name} row with error <= it | its error | its s | "
                  "speed-up |" + (" interpolated: Captum steps, s, speed-up |" if interpolated else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if interpolated else "")]
        ladder = sorted((e for e in entries if e.library == "captum"), key=lambda e: int(e.steps))
        for ours in rows:
            match = next((c for c in peers if c.per_token <= 1.01 * ours.per_token), None)
            if match is None:
                best = min(peers, key=lambda c: c.per_token)
                lines.append(f"| {ours.label} | {fmt_e(ours.per_token)} | {fmt_s(ours.median)} | none (most accurate: "
                             f"{best.label}, {fmt_e(best.per_token)}) | | | |" + (" |" if interpolated else ""))
                summary.append(f"- {length} tokens, {ours.label} ({ours.steps} steps, per-token error "
                               f"{fmt_e(ours.per_token)}, {fmt_s(ours.median)} s): no {peer_name} row run here is as "
                               f"accurate (most accurate: {best.label}, {fmt_e(best.per_token)}, {fmt_s(best.median)} s)")
                continue
            ratio = match.median / ours.median
            estimate = interpolate(ladder, ours.per_token) if interpolated else None
            extra = "" if not interpolated else " — |" if estimate is None else \
                f" {estimate[0]:.0f}, {fmt_s(estimate[1])}, {estimate[1] / ours.median:.2f}x |"
            lines.append(f"| {ours.label} | {fmt_e(ours.per_token)} | {fmt_s(ours.median)} | {match.label} | "
                         f"{fmt_e(match.per_token)} | {fmt_s(match.median)} | {ratio:.2f}x |" + extra)
            verdict = f"{name} {ratio:.2f}x faster" if ratio >= 1 else f"{peer_name} {1 / ratio:.2f}x faster"
            summary.append(f"- {length} tokens, {ours.label} ({ours.steps} steps, {ours.forward}/{ours.backward} "
                           f"passes, per-token error {fmt_e(ours.per_token)}, {fmt_s(ours.median)} s) vs {match.label} "
                           f"({match.steps} steps, {match.forward}/{match.backward} passes, error "
                           f"{fmt_e(match.per_token)}, {fmt_s(match.median)} s): {verdict}"
                           + ("" if estimate is None else f"; Captum interpolated to the same error: about "
                              f"{estimate[0]:.0f} steps, {fmt_s(estimate[1])} s, {estimate[1] / ours.median:.2f}x"))
    return lines, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--captum-steps", nargs="+", type=int, default=[8, 12, 16, 24, 32, 40, 50, 64, 100])
    parser.add_argument("--compare", nargs="+", type=int, default=[16, 32, 50],
                        help="Captum rows also matched against Salience's (the others only serve as the ladder)")
    parser.add_argument("--salience-steps", nargs="+", type=int, default=[16, 32, 50])
    parser.add_argument("--ref-nodes", type=int, default=512, help="reference gradients (a multiple of 8)")
    parser.add_argument("--check-steps", type=int, default=512, help="Captum's n_steps for the check of the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="a line for the Machine section (e.g. that the machine was shared)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS-ig-accuracy.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    clf = cases.build_model("minilm", cases.device())
    counter = cases.PassCounter(clf.model)
    tables, summary = [], []
    for length in args.lengths:
        lines, found = one_length(clf, counter, length, args)
        tables += [*lines, ""]
        summary += found
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + shlex.join(["python", "benchmarks/ig_accuracy.py", *sys.argv[1:]])
    out = ["# IG at equal per-token error: Salience vs Captum on the trained MiniLM", "",
           f"Latest run: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
           f"{(time.perf_counter() - started) / 60:.1f} min. Command:", "", f"    {command}", "",
           "## Machine", *machine(), *([f"- note: {args.note}"] if args.note else []), "",
           "## Model and inputs",
           f"- {cases.DESCRIPTIONS['minilm']}; the main benchmark's inputs (test-split movie sentences cut to "
           f"{' and '.join(map(str, args.lengths))} tokens); baseline pad; output: probability of the predicted class", "",
           "## Speed at equal or better per-token error", "", *summary, "",
           "## Tables", "", "Passes: rows through the model per run (fwd counts every forward, fwd+bwd those "
           "with a backward pass). Per-token error: max abs difference to the reference / max abs reference score. "
           f"Times: median of {args.repeats} rounds.", "", *tables]
    text = "\n".join(out)
    args.output.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
