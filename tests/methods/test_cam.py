"""The CAM family (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, Score-CAM, Ablation-CAM) against its
formulas written out here, Grad-CAM against Captum, on CNNs and vision transformers.

The reference maps are computed without Salience's hooks: the test models are ``Sequential(features,
head)`` pairs (or a ViT whose layer output a hook written here keeps), so A = features(x) and
y = head(A) are plain tensors. Tolerances: float64 models, the same operations in another order,
so 1e-10 of the largest score (the weights of Grad-CAM++ divide by small numbers: 1e-9);
EfficientNet-Lite0 runs in float32: 1e-5 of the largest score (batch shapes change the summation
order inside the convolutions; differences measured ~1e-7).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from oracles import require
from salience.errors import ParameterError
from salience.models.image import ImageClassifier
from salience.models.layers import token_layout
from tiny_cnn import photo, tiny_classifier
from toy import explain_probability

GRID = 16
GRADIENT_CAMS = ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam")
ALL_CAMS = (*GRADIENT_CAMS, "score_cam", "ablation_cam")


# ------------------------------------------------------------------ models
def split_cnn(seed: int = 0) -> nn.Module:
    """Sequential(features, head): features give A (N, 5, 8, 8) (ReLU, so A >= 0, as after a
    convolution block); the head mixes positions (1x1 conv, Softplus, 2x2 pooling) so gradients
    vary over the map."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU())
    head = nn.Sequential(nn.Conv2d(5, 6, 1), nn.Softplus(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3))
    with torch.no_grad():
        features[2].bias.add_(0.3)  # most activations positive
        head[-1].weight.mul_(3.0)
    return nn.Sequential(features, head).double().eval()


class Block(nn.Module):
    """A pre-norm transformer block (as timm's ViT): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (4 x 4 conv: a 4 x 4 grid of a 16 x 16 image), a class token and ``registers``
    register tokens before the patches, 2 blocks, a final norm, a linear head on the class token."""

    def __init__(self, registers: int = 0, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.tokens = nn.Parameter(torch.randn(1, 1 + registers, dim))
        self.position = nn.Parameter(0.5 * torch.randn(1, 1 + registers + 16, dim))
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.tokens.expand(x.shape[0], -1, -1), patches], 1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def classifier(net: nn.Module) -> ImageClassifier:
    return ImageClassifier(net, input_shape=(3, GRID, GRID), labels=["a", "b", "c"], name=type(net).__name__)


def vit(registers: int = 0) -> TinyViT:
    torch.manual_seed(1)
    return TinyViT(registers).double().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, GRID, GRID, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


# ------------------------------------------------------------------ the formulas, written out
def layer_and_gradients(net: nn.Module, x: torch.Tensor, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (K, h, w), dy_t/dA (T, K, h, w), the logits y (T,) of Sequential(features, head)."""
    a = net[0](x[None]).detach().requires_grad_(True)
    logits = net[1](a)[0]
    grads = torch.stack([torch.autograd.grad(logits[t], a, retain_graph=True)[0][0] for t in targets])
    return a.detach()[0], grads, logits.detach()[targets]


def gradcam_weights(a: torch.Tensor, g: torch.Tensor, method: str) -> torch.Tensor:
    """The raw map (T, h, w) of a gradient CAM, one channel and one position at a time (loops, not
    the library's vectorised form)."""
    t_count, k_count, h, w = g.shape
    cam = torch.zeros(t_count, h, w, dtype=torch.float64)
    for t in range(t_count):
        for k in range(k_count):
            gk, ak = g[t, k], a[k]
            if method == "grad_cam":
                cam[t] += gk.mean() * ak
            elif method == "grad_cam_plus_plus":
                weight = 0.0
                for i in range(h):
                    for j in range(w):
                        if gk[i, j] != 0:
                            alpha = gk[i, j] ** 2 / (2 * gk[i, j] ** 2 + ak.sum() * gk[i, j] ** 3 + 1e-6)
                            weight += max(float(gk[i, j]), 0.0) * float(alpha)
                cam[t] += weight * ak
            elif method == "xgrad_cam":
                cam[t] += (ak / (ak.sum() + 1e-7) * gk).sum() * ak
            else:  # layer_cam
                cam[t] += gk.clamp(min=0) * ak
    return cam


def finish(cam: torch.Tensor, relu: bool = True, mode: str = "bilinear") -> np.ndarray:
    """ReLU, then upsample (T, h, w) -> (T, H*W) as F.interpolate does (align_corners=False)."""
    shown = cam.clamp(min=0) if relu else cam
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(shown[:, None], size=(GRID, GRID), mode=mode, **options).reshape(cam.shape[0], -1).numpy()


def close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-10) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * max(np.abs(expected).max(), 1e-300))


