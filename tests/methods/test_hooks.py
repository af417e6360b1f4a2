"""No hooks, requires_grad changes or mode changes survive a method, also when it fails midway."""

from __future__ import annotations

import pytest
import torch

import salience
from conftest import TOY_TEXT

# these refuse a model without ReLU-family units (this GELU BERT); tests/methods/test_guided.py checks their state
NEED_RELU = {"guided_backprop", "deconvnet", "guided_gradcam"}
# DeepLIFT and LRP refuse a transformer (layer norm, softmax): test_deeplift.py and test_lrp.py check their state
NEED_RELU |= {"deeplift", "deeplift_shap", "lrp"}
# CAM methods need a layer map (image classifiers): tests/methods/test_cam.py checks their state
# so do methods needing another capability text classifiers lack (RISE, NeuroMask: a pixel grid; test_image.py)
TEXT_METHODS = [info.name for info in salience.methods() if info.name not in NEED_RELU and info.kind != "cam"
                and all(hasattr(salience.TextClassifier, need) for need in getattr(info.cls, "needs", ()))]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_no_hooks_exist_after_gradient_methods(toy):
    for method in ("ig", "sig", "saliency"):
        salience.explain(toy, TOY_TEXT, method=method, **({"form": "path", "steps": 4} if method == "sig" else {}))
    assert _hook_count(toy.model) == 0


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_no_state_left_behind(toy, method):
    # transformers installs its own inert output-capturing hooks, once, on the first call asking
    # for attentions; install them first so that only hooks Salience might leave are counted
    toy.model(input_ids=torch.tensor([[2, 3]]), output_attentions=True)
    hooks = _hook_count(toy.model)
    toy.model.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)  # a user's own choice
    flags = [p.requires_grad for p in toy.model.parameters()]
    salience.explain(toy, TOY_TEXT, method=method, **({"n_samples": 8} if method in ("lime", "smoothgrad") else {}))
    assert _hook_count(toy.model) == hooks
    assert [p.requires_grad for p in toy.model.parameters()] == flags
    assert not toy.model.training
    assert all(p.grad is None for p in toy.model.parameters())


# small settings so that every method makes several model calls with batch_size=4
CHEAP = {"integrated_gradients": {"steps": 20}, "lime": {"n_samples": 16}, "smoothgrad": {"n_samples": 8},
         "gradient_shap": {"n_samples": 8}, "kernel_shap": {"max_exact": 0, "n_samples": 16}}


def _state(model: torch.nn.Module) -> tuple:
    return (_hook_count(model), [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            model.config._attn_implementation, [p.grad is None for p in model.parameters()])


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_state_restored_after_exception_inside_method(toy, method):
    """The model raises in the middle of the method's model calls (a forward hook on the last
    encoder layer): no hook, requires_grad change, training flag, attention implementation or
    gradient may survive."""
    toy.model(input_ids=torch.tensor([[2, 3]]), output_attentions=True)  # transformers' own hooks, once
    toy.model.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)  # a user's own choice
    calls = {"n": 0, "fail_at": None}

    def count_or_fail(_module, _inputs, _output):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("boom")

    toy.model.bert.encoder.layer[-1].register_forward_hook(count_or_fail)
    params = CHEAP.get(method, {})
    salience.explain(toy, TOY_TEXT, method=method, batch_size=4, **params)  # a clean run counts the calls
    n_calls, calls["n"] = calls["n"], 0
    calls["fail_at"] = n_calls // 2 + 1  # the middle call; the method's only one for the 1-pass methods
    before = _state(toy.model)
    with pytest.raises(RuntimeError, match="boom"):
        salience.explain(toy, TOY_TEXT, method=method, batch_size=4, **params)
    assert calls["n"] == calls["fail_at"]  # it did fail where intended
    assert _state(toy.model) == before
