"""Per (method, metric): the mean over examples and a seeded bootstrap 95 % confidence interval."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

N_BOOTSTRAP = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class SummaryRow:
    """``n`` values (``n_errors`` more examples could not be scored; ``first_error`` says why)."""

    method: str
    metric: str
    higher_is_better: bool | None
    n: int
    n_errors: int
    mean: float
    ci_low: float
    ci_high: float
    first_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_ci(values: Sequence[float], *, n_boot: int = N_BOOTSTRAP, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values with replacement ``n_boot``
    times (``numpy.random.default_rng(seed)``) and take the (1-level)/2 and (1+level)/2 quantiles
    of the resampled means. One value gives (v, v); none gives (nan, nan)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    if data.size == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // data.size)  # bound memory for large n
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = data[rng.integers(0, data.size, size=(stop - start, data.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarise(rows: Iterable[dict[str, Any]], *, methods: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
              seed: int = 0, n_boot: int = N_BOOTSTRAP) -> list[SummaryRow]:
    """Summary rows from metric rows (dicts with method, metric, value, higher_is_better, error),
    ordered by ``methods`` then ``metrics`` (default: order of first appearance)."""
    values: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], list[str]] = {}
    direction: dict[str, bool | None] = {}
    seen_methods: list[str] = []
    seen_metrics: list[str] = []
    for row in rows:
        key = (row["method"], row["metric"])
        if row["method"] not in seen_methods:
            seen_methods.append(row["method"])
        if row["metric"] not in seen_metrics:
            seen_metrics.append(row["metric"])
        values.setdefault(key, [])
        errors.setdefault(key, [])
        if row.get("value") is None:
            errors[key].append(str(row.get("error") or "no value"))
        else:
            values[key].append(float(row["value"]))
            direction.setdefault(row["metric"], row.get("higher_is_better"))
    out = []
    for method in methods or seen_methods:
        for metric in metrics or seen_metrics:
            key = (method, metric)
            if key not in values:
                continue
            data = values[key]
            low, high = bootstrap_ci(data, n_boot=n_boot, seed=seed)
            mean = float(np.mean(data)) if data else float("nan")
            out.append(SummaryRow(method, metric, direction.get(metric), len(data), len(errors[key]), mean, low, high,
                                  errors[key][0] if errors[key] else None))
    return out
