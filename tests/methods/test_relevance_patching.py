"""Relevance patching (RelP: attribution patching with AttnLRP's modified gradient) on the tiny
float64 Llama and the toy BERT.

- RelP equals (a_corrupt - a_clean) . c computed here, c the gradient that reaches the component
  in a clean forward + backward run by hand inside ``LRPMode(epsilon, transformer=True)`` (1e-10:
  the same float64 computation, hooked differently).
- The LRP coefficients differ from the plain gradient (RelP != AtP on a nonlinear model), so the
  option is not silently ignored.
- Probability metrics are refused in one line; after an error inside the backward no hook and no
  torch-function mode is left.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_patching import CLEAN, CORRUPT, OPTIONS, TOL, activations, lm, metric  # noqa: F401  (lm: the float64 Llama fixture)
from torch.nn.modules import module as torch_module
from torch.overrides import _get_current_function_mode_stack

import salience
from salience.methods.lrp_composites import parse_composite
from salience.methods.lrp_mode import LRPMode
from salience.patching import attribution_patching


def lrp_activations(net, run, ids, layers, projections):
    """Block outputs, o_proj inputs (row 0) and their LRP coefficients in one run inside LRPMode
    (parameters frozen for the run and the word embeddings fed as a leaf, as the adapters do)."""
    blocks, heads, handles = [], [], []
    frozen = [p for p in net.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    embeds = net.get_input_embeddings()(ids).detach().requires_grad_(True)
    for layer, projection in zip(layers, projections):
        handles.append(layer.register_forward_hook(lambda _m, _i, out: blocks.append(out[0] if isinstance(out, tuple) else out)))
        handles.append(projection.register_forward_pre_hook(lambda _m, inputs: heads.append(inputs[0])))
    try:
        with LRPMode(parse_composite("epsilon"), eps=0.0, stabiliser=0.0, transformer=True):  # relp's defaults
            value = run(embeds)
            tensors = blocks + heads
            grads = torch.autograd.grad(value, tensors, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    count = len(blocks)
    zeros = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
    return ([b.detach()[0] for b in blocks], [h.detach()[0] for h in heads], zeros[:count], zeros[count:])


def test_relp_on_llama_equals_lrp_coefficients_by_hand(lm):  # noqa: F811
    relp = attribution_patching(lm, CLEAN, CORRUPT, method="relp", **OPTIONS)
    net = lm.model
    layers = list(net.model.layers)
    projections = [layer.self_attn.o_proj for layer in layers]
    clean_ids = lm.tokenizer(CLEAN + OPTIONS["continuation"], return_tensors="pt")["input_ids"]
    blocks, heads, grad_b, grad_h = lrp_activations(net, lambda e: metric(lm, net(inputs_embeds=e).logits), clean_ids,
                                                     layers, projections)
    corrupt_blocks, corrupt_heads, _ = activations(lm, CORRUPT)
    n_heads = net.config.num_attention_heads
    for layer in range(len(layers)):
        residual = ((corrupt_blocks[layer][0] - blocks[layer]) * grad_b[layer][0]).sum(-1).numpy()
        np.testing.assert_allclose(relp.residual[layer], residual, rtol=0, atol=TOL)
        per_head = ((corrupt_heads[layer][0] - heads[layer]) * grad_h[layer][0]).view(len(residual), n_heads, -1).sum((0, 2))
        np.testing.assert_allclose(relp.heads[layer], per_head.numpy(), rtol=0, atol=TOL)
    atp = attribution_patching(lm, CLEAN, CORRUPT, **OPTIONS)
    assert relp.clean_metric == pytest.approx(atp.clean_metric, abs=TOL)
    assert np.abs(relp.heads - atp.heads).max() > 1e-6  # the rules change the coefficients
    assert relp.method == "relp" and "relevance" in relp.method_note


def test_relp_on_toy_bert_equals_lrp_coefficients_by_hand(toy):
    clean, corrupt = "the film was good and lovely", "the film was dull and lovely"
    relp = attribution_patching(toy, clean, corrupt, method="relp", output="logit", target="positive")
    layers = list(toy.model.bert.encoder.layer)
    projections = [layer.attention.output.dense for layer in layers]
    batch = {k: toy.tokenizer(t, return_tensors="pt") for k, t in (("clean", clean), ("corrupt", corrupt))}
    blocks, heads, grad_b, grad_h = lrp_activations(
        toy.model, lambda e: toy.model(inputs_embeds=e, attention_mask=batch["clean"]["attention_mask"],
                                       token_type_ids=batch["clean"]["token_type_ids"]).logits[0, 1],
        batch["clean"]["input_ids"], layers, projections)
    with torch.no_grad():
        corrupt_blocks, corrupt_heads, _, _ = lrp_activations_plain(toy, batch["corrupt"], layers, projections)
    n_heads = toy.model.config.num_attention_heads
    for layer in range(len(layers)):
        residual = ((corrupt_blocks[layer] - blocks[layer]) * grad_b[layer][0]).sum(-1).numpy()
        np.testing.assert_allclose(relp.residual[layer], residual, rtol=0, atol=TOL)
        product = (corrupt_heads[layer] - heads[layer]) * grad_h[layer][0]
        np.testing.assert_allclose(relp.heads[layer], product.view(len(residual), n_heads, -1).sum((0, 2)).numpy(), rtol=0, atol=TOL)


def lrp_activations_plain(toy, batch, layers, projections):
    blocks, heads, handles = [], [], []
    for layer, projection in zip(layers, projections):
        handles.append(layer.register_forward_hook(lambda _m, _i, out: blocks.append((out[0] if isinstance(out, tuple) else out)[0])))
        handles.append(projection.register_forward_pre_hook(lambda _m, inputs: heads.append(inputs[0][0])))
    toy.model(**batch)
    for handle in handles:
        handle.remove()
    return blocks, heads, None, None


def test_relp_refuses_probabilities_and_leaves_nothing_behind(lm, monkeypatch):  # noqa: F811
    with pytest.raises(salience.ParameterError, match="relp explains logits"):
        attribution_patching(lm, CLEAN, CORRUPT, method="relp", output="log_probability", continuation=" paris")
    with pytest.raises(salience.ParameterError, match="leave backward_mode out"):
        attribution_patching(lm, CLEAN, CORRUPT, method="relp", backward_mode=LRPMode, **OPTIONS)
    hooks_before = (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks))

    def failing(*_args, **_kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(lm, "score_inputs", failing)
    with pytest.raises(RuntimeError, match="boom"):
        attribution_patching(lm, CLEAN, CORRUPT, method="relp", **OPTIONS)
    assert (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks)) == hooks_before
    assert not _get_current_function_mode_stack()
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in lm.model.modules())


def test_relp_equals_atp_where_the_path_to_the_metric_is_linear(lm, monkeypatch):  # noqa: F811
    """With the final RMSNorm made a fixed scaling (weight * x), the last block's output reaches the
    logit difference through linear maps only (the norm's scaling, the bias-free lm_head). There
    epsilon-LRP with eps = 0 propagates c_in = W^T c_out, the gradient, so RelP's last-layer
    residual scores equal AtP's to 1e-12 (float64 round-off; the metric is one logit, since a logit
    difference goes through the sum rule, whose stabiliser 1e-6 moves it by ~4e-8 relative); the earlier layers cross attention and
    SwiGLU, where the rules differ from the gradient."""
    norm = lm.model.model.norm
    monkeypatch.setattr(norm, "forward", lambda hidden: norm.weight * hidden)
    options = {"continuation": " paris", "output": "logit"}  # one logit: no difference for the sum rule to stabilise
    relp = attribution_patching(lm, CLEAN, CORRUPT, method="relp", eps=0.0, components="residual", **options)
    atp = attribution_patching(lm, CLEAN, CORRUPT, components="residual", **options)
    np.testing.assert_allclose(relp.residual[-1], atp.residual[-1], rtol=1e-12, atol=1e-12)
    assert np.abs(atp.residual[-1]).max() > 1e-3  # not trivially zero
    assert np.abs(relp.residual[:-1] - atp.residual[:-1]).max() > 1e-6
