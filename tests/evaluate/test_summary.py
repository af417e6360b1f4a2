"""Means and seeded bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np

from salience.evaluate.summary import bootstrap_ci, summarise


def test_bootstrap_interval_is_seeded_and_sensible():
    values = np.random.default_rng(3).normal(1.0, 2.0, size=400)
    low, high = bootstrap_ci(values, seed=0)
    assert (low, high) == bootstrap_ci(values, seed=0) != bootstrap_ci(values, seed=1)
    assert low < values.mean() < high
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)  # the normal-theory interval
    assert abs((high - low) / 2 - half) < 0.1 * half
    small_low, small_high = bootstrap_ci(values[:40], seed=0)
    assert small_high - small_low > high - low
    assert bootstrap_ci([2.5]) == (2.5, 2.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_bootstrap_matches_a_plain_loop():
    values = np.arange(10.0) ** 2
    rng = np.random.default_rng(0)
    means = [values[rng.integers(0, 10, size=10)].mean() for _ in range(2000)]
    assert np.allclose(bootstrap_ci(values, seed=0), np.quantile(means, [0.025, 0.975]))


def test_summarise_orders_counts_errors_and_keeps_direction():
    rows = [
        {"method": "ig", "metric": "f1", "value": 1.0, "higher_is_better": True},
        {"method": "ig", "metric": "f1", "value": None, "higher_is_better": True, "error": "example 3: no rationale"},
        {"method": "ig", "metric": "f1", "value": 0.0, "higher_is_better": True},
        {"method": "lime", "metric": "f1", "value": 0.5, "higher_is_better": True},
        {"method": "lime", "metric": "suff", "value": 0.2, "higher_is_better": False},
    ]
    summary = summarise(rows, methods=["lime", "ig"])
    assert [(r.method, r.metric) for r in summary] == [("lime", "f1"), ("lime", "suff"), ("ig", "f1")]
    ig = summary[2]
    assert (ig.n, ig.n_errors, ig.mean, ig.first_error) == (2, 1, 0.5, "example 3: no rationale")
    assert summary[1].higher_is_better is False and summary[0].ci_low == summary[0].ci_high == 0.5
