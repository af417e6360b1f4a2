"""Propagation benchmark (issue 14): LRP, AttnLRP and DeepLIFT against their pass limit and against
Captum, in one process, on the three zoo models:

- zoo:efficientnet-lite0, one 224 x 224 image (scikit-image's chelsea), the predicted class:
  Salience ``lrp`` (default composite) and ``deeplift`` (black reference) against Captum ``LRP`` and
  ``DeepLift`` (as they are, and DeepLift on a copy of the network where Captum can apply its
  Rescale rule: ReLU6 registered as a nonlinearity and no activation module called twice);
- zoo:minilm-sentiment, one movie-snippets sentence, the predicted class: ``attnlrp`` (``lrp`` and
  ``deeplift`` where they apply) against Captum ``LayerDeepLift`` / ``LayerLRP`` on the word embeddings;
- zoo:smollm2-135m, a 32-token prompt and 16 greedily generated tokens, every generated token a
  target: ``attnlrp`` and ``saliency`` (the like-for-like gradient cost).

The *limit* of each case is timed plainly with torch on the same input: one forward + one backward
of the explained logit (the LM: one forward and 16 backwards with ``retain_graph``, one forward and
one backward vmapped over the 16 targets, and 16 forwards + 16 backwards; EfficientNet: also that
pass with each convolution's backward through the convolutions LRP's default z+ rule needs,
:func:`zplus_floor`). Every implementation
(limits included) runs once untimed, then ``--repeats`` rounds interleaved, the order reversed every
other round; medians. Salience's times are whole ``explain()`` calls (its prediction pass
included). See benchmarks/README.md.

    flock /tmp/salience-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/propagation.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/propagation.py --quick    # 1 round, 16-token LM prompt + 4 tokens
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RowCounter, Rows, fmt_s, load_average, log, median, run_and_write, table, timed  # noqa: E402
from torch import nn  # noqa: E402

import salience  # noqa: E402
from salience.core.grid import model_grid_scores  # noqa: E402

PACKAGES = ("salience", "torch", "transformers", "captum", "numpy")
GOAL = 1.2


@dataclass
class Impl:
    """One timed thing: a limit (plain torch), a Salience method or a Captum method."""

    name: str
    kind: str  # "limit", "salience", "captum"
    fn: Callable[[], Any]
    settings: str = ""
    runs: list[float] = field(default_factory=list)
    rows: Rows = field(default_factory=Rows)
    cost: tuple[int, int, int] | None = None  # Salience's Explanation.cost: forward, backward, calls
    scores: np.ndarray | None = None  # the map compared between implementations
    error: str = ""
    counter: RowCounter | None = None  # rows counted on another module than the case's

    @property
    def seconds(self) -> float | None:
        return median(self.runs) if self.runs else None


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def run_rounds(impls: list[Impl], counter: RowCounter, repeats: int, scores: Callable[[Impl, Any], np.ndarray | None]) -> None:
    """One untimed call of each (an error is recorded and the implementation dropped), then
    ``repeats`` interleaved rounds (order reversed every other round)."""
    live = []
    for impl in impls:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = impl.fn()
        except Exception as error:  # noqa: BLE001 - a refusal is a result of the benchmark
            impl.error = first_line(error)
            log(f"  {impl.name}: {impl.error}")
            continue
        impl.scores = scores(impl, result)
        live.append(impl)
    for round_ in range(repeats):
        for impl in live if round_ % 2 == 0 else live[::-1]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seconds, result, rows = timed(impl.fn, impl.counter or counter)
            impl.runs.append(seconds)
            impl.rows = rows
            if isinstance(result, salience.Explanation):
                impl.cost = (result.cost.forward_passes, result.cost.backward_passes, result.cost.model_calls)
            log(f"    {impl.name}: {seconds:.3f} s ({rows.forward} fwd / {rows.backward} bwd rows; load {load_average()})")


def max_diff(a: np.ndarray | None, b: np.ndarray | None) -> str:
    """Max |a - b| and that over max |b|, over the cells both define (not NaN)."""
    if a is None or b is None or a.shape != b.shape:
        return ""
    both = ~np.isnan(a) & ~np.isnan(b)
    if not both.any():
        return ""
    diff = float(np.abs(a[both] - b[both]).max())
    return f"{diff:.1e} ({diff / max(float(np.abs(b[both]).max()), 1e-300):.1e})"


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without gradients (as Salience's passes): the backward computes input gradients only."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------- EfficientNet-Lite0
def _block_forward(self: Any, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
    """efficientnet_lite_pytorch's MBConvBlock.forward (eval mode, no squeeze-excitation in the Lite
    models) with a second ReLU6 module for the depthwise stage instead of calling ``_swish`` twice."""
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish_depthwise(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    args = self._block_args
    if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = x + inputs
    return x


def _extract_features(self: Any, inputs: torch.Tensor) -> torch.Tensor:
    """EfficientNet.extract_features (eval mode: no drop connect) with its own ReLU6 for the head."""
    x = self._swish(self._bn0(self._conv_stem(inputs)))
    for block in self._blocks:
        x = block(x)
    return self._swish_head(self._bn1(self._conv_head(x)))


def untangled(net: nn.Module) -> nn.Module:
    """A copy of EfficientNet-Lite0 whose every activation call has its own module (Captum's
    DeepLift keeps one input and output per module: a module called twice gets the wrong multiplier)."""
    twin = copy.deepcopy(net)
    twin._swish_head = nn.ReLU6()
    twin.extract_features = types.MethodType(_extract_features, twin)
    for block in twin._blocks:
        if getattr(block, "has_se", False):
            raise RuntimeError("untangled() covers blocks without squeeze-excitation only")
        block._swish_depthwise = nn.ReLU6()
        block.forward = types.MethodType(_block_forward, block)
    return twin


class _ZPlusConvolutions(torch.autograd.Function):
    """A convolution's own output forward; backward, the convolutions z+ needs, without its
    arithmetic: the positive-weight convolution of the input (for an input of both signs, of its
    positive part, plus the negative-weight convolution of its negative part: z+'s denominator),
    and the input gradient through those weights (W+, and W- where the input is negative) instead
    of W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: Any, weight: torch.Tensor, bias: torch.Tensor | None,
                signed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight.clamp(min=0), weight.clamp(max=0) if signed else None)
        ctx.conv = conv
        return conv(x, weight, bias)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, c: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, positive, negative = ctx.saved_tensors
        conv = ctx.conv
        # z+'s denominator, computed (as LRP does) in the backward; its division is left out
        ctx.denominator = conv(x, positive, None) if negative is None else \
            conv(x.clamp(min=0), positive, None) + conv(x.clamp(max=0), negative, None)

        def through(weight: torch.Tensor) -> torch.Tensor:
            grad, _, _ = torch.ops.aten.convolution_backward(c, x, weight, None, conv.keywords["stride"],
                                                             conv.keywords["padding"], conv.keywords["dilation"], False,
                                                             [0, 0], conv.keywords["groups"], [True, False, False])
            return grad  # type: ignore[no-any-return]

        up = through(positive)
        return (up if negative is None else torch.where(x > 0, up, through(negative))), None, None, None, None


