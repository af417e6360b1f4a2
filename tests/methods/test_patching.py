"""Activation patching and attribution patching (AtP) on the tiny seeded Llama and the toy BERT.

- Exact patching equals patching by hand (a forward hook written here replaces one activation;
  1e-10: the same float64 computation, batched differently).
- AtP equals (a_corrupt - a_clean) . dm/da computed here with plain autograd (1e-10).
- AtP is the first-order term of exact patching: patching part-way, a_clean + d (a_corrupt -
  a_clean), the error |exact - AtP| is O(d^2), so halving d divides it by about 4 (checked in
  [3, 5] for d = 0.1, 0.05, 0.025; measured 3.82 and 3.94: the next order still shows). These run
  on the Llama with no float32 step (norms in float64, SDPA), so float32 round-off (1e-7 relative)
  cannot blur the small differences compared.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import salience
from salience.models.components import COMPONENTS, ComponentFacts
from salience.patching import PatchingResult, attribution_patching
from tiny_lm import VOCAB, build_model, build_tokenizer

CLEAN, CORRUPT = "the capital of france is", "the capital of paris is"
OPTIONS = {"continuation": " paris", "contrast": " city"}
TOL = 1e-10


def _norm_in_input_dtype(self: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    """The tiny Llama (3 layers) with no float32 step: norms in the input's dtype, SDPA attention."""
    model = build_model(layers=3)
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_norm_in_input_dtype, module)
    model.set_attn_implementation("sdpa")
    return salience.CausalLM(model, build_tokenizer(), name="tiny-llama")


def ids(lm: salience.CausalLM, text: str) -> torch.Tensor:
    return lm.tokenizer(text + OPTIONS["continuation"], return_tensors="pt")["input_ids"]


def metric(lm: salience.CausalLM, logits: torch.Tensor) -> torch.Tensor:
    """logit(paris) - logit(city) at the position predicting the continuation (the one before last)."""
    paris, city = (lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" paris", " city"))
    return logits[0, -2, paris] - logits[0, -2, city]


