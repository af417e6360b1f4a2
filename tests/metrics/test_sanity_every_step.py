"""model_randomisation(every_step=False): only the last step of the cascade is re-run, and its value
is the full cascade's (each step's re-initialisation is seeded on its own, so skipping the re-runs
in between changes nothing). Checked on the tiny float64 CNN (4 cascade steps) with a deterministic
method (occlusion) and a seeded random one (SmoothGrad: its noise must not shift the weights drawn
for the next step). The two runs execute the same float64 operations on the same weights, so the
values are compared exactly."""

from __future__ import annotations

import numpy as np
import pytest

import salience
from salience.metrics import evaluate_metric
from tiny_cnn import photo, tiny_classifier


@pytest.mark.parametrize("method, params", [("occlusion", {"patch_size": 5}), ("smoothgrad", {"n_samples": 4})])
def test_last_step_only_gives_the_full_cascades_value_for_one_rerun(method, params):
    cnn = tiny_classifier()
    e = salience.explain(cnn, photo(), method, output="logit", seed=3, params=params)
    full = evaluate_metric("model_randomisation", cnn, e)
    last = evaluate_metric("model_randomisation", cnn, e, every_step=False)
    steps = len(full.details["steps"])
    assert steps == 4 and len(full.details["correlations"]) == steps
    assert last.details["steps"] == full.details["steps"]  # every step is still randomised ...
    assert last.details["correlations"] == [full.value]  # ... but only the last is re-run and compared
    assert last.value == full.value and last.details["flagged"] == full.details["flagged"]
    assert last.details["every_step"] is False and full.details["every_step"] is True
    # cost: one re-run of the method (its passes, prediction included) against one per step
    assert full.forward_passes == steps * last.forward_passes > 0
    assert np.isfinite(last.value)