def _zplus_conv_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """An nn.Conv2d's forward (EfficientNet's static-same-padding subclass included) through
    :class:`_ZPlusConvolutions`; whether its input takes both signs is read once, on the first call."""
    padding = getattr(self, "static_padding", None)
    x = padding(x) if padding is not None else x
    if self._zplus_signed is None:
        self._zplus_signed = bool(x.min() < 0)
    conv = functools.partial(F.conv2d, stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                             groups=self.groups)
    return _ZPlusConvolutions.apply(x, conv, self.weight, self.bias, self._zplus_signed)  # type: ignore[no-any-return]


def zplus_floor(net: nn.Module) -> nn.Module:
    """A copy of the network whose every convolution runs through :class:`_ZPlusConvolutions`: its
    forward + backward is what the convolutions of LRP's z+ rule cost (the model's batch norms and
    activations keep their own backward; z+'s division and LRP's bookkeeping are left out)."""
    twin = copy.deepcopy(net)
    for module in twin.modules():
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise RuntimeError("zplus_floor covers zero-padded convolutions with numeric padding only")
            module._zplus_signed = None
            module.forward = types.MethodType(_zplus_conv_forward, module)
    return twin


@contextmanager
def captum_relu6_rescale() -> Iterator[None]:
    """Captum's DeepLift applies its Rescale rule to the module types of SUPPORTED_NON_LINEAR only;
    nn.ReLU6 is not one of them (it passes the plain gradient). Inside: it is, with the same rule as nn.ReLU."""
    from captum.attr._core import deep_lift

    table_ = deep_lift.SUPPORTED_NON_LINEAR
    table_[nn.ReLU6] = table_[nn.ReLU]
    try:
        yield
    finally:
        del table_[nn.ReLU6]