# ------------------------------------------------------------------ 1 and 3: formulas
@pytest.mark.parametrize("method", GRADIENT_CAMS)
def test_gradient_cams_equal_their_formulas(x, method):
    net = split_cnn()
    e = salience.explain(classifier(net), x, method=method, layer="0", target=[0, 1, 2], output="logit")
    a, g, logits = layer_and_gradients(net, x, [0, 1, 2])
    raw = gradcam_weights(a, g, method)
    close(np.array(e.extras["cam"]), raw.numpy())
    close(e.token_scores, finish(raw), rel=1e-9 if method == "grad_cam_plus_plus" else 1e-10)
    close(e.output_value, logits.numpy())
    assert e.params["layer"] == "0" and e.scores.shape == (3, GRID * GRID)
    assert (e.token_scores >= 0).all() and e.token_scores.max() > 0


def test_grad_cam_explains_the_chosen_output_with_its_chain_rule(x):
    """output="probability": the gradient of the softmax output (autograd on the head here);
    relu=False keeps the sign; nearest upsampling."""
    net = split_cnn()
    e = salience.explain(classifier(net), x, method="grad_cam", layer="0", target=1, output="probability",
                         relu=False, upsample="nearest")
    a = net[0](x[None]).detach().requires_grad_(True)
    p = torch.softmax(net[1](a)[0], -1)[1]
    (g,) = torch.autograd.grad(p, a)
    raw = gradcam_weights(a.detach()[0], g, "grad_cam")
    close(e.token_scores, finish(raw, relu=False, mode="nearest")[0])
    assert e.output_value == pytest.approx(float(p.detach()), abs=1e-15)
    assert (e.token_scores < 0).any()  # signed


def test_normalisations(x):
    net = split_cnn()
    model = classifier(net)
    plain = salience.explain(model, x, method="grad_cam", layer="0", target="all", output="logit")
    raw = torch.tensor(plain.extras["cam"], dtype=torch.float64).clamp(min=0)
    for how, expected in (("minmax", (raw - raw.amin((1, 2), keepdim=True))
                           / (raw.amax((1, 2), keepdim=True) - raw.amin((1, 2), keepdim=True) + 1e-7)),
                          ("max", raw / (raw.abs().amax((1, 2), keepdim=True) + 1e-7))):
        e = salience.explain(model, x, method="grad_cam", layer="0", target="all", output="logit", normalise=how)
        close(e.token_scores, F.interpolate(expected[:, None], size=(GRID, GRID), mode="bilinear",
                                            align_corners=False).reshape(3, -1).numpy())
        assert e.token_scores.max() <= 1.0
    with pytest.raises(ParameterError, match="unknown normalise 'l2'; choose one of none, minmax, max"):
        salience.explain(model, x, method="grad_cam", normalise="l2")
    with pytest.raises(ParameterError, match="unknown upsample 'bicubic'"):
        salience.explain(model, x, method="grad_cam", upsample="bicubic")


def test_score_cam_equals_its_formula(x):
    """pytorch-grad-cam's Score-CAM, written out: each channel upsampled, min-max normalised (eps
    1e-8), the input times the mask (the "mean" baseline: 0), scored; softmax over channels."""
    net = split_cnn()
    e = salience.explain(classifier(net), x, method="score_cam", layer="0", target=[0, 2], output="logit")
    a = net[0](x[None]).detach()[0]
    with torch.no_grad():
        scores = []
        for k in range(a.shape[0]):
            up = F.interpolate(a[None, k:k + 1], size=(GRID, GRID), mode="bilinear", align_corners=False)[0, 0]
            mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
            scores.append(net(x[None] * mask)[0, [0, 2]])
        weights = torch.softmax(torch.stack(scores).T, -1)  # (T, K)
    raw = torch.einsum("tk,khw->thw", weights, a)
    close(np.array(e.extras["cam"]), raw.numpy())
    close(e.token_scores, finish(raw))
    assert e.params["baseline"] == "mean"
    assert e.cost.forward_passes == 1 + 1 + 5 and e.cost.backward_passes == 0  # predict, layer, one per channel


