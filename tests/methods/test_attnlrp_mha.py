"""AttnLRP through torch's nn.MultiheadAttention (F.multi_head_attention_forward, as torchvision's
ViT and nn.TransformerEncoderLayer use it): decomposed into its projections (linear layers) and
softmax(q k^T / sqrt(d) + mask) v with AttnLRP's rules, it gives the relevance of the same attention
written out by hand in torch functions, whose calls the mode meets one by one.

Tolerance 1e-12 (float64; the two compute the same values in a different order)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience.errors import ParameterError
from salience.methods.lrp_composites import parse_composite
from salience.methods.lrp_mode import LRPMode
from salience.models.image import ImageClassifier

DIM, HEADS = 8, 2


def by_hand(mha: nn.MultiheadAttention, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
            attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mha(q_in, k_in, v_in)[0]`` for batch-first inputs (N, L, E), in plain torch functions."""
    return written_attention(mha, q_in, k_in, v_in, attn_mask, key_padding_mask)[0]


def written_attention(mha: nn.MultiheadAttention, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`by_hand`'s output and its attention weights (N, heads, L, S), in the graph."""
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q, k, v = F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)
    head = mha.embed_dim // mha.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], mha.num_heads, head).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-2, -1) / math.sqrt(head)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    elif attn_mask is not None:  # float, one (L, S) mask per row and head: (N H, L, S)
        scores = scores + attn_mask.reshape(scores.shape)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(q.shape[0], q.shape[1], mha.embed_dim)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias), weights


class Block(nn.Module):
    """A pre-norm ViT block, its attention by nn.MultiheadAttention or written out by hand."""

    def __init__(self, hand: bool) -> None:
        super().__init__()
        self.hand = hand
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + (by_hand(self.attn, h, h, h) if self.hand else self.attn(h, h, h)[0])
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, hand: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.patch = nn.Conv2d(3, DIM, 4, stride=4)
        self.position = nn.Parameter(0.5 * torch.randn(1, 16, DIM))
        self.blocks = nn.Sequential(Block(hand), Block(hand))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.blocks(tokens).mean(1))


def explain(hand: bool, **params) -> salience.Explanation:
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = ImageClassifier(ViT(hand).double().eval(), labels=list("abc"), input_shape=(3, 16, 16))
    return salience.explain(model, x, method="attnlrp", target="all", **params)


@pytest.mark.parametrize("params", [{}, {"trace": True}, {"eps": 0.1, "stabiliser": 1e-3, "trace": True},
                                    {"composite": {"base": "epsilon", "linear": "gamma"}}])
def test_vit_with_multihead_attention_equals_the_attention_written_out(params):
    found, expected = explain(False, **params), explain(True, **params)
    np.testing.assert_allclose(np.asarray(found.scores), np.asarray(expected.scores), rtol=1e-12, atol=1e-12)
    assert found.output_value == pytest.approx(expected.output_value, abs=1e-12)


def functional(mha: nn.MultiheadAttention, x: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
    """Self-attention by F.multi_head_attention_forward called directly (sequence first; boolean masks
    reach it as they are: nn.MultiheadAttention turns them into float ones first)."""
    seq = x.transpose(0, 1)
    out, _ = F.multi_head_attention_forward(seq, seq, seq, DIM, HEADS, mha.in_proj_weight, mha.in_proj_bias, None, None,
                                            False, 0.0, mha.out_proj.weight, mha.out_proj.bias, training=False,
                                            need_weights=False, **masks)
    return out.transpose(0, 1)


def relevance(mha: nn.MultiheadAttention, how: str, x: torch.Tensor, memory: torch.Tensor | None = None,
              **masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the input relevance x * c under AttnLRP's rules (eps 0.1, stabiliser 1e-3, traced),
    the attention run ``how``: by the module, by the function, or by hand."""
    leaf = x.clone().requires_grad_(True)
    kv = leaf if memory is None else memory
    with LRPMode(parse_composite("epsilon"), eps=0.1, stabiliser=1e-3, transformer=True, method="attnlrp"):
        if how == "hand":
            out = by_hand(mha, leaf, kv, kv, **masks)
        else:
            out = functional(mha, leaf, **masks) if how == "functional" else mha(leaf, kv, kv, **masks)[0]
        (c,) = torch.autograd.grad(out.sum(), leaf)
    return out.detach(), (leaf * c).detach()


@pytest.mark.parametrize("case", ["masks", "functional masks", "float 3-d mask", "cross", "separate weights"])
def test_multihead_attention_masks_and_cross_attention(case):
    torch.manual_seed(4)
    kdim = 5 if case == "separate weights" else None
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True, kdim=kdim, vdim=kdim).double().eval()
    for parameter in mha.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    memory = None if "mask" in case else torch.randn(2, 6, kdim or DIM, dtype=torch.float64)
    masks = {}
    if "masks" in case:
        masks = {"attn_mask": torch.tensor([[False, True, False, False]] * 4),
                 "key_padding_mask": torch.tensor([[False] * 4, [False, False, False, True]])}
    elif case == "float 3-d mask":
        masks = {"attn_mask": torch.randn(2 * HEADS, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    tracked = x.clone().requires_grad_(True)  # (torch's fast path, taken without gradients, rounds differently)
    own = functional(mha, tracked, **masks) if case == "functional masks" else \
        mha(tracked, memory if memory is not None else tracked, memory if memory is not None else tracked, **masks)[0]
    out, found = relevance(mha, "functional" if case == "functional masks" else "module", x, memory, **masks)
    _, expected = relevance(mha, "hand", x, memory, **masks)
    assert torch.equal(out, own.detach())  # the model's own output values forward
    np.testing.assert_allclose(found.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)
    assert float(found.abs().max()) > 1e-3  # relevance reaches the input


def test_multihead_attention_with_bias_kv_is_refused():
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True, add_bias_kv=True).double().eval()
    x = torch.randn(1, 4, DIM, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ParameterError, match=r"multi-head attention with bias_k / bias_v"), \
            LRPMode(parse_composite("epsilon"), transformer=True, method="attnlrp"):
        mha(x, x, x)
