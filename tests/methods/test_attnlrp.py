"""AttnLRP: each new rule against its textbook formula on a one-op network, the sdpa decomposition
against torch's kernel, conservation on the tiny float64 BERT and Llama (whole model and rule by
rule), equality with LXT's rules written out (its efficient gradient x input form) on the tiny
Llama, batched == unbatched, nothing left modified, and one-line refusals.

Tolerances: float64 throughout; 1e-12 where the same arithmetic is written out (summation order
differs: ~1e-16 relative on O(1) values); 1e-9 relative for whole-model identities (hundreds of
float64 operations, the stabilisers set to 1e-13 or 0).
"""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import salience
from salience.errors import ParameterError
from salience.methods.attnlrp_rules import attention
from salience.methods.lrp_composites import parse_composite
from salience.methods.lrp_mode import LRPMode
from tiny_lm import VOCAB, build_model, build_tokenizer

TEXT = "the film was good , but the plot was dull"
PROMPT = "the capital of france is"
S = 1e-6  # the stabiliser of the uniform rule in the formulas below, as the code's default


def stab(d: np.ndarray, e: float = S) -> np.ndarray:
    found = d + e * np.where(d >= 0, 1.0, -1.0)
    return np.where(found == 0, 1.0, found)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def graph_nodes(y: torch.Tensor) -> set[str]:
    """The class names of the autograd nodes y's backward runs through."""
    seen, stack, names = set(), [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def mode(tracing: bool = True) -> LRPMode:
    return LRPMode(parse_composite("epsilon"), transformer=True, method="attnlrp", tracing=tracing)


def relevance_in(call, inputs: list[torch.Tensor], r_out: torch.Tensor, tracing: bool = True) -> list[np.ndarray]:
    """Inside the mode: y = call(*inputs), backward seeded with R_out / y (R = y * c at the output);
    the relevance at each input is input * what arrives there."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with mode(tracing):
        y = call(*leaves)
        grads = torch.autograd.grad(y, leaves, r_out / y.detach())
    return [(t * g).detach().numpy() for t, g in zip(leaves, grads, strict=True)]


# ---------------------------------------------------------------- one-op networks
def test_softmax_rule_is_the_papers_formula():
    """R_in_i = x_i (R_i - s_i sum_j R_j) per row (Proposition 3.1 without the bias term, as LXT)."""
    x, r = rand(3, 5), rand(3, 5, seed=1)
    (found,) = relevance_in(lambda t: F.softmax(t, dim=-1), [x], r)
    X, R = x.numpy(), r.numpy()
    s = np.exp(X) / np.exp(X).sum(-1, keepdims=True)
    expected = np.array([[X[i, k] * (R[i, k] - s[i, k] * R[i].sum()) for k in range(5)] for i in range(3)])
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-12)


def test_uniform_rule_on_a_matmul_of_two_inputs():
    """p = a b: R_a[i,k] = 1/2 sum_j a_ik b_kj R_ij / stab(p_ij), R_b[k,j] = 1/2 sum_i a_ik b_kj R_ij / stab(p_ij)."""
    a, b, r = rand(1, 3, 4), rand(1, 4, 2, seed=1), rand(1, 3, 2, seed=2)
    found_a, found_b = relevance_in(torch.matmul, [a, b], r)
    A, B, R = a[0].numpy(), b[0].numpy(), r[0].numpy()
    P = A @ B
    ra = np.array([[sum(A[i, k] * B[k, j] * R[i, j] / stab(P[i, j]) for j in range(2)) / 2 for k in range(4)] for i in range(3)])
    rb = np.array([[sum(A[i, k] * B[k, j] * R[i, j] / stab(P[i, j]) for i in range(3)) / 2 for j in range(2)] for k in range(4)])
    np.testing.assert_allclose(found_a[0], ra, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(found_b[0], rb, rtol=1e-12, atol=1e-12)
    # conservation up to the stabiliser: sum R_a + sum R_b = sum R p / stab(p)
    assert found_a.sum() + found_b.sum() == pytest.approx(float((R * P / stab(P)).sum()), abs=1e-12)


def test_uniform_rule_on_an_elementwise_gate():
    """SwiGLU's gate: p = act(g) * u with act SiLU (identity rule): R_g = R_u = R p / (2 stab(p))."""
    g, u, r = rand(2, 6), rand(2, 6, seed=1), rand(2, 6, seed=2)
    found_g, found_u = relevance_in(lambda a, b: F.silu(a) * b, [g, u], r)
    G, U, R = g.numpy(), u.numpy(), r.numpy()
    p = G / (1 + np.exp(-G)) * U
    np.testing.assert_allclose(found_g, R * p / stab(p) / 2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(found_u, R * p / stab(p) / 2, rtol=1e-12, atol=1e-12)


PRODUCTS = {
    "square": (lambda a, b: a * a, (2, 6)),  # one factor twice: k = 2, both shares to a
    "gate": (lambda a, b: F.silu(a) * b, (2, 6)),
    "matmul": (lambda a, b: a @ b.transpose(0, 1), (2, 6)),
    "einsum": (lambda a, b: torch.einsum("ij,kj->ik", a, b), (2, 6)),
    "three_factors": (lambda a, b: a * b * torch.tanh(a), (2, 6)),  # two products of k = 2
}


@pytest.mark.parametrize("product", sorted(PRODUCTS))
def test_untraced_products_without_a_stabiliser_equal_the_uniform_rule(product):
    """Without a stabiliser, the uniform rule's share per unit of a factor is 1/k of its gradient:
    untraced, the product runs as the plain call on scaled factors and gives the traced rule's
    relevance (1e-12), a factor used twice included."""
    call, shape = PRODUCTS[product]
    a, b = rand(*shape), rand(*shape, seed=1)
    r = rand(*call(a, b).shape, seed=2)

    def relevance(tracing: bool) -> list[np.ndarray]:
        leaves = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
        with LRPMode(parse_composite("epsilon"), stabiliser=0.0, transformer=True, method="attnlrp", tracing=tracing):
            y = call(*leaves)
            grads = torch.autograd.grad(y, leaves, r / y.detach(), allow_unused=True)
        return [np.zeros(shape) if g is None else (t * g).detach().numpy() for t, g in zip(leaves, grads, strict=True)]

    for ours, rule in zip(relevance(False), relevance(True), strict=True):
        np.testing.assert_allclose(ours, rule, rtol=1e-12, atol=1e-12)
    if product == "square":  # both halves of R go to a
        np.testing.assert_allclose(relevance(False)[0], r.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tracing", [True, False])
def test_layer_norm_rule_holds_the_divisor_constant(tracing):
    """y = (x - mean x) / sigma * w + b with sigma constant: R_in_i = x_i sum_j (delta_ij - 1/n) w_j / sigma R_j / y_j
    (traced: the rule's own backward; untraced: the lean one)."""
    x, w, b, r = rand(2, 5), rand(5, seed=1), rand(5, seed=2), rand(2, 5, seed=3)
    (found,) = relevance_in(lambda t: F.layer_norm(t, (5,), w, b, 1e-5), [x], r, tracing)
    X, W, B, R = x.numpy(), w.numpy(), b.numpy(), r.numpy()
    sigma = np.sqrt(X.var(-1, keepdims=True) + 1e-5)
    y = (X - X.mean(-1, keepdims=True)) / sigma * W + B
    expected = np.array([[X[i, k] * sum(((k == j) - 1 / 5) * W[j] / sigma[i, 0] * R[i, j] / y[i, j] for j in range(5))
                          for k in range(5)] for i in range(2)])
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-12)


class PythonRMSNorm(nn.Module):
    """An RMSNorm written in Python (as Llama's, in the input's dtype): the mode holds its statistics constant."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(rand(size, seed=7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("tracing", [True, False])
@pytest.mark.parametrize("norm", ["python", "torch"])
def test_rms_norm_rule_is_the_identity(norm, tracing):
    """Divisor constant, the weight an elementwise scale: R_in = R_out elementwise (LXT's rms_norm_identity)."""
    x, r = rand(2, 5), rand(2, 5, seed=1)
    module = PythonRMSNorm(5).requires_grad_(False) if norm == "python" else \
        nn.RMSNorm(5, eps=1e-6, dtype=torch.float64).requires_grad_(False)
    (found,) = relevance_in(module, [x], r, tracing)
    np.testing.assert_allclose(found, r.numpy(), rtol=1e-12, atol=1e-12)


def sdpa_case(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """q (2, 4, 3, 5), k and v (2, 4, 6, 5), the relevance at the output, and sdpa's options for ``case``."""
    q, k, v, r = rand(2, 4, 3, 5), rand(2, 4, 6, 5, seed=1), rand(2, 4, 6, 5, seed=2), rand(2, 4, 3, 5, seed=3)
    options: dict = {}
    if case == "causal":
        options = {"is_causal": True}
    elif case == "bool_mask":
        options = {"attn_mask": rand(3, 6, seed=4) > -0.5}
    elif case == "float_mask":
        options = {"attn_mask": rand(3, 6, seed=4)}
    elif case == "inf_mask":
        options = {"attn_mask": torch.where(rand(3, 6, seed=4) > -0.5, rand(3, 6, seed=5), float("-inf"))}
    elif case == "zero_mask":  # as a BERT without padding passes it
        options = {"attn_mask": torch.zeros(2, 1, 3, 6, dtype=torch.float64)}
    elif case == "gqa":
        k, v, options = k[:, :2], v[:, :2], {"enable_gqa": True}
    elif case == "unbatched":
        q, k, v, r = q[0], k[0], v[0], r[0]
    elif case == "broadcast_batch":  # one k and v for both rows of q
        k, v = k[:1], v[:1]
    elif case == "one_kv_head":  # multi-query attention by broadcasting (no enable_gqa)
        k, v = k[:, :1], v[:, :1]
    return q, k, v, r, options


def eager_attention(case: str, options: dict):
    """The attention of :func:`sdpa_case` written eagerly: matmul, softmax, matmul."""

    def eager(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if case == "gqa":
            b, c = b.repeat_interleave(2, 1), c.repeat_interleave(2, 1)
        scores = torch.matmul(a, b.transpose(-2, -1)) / np.sqrt(5)
        if case == "causal":
            scores = scores.masked_fill(~torch.ones(3, 6, dtype=torch.bool).tril(), float("-inf"))
        elif case == "bool_mask":
            scores = scores.masked_fill(~options["attn_mask"], float("-inf"))
        elif case == "float_mask":
            scores = scores + options["attn_mask"]
        return torch.matmul(F.softmax(scores, dim=-1), c)

    return eager


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "gqa"])
def test_sdpa_decomposition_equals_torch_and_the_eager_rules(case):
    """The decomposition's forward equals F.scaled_dot_product_attention (1e-12); inside the mode, sdpa's
    relevance equals that of the same attention written eagerly (matmul, softmax, matmul) (1e-12)."""
    q, k, v, r, options = sdpa_case(case)
    with mode() as m:
        mine = attention(m, q, k, v, **options)
    np.testing.assert_allclose(mine.numpy(), F.scaled_dot_product_attention(q, k, v, **options).numpy(), rtol=1e-12, atol=1e-12)

    eager = eager_attention(case, options)

    by_sdpa = relevance_in(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **options), [q, k, v], r)
    by_hand = relevance_in(eager, [q, k, v], r)
    for ours, theirs in zip(by_sdpa, by_hand, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "inf_mask", "zero_mask", "gqa",
                                  "unbatched", "broadcast_batch", "one_kv_head"])
@pytest.mark.parametrize("stabiliser", [S, 0.0])
def test_sdpa_written_out_backward_equals_the_decomposition_by_autograd(case, stabiliser):
    """sdpa's backward written out (q, k, v all on the path) gives the gradients and the trace (rules in
    order, relevance per row at each rule's output and inputs) of autograd through the decomposition's
    rules (1e-12: the same arithmetic in another order), for two backward passes of one forward (as
    for two targets; without a stabiliser the second reuses the attention weights the first computed)."""
    q, k, v, r, options = sdpa_case(case)
    seeds = [r, rand(*r.shape, seed=6)]

    def run(call) -> tuple[list[np.ndarray], list[tuple[str, np.ndarray, np.ndarray]]]:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with LRPMode(parse_composite("epsilon"), stabiliser=stabiliser, transformer=True, method="attnlrp") as m:
            y = call(m, *leaves)
            grads = [g for seed in seeds for g in torch.autograd.grad(y, leaves, seed / y.detach(), retain_graph=True)]
        return [g.numpy() for g in grads], [(t.rule, np.asarray(t.relevance_out), np.asarray(t.relevance_in)) for t in m.trace]

    decomposed = run(lambda m, a, b, c: attention(m, a, b, c, **options))  # by autograd through its rules
    written = run(lambda m, a, b, c: F.scaled_dot_product_attention(a, b, c, **options))
    for ours, theirs in zip(written[0], decomposed[0], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert [t[0] for t in written[1]] == [t[0] for t in decomposed[1]] == ["uniform", "softmax", "uniform"] * 2
    for ours, theirs in zip(written[1], decomposed[1], strict=True):
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "gqa", "one_kv_head"])
@pytest.mark.parametrize("on_path", ["qkv", "q", "kv", "qv", "v"])
def test_untraced_sdpa_and_products_run_plainly_with_the_rules_gradients(case, on_path):
    """Untraced and without a stabiliser the uniform rule is 1/k of each factor's gradient and the
    softmax rule its gradient, so sdpa (and an eager matmul, softmax, matmul) runs as the plain
    calls with the inputs' gradients scaled (1/4 to q and k, 1/2 to v when all three are on the
    path; less halving when some are off it): the gradients of the traced rules (1e-12), with
    nothing traced and no rule's backward in the graph."""
    q, k, v, r, options = sdpa_case(case)

    eager = eager_attention(case, options)

    def run(call, tracing: bool) -> tuple[list[np.ndarray], set[str], int]:
        leaves = [t.clone().requires_grad_(name in on_path) for name, t in zip("qkv", (q, k, v), strict=True)]
        with LRPMode(parse_composite("epsilon"), stabiliser=0.0, transformer=True, method="attnlrp", tracing=tracing) as m:
            y = call(*leaves)
            grads = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], r / y.detach())
        return [g.numpy() for g in grads], graph_nodes(y), len(m.trace)

    for call in (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **options), eager):
        rules, rule_nodes, traced = run(call, tracing=True)
        plain, plain_nodes, untraced = run(call, tracing=False)
        assert untraced == 0 and "_SurrogateBackward" not in plain_nodes
        if on_path != "v":  # (v alone: fixed attention weights, a linear map without rules either way)
            assert traced > 0 and "_SurrogateBackward" in rule_nodes
        for ours, theirs in zip(plain, rules, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- tiny models
def _rms_in_input_dtype(self: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def llama(attn: str = "sdpa") -> nn.Module:
    """The tiny Llama with its norms in float64 (transformers computes them in float32)."""
    model = build_model()
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_rms_in_input_dtype, module)
    model.set_attn_implementation(attn)
    return model


def bias_free_bert(toy_dir: Path) -> salience.TextClassifier:
    """The tiny BERT with every bias, position and token-type embedding zeroed: nothing but the
    softmax keeps relevance."""
    model = salience.load_model(str(toy_dir))
    model.model.double()
    with torch.no_grad():
        for name, parameter in model.model.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type_embeddings" in name:
                parameter.zero_()
    return model


def check_conservation(e: salience.Explanation, rel: float = 1e-9) -> None:
    """logit = sum of the scores + what the softmax rules kept, per target; every other rule call
    conserves (relevance in = out)."""
    for t, row in enumerate(e.extras["conservation"]):
        assert row["relevance_sum"] == pytest.approx(float(np.nansum(np.asarray(e.token_scores)[t])), rel=1e-12, abs=1e-12)
        assert abs(row["other_kept"]) <= rel * abs(row["output"]), row
        assert abs(row["softmax_kept"]) > 1e-3 * abs(row["output"])  # the softmax rule does not conserve: not trivially 0
    for layer in e.extras["_layers"]:
        if layer["rule"] != "softmax":
            np.testing.assert_allclose(layer["relevance_in"], layer["relevance_out"], rtol=rel, atol=1e-12)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_conservation_tiny_bert(toy_dir, attn):
    model = bias_free_bert(toy_dir)
    model.model.set_attn_implementation(attn)
    e = salience.explain(model, TEXT, method="attnlrp", eps=1e-13, stabiliser=1e-13, target="all", trace=True)
    check_conservation(e)
    # 2 targets x (14 linear layers, 5 layer norms, 2 softmaxes, 2 x 2 attention matmuls)
    assert e.params["rule_calls"] == {"epsilon": 28, "layer_norm": 10, "softmax": 4, "uniform": 8}
    # with biases and position embeddings the bookkeeping still closes: logit = sum + softmax_kept + other_kept
    full = salience.load_model(str(toy_dir))
    full.model.double()
    for row in salience.explain(full, TEXT, method="attnlrp", target="all", trace=True).extras["conservation"]:
        assert row["output"] == pytest.approx(row["relevance_sum"] + row["softmax_kept"] + row["other_kept"], abs=1e-12)


def test_conservation_tiny_gpt2_over_a_generation():
    """GPT-2 writes its dense layers as addmm (Conv1D) and its GELU in torch functions
    (NewGELUActivation): the written-out layers take the epsilon rule and the activation the identity
    rule, so with every bias and the position embeddings zeroed nothing but the softmax keeps relevance."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(VOCAB), n_embd=16, n_layer=2, n_head=4, n_positions=32, n_inner=32,
                        bos_token_id=1, eos_token_id=2, initializer_range=0.4)
    model = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "wpe" in name:
                parameter.zero_()
    lm = salience.CausalLM(model, build_tokenizer(), name="tiny-gpt2")
    e = salience.explain(lm, PROMPT, method="attnlrp", eps=1e-13, stabiliser=1e-13, max_new_tokens=2, trace=True)
    check_conservation(e)
    assert e.params["rules"]["Conv1D"] == ["epsilon"]
    # 2 targets x (2 layers x 4 Conv1D, 5 layer norms, 2 softmaxes, 2 x 2 attention matmuls), and the output
    # head once (its backward shared by the targets)
    assert e.params["rule_calls"] == {"epsilon": 17, "layer_norm": 10, "softmax": 4, "uniform": 8}


def test_conservation_tiny_llama_over_a_generation():
    lm = salience.CausalLM(llama("sdpa"), build_tokenizer(), name="tiny-llama")
    e = salience.explain(lm, PROMPT, method="attnlrp", eps=1e-13, stabiliser=1e-13, max_new_tokens=3, trace=True)
    check_conservation(e)
    assert len(e.extras["conservation"]) == 3


def test_lrp0_linear_layers_run_plainly_and_equal_the_epsilon_rule_at_its_limit(toy):
    """eps = 0 (the default) runs the linear layers as plain calls (LRP-0 is their gradient per unit
    of input; nothing traced for them); eps = 1e-300 runs them as epsilon rules, whose factor
    z / (|z| + eps) is 1 to the last bit wherever |z| > 1e-284: the same maps to 1e-12, on the
    tiny BERT with its biases and on the tiny Llama over a generation."""
    lm = salience.CausalLM(llama("sdpa"), build_tokenizer(), name="tiny-llama")
    for model, text, options in ((toy, TEXT, {"target": "all"}), (lm, PROMPT, {"max_new_tokens": 3})):
        plain = salience.explain(model, text, method="attnlrp", trace=True, **options)
        rule = salience.explain(model, text, method="attnlrp", eps=1e-300, trace=True, **options)
        np.testing.assert_allclose(np.asarray(plain.scores), np.asarray(rule.scores), rtol=1e-12, atol=1e-12)
        assert "epsilon" not in plain.params["rule_calls"] and rule.params["rule_calls"]["epsilon"] > 0
        for a, b in zip(plain.extras["conservation"], rule.extras["conservation"], strict=True):
            assert a["softmax_kept"] == pytest.approx(b["softmax_kept"], abs=1e-12)


@pytest.mark.parametrize("stabilisers", [{}, {"eps": 1e-6, "stabiliser": 1e-6}])
def test_untraced_targets_vmapped_equal_the_traced_backward_passes(toy, monkeypatch, stabilisers):
    """Several targets of one forward pass, untraced (the default): their backward runs vmapped
    (``is_grads_batched``) through the rules, and gives the scores of one traced plain backward per
    target (1e-12), on the tiny Llama over a generation (sdpa, grouped k/v heads written out) and
    the tiny BERT's classes, at the default eps and stabiliser 0 (linear layers plain) and with both
    1e-6 (the epsilon rule and the stabilised uniform rule under vmap); the conservation rows keep
    output, sum and error."""
    batched = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        batched.append(bool(kwargs.get("is_grads_batched", False)))
        return grad(*args, **kwargs)

    lm = salience.CausalLM(llama("sdpa"), build_tokenizer(), name="tiny-llama")
    for model, text, options in ((lm, PROMPT, {"max_new_tokens": 3}), (toy, TEXT, {"target": "all"})):
        traced = salience.explain(model, text, method="attnlrp", trace=True, **stabilisers, **options)
        batched.clear()
        monkeypatch.setattr(torch.autograd, "grad", counting)
        vmapped = salience.explain(model, text, method="attnlrp", **stabilisers, **options)
        monkeypatch.setattr(torch.autograd, "grad", grad)
        assert any(batched) and vmapped.params["traced"] is False and traced.params["traced"] is True
        np.testing.assert_allclose(np.asarray(vmapped.scores), np.asarray(traced.scores), rtol=1e-12, atol=1e-12)
        for a, b in zip(vmapped.extras["conservation"], traced.extras["conservation"], strict=True):
            assert set(a) == {"output", "relevance_sum", "error"}
            assert a["relevance_sum"] == pytest.approx(b["relevance_sum"], abs=1e-12)
        assert vmapped.extras["_layers"] == [] and "rule_calls" not in vmapped.params


# ---------------------------------------------------------------- LXT's rules written out
def divide_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """LXT's ``divide_gradient``: the value x, the gradient divided by ``factor``."""
    return x / factor + (x - x / factor).detach()


# LXT divides by x + 1e-10 in its identity rule, a guard against x = 0 (Salience sends 0 there
# instead); with it the two differ by up to 4e-10 here, without it they are equal to 1e-12
GUARD = 0.0


def identity_rule(fn, x: torch.Tensor) -> torch.Tensor:
    """LXT's ``identity_rule_implicit``: the value fn(x), the gradient fn(x) / (x + GUARD)."""
    y = fn(x)
    ratio = (y / (x + GUARD)).detach()
    return x * ratio + (y - x * ratio).detach()


def lxt_rms_norm(self: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:  # LXT's rms_norm_forward, in float64
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).detach())


