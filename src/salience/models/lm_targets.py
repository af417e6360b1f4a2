"""What a causal LM's target can be besides one continuation token, and the step scores.

- A **contrast**: the token's output minus a foil token's output, both read from the logits of the
  same position (same prefix): ``z_t - z_f`` for ``output="logit"`` (and ``"log_probability"``,
  which equals it), ``p_t - p_f`` for ``"probability"`` (Inseq's ``contrast_prob_diff``; Yin and
  Neubig 2022, "Interpreting Language Models with Contrastive Explanations"). The foil is a text
  tokenised on its own like the continuation and aligned with it by position (as many tokens), one
  token id for every target, or a list of ids. Inseq reads the foil of step t after the foil's own
  prefix (a second forward pass); here it is read after the continuation's prefix, from the same
  rows, so the two agree wherever the continuation and the foil share the tokens before t (e.g. a
  one-token foil).
- A **span** of continuation tokens ``[start, end)``: its log-probability given the prompt,
  ``S = sum_t log p(y_t | prefix)``, one target row. ``output="log_probability"`` explains S,
  ``"probability"`` the span's joint probability exp(S), ``"log_odds"`` log(P / (1 - P)) with
  P = exp(S) (ContextCite's target); ``"logit"`` has no meaning for a span and is refused.
- **Step scores** of each continuation token from the logits at its position: probability p,
  entropy of the next-token distribution -sum p log p and surprisal -log p, both in nats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from salience.core.target import Target, read_outputs
from salience.errors import InputError, ParameterError, TargetError

ContrastSpec = str | int | Sequence[int]


def target_positions(target: Target) -> list[int]:
    """Sequence positions of the tokens ``target`` explains (one, or a span's); each is read from the
    logits one position earlier."""
    if target.position is None or target.position < 1:
        raise TargetError(f"target {target.label!r} has no position after the first token of the sequence")
    count = 1 if target.span is None else len(target.span)
    return list(range(int(target.position), int(target.position) + count))


def target_value(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """The explained scalar (B,) of ``target`` from the logits (B, n, V) read for its n positions."""
    if target.span is None:
        return read_outputs(logits[:, 0], [target])[:, 0]
    ids = torch.tensor(target.span, device=logits.device)
    log_p = torch.log_softmax(logits, dim=-1).gather(2, ids[None, :, None].expand(logits.shape[0], -1, 1))[..., 0]
    return span_output(log_p.sum(dim=1), target.output)


def span_output(log_probability: torch.Tensor, output: str) -> torch.Tensor:
    """A span's output from its log-probability S (<= 0): S, exp(S) or log(exp(S) / (1 - exp(S)))."""
    if output == "log_probability":
        return log_probability
    if output == "probability":
        return log_probability.exp()
    if output == "log_odds":  # log P - log(1 - P), with log(1 - P) = log(-expm1(S)) accurate for small P
        return log_probability - torch.log(-torch.expm1(log_probability))
    raise ParameterError(f"a span target has no {output!r}; explain it as log_probability (the sum of its tokens'), "
                         "probability (their product) or log_odds")


def foil_ids(contrast: ContrastSpec, tokenise: Callable[[str], list[int]], count: int, vocab: int) -> list[int]:
    """The foil token of each of the ``count`` continuation tokens: a text tokenised on its own (as
    many tokens as the continuation), one token id (the foil of every token) or a list of ids."""
    if isinstance(contrast, str):
        if not contrast.strip():
            raise InputError("the contrast (foil) text is empty")
        ids = tokenise(contrast)
        what = f"the contrast {contrast!r} tokenises to {len(ids)} tokens"
    elif isinstance(contrast, int) and not isinstance(contrast, bool):
        ids, what = [int(contrast)] * count, ""
    elif isinstance(contrast, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in contrast):
        ids, what = [int(i) for i in contrast], f"the contrast has {len(contrast)} token ids"
        if not ids:
            raise InputError("the contrast (foil) is an empty list of token ids")
    else:
        raise ParameterError(f"a contrast is a text, a token id or a list of token ids, not {contrast!r}")
    if len(ids) != count:
        raise InputError(f"{what} but the continuation has {count}; a foil is aligned with the continuation by position")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InputError(f"foil token id {bad[0]} is outside the vocabulary (0-{vocab - 1})")
    return ids


def span_bounds(span: object, count: int) -> tuple[int, int]:
    """A target span ``(start, end)`` of continuation token indices (end exclusive), checked."""
    if not (isinstance(span, (tuple, list)) and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
        raise ParameterError(f"a target span is (start, end) of continuation token indices, got {span!r}")
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= count:
        raise TargetError(f"target span ({start}, {end}) is empty or outside the continuation's {count} tokens (0-{count})")
    return start, end


def step_scores(logits: torch.Tensor, ids: torch.Tensor) -> dict[str, list[float]]:
    """Probability, entropy and surprisal (nats) of tokens ``ids`` (K,) from their logits (K, V)."""
    log_p = torch.log_softmax(logits.detach().double().cpu(), dim=-1)
    chosen = log_p.gather(1, ids.long().cpu()[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).nan_to_num().sum(dim=-1)  # 0 log 0 = 0
    return {"probability": chosen.exp().tolist(), "entropy": entropy.tolist(), "surprisal": (-chosen).tolist()}
