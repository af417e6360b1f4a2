"""No hooks, requires_grad changes or mode changes survive a method, also when it fails midway."""

from __future__ import annotations

import pytest
import torch

import salience
from conftest import TOY_TEXT


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_no_hooks_exist_after_gradient_methods(toy):
    for method in ("ig", "sig", "saliency"):
        salience.explain(toy, TOY_TEXT, method=method, **({"form": "path", "steps": 4} if method == "sig" else {}))
    assert _hook_count(toy.model) == 0


@pytest.mark.parametrize("method", [info.name for info in salience.methods()])
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


def test_state_restored_after_exception_inside_method(toy, monkeypatch):
    calls = {"n": 0}
    original = toy.model.classifier.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # fail in the middle of the integration, while the hook is attached
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(toy.model.classifier, "forward", failing)
    flags = [p.requires_grad for p in toy.model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        salience.explain(toy, TOY_TEXT, method="ig", steps=20, batch_size=4)
    assert _hook_count(toy.model) == 0
    assert [p.requires_grad for p in toy.model.parameters()] == flags
