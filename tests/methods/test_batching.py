"""Every method gives the same result batched and unbatched, and the same result for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

import salience
from conftest import TOY_TEXT

FAST_PARAMS = {
    "smoothgrad": {"n_samples": 6},
    "gradient_shap": {"n_samples": 6},
    "integrated_gradients": {"steps": 12},
    "lime": {"n_samples": 40},
    "kernel_shap": {"n_samples": 40, "max_exact": 0},
    "sequential_integrated_gradients": {"form": "path", "steps": 6},
}
# guided_backprop and the like refuse this GELU BERT (no ReLU-family unit); tests/methods/test_guided.py batches them
# DeepLIFT and LRP refuse it too (layer norm, softmax): test_deeplift.py batches DeepLIFT
# CAM methods need a layer map (image classifiers): tests/methods/test_cam.py and tests/models/test_image.py batch them
# so do methods needing another capability text classifiers lack (RISE, NeuroMask: a pixel grid; test_image.py)
ALL = [info.name for info in salience.methods()
       if info.name not in {"guided_backprop", "deconvnet", "guided_gradcam", "deeplift", "deeplift_shap", "lrp"}
       and info.kind != "cam"
       and all(hasattr(salience.TextClassifier, need) for need in getattr(info.cls, "needs", ()))]


@pytest.mark.parametrize("method", ALL)
def test_batched_equals_unbatched(toy, method):
    params = FAST_PARAMS.get(method, {})
    one = salience.explain(toy, TOY_TEXT, method=method, batch_size=1, **params)
    many = salience.explain(toy, TOY_TEXT, method=method, batch_size=64, **params)
    # float64 model; only the summation order inside BLAS differs between batch shapes
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-9, atol=1e-12)
    assert one.cost.forward_passes == many.cost.forward_passes
    assert one.cost.model_calls > many.cost.model_calls or one.cost.forward_passes <= 2


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap", "lime", "kernel_shap"])
def test_same_seed_same_result(toy, method):
    params = FAST_PARAMS[method]
    a = salience.explain(toy, TOY_TEXT, method=method, seed=3, **params)
    b = salience.explain(toy, TOY_TEXT, method=method, seed=3, **params)
    c = salience.explain(toy, TOY_TEXT, method=method, seed=4, **params)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


def test_adaptive_ig_batched_equals_unbatched(toy):
    one = salience.explain(toy, TOY_TEXT, method="ig", batch_size=1)
    many = salience.explain(toy, TOY_TEXT, method="ig")
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-9, atol=1e-12)
    assert one.params["steps_used"] == many.params["steps_used"]


def test_memory_budget_limits_chunk_rows():
    from salience.core.batching import choose_batch_size

    small = choose_batch_size(512, backward=True, max_memory="64MB", bytes_per_row=100_000_000)
    large = choose_batch_size(512, backward=True, max_memory="2GB", bytes_per_row=100_000_000)
    assert small == 1 and large == 20  # 2e9 // 1e8
    assert choose_batch_size(512, backward=True, batch_size=7, max_memory="2GB", bytes_per_row=1) == 7


def test_a_budget_below_one_row_is_said(toy):
    said = r"max_memory=1KB is below the estimated \d+ MiB of one forward \+ backward row"
    with pytest.warns(salience.SalienceWarning, match=said) as seen:
        e = salience.explain(toy, TOY_TEXT, method="saliency", max_memory="1KB")
    assert seen[0].filename == __file__  # attributed to the caller of explain()
    assert e.cost.model_calls >= 1


def test_memory_estimate_follows_the_attention_kernel(toy):
    """Eager attention keeps heads x T x T maps per layer (quadratic in T); SDPA keeps none (linear)."""
    config = toy.model.config
    saved = config._attn_implementation
    try:
        config._attn_implementation = "sdpa"
        assert toy.bytes_per_row(256, backward=True) == 2 * toy.bytes_per_row(128, backward=True)
        sdpa = toy.bytes_per_row(128, backward=True)
        config._attn_implementation = "eager"
        assert toy.bytes_per_row(256, backward=True) > 2 * toy.bytes_per_row(128, backward=True)
        assert toy.bytes_per_row(128, backward=True) > sdpa
        assert toy.bytes_per_row(128, backward=False) <= toy.bytes_per_row(128, backward=True)  # equal at 2 layers
    finally:
        config._attn_implementation = saved


def test_default_chunks_fill_half_of_a_gpus_free_memory(monkeypatch):
    import torch

    from salience.core.batching import choose_batch_size, default_memory_budget

    assert default_memory_budget(None) is None and default_memory_budget(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))  # 8 GiB free
    assert default_memory_budget("cuda:0") == 4 * 2**30
    # with such a budget the chunk is rows of the adapter's estimated bytes, capped at 256 rows
    assert choose_batch_size(224 * 224, backward=True, max_memory=default_memory_budget("cuda"), bytes_per_row=100 * 2**20) == 40