def test_score_cam_baseline_is_what_masked_pixels_become(x):
    net = split_cnn()
    e = salience.explain(classifier(net), x, method="score_cam", layer="0", target=0, output="logit", baseline="noise")
    assert e.params["baseline"] == "noise"
    mean = salience.explain(classifier(net), x, method="score_cam", layer="0", target=0, output="logit")
    assert not np.allclose(e.token_scores, mean.token_scores)


def test_ablation_cam_equals_its_formula(x):
    """w_k = (y - y_k) / |y|, y_k the output with channel k of A zeroed."""
    net = split_cnn(seed=1)  # logits of both signs
    targets = [0, 1, 2]
    e = salience.explain(classifier(net), x, method="ablation_cam", layer="0", target=targets, output="logit")
    a = net[0](x[None]).detach()
    with torch.no_grad():
        y = net[1](a)[0, targets]
        weights = torch.zeros(3, a.shape[1], dtype=torch.float64)
        for k in range(a.shape[1]):
            ablated = a.clone()
            ablated[0, k] = 0
            weights[:, k] = (y - net[1](ablated)[0, targets]) / y.abs()
    raw = torch.einsum("tk,khw->thw", weights, a[0])
    assert (y < 0).any() and (y > 0).any()  # both signs of y are exercised
    close(np.array(e.extras["cam"]), raw.numpy())
    close(e.token_scores, finish(raw))
    assert e.cost.forward_passes == 1 + 1 + 5


# ------------------------------------------------------------------ 2: Captum
@pytest.mark.parametrize("target", [0, 2])
def test_grad_cam_equals_captum_layer_grad_cam(x, target):
    captum_attr = require("captum.attr")
    net = split_cnn()
    e = salience.explain(classifier(net), x, method="grad_cam", layer="0", target=target, output="logit")
    layer = captum_attr.LayerGradCam(net, net[0]).attribute(x[None], target=target, relu_attributions=True)
    expected = captum_attr.LayerAttribution.interpolate(layer, (GRID, GRID), "bilinear")[0, 0].detach().numpy().reshape(-1)
    close(e.token_scores, expected)
    close(np.array(e.extras["cam"]).clip(min=0)[0], layer[0, 0].detach().numpy())


def test_grad_cam_on_efficientnet_equals_captum_at_conv_head():
    captum_attr = require("captum.attr")
    from skimage import data

    model = salience.load_model("zoo:efficientnet-lite0")
    chelsea = data.chelsea()
    e = salience.explain(model, chelsea, method="grad_cam", layer="_conv_head", output="logit")
    x = model.encode(chelsea).pixels[None]
    net = model.model
    layer = captum_attr.LayerGradCam(net, net._conv_head).attribute(x, target=285, relu_attributions=True)
    expected = captum_attr.LayerAttribution.interpolate(layer, (224, 224), "bilinear")[0, 0].detach().double().numpy()
    assert e.target.index == 285 and np.array(e.extras["cam"]).shape == (1, 7, 7)
    # float32: the same operations, batch shapes differ; measured differences ~1e-7 of the largest score
    close(e.token_scores, expected.reshape(-1), rel=1e-5)
    assert e.cost.backward_passes == 1 and e.params["layer"] == "_conv_head"


# ------------------------------------------------------------------ 7: the automatic layer
def test_automatic_layer_on_efficientnet_is_recorded():
    """The last spatial module that runs once is `_bn1` (7 x 7; its ReLU6 `_swish` is the one module
    also used by the stem, so it is skipped), but the global pooling after it receives the
    activated map: its input is chosen (at `_bn1` Score-CAM's map was all zero on some photos); the
    choice costs one forward pass."""
    from skimage import data

    model = salience.load_model("zoo:efficientnet-lite0")
    e = salience.explain(model, data.chelsea(), method="grad_cam")
    assert e.params["layer"] == "_avg_pooling:input" and np.array(e.extras["cam"]).shape == (1, 7, 7)
    assert e.cost.forward_passes == 3 and e.cost.backward_passes == 1  # predict, probe, the CAM row
    heat = e.heatmap()
    assert heat.shape == data.chelsea().shape[:2] and np.isfinite(heat).all()


