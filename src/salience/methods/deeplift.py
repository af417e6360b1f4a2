"""DeepLIFT with the Rescale rule (Shrikumar et al. 2017) and DeepLIFT-SHAP (its average over a set
of references, as Captum's DeepLiftShap), in the adapter's attribution space (normalised pixels,
word embeddings). The rule lives in :mod:`salience.methods.deeplift_rules`.

Per channel, the score of input value x_i is (x_i - r_i) * m_i, where m is the gradient of the
explained logit with every nonlinear unit's derivative replaced by its multiplier
(y - y_ref) / (x - x_ref); the scores of a target sum to F(x) - F(r) (summation-to-delta), and the
difference is reported as ``delta`` (``extras["summation_delta"]``). Position scores sum the
channels; feature scores sum their positions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from salience.core.registry import register
from salience.core.target import Target, read_outputs
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, as_array, choose_baseline, position_attribution
from salience.methods.deeplift_rules import RescaleMode
from salience.methods.sharing import SharedInputs

# references whose nonlinear units' activations are held at once (each is one row of every unit's
# input and output): the rows of more references run in further passes
REFERENCES_PER_PASS = 8
# named baselines a model may list that cannot serve as a reference of a gradient method
_NOT_REFERENCES = ("delete",)


@dataclass
class _Pair:
    """One input with one reference, explained for ``targets``: ``context`` indexes the caller's list."""

    context: int
    x: torch.Tensor  # (P, C)
    reference: torch.Tensor  # (P, C)
    targets: list[Target]


@dataclass
class _Found:
    """DeepLIFT of one pair: outputs at the input and at the reference (T,) and the per-channel
    scores (x - r) * m (T, P, C)."""

    values: torch.Tensor
    reference_values: torch.Tensor
    per_channel: torch.Tensor


@dataclass
class _OwnPass:
    """What DeepLIFT's own prediction pass (:meth:`DeepLift.input_gradient_pass`) found for one input."""

    found: _Found
    details: dict[str, object]


@functools.cache
def _every_logit(n_classes: int) -> list[Target]:
    """The logit of every class, in order (read at a reference before the target is known)."""
    return [Target(index=i, label=str(i), output="logit") for i in range(n_classes)]


def check_logit_targets(targets: Sequence[Target], method: str) -> None:
    """DeepLIFT and the LRP family follow the network up to its logits: a softmax read-out has no
    rule of theirs."""
    other = sorted({t.output for t in targets} - {"logit"})
    if other:
        raise ParameterError(f"{method} explains logits (and logit contrasts); output={other[0]!r} puts a softmax after "
                             "them, which has no rule in this method; use output='logit'")


def rescale_pairs(ctx: Context, pairs: list[_Pair], *, eps: float, method: str, paired: bool) -> list[_Found]:
    """DeepLIFT of every pair. Without ``paired`` all pairs share the targets of ``ctx`` and each
    (pair, target) is one backward row (the adapter's row order: pair-major); with it each pair has
    one target, read from its own row (several images of one grid). References in groups of
    :data:`REFERENCES_PER_PASS`: per group one forward call over the references (no gradients) and
    the input rows' forward + backward."""
    found: list[_Found] = []
    for start in range(0, len(pairs), REFERENCES_PER_PASS):
        group = pairs[start:start + REFERENCES_PER_PASS]
        found += _rescale_group(ctx, group, eps=eps, method=method, paired=paired)
    return found


def _rescale_group(ctx: Context, group: list[_Pair], *, eps: float, method: str, paired: bool) -> list[_Found]:
    model, encoded = ctx.model, ctx.encoded
    references = torch.stack([p.reference for p in group])
    inputs = torch.stack([p.x for p in group])
    targets = [p.targets[0] for p in group] if paired else group[0].targets
    n_targets = 1 if paired else len(targets)
    reference_of_row = torch.arange(len(group)).repeat_interleave(n_targets)  # backward rows, pair-major
    with RescaleMode(eps, method) as mode:
        reference_values, _ = model.score_inputs(encoded, references, targets, grad=False, batch_size=len(group))
        mode.begin_inputs(reference_of_row, len(group))
        options: dict[str, Any] = {"paired": True} if paired else {}
        values, gradients = model.score_inputs(encoded, inputs, targets, grad=True, batch_size=ctx.batch_size, **options)
        mode.finish()
    assert gradients is not None
    if paired:  # (N,), (N, P, C): pair i for target i
        reference_values = reference_values.diagonal()[:, None]
        values, gradients = values[:, None], gradients[:, None]
    delta = (inputs - references).to(gradients)[:, None]  # (N, 1, P, C)
    per_channel = delta * gradients
    return [_Found(values[i].detach(), reference_values[i].detach(), per_channel[i].detach()) for i in range(len(group))]