def activations(lm: salience.CausalLM, text: str, *, grad: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Block outputs and o_proj inputs of one plain run (row 0), and the metric (graph kept with ``grad``)."""
    blocks, heads, handles = [], [], []
    for layer in lm.model.model.layers:
        handles.append(layer.register_forward_hook(lambda _m, _i, out: blocks.append(out)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, inputs: heads.append(inputs[0])))
    with torch.set_grad_enabled(grad):
        value = metric(lm, lm.model(ids(lm, text)).logits)
    for handle in handles:
        handle.remove()
    return blocks, heads, value


def hand_patched(lm: salience.CausalLM, kind: str, layer: int, index: int, scale: float = 1.0) -> float:
    """m(clean run with one component moved towards its corrupted value) - m(clean), by a hook written here."""
    corrupt_blocks, corrupt_heads, _ = activations(lm, CORRUPT)
    _, _, clean_value = activations(lm, CLEAN)
    block = lm.model.model.layers[layer]
    if kind == "residual":
        def edit(_m, _i, out):
            out = out.clone()
            out[0, index] += scale * (corrupt_blocks[layer][0, index] - out[0, index])
            return out
        handle = block.register_forward_hook(edit)
    else:
        width = corrupt_heads[layer].shape[-1] // 4
        part = slice(index * width, (index + 1) * width)

        def edit_heads(_m, inputs):
            value = inputs[0].clone()
            value[0, :, part] += scale * (corrupt_heads[layer][0, :, part] - value[0, :, part])
            return (value,)
        handle = block.self_attn.o_proj.register_forward_pre_hook(edit_heads)
    with torch.no_grad():
        patched = metric(lm, lm.model(ids(lm, CLEAN)).logits)
    handle.remove()
    return float(patched - clean_value)


def test_exact_patching_equals_patching_by_hand(lm):
    result = attribution_patching(lm, CLEAN, CORRUPT, method="exact", **OPTIONS)
    assert result.residual.shape == (3, 7) and result.heads.shape == (3, 4)
    for layer, position in [(0, 4), (1, 4), (2, 5), (1, 5), (0, 2)]:
        assert abs(result.residual[layer, position] - hand_patched(lm, "residual", layer, position)) < TOL
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        assert abs(result.heads[layer, head] - hand_patched(lm, "heads", layer, head)) < TOL
    # the last block's output at the predicting position is all the metric reads: patching it gives m(corrupt)
    assert abs(result.residual[2, 5] - (result.corrupted_metric - result.clean_metric)) < TOL
    # positions before the first changed token (4) carry the same values in both runs; the last one is never read
    np.testing.assert_allclose(result.residual[:, [0, 1, 2, 3, 6]], 0, atol=TOL)
    assert abs(result.corrupted_metric - result.clean_metric) > 1e-3
    assert result.cost["forward_passes"] == 2 + 3 * 7 + 3 * 4 and result.cost["backward_passes"] == 0
    chunked = attribution_patching(lm, CLEAN, CORRUPT, method="exact", batch_size=4, **OPTIONS)  # rows counted across calls
    assert chunked.cost["model_calls"] >= 2 + 9
    np.testing.assert_allclose(chunked.residual, result.residual, rtol=0, atol=TOL)
    np.testing.assert_allclose(chunked.heads, result.heads, rtol=0, atol=TOL)


def test_atp_equals_the_gradient_estimate_written_by_hand(lm):
    result = attribution_patching(lm, CLEAN, CORRUPT, **OPTIONS)
    corrupt_blocks, corrupt_heads, _ = activations(lm, CORRUPT)
    blocks, heads, value = activations(lm, CLEAN, grad=True)
    block_grads = torch.autograd.grad(value, blocks, retain_graph=True)
    head_grads = torch.autograd.grad(value, heads)
    residual = np.stack([((c - a) * g)[0].sum(-1).detach().numpy() for c, a, g in zip(corrupt_blocks, blocks, block_grads)])
    per_head = np.stack([((c - a) * g)[0].reshape(7, 4, -1).sum((0, 2)).detach().numpy()
                         for c, a, g in zip(corrupt_heads, heads, head_grads)])
    np.testing.assert_allclose(result.residual, residual, rtol=0, atol=TOL)
    np.testing.assert_allclose(result.heads, per_head, rtol=0, atol=TOL)
    assert np.abs(per_head).max() > 1e-2  # not trivially zero
    assert result.cost["forward_passes"] == 2 and result.cost["backward_passes"] == 1


def test_atp_is_the_first_order_term_of_exact_patching(lm):
    errors = []
    for scale in (0.1, 0.05, 0.025):
        atp = attribution_patching(lm, CLEAN, CORRUPT, scale=scale, **OPTIONS)
        exact = attribution_patching(lm, CLEAN, CORRUPT, scale=scale, method="exact", **OPTIONS)
        errors.append(max(np.abs(atp.residual - exact.residual).max(), np.abs(atp.heads - exact.heads).max()))
        largest = max(np.abs(exact.residual).max(), np.abs(exact.heads).max())
    for bigger, smaller in zip(errors, errors[1:]):
        assert 3 < bigger / smaller < 5, errors  # O(d^2): halving d quarters the error
    print("AtP - exact, max over components, at d = 0.1, 0.05, 0.025:", errors, "largest exact change:", largest)
    assert errors[-1] < 0.1 * largest  # at d = 0.025 the estimate is within 10 % of the largest exact change


def test_backward_mode_wraps_the_clean_backward(lm):
    """A caller's context (here: doubling the gradient at the LM head) changes AtP's gradients only."""
    entered = []

    class Doubled:
        def __enter__(self):
            entered.append(True)
            self.handle = lm.model.lm_head.register_full_backward_pre_hook(lambda _m, grad: (2 * grad[0],))

        def __exit__(self, *_):
            self.handle.remove()

    plain = attribution_patching(lm, CLEAN, CORRUPT, **OPTIONS)
    doubled = attribution_patching(lm, CLEAN, CORRUPT, backward_mode=Doubled, **OPTIONS)
    assert entered == [True]
    np.testing.assert_allclose(doubled.residual, 2 * plain.residual, rtol=1e-12, atol=1e-15)
    assert doubled.clean_metric == plain.clean_metric and not lm.model.lm_head._backward_pre_hooks


def test_classifier_exact_by_hand_and_first_order(toy):
    clean, corrupt = "the film was good and lovely", "the film was dull and lovely"
    exact = attribution_patching(toy, clean, corrupt, method="exact", output="logit", target="positive")
    assert exact.residual.shape == (2, 8) and exact.heads.shape == (2, 2)
    layers = toy.model.bert.encoder.layer
    batch = {k: toy.tokenizer(t, return_tensors="pt") for k, t in (("clean", clean), ("corrupt", corrupt))}
    stash = []
    handle = layers[0].register_forward_hook(lambda _m, _i, out: stash.append(out))
    with torch.no_grad():
        toy.model(**batch["corrupt"])
    handle.remove()

    def edit(_m, _i, out):
        out = out.clone()
        out[0, 4] = stash[0][0, 4]
        return out
    handle = layers[0].register_forward_hook(edit)
    with torch.no_grad():
        patched = toy.model(**batch["clean"]).logits[0, 1]
    handle.remove()
    assert abs(exact.residual[0, 4] - (float(patched) - exact.clean_metric)) < TOL
    errors = [np.abs(attribution_patching(toy, clean, corrupt, output="logit", target="positive", scale=d).residual
                     - attribution_patching(toy, clean, corrupt, method="exact", output="logit", target="positive", scale=d).residual).max()
              for d in (0.02, 0.01)]
    assert 3 < errors[0] / errors[1] < 5, errors


def test_result_json_text_and_png(lm, tmp_path):
    result = attribution_patching(lm, CLEAN, CORRUPT, **OPTIONS)
    back = PatchingResult.from_json(result.to_json())
    np.testing.assert_array_equal(back.residual, result.residual)
    np.testing.assert_array_equal(back.heads, result.heads)
    assert back.tokens == result.tokens and back.metric == result.metric == "logit of 'paris vs city'"
    text = result.to_text()
    assert "capital" in text and "france" in text and len([line for line in text.splitlines() if "│" in line]) >= 3
    assert "h3" in result.to_text("heads")
    name, value = result.top(1)[0]
    assert value == result.residual.flat[np.abs(result.residual).argmax()] and name.startswith("layer")
    path = result.to_png(tmp_path / "residual.png")
    assert (tmp_path / "residual.png").stat().st_size > 1000 and path.endswith(".png")
    only = attribution_patching(lm, CLEAN, CORRUPT, components="heads", method="exact", **OPTIONS)
    assert only.residual is None and only.cost["forward_passes"] == 2 + 12
    with pytest.raises(salience.ParameterError, match="no 'residual' scores"):
        only.to_text("residual")


# families whose blocks and head projections sit elsewhere than Llama's (norms in float64 here; Bloom takes
# its softmax in float32, which blurs the extrapolation to 5e-5 relative)
FAMILIES = {
    "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 32},  # Conv1D projection
    "opt": {"ffn_dim": 32, "word_embed_proj_dim": 16},
    "bloom": {"n_layer": 2, "n_head": 4},
    "gpt_neox": {},
    "falcon": {},
    "phi": {},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_components_of_other_families(family):
    """The located blocks: patching the last block's output at the position the metric reads gives the
    corrupted run's metric (1e-10). The located heads: exact patching at scales d and d / 2,
    extrapolated to d -> 0 (2 E(d/2) - E(d), error O(d^2)), meets AtP (1e-5 relative at d = 0.01; Bloom 2e-4)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, tie_word_embeddings=False, **FAMILIES[family])
    model = salience.CausalLM(AutoModelForCausalLM.from_config(config).double().eval(), build_tokenizer(), name=family)
    exact = attribution_patching(model, CLEAN, CORRUPT, method="exact", **OPTIONS)
    assert exact.residual.shape == (2, 7) and exact.heads.shape == (2, 4)
    assert abs(exact.residual[-1, -2] - (exact.corrupted_metric - exact.clean_metric)) < TOL
    assert abs(exact.corrupted_metric - exact.clean_metric) > 1e-4  # the corrupted run differs: the check has power

    def per_unit(d: float) -> np.ndarray:
        return attribution_patching(model, CLEAN, CORRUPT, method="exact", scale=d, components="heads", **OPTIONS).heads / d

    atp = attribution_patching(model, CLEAN, CORRUPT, components="heads", **OPTIONS).heads
    relative = 2e-4 if family == "bloom" else 1e-5
    np.testing.assert_allclose(2 * per_unit(0.005) - per_unit(0.01), atp, rtol=0, atol=relative * np.abs(atp).max())


