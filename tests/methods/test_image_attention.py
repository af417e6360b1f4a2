"""Attention, attention rollout and Chefer's gradient-weighted relevancy on vision transformers built on
nn.MultiheadAttention, against references computed here: the forward pass written out block by
block, each attention in torch functions (``written_attention``: its weights in the graph), the
formulas of the three methods written out on them (rollout with renormalised rows; relevancy
R += mean_heads(relu(dy/dA * A)) R), the class token's row read (every row's mean without a class
token), and each patch token's score given to the pixels of its patch. Tolerance 1e-12 (float64, the same arithmetic in another order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from methods.test_attnlrp_mha import ViT as MeanPooledViT
from methods.test_attnlrp_mha import written_attention
from methods.test_cam import GRID, classifier, vit
from salience.models.image import ImageClassifier
from tiny_cnn import photo, tiny_classifier

PATCH = 4  # TinyViT's and the mean-pooled ViT's patch embedding: 4 x 4 convolution, stride 4


def written_out(net, x: torch.Tensor, *, class_token: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (1, classes) and each block's per-head attention weights (1, heads, T, T), block by block."""
    tokens = net.patch(x[None]).flatten(2).transpose(1, 2)
    if class_token:
        tokens = torch.cat([net.tokens.expand(1, -1, -1), tokens], 1)
    tokens = tokens + net.position
    maps = []
    for block in net.blocks:
        h = block.norm1(tokens)
        out, weights = written_attention(block.attn, h, h, h)
        maps.append(weights)
        tokens = tokens + out
        tokens = tokens + block.mlp(block.norm2(tokens))
    logits = net.head(net.norm(tokens)[:, 0]) if class_token else net.head(tokens.mean(1))
    return logits, maps


def read(matrix: torch.Tensor, class_token: bool) -> np.ndarray:
    """The classification's row (class token, or the mean of every row) spread over the pixels."""
    row = matrix[0] if class_token else matrix.mean(0)
    grid = row[1:] if class_token else row
    side = GRID // PATCH
    return grid.reshape(side, side).repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1).reshape(-1).detach().numpy()


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    eye = torch.eye(maps[0].shape[-1], dtype=torch.float64)
    result = eye
    for weights in maps:
        mixed = 0.5 * weights[0].mean(0) + 0.5 * eye
        result = (mixed / mixed.sum(-1, keepdim=True)) @ result
    return result


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, GRID, GRID, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.mark.parametrize("class_token", [True, False])
def test_attention_and_rollout_equal_the_written_out_maps(x, class_token):
    net = vit() if class_token else MeanPooledViT(hand=False).double().eval()
    model = classifier(net) if class_token else ImageClassifier(net, labels=list("abc"), input_shape=(3, GRID, GRID))
    with torch.no_grad():
        _, maps = written_out(net, x, class_token=class_token)
    last = salience.explain(model, x, method="attention")
    np.testing.assert_allclose(last.token_scores, read(maps[-1][0].mean(0), class_token), rtol=0, atol=1e-12)
    rolled = salience.explain(model, x, method="attention_rollout")
    np.testing.assert_allclose(rolled.token_scores, read(rollout(maps), class_token), rtol=0, atol=1e-12)
    assert last.params["query_rows"] == [[0] if class_token else list(range(16))]


def test_relevancy_equals_the_written_out_formula(x):
    net = vit()
    leaf = x.clone().requires_grad_(True)
    logits, maps = written_out(net, leaf, class_token=True)
    targets = [0, 2]
    expected = []
    for target in targets:
        grads = torch.autograd.grad(logits[0, target], maps, retain_graph=True)
        result = torch.eye(maps[0].shape[-1], dtype=torch.float64)
        for weights, grad in zip(maps, grads):
            result = result + (grad[0] * weights[0]).clamp(min=0).mean(0) @ result
        expected.append(read(result.detach(), class_token=True))
    found = salience.explain(classifier(net), x, method="attention_relevancy", target=targets, output="logit")
    np.testing.assert_allclose(found.token_scores, np.stack(expected), rtol=0, atol=1e-12)
    np.testing.assert_allclose(found.output_value, logits[0, targets].detach().numpy(), rtol=0, atol=1e-12)
    # the prediction pass and the relevancy's own (no third to learn the token count), one backward per target
    assert (found.cost.forward_passes, found.cost.backward_passes) == (2, 2)


def test_an_image_model_without_multihead_attention_is_refused():
    with pytest.raises(salience.ParameterError, match="has no nn.MultiheadAttention"):
        salience.explain(tiny_classifier(), photo(), method="attention_rollout")


def test_hooks_removed_and_outputs_unchanged(x):
    net = vit()
    with torch.no_grad():
        before = net(x[None])
    salience.explain(classifier(net), x, method="attention_relevancy")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net(x[None]), before)


class EncoderViT(torch.nn.Module):
    """Patch embedding, a class token and nn.TransformerEncoder (post-norm layers, ReLU, batch first)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.patch = torch.nn.Conv2d(3, 8, PATCH, stride=PATCH)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 8))
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(8, 3)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.tokens(x))[:, 0])


def test_rollout_through_a_transformer_encoder(x):
    """nn.TransformerEncoderLayer calls its attention with need_weights=False (and has a fused path
    without gradients): the weights are still asked for and recorded, layer by layer."""
    net = EncoderViT().double().eval()
    model = ImageClassifier(net, labels=list("abc"), input_shape=(3, GRID, GRID))
    maps = []
    with torch.no_grad():
        tokens = net.tokens(x[None])
        for layer in net.encoder.layers:  # post-norm: x = norm1(x + sa(x)); x = norm2(x + ff(x))
            out, weights = written_attention(layer.self_attn, tokens, tokens, tokens)
            maps.append(weights)
            tokens = layer.norm1(tokens + out)
            tokens = layer.norm2(tokens + layer.linear2(torch.relu(layer.linear1(tokens))))
    rolled = salience.explain(model, x, method="attention_rollout")
    np.testing.assert_allclose(rolled.token_scores, read(rollout(maps), class_token=True), rtol=0, atol=1e-12)