def _attribution(ctx: Context, found: list[_Found], details: dict[str, object]) -> Attribution:
    """The mean over a context's references of values, reference values and per-channel scores."""
    values = torch.stack([f.values for f in found]).double().mean(0).cpu()
    reference_values = torch.stack([f.reference_values for f in found]).double().mean(0).cpu()
    per_channel = torch.stack([f.per_channel for f in found]).mean(0)
    position_scores = per_channel.sum(-1)
    delta = position_scores.double().sum(-1).cpu() - (values - reference_values)
    return position_attribution(position_scores, ctx, output_value=as_array(values), baseline_value=as_array(reference_values),
                                delta=as_array(delta), details=details,
                                extras={"summation_delta": delta.tolist(), "_per_channel": as_array(per_channel)})


class _Rescaled(SharedInputs):
    """Shared body of the two methods: each context's input and references (:meth:`_references`),
    DeepLIFT of every (input, reference) pair, the mean over a context's references."""

    eps: float
    method: ClassVar[str]

    def attribute(self, ctx: Context) -> Attribution:
        return self._run([ctx], paired=False)[0]

    def attribute_together(self, contexts: list[Context]) -> list[Attribution]:
        return self._run(contexts, paired=True)

    def _references(self, ctx: Context) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, object]]:
        """The input (P, C), its references (P, C) each and what to record in params."""
        raise NotImplementedError

    def _run(self, contexts: list[Context], *, paired: bool) -> list[Attribution]:
        """Contexts whose prediction pass was DeepLIFT's own (:class:`_OwnPass`) take its result; the
        others' (input, reference) pairs run together."""
        pairs: list[_Pair] = []
        details: dict[int, dict[str, object]] = {}
        done: dict[int, list[_Found]] = {}
        for i, ctx in enumerate(contexts):
            own = ctx.input_gradient_state
            if isinstance(own, _OwnPass):
                done[i], details[i] = [own.found], own.details
                continue
            check_logit_targets(ctx.targets, self.method)
            x, references, details[i] = self._references(ctx)
            pairs += [_Pair(i, x, reference, ctx.targets) for reference in references]
        if pairs:
            found = rescale_pairs(contexts[pairs[0].context], pairs, eps=self.eps, method=self.method, paired=paired)
            for pair, result in zip(pairs, found, strict=True):
                done.setdefault(pair.context, []).append(result)
        return [_attribution(ctx, done[i], details[i]) for i, ctx in enumerate(contexts)]


@register("deeplift", aliases=("deep_lift",), kind="gradient",
          cost="1 forward + 1 backward per target, + 1 forward of the reference",
          summary="DeepLIFT Rescale rule: (x - reference) times multipliers, summing to F(x) - F(reference) (Shrikumar et al. 2017)")
@dataclass
class DeepLift(_Rescaled):
    """DeepLIFT with the Rescale rule. Position score = sum over channels of (x - r) * m, where r is
    the reference (``baseline``; images: the adapter's default, black; text: the [PAD] embedding, as
    IG) and m the gradient of the target's logit with every nonlinear unit's derivative replaced by
    (f(x) - f(r)) / (x - r) at that unit (the ordinary derivative where |x - r| < ``eps``; max
    pooling by Captum's rule). Signed; units: logits. Scores sum to logit(x) - logit(r) up to
    rounding: ``delta`` per target (also ``extras["summation_delta"]``). Explains logits only
    (``output="logit"``, the default here). Units handled: the ReLU family, sigmoid, tanh,
    softplus, ELU/SELU/CELU, LeakyReLU, GELU, SiLU, Mish, hard sigmoid/swish and max pooling;
    everything else on the gradient path must be linear (convolutions, linear layers, sums,
    average pooling, batch norm in eval mode, ...), and a model with anything else (softmax,
    layer norm: transformers) is refused naming the function. Per-channel scores in
    ``extras["_per_channel"]``. Equals Captum's DeepLift (rescale) where Captum applies."""

    baseline: Any = None
    eps: float = 1e-10
    default_output: ClassVar[str] = "logit"
    method: ClassVar[str] = "deeplift"
    uses_input_gradient: ClassVar[bool] = True  # one target: the prediction pass is DeepLIFT's own (input_gradient_pass)

    def _references(self, ctx: Context) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, object]]:
        name = ctx.baseline(self.baseline, "pad", perturbation=False)
        x, reference = ctx.model.input_and_baseline(ctx.encoded, name)
        return x, [reference], {"baseline": name}

    def input_gradient_pass(self, model: Any, encoded: Any, resolve: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor, object]:
        """The prediction pass as DeepLIFT's input pass: the reference's forward (every class's logit
        kept, since the target is not known yet), then one forward + one backward at the input in
        the Rescale mode, the target resolved from that forward's prediction (refused unless a
        logit, before the backward). Two forwards and one backward in all, where a separate
        prediction would add a third forward. The result goes to :meth:`attribute`."""
        name = choose_baseline(model, self.baseline, "pad", perturbation=False)
        x, reference = model.input_and_baseline(encoded, name)

        def checked(prediction: Any) -> Target:
            target = resolve(prediction)
            check_logit_targets([target], self.method)
            return target  # type: ignore[no-any-return]

        with RescaleMode(self.eps, self.method) as mode:
            logits, _ = model.score_inputs(encoded, reference[None], _every_logit(len(model.labels)), grad=False, batch_size=1)
            mode.begin_inputs(torch.zeros(1, dtype=torch.long), 1)
            prediction, target, value, gradient = model.predict_with_input_gradient(encoded, checked)
            mode.finish()
        reference_value = read_outputs(logits, [target])[0]
        per_channel = (x - reference).to(gradient) * gradient
        found = _Found(value.reshape(1).detach(), reference_value.detach(), per_channel[None].detach())
        return prediction, target, value, gradient, _OwnPass(found, {"baseline": name})