def test_a_projection_that_is_not_the_heads_is_refused(monkeypatch):
    """Facts pointing at the MLP's output projection (32 inputs, not 4 heads x 4): refused, not split."""
    monkeypatch.setitem(COMPONENTS, "gpt2", ComponentFacts("transformer.h", "mlp.c_proj"))
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, **FAMILIES["gpt2"])
    model = salience.CausalLM(AutoModelForCausalLM.from_config(config).double().eval(), build_tokenizer())
    with pytest.raises(salience.ParameterError, match=r"transformer.h.0 took 32 values per position, not 4 heads x 4"):
        attribution_patching(model, CLEAN, CORRUPT, **OPTIONS)


def test_bad_input_is_refused_in_one_line(lm, toy):
    cases = [
        (salience.InputError, "same length", dict(clean=CLEAN, corrupted="the capital of big france is", **OPTIONS)),
        (salience.ParameterError, "unknown component kind 'mlp'", dict(components=("residual", "mlp"), **OPTIONS)),
        (salience.ParameterError, "give continuation", {}),
        (salience.ParameterError, "2 targets", {"continuation": " paris is"}),
        (salience.ParameterError, "unknown patching method", dict(method="sampled", **OPTIONS)),
        (salience.ParameterError, "scale must be", dict(scale=0.0, **OPTIONS)),
    ]
    for error, message, options in cases:
        options = {"clean": CLEAN, "corrupted": CORRUPT, **options}
        with pytest.raises(error, match=message) as caught:
            attribution_patching(lm, **options)
        assert "\n" not in str(caught.value)
    other = build_model()
    other.config.model_type = "gpt_neo"
    with pytest.raises(salience.ParameterError, match="layers of a 'gpt_neo' model"):
        attribution_patching(salience.CausalLM(other, build_tokenizer()), CLEAN, CORRUPT, **OPTIONS)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    def failing():
        raise RuntimeError("inside the caller's context")
    with pytest.raises(RuntimeError, match="caller's context"):  # raised while the recording hooks are on
        attribution_patching(lm, CLEAN, CORRUPT, backward_mode=failing, **OPTIONS)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == hooks


