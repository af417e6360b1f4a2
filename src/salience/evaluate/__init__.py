"""Evaluate explanations at scale: datasets, a resumable runner, a results database and reports.

``salience evaluate`` / ``salience bench`` / ``salience runs`` drive it from the command line; see
docs/evaluation.md. The pieces, one job each:

* :mod:`~salience.evaluate.datasets`: built-in and JSONL datasets as :class:`Example` lists (the planted task
  and its small model live in :mod:`salience.zoo.planted`)
* :mod:`~salience.evaluate.config`: run configuration, method/metric specs, run identity, study files
* :mod:`~salience.evaluate.store`: the SQLite results database (WAL, transactions, writer lock)
* :mod:`~salience.evaluate.runner`: the resumable loop over examples x methods
* :mod:`~salience.evaluate.summary`: means and bootstrap intervals
* :mod:`~salience.evaluate.plots`, :mod:`~salience.evaluate.report`, :mod:`~salience.evaluate.export`: outputs
"""

from salience.evaluate.config import ConfigError, RunConfig, Spec, load_bench_file, parse_method_spec, parse_metric_spec
from salience.evaluate.datasets import Dataset, DatasetError, Example, load_dataset
from salience.evaluate.runner import EvaluationError, RunOutcome, run_evaluation
from salience.evaluate.store import RunLockedError, Store, StoreError
from salience.evaluate.summary import SummaryRow, bootstrap_ci, summarise

__all__ = [
    "ConfigError",
    "Dataset",
    "DatasetError",
    "EvaluationError",
    "Example",
    "RunConfig",
    "RunLockedError",
    "RunOutcome",
    "Spec",
    "Store",
    "StoreError",
    "SummaryRow",
    "bootstrap_ci",
    "load_bench_file",
    "load_dataset",
    "parse_method_spec",
    "parse_metric_spec",
    "run_evaluation",
    "summarise",
]
