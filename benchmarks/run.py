"""Time Salience and its peers (Captum, tint, lime, shap) on the same models, inputs and targets,
in one process, and print / write a table (benchmarks/RESULTS.md). See benchmarks/README.md.

    OMP_NUM_THREADS=1 python benchmarks/run.py --quick      # smoke test, about 2 minutes
    python benchmarks/run.py                                # the full run (about 25 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402
import common  # noqa: E402
import impls  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import fmt_s, log  # noqa: E402
from impls import METHODS, SHORT, Case, Impl, Settings  # noqa: E402

LENGTHS = (32, 128, 512)
LIBRARIES = ("salience", "captum", "tint", "lime", "shap")


# ---------------------------------------------------------------------------------------- results
@dataclass
class Row:
    model: str
    length: int | str
    method: str
    impl: Impl
    settings: str = ""
    times: list[float] = field(default_factory=list)
    forward: int = 0  # passes per run (forward-only + forward-with-backward)
    backward: int = 0
    calls: int = 0
    limit: float | None = None
    peak: int | None = None
    accuracy: str = ""
    skipped: str = ""
    warmup: str = ""
    notes: list[str] = field(default_factory=list)
    outputs: list[impls.Output] = field(default_factory=list)
    ratio: float | None = None  # Salience median / this peer's median
    length_scale: float = 1.0  # mean padded row length / input length (deletion makes rows shorter)
    backward_scale: float = 1.0
    order: int = 0  # the implementation's place in impls.implementations() (Salience first per method)
    auto_settings: bool = True  # settings text from the implementation (batch sizes known at run time)

    def set_limit(self, limit: cases.Limit) -> None:
        self.limit = limit.seconds(self.forward - self.backward, self.backward,
                                   forward_scale=min(self.length_scale, 1.0), backward_scale=min(self.backward_scale, 1.0))

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


class Clock:
    """The whole run's time budget."""

    def __init__(self, minutes: float) -> None:
        self.start = time.perf_counter()
        self.budget = 60 * minutes

    @property
    def used(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, seconds: float) -> bool:
        return self.used + seconds <= self.budget


