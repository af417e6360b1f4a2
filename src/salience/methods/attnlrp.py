"""AttnLRP (Achtibat et al. 2024): layer-wise relevance propagation through transformers, with
rules for softmax attention, the bilinear matmuls and gated MLPs (uniform), and layer / RMS norms
(identity on the normalisation); see :mod:`salience.methods.attnlrp_rules`. It runs in LRP's
machinery (:class:`salience.methods.lrp_mode.LRPMode` with ``transformer=True``), as a modified
gradient: one backward row per target, and one forward pass for all the targets where the adapter
shares it (a causal LM's generated tokens), else one per target.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context, as_array, position_attribution
from salience.methods.deeplift import check_logit_targets
from salience.methods.lrp_composites import Composite, parse_composite
from salience.methods.lrp_mode import LRPMode, predict_in_mode, run_with_copies_if_needed
from salience.models.passes import one_target_per_backward

# rules of the trace whose calls keep relevance by design (not by biases or the stabiliser)
SOFTMAX = {"softmax"}


@register("attnlrp", aliases=("attn_lrp", "attention_lrp"), kind="gradient",
          cost="1 backward per target; 1 forward for all the tokens of a generation, else 1 per target",
          summary="LRP through transformers with AttnLRP's rules for softmax, attention matmuls and norms (Achtibat et al. 2024)")
@dataclass
class AttnLRP:
    """AttnLRP. The relevance of the explained logit (the relevance put at the output is the logit
    itself; logits and logit contrasts only, as ``lrp``) is propagated back to the word embeddings'
    output (before position embeddings are added, where the model adds them) by modified gradients:
    the relevance of an embedding value is the value times the modified gradient, and a token's
    score is the sum over its embedding dimensions. Signed: positive = evidence for the target.
    Units: logits. No baseline.

    Rules: linear layers take the ``composite``'s rule (default ``"epsilon"``: epsilon-LRP with
    ``eps``, default 0: LRP-0, which per unit of input is the layer's gradient and runs as the plain
    call, as LXT's efficient mode; a layer's bias absorbs its share of the relevance, ``b / z``);
    softmax AttnLRP's rule ``R_in = x (R_out - s sum R_out)`` (without its bias term, as LXT); products of two
    input-dependent tensors (Q K^T, A V, SwiGLU's gate) the epsilon rule then half to each factor
    (uniform); LayerNorm / RMSNorm their linear part with the divisor held constant (identity on the
    normalisation); GELU, SiLU, tanh the identity rule; residual sums (and rotary embeddings'
    ``q cos + rot(q) sin``) split in proportion; eager attention and ``scaled_dot_product_attention``
    alike (the latter decomposed in the backward pass; untraced and without a stabiliser, these
    rules are fractions of gradients and run as plain calls with scaled gradients, as LXT's
    efficient mode). Any other nonlinear function on the path
    (custom attention) is refused with its name and module.

    Conservation: not exact by design. ``extras["conservation"]`` per target: the logit, the sum of
    the scores, the error (sum - logit) and, when traced, ``softmax_kept`` (the relevance the
    softmax rules keep: their Taylor bias terms) and ``other_kept`` (the rest: biases, constants
    added on the path such as position and token-type embeddings, the stabilisers); ``output = sum
    + softmax_kept + other_kept``. ``trace``: record every rule call's relevance (those two, and
    ``extras["_layers"]``, ``params["rule_calls"]``); it costs more arithmetic per rule call and,
    for several targets of one forward pass (a generation's tokens), a plain backward pass per
    target, as a record cannot be taken under vmap (untraced, their backward is vmapped together).
    ``stabiliser``: e in the uniform rule's denominators (default 0: none; per unit of
    input the rule is then 1/k of each factor's gradient)."""

    eps: float = 0.0
    stabiliser: float = 0.0
    composite: Any = "epsilon"
    trace: bool = False
    default_output: ClassVar[str] = "logit"

    uses_input_gradient: ClassVar[bool] = True  # a classifier's prediction pass is AttnLRP's own (input_gradient_pass)

    def input_gradient_pass(self, model: Any, encoded: Any, resolve: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor, object]:
        """A classifier's prediction pass run in AttnLRP mode (one forward + one backward for the
        prediction, its target's logit and the relevance per unit of embedding); the mode (its
        trace) goes to :meth:`attribute`."""
        composite = self._composite()
        return predict_in_mode(model, encoded, resolve, "attnlrp", lambda copy: self._mode(composite, copy, self.trace))

    def _composite(self) -> Composite:
        if self.eps < 0 or self.stabiliser < 0:
            raise ParameterError(f"attnlrp: eps and stabiliser must be >= 0, got eps={self.eps}, stabiliser={self.stabiliser}")
        composite = parse_composite(self.composite)
        if composite.uses("zbox"):
            raise ParameterError("attnlrp: the z^B rule needs bounded inputs; token embeddings have none (use epsilon or gamma)")
        return composite

    def _mode(self, composite: Composite, copy_outputs: bool, tracing: bool) -> LRPMode:
        return LRPMode(composite, eps=self.eps, stabiliser=self.stabiliser, transformer=True, method="attnlrp",
                       copy_outputs=copy_outputs, tracing=tracing)

    def attribute(self, ctx: Context) -> Attribution:
        composite = self._composite()
        x, _ = ctx.model.input_and_baseline(ctx.encoded, "zero")
        if isinstance(ctx.input_gradient_state, LRPMode) and ctx.input_gradient is not None:
            mode, (values, gradients) = ctx.input_gradient_state, ctx.input_gradient  # the prediction pass was ours
        else:
            check_logit_targets(ctx.targets, "attnlrp")

            def run(copy_outputs: bool) -> tuple[LRPMode, torch.Tensor, torch.Tensor]:
                with self._mode(composite, copy_outputs, self.trace) as mode, \
                        one_target_per_backward(mode.next_backward_row) if self.trace else nullcontext():
                    # one forward pass for every target where the adapter shares it (a causal LM's generated
                    # tokens), then one backward vmapped over the targets, or one plain backward per target when
                    # the rules trace each backward (a record cannot be taken under vmap)
                    found, gradients = ctx.model.score_inputs(ctx.encoded, x[None], list(ctx.targets), grad=True,
                                                              batch_size=ctx.batch_size)
                assert gradients is not None
                return mode, found[0].detach(), gradients[0]

            mode, values, gradients = run_with_copies_if_needed(run)
        if mode.layers == 0:
            raise ParameterError(f"attnlrp found no linear layer on {ctx.model.name}'s gradient path (a TorchScript or compiled "
                                 "model, or custom kernels, are not seen); explain a plain nn.Module")
        per_channel = x[None].to(gradients) * gradients  # (T, P, D)
        value = values.double().cpu()
        totals = per_channel.double().sum((-1, -2)).cpu()
        conservation: list[dict[str, float]] = [{"output": float(o), "relevance_sum": float(s), "error": float(s - o)}
                                                for o, s in zip(value, totals, strict=True)]
        details: dict[str, object] = {"composite": composite.name, "composite_rules": composite.describe(), "epsilon": self.eps,
                                      "stabiliser": self.stabiliser,
                                      "rules": {kind: sorted(names) for kind, names in sorted(mode.rules.items())},
                                      "traced": mode.tracing}
        if mode.tracing:
            # nothing traced (every call on the path ran plainly: no softmax, no rule) keeps nothing
            softmax_kept = mode.per_row(SOFTMAX) if mode.trace else torch.zeros_like(totals)
            if softmax_kept.numel() != totals.numel():  # the rows are the targets (one input)
                raise AssertionError(f"attnlrp traced {softmax_kept.numel()} backward rows for {totals.numel()} targets")
            for row, k in zip(conservation, softmax_kept.tolist(), strict=True):
                row.update(softmax_kept=k, other_kept=row["output"] - row["relevance_sum"] - k)
            counts: dict[str, int] = {}
            for t in mode.trace:
                counts[t.rule] = counts.get(t.rule, 0) + 1
            details["rule_calls"] = dict(sorted(counts.items()))
        layers = [{"layer": t.layer, "rule": t.rule, "relevance_out": as_array(t.relevance_out),
                   "relevance_in": as_array(t.relevance_in)} for t in mode.trace]
        extras: dict[str, object] = {"conservation": conservation, "_per_channel": as_array(per_channel), "_layers": layers}
        return position_attribution(per_channel.sum(-1), ctx, output_value=as_array(values), details=details,
                                    extras=extras)