def image_case(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from captum.attr import LRP, DeepLift
    from skimage import data

    clf = salience.load_model("zoo:efficientnet-lite0")
    clf.model.to(args.device)
    net = clf.model
    encoded = clf.encode(data.chelsea())
    prediction = clf.predict(encoded)
    target = int(prediction.index)
    x = encoded.pixels[None].to(clf.device, clf.dtype)
    height, width = encoded.grid
    _, x0s = clf.input_and_baseline(encoded, "black")
    x0 = x0s.T.reshape(1, -1, height, width).contiguous().to(x.device)
    twin = untangled(net)
    with torch.no_grad():
        same = float((twin(x) - net(x)).abs().max())
    log(f"image: target {target} {prediction.label!r}; untangled copy's logits differ by {same:.1e}")

    def plain_forward() -> None:
        with torch.no_grad():
            net(x)

    def plain_backward() -> torch.Tensor:
        with frozen(net):
            leaf = x.clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(net(leaf)[0, target], leaf)
        return gradient

    floor_net = zplus_floor(net)
    floor_counter = RowCounter(floor_net, sequence=False)

    def zplus_backward() -> torch.Tensor:
        with frozen(floor_net):
            leaf = x.clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(floor_net(leaf)[0, target], leaf)
        return gradient

    def explain(method: str, **params: Any) -> Callable[[], Any]:
        return lambda: salience.explain(clf, encoded, method, target=target, output="logit", **params)

    def captum_deeplift(model: nn.Module, rescale_relu6: bool) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            if rescale_relu6:
                with captum_relu6_rescale():
                    return DeepLift(model).attribute(x.clone(), baselines=x0, target=target)
            return DeepLift(model).attribute(x.clone(), baselines=x0, target=target)

        return run

    twin_counter = RowCounter(twin, sequence=False)
    impls = [
        Impl("plain forward (no gradients)", "limit", plain_forward, "torch.no_grad(): the prediction / reference pass"),
        Impl("plain forward + backward", "limit", plain_backward, "d logit[target] / d input, parameters frozen"),
        Impl("plain forward + backward, z+ convolutions", "limit", zplus_backward,
             "each convolution also computes z+'s denominator (W+ on the input, and W- on its negative part where it "
             "takes both signs) and takes its input gradient through those weights instead of W; no rule arithmetic: "
             "the convolutions the default composite cannot avoid", counter=floor_counter),
        Impl("Salience lrp", "salience", explain("lrp"), "composite epsilon_plus (z^B input, z+ convolutions, epsilon "
             "dense), batch norm merged"),
        Impl("Salience lrp (epsilon composite)", "salience", explain("lrp", composite="epsilon"), "epsilon everywhere"),
        Impl("Captum LRP", "captum", lambda: LRP(net).attribute(x.clone().requires_grad_(True), target=target),
             "default rules"),
        Impl("Salience deeplift", "salience", explain("deeplift", baseline="black"), "Rescale, black reference"),
        Impl("Captum DeepLift (as it is)", "captum", captum_deeplift(net, False), "black reference; ReLU6 modules not in "
             "Captum's nonlinearities (plain gradient), each called twice per block"),
        Impl("Captum DeepLift (ReLU6 rescaled, untangled copy)", "captum", captum_deeplift(twin, True),
             "black reference; ReLU6 given Captum's Rescale rule, one module per activation call", counter=twin_counter),
    ]
    counter = RowCounter(net, sequence=False)

    def scores(impl: Impl, result: Any) -> np.ndarray | None:
        if isinstance(result, salience.Explanation):
            return model_grid_scores(result)
        if isinstance(result, torch.Tensor) and impl.kind == "captum":
            return result.detach().double().sum(1)[0].cpu().numpy()
        return None

    log(f"image case ... (load {load_average()})")
    run_rounds(impls, counter, args.repeats, scores)
    counter.close()
    twin_counter.close()
    floor_counter.close()
    fwd, both = impls[0].seconds, impls[1].seconds
    pairs = {"Salience lrp": ("Captum LRP", False), "Salience lrp (epsilon composite)": ("Captum LRP", True),
             "Salience deeplift": ("Captum DeepLift (ReLU6 rescaled, untangled copy)", True)}
    lines = per_case_table(impls, fwd, both, pairs)
    deeplift = next(i for i in impls if i.name == "Salience deeplift")
    as_is = next(i for i in impls if i.name == "Captum DeepLift (as it is)")
    input_lines = [f"- input: scikit-image `data.chelsea()` through the zoo preprocessing ({width} x {height}, scaled to "
                   f"[-1, 1]); target: the predicted class {prediction.label!r} (index {target}), its logit explained "
                   "by every implementation; DeepLIFT's reference: the black image (-1 in every channel)",
                   f"- the untangled copy gives the same logits as the network (max difference {same:.1e})",
                   f"- Captum DeepLift as it is differs from Salience's DeepLift by {max_diff(deeplift.scores, as_is.scores)} "
                   "(max abs, and over Captum's max): it back-propagates ReLU6 by its gradient and, for the ReLU6 module "
                   "each block calls twice, keeps the second call's input and output for both calls"]
    summary = summary_lines("EfficientNet-Lite0", impls, fwd, both)
    floor = next(i for i in impls if i.name == "plain forward + backward, z+ convolutions")
    lrp = next(i for i in impls if i.name == "Salience lrp")
    if floor.seconds and lrp.seconds and both:
        summary.append(f"- EfficientNet-Lite0, the z+ convolutions alone (plain torch): {fmt_s(floor.seconds)} s = "
                       f"{floor.seconds / both:.2f}x one plain forward + backward; Salience lrp {lrp.seconds / floor.seconds:.2f}x that")
    return summary, ["## EfficientNet-Lite0 (one image)", "", *input_lines, "",
                                                                     *lines, ""]


def limit_of(impl: Impl, fwd: float | None, both: float | None) -> float | None:
    """The time the implementation's passes take plainly: (forward-only rows) x the plain forward +
    (backward rows) x the plain forward + backward, from Salience's own cost (or the counted rows)."""
    if fwd is None or both is None:
        return None
    forward, backward = (impl.cost[0], impl.cost[1]) if impl.cost else (impl.rows.forward, impl.rows.backward)
    if not backward:
        return None
    return (forward - backward) * fwd + backward * both


def per_case_table(impls: list[Impl], fwd: float | None, both: float | None, pairs: dict[str, tuple[str, bool]]) -> list[str]:
    """The case's table; ``pairs``: Salience row -> (its Captum row, whether their maps are the same quantity)."""
    head = ["implementation", "runs", "median s", "fwd / bwd rows (hook)", "Salience cost fwd / bwd / calls",
            "x (1 fwd + 1 bwd)", "x (same passes plainly)", "x Captum", "max abs diff to Captum (rel.)", "settings / error"]
    rows = []
    for impl in impls:
        if impl.error:
            rows.append([impl.name, "—", "—", "—", "—", "—", "—", "—", "—", f"{impl.settings}; **{impl.error}**"])
            continue
        peer_name, same_quantity = pairs.get(impl.name, ("", False))
        peer = next((i for i in impls if i.name == peer_name), None)
        same = limit_of(impl, fwd, both)
        versus = f"{impl.seconds / peer.seconds:.2f}" if peer is not None and peer.seconds and impl.seconds else ""
        rows.append([impl.name, str(len(impl.runs)), fmt_s(impl.seconds), f"{impl.rows.forward} / {impl.rows.backward}",
                     " / ".join(map(str, impl.cost)) if impl.cost else "—",
                     f"{impl.seconds / both:.2f}" if both and impl.seconds else "",
                     f"{impl.seconds / same:.2f}" if same and impl.seconds and impl.kind != "limit" else "",
                     versus, max_diff(impl.scores, peer.scores) if peer is not None and same_quantity else "", impl.settings])
    return table(head, rows)


def paired_ratio(impl: Impl, limit: Impl) -> float | None:
    """The median over the timed rounds of impl's time over the limit's in the same round (each round
    runs both, side by side): steadier than a ratio of medians when the machine's speed drifts."""
    if not impl.runs or len(impl.runs) != len(limit.runs):
        return None
    return median([a / b for a, b in zip(impl.runs, limit.runs, strict=True)])


def summary_lines(case: str, impls: list[Impl], fwd: float | None, both: float | None) -> list[str]:
    lines = []
    limit = next((i for i in impls if i.name == "plain forward + backward"), None)
    for impl in impls:
        if impl.kind != "salience":
            continue
        if impl.error:
            lines.append(f"- {case}, {impl.name}: refused ({impl.error})")
            continue
        ratio = impl.seconds / both if impl.seconds and both else math.nan
        same = limit_of(impl, fwd, both)
        paired = paired_ratio(impl, limit) if limit is not None else None
        lines.append(f"- {case}, {impl.name}: {fmt_s(impl.seconds)} s = {ratio:.2f}x one plain forward + backward "
                     f"({'within' if ratio <= GOAL else 'over'} {GOAL}x"
                     + (f"; paired over the rounds {paired:.2f}x" if paired is not None else "") + ")"
                     + (f"; {impl.seconds / same:.2f}x its own passes done plainly" if same and impl.seconds else ""))
    return lines


# ------------------------------------------------------------------------- MiniLM sentiment
class _Logits(nn.Module):
    """The classifier's logits from token ids (what Captum's layer methods call)."""

    def __init__(self, model: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=self.mask.expand_as(ids)).logits  # type: ignore[no-any-return]


def text_case(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from captum.attr import LayerDeepLift, LayerLRP

    from salience.datasets.movie_snippets import split_movie_snippets

    clf = salience.load_model("zoo:minilm-sentiment")
    clf.model.to(args.device)
    model = clf.model
    test = split_movie_snippets()["test"]
    sentence = " ".join(s.text for s in test[args.sentence:args.sentence + args.sentences])
    encoded = clf.encode(sentence)
    prediction = clf.predict(encoded)
    target = int(prediction.index)
    ids = encoded.input_ids[None].to(clf.device)
    mask = torch.ones_like(ids)
    pad = clf.tokenizer.pad_token_id
    special = encoded.special[None].to(clf.device)
    reference_ids = torch.where(special, ids, torch.full_like(ids, pad))
    wrapper = _Logits(model, mask).eval()
    log(f"text: {ids.shape[1]} tokens, target {target} {prediction.label!r}")

    def plain_forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def plain_backward() -> torch.Tensor:
        with frozen(model):
            leaf = clf.embedding_layer(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=leaf, attention_mask=mask).logits
            (gradient,) = torch.autograd.grad(logits[0, target], leaf)
        return gradient

    def explain(method: str, **params: Any) -> Callable[[], Any]:
        return lambda: salience.explain(clf, encoded, method, target=target, output="logit", level="token", **params)

    impls = [
        Impl("plain forward (no gradients)", "limit", plain_forward, "token ids"),
        Impl("plain forward + backward", "limit", plain_backward, "d logit[target] / d word embeddings (inputs_embeds)"),
        Impl("Salience attnlrp", "salience", explain("attnlrp"), "epsilon composite, AttnLRP's softmax / uniform / norm rules"),
        Impl("Salience lrp (epsilon composite)", "salience", explain("lrp", composite="epsilon"), "LRP without AttnLRP's rules"),
        Impl("Salience deeplift", "salience", explain("deeplift", baseline="pad"), "[PAD] reference"),
        Impl("Captum LayerDeepLift (word embeddings)", "captum",
             lambda: LayerDeepLift(wrapper, clf.embedding_layer).attribute(ids, baselines=reference_ids, target=target),
             "reference: [PAD] ids at the non-special positions"),
        Impl("Captum LayerLRP (word embeddings)", "captum",
             lambda: LayerLRP(wrapper, clf.embedding_layer).attribute(ids, target=target), "default rules"),
    ]

    def scores(impl: Impl, result: Any) -> np.ndarray | None:
        if isinstance(result, salience.Explanation):
            return np.asarray(result.scores, dtype=np.float64)
        if isinstance(result, torch.Tensor) and impl.kind == "captum":
            return result.detach().double().sum(-1)[0].cpu().numpy()
        return None

    counter = RowCounter(getattr(model, model.base_model_prefix))  # the encoder's output (the classifier's is not a tensor)
    log(f"text case ... (load {load_average()})")
    run_rounds(impls, counter, args.repeats, scores)
    counter.close()
    fwd, both = impls[0].seconds, impls[1].seconds
    lines = per_case_table(impls, fwd, both, {"Salience attnlrp": ("Captum LayerDeepLift (word embeddings)", False)})
    last = args.sentence + args.sentences - 1
    which = f"sentence {args.sentence}" if args.sentences == 1 else f"sentences {args.sentence}-{last}, joined"
    notes = [f"- input: movie-snippets test {which} ({ids.shape[1]} tokens with [CLS] and [SEP]): "
             f"{sentence!r}; target: the predicted class {prediction.label!r}, its logit explained; token level",
             "- no map is compared: Salience's DeepLIFT refuses the model (layer norm and softmax have no Rescale rule), "
             "and Captum's LayerDeepLift computes something else than AttnLRP (its Rescale rule on the nn.Softmax "
             "modules, the plain gradient through GELU and LayerNorm, no rule for the attention products)"]
    return summary_lines("MiniLM sentiment", impls, fwd, both), ["## MiniLM sentiment classifier (one sentence)", "", *notes, "",
                                                                   *lines, ""]


# ---------------------------------------------------------------------------------- SmolLM2
def lm_case(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from lm import build_input

    lm = salience.load_model("zoo:smollm2-135m")
    lm.model.to(args.device)
    model = lm.model
    base = getattr(model, model.base_model_prefix)
    counter = RowCounter(base)
    prompt, encoded, _, _, _ = build_input(lm, args.prompt_tokens, args.new_tokens, counter)
    start = int(encoded.extras["prompt_length"])
    ids = encoded.input_ids[None].to(lm.device)
    count = ids.shape[1] - start
    positions = torch.arange(start, ids.shape[1], device=ids.device)
    tokens = ids[0, start:]
    log(f"LM: prompt {start} tokens, {count} generated: {encoded.extras['continuation']!r}")

    def logits_of(leaf: torch.Tensor) -> torch.Tensor:
        """The explained logits (T,): each generated token's logit at the position before it."""
        out = model(inputs_embeds=leaf, use_cache=False, logits_to_keep=positions - 1).logits  # (1, T, V)
        return out[0, torch.arange(count, device=ids.device), tokens]

    def leaf() -> torch.Tensor:
        return lm.embedding_layer(ids).detach().requires_grad_(True)

    def plain_forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=positions - 1)

    def shared_loop() -> torch.Tensor:
        with frozen(model):
            x = leaf()
            values = logits_of(x)
            return torch.stack([torch.autograd.grad(values[t], x, retain_graph=t < count - 1)[0][0] for t in range(count)])

    def shared_vmap() -> torch.Tensor:
        with frozen(model):
            x = leaf()
            values = logits_of(x)
            (found,) = torch.autograd.grad(values, x, torch.eye(count, dtype=values.dtype, device=values.device),
                                           is_grads_batched=True)
        return found[:, 0]

    def per_target() -> torch.Tensor:
        found = []
        with frozen(model):
            for t in range(count):
                x = leaf()
                found.append(torch.autograd.grad(logits_of(x)[t], x)[0][0])
        return torch.stack(found)

    def explain(method: str) -> Callable[[], Any]:
        return lambda: salience.explain(lm, encoded, method, output="logit", level="token")

    impls = [
        Impl("plain forward (no gradients)", "limit", plain_forward, "token ids, the targets' logits kept"),
        Impl(f"plain 1 forward + {count} backwards", "limit", shared_loop, "retain_graph"),
        Impl(f"plain 1 forward + 1 backward vmapped over {count}", "limit", shared_vmap, "is_grads_batched=True"),
        Impl(f"plain {count} x (forward + backward)", "limit", per_target, "one target per pass"),
        Impl("Salience saliency", "salience", explain("saliency"), "every generated token, logit"),
        Impl("Salience attnlrp", "salience", explain("attnlrp"), "every generated token, logit; epsilon composite"),
    ]

    def scores(impl: Impl, result: Any) -> np.ndarray | None:
        if isinstance(result, salience.Explanation):
            return np.asarray(result.scores, dtype=np.float64)
        if isinstance(result, torch.Tensor):  # gradients (T, L, D) -> |gradient| summed (for a check against saliency)
            return result.detach().double().abs().sum(-1).cpu().numpy()
        return None

    log(f"LM case ... (load {load_average()})")
    run_rounds(impls, counter, args.repeats, scores)
    counter.close()
    fwd, loop, vmapped, each = (impls[i].seconds for i in range(4))
    head = ["implementation", "runs", "median s", "fwd / bwd rows (hook)", "Salience cost fwd / bwd / calls",
            f"x (1 fwd + {count} bwd)", "x (1 fwd + vmapped bwd)", f"x ({count} fwd + {count} bwd)", "settings / error"]
    rows = []
    for impl in impls:
        if impl.error:
            rows.append([impl.name, "—", "—", "—", "—", "—", "—", "—", f"{impl.settings}; **{impl.error}**"])
            continue
        s = impl.seconds or math.nan
        rows.append([impl.name, str(len(impl.runs)), fmt_s(impl.seconds), f"{impl.rows.forward} / {impl.rows.backward}",
                     " / ".join(map(str, impl.cost)) if impl.cost else "—", f"{s / loop:.2f}" if loop else "",
                     f"{s / vmapped:.2f}" if vmapped else "", f"{s / each:.2f}" if each else "", impl.settings])
    sal, att = impls[4], impls[5]
    summary = []
    for impl in (sal, att):
        if impl.error or not impl.seconds:
            summary.append(f"- SmolLM2-135M, {impl.name}: {impl.error or 'no time'}")
            continue
        best = min(v for v in (loop, vmapped) if v)
        summary.append(f"- SmolLM2-135M ({start} + {count} tokens), {impl.name}: {fmt_s(impl.seconds)} s = "
                       f"{impl.seconds / best:.2f}x the faster shared-forward limit (1 forward + {count} backwards), "
                       f"{impl.seconds / each:.2f}x {count} plain forward + backward passes"
                       + (f"; {impl.seconds / sal.seconds:.2f}x Salience's saliency" if impl is att and sal.seconds else ""))
    check = max_diff(None if sal.scores is None else np.abs(sal.scores), impls[1].scores)
    notes = [f"- prompt: {start} tokens of movie-snippets test sentences: {prompt!r}",
             f"- continuation: {count} tokens generated greedily by Salience (not timed): {encoded.extras['continuation']!r}; "
             "every generated token is a target (its logit at the position before it)",
             "- Salience's gradient methods take every target from one forward pass and one backward vmapped over the "
             "targets (the output head's backward split per position); so does AttnLRP (untraced, its default for several "
             "targets; with trace=True it runs one plain backward per target, as a record cannot be taken under vmap)",
             "- Captum has no LRP rules for transformer layers (softmax attention, RMSNorm, rotary embeddings): no Captum "
             "row for this model"]
    if check:
        notes.append(f"- check: Salience's saliency (|gradient| summed over dimensions) against the plain loop's: {check}")
    return summary, ["## SmolLM2-135M (generation)", "", *notes, "", *table(head, rows), ""]


# ------------------------------------------------------------------------------------- main
CASES = {"image": image_case, "text": text_case, "lm": lm_case}


def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    torch.manual_seed(0)
    summary: list[str] = []
    body = ["Times are whole calls (Salience: `explain()`, its prediction forward included; Captum: `attribute`). "
            "Medians of the timed rounds; each implementation first runs once untimed (warm-up, excluded). Ratios "
            "to the limit use the plain torch calls timed in the same rounds. 'x (same passes plainly)': the "
            "implementation's own passes (Salience's `Explanation.cost`, else the counted rows) priced at the plain "
            "forward and forward + backward times. Rows: counted by a forward hook on the model (the same for every "
            "implementation; a backward row is one whose output took part in a backward pass).", ""]
    for name in args.cases:
        start = load_average()
        found, lines = CASES[name](args)
        summary += found
        body += [*lines[:-1], f"Load average (1 / 5 / 15 min) at this case's start: {start}; at its end: {load_average()}.", ""]
    return summary, body


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LRP / AttnLRP / DeepLIFT against their pass limit and Captum.")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 16-token LM prompt + 4 tokens")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5; --quick 1)")
    parser.add_argument("--sentence", type=int, default=0, help="movie-snippets test sentence (default 0)")
    parser.add_argument("--sentences", type=int, default=1,
                        help="the text case joins this many test sentences from --sentence on (default 1: a longer input "
                        "shows how the rules' cost grows with length)")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--device", default="cpu", help="where the models run (cpu, cuda)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.prompt_tokens = args.prompt_tokens or (16 if args.quick else 32)
    args.new_tokens = args.new_tokens or (4 if args.quick else 16)
    args.output = args.output or HERE / ("RESULTS-propagation-quick.md" if args.quick else "RESULTS-propagation.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    run_and_write("Propagation benchmark (LRP, AttnLRP, DeepLIFT vs Captum)", "propagation.py", argv, PACKAGES, args.output,
                  lambda: run(args))


if __name__ == "__main__":
    main()