def test_automatic_layer_on_cnns(x):
    """The last non-pooling module with a spatial output; of modules sharing it the outermost."""
    assert salience.explain(classifier(split_cnn()), x, method="grad_cam").params["layer"] == "1.1"  # head's Softplus
    tiny = tiny_classifier()
    e = salience.explain(tiny, photo(), method="grad_cam")
    assert e.params["layer"] == "4"  # the Tanh after the second conv (8 x 8), not the 2 x 2 pooling
    block = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    assert salience.explain(classifier(block), x, method="grad_cam").params["layer"] == "0"  # the block, not its ReLU


# ------------------------------------------------------------------ 4: vision transformers
def token_reference(net: TinyViT, x: torch.Tensor, target: int, extra: int) -> torch.Tensor:
    """Grad-CAM on blocks[-1].norm1's patch tokens with a hook written here: (1, 4, 4) raw map."""
    kept = {}

    def keep(_module, _inputs, output):
        kept["a"] = output
        output.retain_grad()

    handle = net.blocks[1].norm1.register_forward_hook(keep)
    try:
        logits = net(x[None])
    finally:
        handle.remove()
    logits[0, target].backward()
    tokens, grads = kept["a"].detach()[0, extra:], kept["a"].grad[0, extra:]
    net.zero_grad(set_to_none=True)
    a = tokens.reshape(4, 4, -1).permute(2, 0, 1)
    g = grads.reshape(4, 4, -1).permute(2, 0, 1)
    return gradcam_weights(a, g[None], "grad_cam")


@pytest.mark.parametrize("registers", [0, 1])
def test_vit_automatic_layer_and_grid(x, registers):
    net = vit(registers)
    e = salience.explain(classifier(net), x, method="grad_cam", target=1, output="logit")
    assert e.params["layer"] == "blocks.1.norm1"  # the last token layer whose patch tokens the class token reads
    assert np.array(e.extras["cam"]).shape == (1, 4, 4)
    raw = token_reference(net, x, 1, 1 + registers)
    close(np.array(e.extras["cam"]), raw.numpy())
    close(e.token_scores, finish(raw)[0])
    assert e.cost.forward_passes == 4 and e.cost.backward_passes == 2  # predict, 2 probes (1 with a backward), the row
    assert all(p.grad is None for p in net.parameters())


def test_vit_gradient_free_cams_and_ablation_of_patch_tokens(x):
    net = vit(1)
    model = classifier(net)
    for method in ("score_cam", "ablation_cam", "layer_cam"):
        e = salience.explain(model, x, method=method, target=[0, 2], layer="blocks.0", output="logit")
        assert np.array(e.extras["cam"]).shape == (2, 4, 4) and np.isfinite(e.scores).all()
    # Ablation-CAM zeroes channel k of the 16 patch tokens only; the class and register tokens stay
    kept = {}
    handle = net.blocks[0].register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    with torch.no_grad():
        y = net(x[None])[0, 0]
    handle.remove()
    a = kept["a"]

    def head(tokens: torch.Tensor) -> torch.Tensor:
        return net.head(net.norm(net.blocks[1](tokens))[:, 0])

    with torch.no_grad():
        weights = []
        for k in range(a.shape[2]):
            ablated = a.clone()
            ablated[0, 2:, k] = 0
            weights.append(float((y - head(ablated)[0, 0]) / y.abs()))
    raw = torch.einsum("k,khw->hw", torch.tensor(weights, dtype=torch.float64), a[0, 2:].reshape(4, 4, -1).permute(2, 0, 1))
    e = salience.explain(model, x, method="ablation_cam", target=0, layer="blocks.0", output="logit")
    close(np.array(e.extras["cam"])[0], raw.numpy())