@register("deeplift_shap", aliases=("deepliftshap", "deep_lift_shap", "deepshap"), kind="gradient",
          cost="per reference: 1 forward + 1 backward per target, + 1 forward of the reference",
          summary="DeepLIFT averaged over a set of references (Lundberg & Lee 2017; Captum's DeepLiftShap)")
@dataclass
class DeepLiftShap(_Rescaled):
    """DeepLIFT (Rescale) averaged over references: the mean over references r_j of each
    reference's DeepLIFT scores, so scores sum to logit(x) - mean_j logit(r_j) (``delta``).
    References: ``baselines`` (names or tensors of the attribution space; default: every named
    baseline the adapter can use as a reference, e.g. black, mean, blur and noise for images), each
    once when ``n_baselines`` is None, else ``n_baselines`` draws with replacement (seeded; a drawn
    ``noise`` gets a fresh seed per draw); ``stdev`` > 0 adds Gaussian noise of that std (attribution
    units) to every reference, positions marked special kept. The references used are recorded
    (``params["baselines"]``). Cost: one DeepLIFT per reference. Logits only, units and refusals
    as ``deeplift``."""

    baselines: Sequence[Any] | None = None
    n_baselines: int | None = None
    stdev: float = 0.0
    eps: float = 1e-10
    default_output: ClassVar[str] = "logit"
    method: ClassVar[str] = "deeplift_shap"

    def _references(self, ctx: Context) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, object]]:
        if self.n_baselines is not None and self.n_baselines < 1:
            raise ParameterError(f"n_baselines must be at least 1, got {self.n_baselines}")
        if self.stdev < 0:
            raise ParameterError(f"stdev must be >= 0, got {self.stdev}")
        names = self._draw(ctx)
        x, _ = ctx.model.input_and_baseline(ctx.encoded, "zero")
        generator = ctx.generator()
        movable = (~ctx.encoded.special).to(x.device)[:, None]  # type: ignore[attr-defined]
        references = []
        for name in names:
            _, reference = ctx.model.input_and_baseline(ctx.encoded, name)
            if self.stdev > 0:
                noise = torch.randn(reference.shape, generator=generator, dtype=torch.float64).to(reference)
                reference = reference + self.stdev * noise * movable
            references.append(reference)
        return x, references, {"baselines": names, "n_references": len(names)}

    def _draw(self, ctx: Context) -> list[str]:
        """The recorded names of this context's references, in order."""
        if self.baselines is not None:
            if isinstance(self.baselines, (str, torch.Tensor, np.ndarray)) or not len(self.baselines):
                raise ParameterError("baselines must be a non-empty list of baseline names or tensors")
            pool = [ctx.baseline(b, "pad", perturbation=False) for b in self.baselines]
        else:
            pool = []
            for name in getattr(ctx.model, "baselines", ()):
                if name in _NOT_REFERENCES:
                    continue
                try:
                    pool.append(ctx.baseline(name, name, perturbation=False))
                except ParameterError:
                    continue  # a named baseline this input or model cannot build
            if not pool:
                pool = [ctx.baseline(None, "pad", perturbation=False)]
        if self.n_baselines is None:
            return pool
        rng = ctx.rng()
        drawn = []
        for j in rng.integers(len(pool), size=self.n_baselines):
            name = pool[int(j)]
            drawn.append(f"noise:{int(rng.integers(2**31))}" if name == "noise" else name)
        return drawn