def fmt_est(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------ runner
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = cases.device()
        self.clock = Clock(args.budget)
        self.models: dict[str, Any] = {}
        self.counters: dict[str, cases.PassCounter] = {}
        self.tiny: dict[str, Case] = {}
        self.rows: list[Row] = []
        self.kshap_rows: list[dict[str, Any]] = []
        self.limits: list[tuple[str, int, cases.Limit, float]] = []
        self.spread: dict[int, tuple[float, float]] = {}  # id(limit) -> (second / first measurement), fwd and fwd+bwd
        self.memory: dict[str, Any] | None = None
        self.groups: list[tuple[Case, list[Row]]] = []
        self.limit_seconds: dict[int, float] = {}  # id(limit) -> seconds its first measurement took
        self.settings = Settings(kernel_shap_samples=args.kernel_shap_samples, lime_samples=args.lime_samples,
                                 ref_panels=args.ref_panels, sig_ref_panels=args.sig_ref_panels)
        self.impls = [i for i in impls.implementations() if i.method in args.methods and i.library in args.libraries]

    # ---------------------------------------------------------------- setup
    def model(self, name: str) -> Any:
        if name not in self.models:
            log(f"building model {name} ...")
            clf = cases.build_model(name, self.dev)
            self.models[name] = clf
            self.counters[name] = cases.PassCounter(clf.model)
        return self.models[name]

    def case(self, model_name: str, text: str, length: int | None = None) -> Case:
        clf = self.model(model_name)
        encoded = clf.encode(text)
        target = clf.predict(encoded).index
        started = time.perf_counter()
        limit = cases.measure_limit(clf, encoded.input_ids, target=target, max_call_seconds=self.args.max_call)
        self.limits.append((model_name, encoded.length, limit, time.perf_counter() - started))
        self.limit_seconds[id(limit)] = time.perf_counter() - started
        log(f"  limit {model_name}/{encoded.length}: {limit.describe()} ({time.perf_counter() - started:.0f} s)")
        return Case(model_name, clf, length or encoded.length, text, encoded, target, limit, self.settings)

    def remeasure(self, case: Case, rows: list[Row]) -> None:
        """Measure the limit again after the group's runs and keep the faster time per batch size
        (the limit is the best measured throughput; one measurement can catch a busy moment)."""
        around = {backward: sorted({max(1, b // 2), b, 2 * b} & set(case.limit.backward if backward else case.limit.forward))
                  for backward in (False, True) for b in [case.limit.best_batch(backward)]}
        again = cases.measure_limit(case.clf, case.encoded.input_ids, target=case.target,
                                    max_call_seconds=self.args.max_call, batches=around)
        self.spread[id(case.limit)] = (again.per_row(False) / case.limit.per_row(False),
                                       again.per_row(True) / case.limit.per_row(True))
        case.limit.merge(again)
        log(f"  limit again {case.model_name}/{case.encoded.length}: {again.describe()}; best {case.limit.describe()}")
        for row in rows:
            if row.times:
                row.set_limit(case.limit)

    def tiny_case(self, model_name: str, like: Case) -> Case:
        """An 8-token input on the same model, for warming up expensive implementations."""
        clf = self.model(model_name)
        text = cases.text_of_length(clf.tokenizer, 8)
        encoded = clf.encode(text)
        return Case(model_name, clf, 8, text, encoded, clf.predict(encoded).index, like.limit, self.settings)

    def estimate(self, impl: Impl, case: Case) -> float:
        forward, backward = impl.estimate(case)
        return impl.overhead * case.limit.seconds(max(forward - backward, 0), backward)

    def affordable(self, seconds: float) -> str:
        """'' if a job of ``seconds`` may run, else why it is skipped."""
        if seconds > self.args.max_run:
            return f"skipped (estimated {fmt_est(seconds)} per run > --max-run {self.args.max_run:.0f} s)"
        if not self.clock.fits(seconds):
            return f"skipped (estimated {fmt_est(seconds)}; time budget spent)"
        return ""

    # ---------------------------------------------------------------- one implementation
    def new_row(self, impl: Impl, case: Case, *, label: str | None = None, settings: str | None = None) -> Row:
        return Row(case.model_name, label or case.length, impl.method, impl,
                   settings if settings is not None else impl.settings(case), order=self.impls.index(impl)
                   if impl in self.impls else 0, auto_settings=settings is None)

    def measure(self, impl: Impl, case: Case, *, seeds: list[int] | None = None, label: str | None = None,
                settings: str | None = None) -> Row:
        row = self.new_row(impl, case, label=label, settings=settings)
        self.execute(row, case, seeds=seeds)
        return row

    def execute(self, row: Row, case: Case, *, seeds: list[int] | None = None) -> None:
        """Warm up, then time runs of ``row.impl`` on ``case`` and fill ``row`` (or mark it skipped)."""
        impl = row.impl
        run_fn = impl.run
        if row.auto_settings:
            row.settings = impl.settings(case)  # batch sizes from the limit as measured so far
        estimate = self.estimate(impl, case)
        why = self.affordable(estimate)
        if why:
            row.skipped = why
            log(f"    {case.model_name}/{case.length} {impl.name}: {why}")
            return
        counter = self.counters[case.model_name]
        # warm-up: the same call if cheap, else the same implementation on an 8-token input
        try:
            if estimate <= min(self.args.case_seconds / 4, 5.0):
                run_fn(case, 0)
                row.warmup = "same input"
            else:
                if case.model_name not in self.tiny:
                    self.tiny[case.model_name] = self.tiny_case(case.model_name, case)
                run_fn(self.tiny[case.model_name], 0)
                row.warmup = "8-token input"
        except Exception as error:  # noqa: BLE001 - a peer failing must not stop the benchmark
            row.skipped = f"failed: {type(error).__name__}: {error}"[:200]
            log(f"    {impl.name}: {row.skipped}")
            return
        wanted = self.args.repeats
        if impl.stochastic and seeds is None:
            wanted = max(wanted, self.args.seeds)
        seeds = seeds or list(range(wanted))
        for index, seed in enumerate(seeds):
            gc.collect()
            counter.reset()
            with cases.PeakMemory(self.dev) as peak:
                cases.sync(self.dev)
                started = time.perf_counter()
                output = run_fn(case, seed)
                cases.sync(self.dev)
                elapsed = time.perf_counter() - started
            passes = counter.reset()
            row.times.append(elapsed)
            row.outputs.append(output)
            row.forward, row.backward, row.calls = passes.forward, passes.backward, passes.calls
            if peak.added is not None:
                row.peak = max(row.peak or 0, peak.added)
            cost = output.info.get("cost")
            if cost is not None and (cost.forward_passes, cost.backward_passes) != (passes.forward, passes.backward):
                row.notes.append(f"Salience counted {cost.forward_passes}/{cost.backward_passes} passes, hook "
                                 f"{passes.forward}/{passes.backward}")
            # repeats: as many as fit in --case-seconds (at least 2 seeds for a stochastic method if affordable)
            floor = 2 if impl.stochastic and len(seeds) >= 2 and elapsed <= 2 * self.args.case_seconds else 1
            affordable = max(floor, int(self.args.case_seconds // max(elapsed, 1e-9)))
            if index + 1 >= min(len(seeds), affordable) or not self.clock.fits(elapsed):
                break
        forward_only = row.forward - row.backward
        fwd_tokens = passes.forward_tokens - passes.backward_tokens
        row.length_scale = fwd_tokens / (forward_only * case.encoded.length) if forward_only else 1.0
        row.backward_scale = passes.backward_tokens / (row.backward * case.encoded.length) if row.backward else 1.0
        row.set_limit(case.limit)
        if row.length_scale < 0.99:
            row.notes.append(f"rows {row.length_scale:.0%} of the input length on average (limit scaled)")
        for output in row.outputs:
            for note in output.info.get("warnings") or []:
                if note not in row.notes:
                    row.notes.append(note)
        log(f"    {case.model_name}/{case.length} {impl.name}: median {fmt_s(row.median)} s over {len(row.times)} "
            f"run(s); passes {row.forward} fwd / {row.backward} bwd; limit {fmt_s(row.limit)} s")

    # ---------------------------------------------------------------- references
    def reference_estimate(self, case: Case, method: str) -> float | None:
        if method == "integrated_gradients":
            return 1.3 * case.limit.seconds(2, self.settings.ref_panels * self.settings.ref_nodes)
        if method == "sequential_integrated_gradients":
            per_token = self.settings.sig_ref_panels * self.settings.ref_nodes
            return 1.3 * case.limit.seconds(case.length, (case.length - 2) * per_token)
        return None

    def compute_reference(self, case: Case, method: str) -> None:
        estimate = self.reference_estimate(case, method)
        if estimate is None or method in case.references:
            return
        why = self.affordable(estimate)
        if why:
            case.references[method] = None
            case.references[method + ":why"] = why
            return
        started = time.perf_counter()
        if method == "integrated_gradients":
            case.references[method] = impls.ig_reference(case)
        else:  # a path integral computed here; F(x) - F(x masked) by forward passes only as a check of it
            case.references[method] = impls.sig_path_reference(case)
            case.references[method + ":ftc"] = impls.sig_reference(case)
        log(f"    {case.model_name}/{case.length} reference for {SHORT[method]}: {time.perf_counter() - started:.1f} s")

    def accuracy(self, case: Case, rows: list[Row]) -> None:
        """Fill the accuracy column of one method's rows (Salience first, then peers)."""
        method = rows[0].method
        ran = [r for r in rows if r.outputs]
        if not ran:
            return
        salience_row = rows[0] if rows[0].impl.is_salience and rows[0].outputs else None
        reference = case.references.get(method)
        missing = "reference " + (case.references.get(method + ":why") or "not computed")
        if method == "integrated_gradients":
            f_x, f_0 = impls.ig_ends(case)
            gap = f_x - f_0
            for r in ran:
                scores = r.outputs[0].scores
                parts = [f"completeness error {abs(scores.sum() - gap) / max(abs(gap), 1e-300):.1e} of gap {abs(gap):.3g}"]
                parts.append(f"vs {self.settings.ref_panels * self.settings.ref_nodes}-step ref: rel. L1 "
                             f"{impls.rel_l1(scores, reference):.1e}, per-token max abs diff "
                             f"{impls.max_rel(scores, reference):.1e} of max abs ref" if reference is not None else missing)
                steps = r.outputs[0].info.get("steps")
                if steps:
                    parts.append(f"{steps} steps")
                r.accuracy = "; ".join(parts)
        elif method == "sequential_integrated_gradients":
            nodes = self.settings.sig_ref_panels * self.settings.ref_nodes
            for r in ran:
                if reference is None:
                    r.accuracy = missing
                    continue
                scores = r.outputs[0].scores
                r.accuracy = (f"vs {nodes}-gradient/token path ref: rel. L1 {impls.rel_l1(scores, reference):.1e}, "
                              f"max abs diff {impls.max_rel(scores, reference):.1e} of max abs ref")
            if reference is not None:
                ftc = case.references[method + ":ftc"]
                ran[0].notes.append(f"path ref vs F(x) - F(x with the token at [MASK]): max abs diff "
                                    f"{impls.max_rel(reference, ftc):.1e} of max abs ref (mean abs ref "
                                    f"{np.abs(reference).mean():.1e})")
        elif method in ("saliency", "input_x_gradient", "occlusion"):
            for r in ran:
                if r is salience_row:
                    r.accuracy = "exact by definition"
                elif salience_row is not None:
                    ours, theirs = salience_row.outputs[0].scores, r.outputs[0].scores
                    if ours.shape == theirs.shape:
                        diff = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-300)
                        r.accuracy = f"max abs diff to Salience {diff:.1e} (of max abs score)"
        elif method == "kernel_shap":
            for r in ran:
                r.accuracy = "see the exact-Shapley table"
        elif method == "lime":
            for r in ran:
                tops = [o.info["top"] for o in r.outputs]
                agreement = impls.top_k_agreement(tops, self.settings.top_k)
                zero = all(not np.any(o.scores) for o in r.outputs)
                r.accuracy = ("all scores 0" if zero else "") or (
                    f"top-{self.settings.top_k} agreement across {len(tops)} seeds {agreement:.2f}"
                    if agreement is not None else "1 seed: no agreement")

    def finalize(self, case: Case, rows: list[Row]) -> None:
        """Accuracy and Salience/peer ratios of one group, per method."""
        for method in self.args.methods:
            group = sorted((r for r in rows if r.method == method), key=lambda r: r.order)
            if not group:
                continue
            self.accuracy(case, group)
            for r in group:
                ours = salience_match(group, r)
                if not r.impl.is_salience and r.median and ours is not None and ours.median:
                    r.ratio = ours.median / r.median

    # ---------------------------------------------------------------- groups
    def group(self, model_name: str, length: int, deferred: list[tuple[int, float, Any]]) -> None:
        """Build the case, run what is cheap now (estimated <= --core-seconds) and defer the rest."""
        if not self.clock.fits(self.args.group_reserve):
            log(f"== {model_name}, {length} tokens: skipped (time budget spent)")
            for impl in self.impls:
                self.rows.append(Row(model_name, length, impl.method, impl, "", skipped="skipped (time budget spent "
                                     "before this group started)", order=self.impls.index(impl)))
            return
        log(f"== {model_name}, {length} tokens (elapsed {self.clock.used / 60:.1f} min)")
        clf = self.model(model_name)
        case = self.case(model_name, cases.text_of_length(clf.tokenizer, length), length)
        rows = [self.new_row(impl, case) for impl in self.impls]
        self.groups.append((case, rows))
        self.rows.extend(rows)
        for row in rows:
            estimate = self.estimate(row.impl, case)
            if estimate <= self.args.core_seconds:
                self.execute(row, case)
            else:
                deferred.append((priority(length, row.method), estimate, lambda row=row, case=case: self.execute(row, case)))
        if any(r.times for r in rows) and self.clock.fits(0.5 * self.limit_seconds.get(id(case.limit), 0.0)):
            self.remeasure(case, rows)
        for method in self.args.methods:
            estimate = self.reference_estimate(case, method)
            if estimate is None:
                continue
            if estimate <= self.args.core_seconds:
                self.compute_reference(case, method)
            else:
                deferred.append((priority(length, method), estimate,
                                 lambda case=case, method=method: self.compute_reference(case, method)))

    def kernel_shap_exact(self, like: Case) -> None:
        """KernelSHAP against exact Shapley values on a short input: error and passes at several budgets.
        Batch sizes come from the throughput measured on ``like`` (same model)."""
        words = self.args.kshap_words
        model_name = like.model_name
        clf = like.clf
        text = cases.text_of_words(words)
        encoded = clf.encode(text)
        case = Case(model_name, clf, encoded.length, text, encoded, clf.predict(encoded).index, like.limit, self.settings)
        label = f"{case.length} ({words} words)"
        log(f"== {model_name}, KernelSHAP vs exact Shapley ({words} words; elapsed {self.clock.used / 60:.1f} min)")
        estimate = self.kshap_estimate(like)
        why = self.affordable(estimate)
        if why:
            self.kshap_rows.append({"model": model_name, "label": label, "skipped": f"exact reference and runs {why}"})
            return
        exact = impls.exact_shapley(case)
        seeds = list(range(max(self.args.seeds, 1)))
        by_name = {i.name: i for i in self.impls if i.method == "kernel_shap"}
        full = self.settings.kernel_shap_samples
        # (implementation, name in the table, n, function, seeds); the estimators of one family get the
        # same budgets (Salience's sweep), the variants and shap's Partition explainer the full budget
        jobs: list[tuple[Impl, str, int, Any, list[int]]] = []
        for n in self.args.kshap_sweep:
            if "Salience kernel_shap" in by_name:
                jobs.append((by_name["Salience kernel_shap"], "Salience kernel_shap", n,
                             lambda c, s, n=n: impls.salience_kernel_shap(c, s, n), seeds))
            if "Captum KernelShap" in by_name:
                jobs.append((by_name["Captum KernelShap"], "Captum KernelShap (players: words)", n,
                             lambda c, s, n=n: impls.captum_kernel_shap(c, s, n), seeds))
            if "shap KernelExplainer" in by_name:
                jobs.append((by_name["shap KernelExplainer"], "shap KernelExplainer (l1_reg=False)", n,
                             lambda c, s, n=n: impls.shap_kernel(c, s, n), seeds))
        if "Captum KernelShap" in by_name:
            jobs.append((by_name["Captum KernelShap"], "Captum KernelShap (special tokens as an extra player)", full,
                         lambda c, s: impls.captum_kernel_shap(c, s, full, special_feature=True), seeds))
        if "shap KernelExplainer" in by_name:
            jobs.append((by_name["shap KernelExplainer"], "shap KernelExplainer (default l1_reg='num_features(10)')",
                         full, lambda c, s: impls.shap_kernel(c, s, full, l1_reg="num_features(10)"), seeds))
        partition = "shap Partition (Text masker; Owen values)"
        if partition in by_name:  # deterministic: one run
            jobs.append((by_name[partition], partition, full, lambda c, s: impls.shap_partition(c, s, full), [0]))
        scale = case.length / like.length  # estimates from the longer input's limit
        for impl, name, n, fn, runs in jobs:
            budgeted = Impl(impl.method, impl.library, name, impl.settings,
                            lambda c, n=n: (max(1, int((n + 3) * scale)), 0), fn, impl.stochastic, impl.overhead)
            row = self.measure(budgeted, case, seeds=runs, label=label, settings=f"n = {n}")
            entry: dict[str, Any] = {"model": model_name, "label": label, "impl": name, "n": n,
                                     "skipped": row.skipped}
            if row.outputs:
                errors = [impls.rel_l2(o.scores, exact) for o in row.outputs]
                entry.update(error=float(np.mean(errors)), error_max=float(np.max(errors)), seeds=len(errors),
                             passes=row.forward, median=row.median)
            self.kshap_rows.append(entry)

    def kshap_estimate(self, like: Case) -> float:
        """Seconds for the exact reference and the runs, from the (longer) ``like`` input's limit."""
        short = len(like.clf.tokenizer(cases.text_of_words(self.args.kshap_words))["input_ids"])
        rows = 2**self.args.kshap_words + self.args.seeds * (3 * sum(self.args.kshap_sweep)
                                                             + 3 * self.settings.kernel_shap_samples)
        return 1.3 * like.limit.seconds(rows, 0) * short / like.length

    def run_memory(self) -> None:
        args = self.args
        command = [sys.executable, str(HERE / "memory_case.py"), "--model", args.memory_model,
                   "--length", str(args.memory_length), "--max-memory", args.memory_budget]
        log(f"== memory: IG on {args.memory_model}/{args.memory_length} with max_memory={args.memory_budget} (subprocess)")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=max(60, args.max_run * 3))
        except subprocess.TimeoutExpired:
            self.memory = {"error": "timed out"}
            return
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        self.memory = json.loads(lines[-1]) if lines else {"error": (done.stderr or "no output")[-400:]}
        log(f"   {self.memory}")

    def run(self) -> None:
        """Memory case; then pass 1: every group, cheapest first, with its cheap runs (and its limit measured
        again); pass 2: the deferred (expensive) runs, target comparisons at 128 tokens first, cheapest first,
        while the budget lasts; then accuracy and ratios."""
        warnings.simplefilter("ignore")
        if self.args.memory:
            self.run_memory()
        groups = [(m, n) for m in self.args.models for n in self.args.lengths]
        groups.sort(key=lambda g: cost_proxy(*g))
        deferred: list[tuple[int, float, Any]] = []
        kshap_done: set[str] = set()
        for model_name, length in groups:
            self.group(model_name, length, deferred)
            like = next((c for c, _ in self.groups if c.model_name == model_name), None)
            if like is not None and model_name not in kshap_done and "kernel_shap" in self.args.methods:
                kshap_done.add(model_name)
                estimate = self.kshap_estimate(like)
                if estimate <= 4 * self.args.core_seconds:
                    self.kernel_shap_exact(like)
                else:
                    deferred.append((1, estimate, lambda like=like: self.kernel_shap_exact(like)))
        log(f"== deferred runs: {len(deferred)} (elapsed {self.clock.used / 60:.1f} min)")
        for _, _, job in sorted(deferred, key=lambda d: (d[0], d[1])):
            job()
        for case, rows in self.groups:
            for row in rows:
                if row.times:
                    row.set_limit(case.limit)
            self.finalize(case, rows)


def tag(row: Row) -> str:
    """Short method name, with the removal for perturbation methods benchmarked both ways."""
    return SHORT[row.method] + (f" ({row.impl.removal})" if row.method in ("kernel_shap", "lime") else "")


def salience_match(rows: list[Row], peer: Row) -> Row | None:
    """The Salience row a peer is compared with: same method and, for perturbation methods, the same
    way of removing a word (a [MASK] token or deletion), so both compute the same quantity."""
    return next((r for r in rows if r.impl.is_salience and r.method == peer.method
                 and r.impl.removal == peer.impl.removal), None)


TARGET_METHODS = ("integrated_gradients", "sequential_integrated_gradients", "kernel_shap", "lime")


def priority(length: int, method: str) -> int:
    """Pass-2 order: first the comparisons the issue's targets name (IG, SIG, KernelSHAP, LIME at 128
    tokens), then the rest; cheapest first within each."""
    return 0 if length == 128 and method in TARGET_METHODS else 1


def cost_proxy(model_name: str, length: int) -> float:
    """Rough multiply-adds of one forward pass, to run cheap groups first."""
    width, layers = {"small": (256, 4), "minilm": (384, 6), "base": (768, 12)}[model_name]
    return layers * length * (12 * width * width + 2 * length * width)


# --------------------------------------------------------------------------------------- reporting
def table(rows: list[Row]) -> list[str]:
    head = ["model", "tokens", "method", "implementation", "runs", "median s", "fwd", "bwd", "limit s",
            "actual/limit", "peak MB", "accuracy", "Salience/peer", "settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.skipped:
            cells = [r.model, str(r.length), SHORT[r.method], r.impl.name, "—", r.skipped, "", "", "", "", "", "", "",
                     r.settings]
        else:
            ratio = "" if r.ratio is None else f"{r.ratio:.3g} ({1 / r.ratio:.3g}x faster)" if r.ratio < 1 else \
                f"{r.ratio:.3g} ({r.ratio:.3g}x slower)"
            peak = "" if r.peak is None else f"{r.peak / 2**20:.0f}" if r.peak >= 2**20 else "<1"
            limit_ratio = "" if not r.limit else f"{r.median / r.limit:.2f}"
            runs = f"{len(r.times)}" + ("" if r.warmup == "same input" else "*")
            accuracy = r.accuracy + ("" if not r.notes else " ⚠ " + "; ".join(r.notes))
            cells = [r.model, str(r.length), SHORT[r.method], r.impl.name, runs, fmt_s(r.median), str(r.forward),
                     str(r.backward), fmt_s(r.limit), limit_ratio, peak, accuracy, ratio, r.settings]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def kshap_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | tokens | implementation | n | seeds | passes | median s | rel. L2 error vs exact (mean / max) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "impl" not in r:
            lines.append(f"| {r['model']} | {r['label']} | — | | | | | {r['skipped']} |")
        elif r.get("skipped"):
            lines.append(f"| {r['model']} | {r['label']} | {r['impl']} | {r['n']} | | | | {r['skipped']} |")
        else:
            lines.append(f"| {r['model']} | {r['label']} | {r['impl']} | {r['n']} | {r['seeds']} | {r['passes']} | "
                         f"{fmt_s(r['median'])} | {r['error']:.3f} / {r['error_max']:.3f} |")
    return lines


def limits_table(limits: list[tuple[str, int, cases.Limit, float]], spread: dict[int, tuple[float, float]]) -> list[str]:
    lines = ["| model | tokens | forward ms/row (batch given to peers) | forward+backward ms/row (batch given to peers) | "
             "largest batch tried | 2nd / 1st measurement |", "|---|---|---|---|---|---|"]
    for model, length, limit, _ in limits:
        again = spread.get(id(limit))
        noise = "—" if again is None else f"{again[0]:.2f} / {again[1]:.2f}"
        lines.append(f"| {model} | {length} | {1e3 * limit.per_row(False):.2f} ({limit.best_batch(False)}) | "
                     f"{1e3 * limit.per_row(True):.2f} ({limit.best_batch(True)}) | "
                     f"{max(limit.forward)} / {max(limit.backward)} | {noise} |")
    return lines


def memory_lines(memory: dict[str, Any] | None) -> list[str]:
    if memory is None:
        return ["not run (--no-memory)"]
    if "error" in memory:
        return [f"failed: {memory['error']}"]
    added, budget = memory["added_bytes"], memory["budget_bytes"]
    what = "CUDA allocator peak growth" if memory["device"] == "cuda" else "peak RSS growth (VmHWM - RSS before)"
    lines = [f"integrated_gradients on {memory['model']}, {memory['length']} tokens, max_memory={memory['max_memory']}: "
             f"{what} {added / 2**20:.0f} MiB = {added / budget:.0%} of the budget "
             f"({'within' if added <= 1.2 * budget else 'OVER'} budget + 20%)."]
    if memory.get("peak_rss_bytes"):
        lines.append(f"Whole process: RSS before {memory['rss_before_bytes'] / 2**20:.0f} MiB, peak "
                     f"{memory['peak_rss_bytes'] / 2**20:.0f} MiB (model weights and libraries included).")
    lines.append(f"Chunks of {memory['rows_per_chunk']} row(s) (estimated {memory['estimated_bytes_per_row'] / 2**20:.0f} "
                 f"MiB per row); {memory['steps']} gradient steps, {memory['forward_passes']} fwd / "
                 f"{memory['backward_passes']} bwd passes in {memory['model_calls']} calls, "
                 f"{memory['seconds']:.1f} s; completeness error {memory['completeness']:.1e} of the gap.")
    return lines


def summary(rows: list[Row], kshap: list[dict[str, Any]], memory: dict[str, Any] | None) -> list[str]:
    """The issue's targets, read off this run's numbers (no tuning: a summary of the table)."""
    out: list[str] = []

    def pairs(method: str, library: str, length: int | None = None) -> list[tuple[Row, Row]]:
        found = []
        for peer in rows:
            if peer.method == method and peer.impl.library == library and peer.ratio and \
                    (length is None or peer.length == length):
                ours = salience_match([r for r in rows if r.model == peer.model and r.length == peer.length], peer)
                if ours is not None:
                    found.append((ours, peer))
        return found

    def work(r: Row) -> str:
        passes = f"{r.forward} fwd" + (f" / {r.backward} fwd+bwd" if r.backward else "")
        if r.length_scale < 0.99:
            passes += f", rows {r.length_scale:.0%} of the input length"
        return f"{r.impl.name}: {fmt_s(r.median)} s, {passes}"

    def speed(ratio: float) -> str:
        return f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x slower"

    for peer_library in ("tint", "captum"):
        for ours, peer in pairs("sequential_integrated_gradients", peer_library):
            out.append(f"- SIG {ours.model}/{ours.length}: Salience {speed(peer.ratio)} than {peer.impl.name}. "
                       f"Work and accuracy: {work(ours)}, {ours.accuracy}; {work(peer)}, {peer.accuracy}. "
                       "Exact SIG is occlusion with the [MASK] baseline (the FeatureAblation row computes the same numbers)")
    for ours, peer in pairs("integrated_gradients", "captum"):
        out.append(f"- IG {ours.model}/{ours.length}: Salience {speed(peer.ratio)} than Captum at UNEQUAL work and "
                   f"accuracy: {work(ours)}, {ours.accuracy}; {work(peer)}, "
                   f"{peer.accuracy}. Speed at equal per-token error: benchmarks/ig_accuracy.py")
    for method in ("kernel_shap", "lime"):
        for library in ("captum", "lime", "shap"):
            for ours, peer in pairs(method, library):
                agreement = "" if method == "kernel_shap" else f"; {ours.accuracy} vs {peer.accuracy}"
                limits = "" if not (ours.limit and peer.limit) else \
                    (f"; pass limits (row lengths included, load-independent) {fmt_s(ours.limit)} vs "
                     f"{fmt_s(peer.limit)} s: {speed(ours.limit / peer.limit)}")
                out.append(f"- {SHORT[method]} ({ours.impl.removal}) {ours.model}/{ours.length}: Salience "
                           f"{speed(peer.ratio)} than {peer.impl.name} at the same model-evaluation budget: "
                           f"{work(ours)}; {work(peer)}{limits}"
                           + (" (accuracy: the exact-Shapley table)" if method == "kernel_shap" else agreement))
    by_model: dict[str, list[dict[str, Any]]] = {}
    for entry in kshap:
        if "error" in entry:
            by_model.setdefault(entry["model"], []).append(entry)
    for model, entries in by_model.items():
        full = max(e["n"] for e in entries)
        at_full = [e for e in entries if e["n"] == full]
        out.append(f"- KernelSHAP {model} vs exact Shapley values at n = {full}: "
                   + "; ".join(f"{e['impl']} error {e['error']:.3f} ({e['passes']} passes)" for e in at_full))
        ours = sorted((e for e in entries if e["impl"].startswith("Salience")), key=lambda e: e["n"])
        for peer_name in ("Captum KernelShap (players: words)", "shap KernelExplainer (l1_reg=False)"):
            peer = next((e for e in at_full if e["impl"] == peer_name), None)
            if peer and ours:
                enough = next((e for e in ours if e["error"] <= peer["error"]), None)
                out.append(f"  - {peer_name} error {peer['error']:.3f} at {peer['passes']} passes: "
                           + (f"Salience reaches {enough['error']:.3f} with {enough['passes']} passes" if enough else
                              f"Salience does not reach it within n = {ours[-1]['n']} (error {ours[-1]['error']:.3f})"))
    for r in rows:
        if r.impl.is_salience and r.length == 128 and r.limit and r.median:
            if r.median / r.limit > 1.2:
                out.append(f"- limit: Salience {tag(r)} on {r.model}/128 at {r.median / r.limit:.2f}x its "
                           f"pass limit (target <= 1.2x)")
    within = [f"{tag(r)}/{r.model}" for r in rows if r.impl.is_salience and r.length == 128 and r.limit
              and r.median and r.median / r.limit <= 1.2]
    if within:
        out.append(f"- limit: within 1.2x at 128 tokens: {', '.join(within)}")
    if memory and "added_bytes" in memory:
        out.append(f"- memory: {memory_lines(memory)[0]}")
    return out or ["- nothing to compare (filters left no pairs)"]


def machine() -> list[str]:
    lines = [common.cpu_line(),
             f"- device: {cases.device()}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
             f"- OS: {platform.platform()}; Python {platform.python_version()}",
             "- load average at the end of the run (1/5/15 min): "
             + (" / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a")
             + " (other processes' load makes absolute times noisy)"]
    packages = ["salience", "torch", "transformers", "captum", "time-interpret", "lime", "shap", "numpy", "scikit-learn"]
    lines.append("- versions: " + common.versions(packages))
    return lines


def report(bench: Bench, command: str) -> str:
    rows = sorted(bench.rows, key=lambda r: (bench.args.models.index(r.model), r.length if isinstance(r.length, int) else 0,
                                             METHODS.index(r.method), r.order))
    note = [f"- note: {bench.args.note}"] if bench.args.note else []
    out = ["# Benchmark results", "",
           f"Latest run: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
           f"{bench.clock.used / 60:.1f} min. Command:", "", f"    {command}", "", "## Machine", *machine(), *note, "",
           "## Models", *[f"- {m}: {cases.DESCRIPTIONS[m]}" for m in bench.args.models], "",
           "## Ratios read off this run, with each side's work and accuracy", "",
           "Salience's time over the peer's, measured in this process; passes are rows through the model "
           "(fwd+bwd: with a backward pass).", "", *summary(rows, bench.kshap_rows, bench.memory), "",
           "## Methods", "", "Ratios compare runs made in this process only. `runs*`: warmed up on an 8-token input "
           "(else on the same input). Passes are rows through the model per run (forward includes the forward half of "
           "forward+backward passes). `peak MB`: peak RSS growth during the run (CUDA: allocator peak growth).", "",
           *table(rows), "",
           "## KernelSHAP against exact Shapley values (short input)", "",
           "Game: words outside the coalition set to [MASK]; exact values by enumerating all coalitions. "
           "shap's Partition explainer estimates Owen values over its own token hierarchy (summed per word), "
           "not Shapley values.", "", *kshap_table(bench.kshap_rows), "",
           "## Memory budget", "", *memory_lines(bench.memory), "",
           "## Throughput limits", "", "Best measured time per row; the limit of a run is its passes at the best "
           "measured batching (a run with fewer rows than the best batch is limited by that smaller call). Peers get "
           "the largest batch within 10% of the best time per row. The last column compares the best time per row "
           "measured after the group's runs with the one before (forward / forward+backward): far from 1.00 means the "
           "machine was busy and absolute times are unreliable.", "",
           *limits_table(bench.limits, bench.spread), ""]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark Salience against Captum, tint, lime and shap.")
    parser.add_argument("--quick", action="store_true", help="smoke test: small model, 32 tokens, 1 repeat, few samples")
    parser.add_argument("--models", nargs="+", choices=cases.MODEL_NAMES, help="default: all")
    parser.add_argument("--lengths", nargs="+", type=int, help="input lengths in tokens (default: 32 128 512)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--repeats", type=int, help="timed runs per case (fewer when a run is slow; default 5)")
    parser.add_argument("--seeds", type=int, help="seeds for stochastic methods (default 3)")
    parser.add_argument("--case-seconds", type=float, default=15.0,
                        help="repeats stop when this many seconds would be exceeded (default 15)")
    parser.add_argument("--max-run", type=float, help="skip a run estimated longer than this (s, default 240)")
    parser.add_argument("--core-seconds", type=float, default=20.0,
                        help="pass 1 runs what is estimated under this per run; the rest waits for pass 2 (default 20)")
    parser.add_argument("--group-reserve", type=float, default=60.0,
                        help="a (model, length) group starts only if this many seconds of budget are left (default 60)")
    parser.add_argument("--max-call", type=float, default=3.0, help="stop growing the batch in the limit "
                        "measurement when one call takes longer (s)")
    parser.add_argument("--budget", type=float, help="whole-run time budget in minutes (default 24); runs that "
                        "would exceed it are skipped and listed")
    parser.add_argument("--kernel-shap-samples", type=int, help="model-pass budget of every KernelSHAP (default 512)")
    parser.add_argument("--lime-samples", type=int, help="model-pass budget of every LIME (default 500)")
    parser.add_argument("--ref-panels", type=int, help="IG reference: Gauss-Legendre panels of 8 nodes (default 16)")
    parser.add_argument("--sig-ref-panels", type=int, help="SIG reference: Gauss-Legendre panels of 8 nodes per "
                        "token (default 16)")
    parser.add_argument("--note", default="", help="a line for the Machine section (e.g. that the machine was shared)")
    parser.add_argument("--kshap-words", type=int, help="words of the exact-Shapley input (default 12)")
    parser.add_argument("--kshap-sweep", nargs="+", type=int, help="Salience n_samples tried against exact values")
    parser.add_argument("--memory-model", choices=cases.MODEL_NAMES)
    parser.add_argument("--memory-length", type=int)
    parser.add_argument("--memory-budget")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--output", type=Path, help="default: benchmarks/RESULTS.md (--quick: benchmarks/RESULTS-quick.md, "
                        "git-ignored, so a smoke test does not replace the full results)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "models": ["small"] if quick else list(cases.MODEL_NAMES),
        "lengths": [32] if quick else list(LENGTHS),
        "methods": list(METHODS),
        "repeats": 1 if quick else 5,
        "seeds": 2 if quick else 3,
        "max_run": 60.0 if quick else 240.0,
        "budget": 4.0 if quick else 40.0,
        "kernel_shap_samples": 64 if quick else 512,
        "lime_samples": 64 if quick else 500,
        "ref_panels": 4 if quick else 16,
        "sig_ref_panels": 2 if quick else 16,
        "kshap_words": 11 if quick else 12,
        "kshap_sweep": [32, 64] if quick else [64, 128, 256, 512],
        "memory_model": "small" if quick else "base",
        "memory_length": 128 if quick else 512,
        "memory_budget": "100MB" if quick else "2GB",
        "output": HERE / ("RESULTS-quick.md" if quick else "RESULTS.md"),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m for m in cases.MODEL_NAMES if m in args.models]
    args.methods = [m for m in METHODS if m in args.methods]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    bench = Bench(args)
    bench.run()
    text = report(bench, command)
    args.output.write_text(text, encoding="utf-8")
    print(text)
    print(f"(written to {args.output}; {bench.clock.used / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