def test_token_grid_inference():
    assert token_layout(16, (16, 16)) == (0, 4, 4)
    assert token_layout(17, (16, 16)) == (1, 4, 4)
    assert token_layout(18, (16, 16)) == (2, 4, 4)
    assert token_layout(197, (224, 224)) == (1, 14, 14)
    assert token_layout(1 + 4 + 256, (224, 224)) == (5, 16, 16)  # DINOv2-style: class + 4 registers, 14-px patches
    assert token_layout(1 + 8 * 12, (128, 192)) == (1, 8, 12)  # a non-square input: its aspect ratio
    assert token_layout(27, (16, 16)) is None  # 5 x 5 patches do not tile 16 px; 4 x 4 leaves 11 extra tokens
    assert token_layout(3, (16, 16)) is None
    assert token_layout(16 + 9, (16, 16)) is None  # 9 extra tokens: more than MAX_EXTRA_TOKENS


def test_vit_whose_tokens_form_no_grid_is_refused(x):
    model = classifier(vit(registers=8))  # 16 patches + 9 leading tokens
    with pytest.raises(ParameterError, match=r"gives 25 tokens .* not a grid of patches") as caught:
        salience.explain(model, x, method="grad_cam")
    assert "\n" not in str(caught.value)
    with pytest.raises(ParameterError, match=r"layer 'blocks.1.norm1' gives 25 tokens \(1, 25, 8\): not a grid"):
        salience.explain(model, x, method="grad_cam", layer="blocks.1.norm1")


# ------------------------------------------------------------------ 5: batching and targets
@pytest.mark.parametrize("method", ALL_CAMS)
def test_batched_equals_unbatched_and_targets_share_passes(x, method):
    model = classifier(split_cnn())
    one = salience.explain(model, x, method=method, layer="0", target="all", batch_size=1)
    many = salience.explain(model, x, method=method, layer="0", target="all")
    # float64; only the summation order inside the convolutions differs between batch shapes
    np.testing.assert_allclose(one.token_scores, many.token_scores, rtol=1e-9, atol=1e-12)
    assert one.cost.forward_passes == many.cost.forward_passes
    if method in GRADIENT_CAMS:  # one forward row serves the 3 targets: nothing to split
        assert one.cost.model_calls == many.cost.model_calls == 2 and one.cost.backward_passes == 3
    else:
        assert one.cost.model_calls > many.cost.model_calls
    for row, target in enumerate(range(3)):
        alone = salience.explain(model, x, method=method, layer="0", target=target)
        np.testing.assert_allclose(many.token_scores[row], alone.token_scores, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(many.scores[row], alone.scores, rtol=1e-9, atol=1e-12)
    if method in ("score_cam", "ablation_cam"):  # every target from the same K masked / ablated passes
        assert many.cost.forward_passes == 1 + 1 + 5


def test_features_sum_their_positions(x):
    e = salience.explain(classifier(split_cnn()), x, method="grad_cam", layer="0", level="patch", patch_size=4)
    pixels = salience.explain(classifier(split_cnn()), x, method="grad_cam", layer="0")
    assert e.scores.shape == (16,)
    grid = pixels.scores.reshape(4, 4, 4, 4).transpose(0, 2, 1, 3).reshape(16, 16)
    np.testing.assert_allclose(e.scores, grid.sum(1), rtol=1e-12)


# ------------------------------------------------------------------ hooks and state
def _hooks(net: nn.Module) -> list[tuple[int, ...]]:
    """Every hook dictionary of every module, by module."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [tuple(len(getattr(m, kind)) for kind in kinds) for m in net.modules()]


def _state(net: nn.Module) -> tuple:
    """Hooks, requires_grad flags, training flags, accumulated gradients, and the global grad mode."""
    return (_hooks(net), [(p.requires_grad, p.grad is None) for p in net.parameters()], [m.training for m in net.modules()],
            torch.is_grad_enabled())


class Tripwire:
    """A forward hook that counts its calls and raises on call number ``fail_at``."""

    def __init__(self) -> None:
        self.calls, self.fail_at = 0, 0

    def __call__(self, _module: nn.Module, _inputs: object, _output: object) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")


@pytest.mark.parametrize("layer", [None, "0"])
@pytest.mark.parametrize("method", ALL_CAMS)
def test_no_state_left_behind_also_after_an_exception_inside_the_model(x, method, layer):
    net = split_cnn()
    net[0][0].weight.requires_grad_(False)  # a user's own choice
    model = classifier(net)
    before = _state(net)
    tripwire = Tripwire()
    handle = net[1][0].register_forward_hook(tripwire)
    salience.explain(model, x, method=method, layer=layer, target="all", batch_size=2)  # a clean run counts the calls
    total = tripwire.calls
    for fail_at in (2, total // 2 + 1, total):  # the probe or the first layer pass, the middle, the last
        tripwire.calls, tripwire.fail_at = 0, fail_at
        with pytest.raises(RuntimeError, match="boom"):
            salience.explain(model, x, method=method, layer=layer, target="all", batch_size=2)
        assert tripwire.calls == fail_at
    handle.remove()
    assert _state(net) == before


def test_in_place_relu_after_the_layer_does_not_change_the_map(x):
    """pytorch-grad-cam's users' problem: an nn.ReLU(inplace=True) after the layer rewrites the
    layer's output in place. Salience reads a copy: the map is the formula on the values the layer
    gave (negative ones included)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 3, stride=2, padding=1)),
                        nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(5, 6, 1), nn.Softplus(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten(), nn.Linear(24, 3))).double().eval()
    e = salience.explain(classifier(net), x, method="grad_cam", layer="0", target=0, output="logit", relu=False)
    a = net[0](x[None]).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(net[1](a.clone())[0, 0], a)
    raw = gradcam_weights(a.detach()[0], g, "grad_cam")
    assert (a < 0).any()
    close(np.array(e.extras["cam"])[0], raw[0].numpy())
    e = salience.explain(classifier(net), x, method="ablation_cam", layer="0", target=0, output="logit")
    assert np.isfinite(e.scores).all()


