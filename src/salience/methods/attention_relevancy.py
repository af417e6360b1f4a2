"""Gradient-weighted attention relevancy (Chefer, Gur & Wolf, 2021).

"Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
(ICCV 2021), the gradient x attention form of "Transformer Interpretability Beyond Attention
Visualization" (CVPR 2021): for each layer l (first to last) with attention probabilities A_l
(heads, P, P) and the gradient of the target's output y_t w.r.t. them,

    Ā_l = mean over heads of relu(dy_t/dA_l ⊙ A_l)          (P, P)
    R   ← R + Ā_l R,          starting from R = I

and the score of token j is R[q, j] at the target's query row q (the adapter's
``attention_query_rows``: [CLS] for a classifier, the position predicting the token for a causal
LM; a span target: the mean of its rows).

Signs and units: scores are >= 0 (relu, then sums of products of non-negative matrices). Ā_l is in
units of the explained output (a gradient times a probability); R mixes them over layers, so scores
are a ranking, not a decomposition of y_t (they do not sum to it). ``remove_identity=True`` reads
(R - I)[q, :]: only relevance that flowed through attention (the query token's own starting 1
removed).

Differences from the authors' code (``hila-chefer/Transformer-MM-Explainability``, the ViT notebook's
``generate_relevance`` and ``lxmert/.../ExplanationGenerator.py``): the same Ā_l (``avg_heads``:
``(grad * cam).clamp(min=0).mean(heads)``) and update (``R += cam @ R``), with no normalisation
(their ``handle_residual`` is for the bi-modal rules only). They read R[CLS, 1:] (ViT) or set
R[CLS, CLS] = 0 (LXMERT) and differentiate the logit; here the whole row is kept (a classifier's
[CLS] is special, in no feature, so feature scores are the same), and y_t is the explained output
(``output=``: pass ``output="logit"`` for theirs).

Cost: one forward + one backward row per target (targets batched as rows of one model call, as
the gradient methods batch them); eager attention is used for the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.registry import register
from salience.methods.attention import as_positions, query_rows
from salience.methods.base import Attribution, Context, as_array, position_attribution


def head_mean_relevance(maps: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Ā_l = mean_heads(relu(grad ⊙ A)) for each of the L layers of B rows: (B, L, P, P), float64."""
    return torch.stack([(g.double() * a.double()).clamp(min=0).mean(1) for a, g in zip(maps, grads)], dim=1)


def relevancy(weights: torch.Tensor) -> torch.Tensor:
    """R = (I + Ā_L) ... (I + Ā_1) for per-layer weights (B, L, P, P) -> (B, P, P): R ← R + Ā_l R."""
    batch, _, size, _ = weights.shape
    result = torch.eye(size, dtype=weights.dtype, device=weights.device).expand(batch, size, size)
    for layer in range(weights.shape[1]):
        result = result + weights[:, layer] @ result
    return result


@register("attention_relevancy", aliases=("chefer", "relevancy", "grad_attention"), kind="attention",
          cost="1 forward + 1 backward per target",
          summary="Gradient-weighted attention relevancy (Chefer et al., 2021): R += mean_heads(relu(grad * A)) R per layer")
@dataclass
class AttentionRelevancy:
    """Module docstring: score of token j = R[q, j] (``remove_identity``: (R - I)[q, j]) at each
    target's query row q; non-negative, a ranking."""

    remove_identity: bool = False
    needs: ClassVar[tuple[str, ...]] = ("attention_gradients", "attention_query_rows")

    def attribute(self, ctx: Context) -> Attribution:
        def combine(maps: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
            return relevancy(head_mean_relevance(maps, grads)).cpu()

        matrices, values = ctx.model.attention_gradients(ctx.encoded, ctx.targets, combine,  # type: ignore[attr-defined]
                                                         batch_size=ctx.batch_size)
        # (after the pass: an image transformer learns its token count from it, with no forward of its own)
        rows = ctx.model.attention_query_rows(ctx.encoded, ctx.targets)  # type: ignore[attr-defined]
        if self.remove_identity:
            matrices = matrices - torch.eye(matrices.shape[-1], dtype=matrices.dtype)
        scores = torch.stack([query_rows(matrix, [r])[0] for matrix, r in zip(matrices, rows)])
        return position_attribution(as_positions(ctx, scores), ctx, output_value=as_array(values), details={"query_rows": rows})