@pytest.mark.slow
def test_smollm2_atp_ranks_heads_as_exact_patching():
    """SmolLM2-135M, "The capital of France is" + " Paris" vs " Rome", corrupted "... Italy is": AtP
    orders the 270 heads as exact patching does (Spearman > 0.9; 0.998 measured) and finds its
    largest head among its own top 3; the last block at the predicting position carries the whole
    change (float32 model: 1e-3 of a metric change of 13)."""
    from scipy.stats import spearmanr

    try:
        smol = salience.load_model("zoo:smollm2-135m")
    except salience.AssetMissingError as error:
        pytest.skip(str(error))
    pair = ("The capital of France is", "The capital of Italy is")
    options = {"continuation": " Paris", "contrast": " Rome"}
    atp = attribution_patching(smol, *pair, components="heads", **options)
    exact = attribution_patching(smol, *pair, components="heads", method="exact", **options)
    assert spearmanr(atp.heads.ravel(), exact.heads.ravel())[0] > 0.9
    top = np.unravel_index(np.abs(exact.heads).argmax(), exact.heads.shape)
    assert top in [np.unravel_index(i, atp.heads.shape) for i in np.argsort(-np.abs(atp.heads), axis=None)[:3]]
    last = attribution_patching(smol, *pair, components="residual", method="exact", **options)
    change = last.corrupted_metric - last.clean_metric
    assert abs(change) > 5 and abs(last.residual[-1, -2] - change) < 1e-3 * abs(change)


def test_cli_patch_prints_tables_and_writes_json_and_png(tmp_path, capsys):
    from salience.cli import main

    folder = tmp_path / "lm"
    build_model(layers=3).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    status = main(["patch", "--model", str(folder), "--clean", CLEAN, "--corrupted", CORRUPT, "--continuation", " paris",
                   "--contrast", " city", "--method", "exact", "--json", str(out), "--png", str(png), "--no-color"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "exact residual" in printed and "exact heads" in printed and "france" in printed
    saved = PatchingResult.from_json(out.read_text())
    assert saved.residual.shape == (3, 7) and saved.metric == "logit of 'paris vs city'"
    assert (tmp_path / "p-residual.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "p-heads.png").exists()
    assert main(["patch", "--model", str(folder), "--clean", CLEAN, "--corrupted", "the capital", "--continuation", " paris"]) == 2
    assert "same length" in capsys.readouterr().err