# ------------------------------------------------------------------ 6: bad input
def test_unknown_layer_lists_the_spatial_layers(x):
    with pytest.raises(ParameterError) as caught:
        salience.explain(classifier(split_cnn()), x, method="grad_cam", layer="features.9")
    message = str(caught.value)
    assert message.startswith("no layer 'features.9' in Sequential; layers with spatial outputs, nearest the output last:")
    assert message.endswith("0.0, 0.1, 0.2, 0.3, 0, 1.0, 1.1") and "\n" not in message


def test_layers_without_a_spatial_output_are_refused(x):
    cases = [
        (classifier(split_cnn()), {"layer": "1.4"}, r"layer '1.4' gives an output of shape \(1, 3\): not a spatial map"),
        (classifier(split_cnn()), {"layer": "1.3"}, r"layer '1.3' gives an output of shape \(1, 24\)"),  # flattened
        (classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * GRID * GRID, 3)).double().eval()), {},
         "no layer of Sequential gives a spatial output"),
        (classifier(vit()), {"layer": "blocks.1.attn"}, "layer 'blocks.1.attn' returns a tuple, not a tensor"),
        (classifier(split_cnn()), {"layer": nn.Linear(2, 2)}, r"the given layer \(Linear\) is not a submodule"),
        (classifier(split_cnn()), {"layer": 2.5}, "layer must be a dotted module name"),
        (classifier(split_cnn()), {"layer": 3}, "no layer '3' in Sequential"),
    ]
    for model, params, message in cases:
        with pytest.raises(ParameterError, match=message) as caught:
            salience.explain(model, x, method="grad_cam", **params)
        assert "\n" not in str(caught.value)


