"""Metrics of explanation quality: faithfulness, plausibility, sanity and robustness.

Each metric is registered with :func:`salience.metrics.base.register_metric` and evaluated with
:func:`salience.metrics.base.evaluate_metric`; see docs/metrics.md for definitions and directions.
"""

from salience.metrics.base import MetricInfo, MetricResult, all_metrics, evaluate_metric, get_metric

__all__ = ["MetricInfo", "MetricResult", "all_metrics", "evaluate_metric", "get_metric"]