def lxt_gated_mlp(self: LlamaMLP, x: torch.Tensor) -> torch.Tensor:  # LXT's gated_mlp_forward
    return self.down_proj(divide_gradient(identity_rule(self.act_fn, self.gate_proj(x)) * self.up_proj(x), 2))


class LXTAttention:
    """LXT's ``wrap_attention_forward`` around the model's attention functions: the gradient at the
    query and key divided by 4, at the value by 2 (the uniform rule of both matmuls in gradient form)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def get_interface(self, name: str, default):
        found = self.inner.get_interface(name, default)

        def forward(module, query, key, value, *args, **kwargs):
            return found(module, divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2), *args, **kwargs)

        return forward


def test_equals_lxt_rules_written_out(monkeypatch):
    """AttnLRP with eps = 0 and no stabiliser equals LXT's efficient AttnLRP (its patches written out
    above, then input x gradient of the logit) on the tiny float64 Llama, for every token of a
    continuation (1e-12: the same products in another order)."""
    continuation = " paris is a big city"
    ours = salience.explain(salience.CausalLM(llama(), build_tokenizer(), name="tiny"), PROMPT, method="attnlrp", eps=0.0,
                            stabiliser=0.0, continuation=continuation)
    patched = llama()
    for module in patched.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(lxt_rms_norm, module)
        elif isinstance(module, LlamaMLP):
            module.forward = types.MethodType(lxt_gated_mlp, module)
    monkeypatch.setattr(modeling_llama, "ALL_ATTENTION_FUNCTIONS", LXTAttention(modeling_llama.ALL_ATTENTION_FUNCTIONS))
    theirs = salience.explain(salience.CausalLM(patched, build_tokenizer(), name="lxt"), PROMPT, method="input_x_gradient",
                              output="logit", continuation=continuation)
    a, b = np.asarray(ours.token_scores), np.asarray(theirs.token_scores)
    assert a.shape == b.shape == (5, 11) and np.abs(b).max() > 0.1
    # the 5 targets share one forward pass and run backward one by one (their rules' trace per backward)
    assert (ours.cost.forward_passes, ours.cost.backward_passes) == (1, 5)
    assert len(ours.extras["conservation"]) == 5
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- attention implementations, batching
def test_eager_equals_sdpa_on_the_tiny_llama():
    """The same model, eager (transformers' softmax in float32) or sdpa (decomposed by the mode, float64):
    equal to float32 rounding of the softmax (1e-6 of the largest score)."""
    runs = [salience.explain(salience.CausalLM(llama(attn), build_tokenizer(), name="tiny"), PROMPT, method="attnlrp",
                             max_new_tokens=4, trace=True) for attn in ("eager", "sdpa")]
    a, b = (np.asarray(e.token_scores) for e in runs)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.nanmax(np.abs(b)))
    assert runs[0].params["rule_calls"] == runs[1].params["rule_calls"]


def test_classifier_prediction_pass_in_attnlrp_mode(toy_dir):
    """One class of a classifier explained: the prediction pass itself runs in AttnLRP mode (1
    forward + 1 backward in all) and gives the scores, conservation and rule trace of AttnLRP's own
    pass after a plain prediction (target="all" takes that path), to 1e-12."""
    model = salience.load_model(str(toy_dir))
    model.model.double()
    every = salience.explain(model, TEXT, method="attnlrp", target="all", trace=True)
    for target in [None, 1]:  # None: the predicted class
        one = salience.explain(model, TEXT, method="attnlrp", trace=True, **({} if target is None else {"target": target}))
        k = int(one.targets[0].index)
        assert k == (every.prediction.index if target is None else target)
        assert (one.cost.forward_passes, one.cost.backward_passes) == (1, 1)
        np.testing.assert_allclose(np.asarray(one.scores), np.asarray(every.scores)[k], rtol=1e-12, atol=1e-12)
        for key in ("output", "relevance_sum", "softmax_kept", "other_kept"):
            assert one.extras["conservation"][0][key] == pytest.approx(every.extras["conservation"][k][key], abs=1e-12)
        assert one.params["rule_calls"] == {rule: n // 2 for rule, n in every.params["rule_calls"].items()}  # 2 targets there


def test_batched_equals_unbatched(toy):
    """Several inputs in one call, several targets in one call and batch_size=1: equal to one
    input and one target at a time (1e-12)."""
    texts = [TEXT, "a superb and lovely story"]
    together = salience.explain(toy, texts, method="attnlrp", target="all")
    for text, e in zip(texts, together, strict=True):
        for t in range(2):
            alone = salience.explain(toy, text, method="attnlrp", target=t, batch_size=1)
            np.testing.assert_allclose(np.asarray(e.scores)[t], np.asarray(alone.scores), rtol=1e-12, atol=1e-12)
    lm = salience.CausalLM(llama(), build_tokenizer(), name="tiny")
    generation = salience.explain(lm, PROMPT, method="attnlrp", continuation=" paris is")
    ids = lm.tokenizer(" paris is", add_special_tokens=False)["input_ids"]
    first = salience.explain(lm, PROMPT, method="attnlrp", continuation=" paris", batch_size=1)
    assert len(ids) == 2
    np.testing.assert_allclose(np.asarray(generation.token_scores)[0, :-1], np.asarray(first.token_scores)[0], rtol=1e-12,
                               atol=1e-12)


# ---------------------------------------------------------------- nothing left modified, refusals
class TopKAttention(nn.Module):
    """A custom sparse attention: each query attends to its 2 highest-scoring keys (torch.topk on the
    relevance path), wrapping a Llama attention's projections."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        a, (b, length, _) = self.inner, hidden_states.shape
        q, k, v = (proj(hidden_states).view(b, length, -1, a.head_dim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        k, v = k.repeat_interleave(a.num_key_value_groups, 1), v.repeat_interleave(a.num_key_value_groups, 1)
        top, index = (q @ k.transpose(-1, -2) * a.scaling).topk(min(2, length), dim=-1)
        picked = torch.gather(v[:, :, None].expand(-1, -1, length, -1, -1), 3,
                              index[..., None].expand(-1, -1, -1, -1, a.head_dim))  # (B, H, L, 2, D)
        out = (top.softmax(-1)[..., None] * picked).sum(-2)
        return a.o_proj(out.transpose(1, 2).reshape(b, length, -1)), None


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_untouched(model: nn.Module, fresh: nn.Module, ids: torch.Tensor) -> None:
    ours, theirs = _state(model), _state(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in fresh.parameters()]
    assert model.config._attn_implementation == fresh.config._attn_implementation
    assert model.training == fresh.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_restored_after_success_and_after_an_error(attn):
    model = llama(attn)
    fresh = copy.deepcopy(model)
    lm = salience.CausalLM(model, build_tokenizer(), name="tiny")
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    salience.explain(lm, PROMPT, method="attnlrp", max_new_tokens=2)
    assert_untouched(model, fresh, ids)
    model.model.layers[1].self_attn = TopKAttention(model.model.layers[1].self_attn)  # on the model and on its copy
    fresh.model.layers[1].self_attn = TopKAttention(fresh.model.layers[1].self_attn)
    with pytest.raises(ParameterError) as info:
        salience.explain(lm, PROMPT, method="attnlrp", continuation=" paris")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("attnlrp has no rule for") and "topk" in message
    assert "(in model.layers.1.self_attn, TopKAttention)" in message
    assert_untouched(model, fresh, ids)


def test_refusals(toy):
    with pytest.raises(ParameterError, match="attnlrp explains logits"):
        salience.explain(toy, TEXT, method="attnlrp", output="probability")
    with pytest.raises(ParameterError, match="z\\^B"):
        salience.explain(toy, TEXT, method="attnlrp", composite="epsilon_plus")
    with pytest.raises(ParameterError, match="eps and stabiliser must be >= 0"):
        salience.explain(toy, TEXT, method="attnlrp", eps=-1.0)
    with pytest.raises(ParameterError, match="lrp has no rule for .*softmax"):  # plain LRP still refuses attention
        salience.explain(toy, TEXT, method="lrp", composite="epsilon")


@pytest.mark.slow
def test_zoo_minilm_sentiment_one_sentence():
    """The float32 zoo classifier (sdpa attention, biases, position embeddings): finite scores, the
    bookkeeping closes (logit = sum + softmax_kept + other_kept, 1e-9 absolute on sums of float32
    values added in float64) and the softmax keeps a real share (not asserted small: see docs)."""
    model = salience.load_model("zoo:minilm-sentiment")
    e = salience.explain(model, "Woefully pretentious.", method="attnlrp", trace=True)
    assert np.isfinite(np.asarray(e.scores)).all()
    (row,) = e.extras["conservation"]
    assert row["output"] == pytest.approx(row["relevance_sum"] + row["softmax_kept"] + row["other_kept"], abs=1e-9)
    assert e.params["rule_calls"]["softmax"] == 6 and e.params["rule_calls"]["layer_norm"] == 13