def test_torchscript_layers_are_refused(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in recent torch
        net = torch.jit.script(split_cnn())
    with pytest.raises(ParameterError, match="layer '0' is a TorchScript module, which takes no hooks"):
        salience.explain(classifier(net), x, method="grad_cam", layer="0")
    with pytest.raises(ParameterError, match=r"RecursiveScriptModule has no submodule that takes hooks \(TorchScript"):
        salience.explain(classifier(net), x, method="grad_cam")


def test_a_module_used_twice_is_refused_and_skipped(x):
    relu = nn.ReLU()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), relu, nn.Conv2d(4, 4, 3, padding=1), relu,
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    with pytest.raises(ParameterError, match="layer '1' runs 2 times in one forward pass"):
        salience.explain(classifier(net), x, method="grad_cam", layer="1")
    # the last conv "2" runs once, but the pooling receives the shared ReLU's output: its input is read
    e = salience.explain(classifier(net), x, method="grad_cam")
    assert e.params["layer"] == "4:input"
    # = the output of an unshared ReLU at the same place in the same network
    unshared = nn.Sequential(net[0], nn.ReLU(), net[2], nn.ReLU(), *net[4:]).eval()
    for method in ("grad_cam", "score_cam", "ablation_cam"):
        here = salience.explain(classifier(net), x, method=method)
        there = salience.explain(classifier(unshared), x, method=method, layer="3")
        assert here.params["layer"] == "4:input"
        np.testing.assert_allclose(np.array(here.extras["cam"]), np.array(there.extras["cam"]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(here.scores, there.scores, rtol=0, atol=1e-12)
    assert not any(any(counts) for counts in _hooks(net)) and not any(any(counts) for counts in _hooks(unshared))


def test_a_module_given_as_an_object_is_named(x):
    net = split_cnn()
    e = salience.explain(classifier(net), x, method="grad_cam", layer=net[0][2])
    assert e.params["layer"] == "0.2"
    assert salience.explain(classifier(net), x, method="grad_cam", layer=0).params["layer"] == "0"  # as the CLI reads "0"


def test_a_text_classifier_has_no_layer_maps(toy):
    for method in ALL_CAMS:
        with pytest.raises(ParameterError, match=f"method '{method}' needs layer activations, which a text classifier "
                                                 r"does not provide; it works on image classifiers \(CNNs and ViTs\)"):
            salience.explain(toy, "a good film", method=method)


def test_registered_with_aliases_and_probability_output(x):
    assert salience.core.registry.get_method("Grad-CAM++").name == "grad_cam_plus_plus"
    assert {m.name for m in salience.methods() if m.kind == "cam"} >= set(ALL_CAMS)
    e = explain_probability(classifier(split_cnn()), x, method="gradcam", layer="0")
    assert 0 < e.output_value < 1  # the probability was explained


class ChannelsLast(nn.Module):
    """A CNN whose stage output is channels-last (N, H, W, C), as a Swin stage's, before pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.stage = nn.Identity()  # receives and returns the (N, H, W, C) map
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc = self.stage(torch.relu(self.conv(x)).permute(0, 2, 3, 1))
        return self.head(nhwc.mean(dim=(1, 2)))


def test_a_channels_last_layer_is_refused_unless_declared(x):
    net = ChannelsLast().double().eval()
    model = classifier(net)
    with pytest.raises(ParameterError, match=r"looks channels-last \(N, H, W, C\).*layer='stage:nhwc'"):
        salience.explain(model, x, method="grad_cam", layer="stage")
    with pytest.raises(ParameterError, match="looks channels-last"):
        salience.explain(model, x, method="grad_cam")  # the automatic choice would read it wrongly too
    with pytest.raises(ParameterError, match="unknown or repeated suffix 'nchw'"):
        salience.explain(model, x, method="grad_cam", layer="stage:nchw")
    # declared: the same maps as the channels-first conv output it permutes
    conv = nn.Sequential(net.conv, nn.ReLU())
    reference = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.head).eval()
    for method in ("grad_cam", "score_cam", "ablation_cam", "layer_cam"):
        declared = salience.explain(model, x, method=method, layer="stage:nhwc")
        plain = salience.explain(classifier(reference), x, method=method, layer="0")
        assert declared.params["layer"] == "stage:nhwc"
        np.testing.assert_allclose(np.array(declared.extras["cam"]), np.array(plain.extras["cam"]), rtol=0, atol=1e-12)


@pytest.mark.slow  # 1,281 forward rows of EfficientNet-Lite0: about a minute on 2 CPU cores
def test_score_cam_on_efficientnet_reads_the_activated_map():
    """At `_bn1` (before the shared ReLU6) Score-CAM's map was all zero on coffee and chelsea (measured:
    ptp 0.0): the automatic layer is now the pooling's input, whose channels are non-negative."""
    from salience.datasets.photos import load_photos

    coffee = next(p for p in load_photos() if p.id == "coffee")
    model = salience.load_model("zoo:efficientnet-lite0")
    e = salience.explain(model, coffee.path, method="score_cam", batch_size=128)
    cam = np.array(e.extras["cam"])
    assert e.params["layer"] == "_avg_pooling:input" and np.ptp(e.scores) > 0 and (cam > 0).mean() > 0.2
