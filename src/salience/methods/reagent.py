"""ReAGent (Zhao & Shan, 2024, "ReAGent: A Model-agnostic Feature Attribution Method for Generative
Language Models", arXiv 2402.00794): importance from recursive random token replacement.

Each target has ``num_probes`` probes, each a vector of logit-scale scores over the features that can
influence the target, drawn U(0, 1). A probe step replaces every feature with probability
``replacing_ratio`` (all its tokens, each by a token drawn uniformly from the model's vocabulary
without special tokens) and reads the target's probability p' on that row; with p the probability
on the input and d = p - p', each replaced feature's score grows by logit(0.5 + 0.5 d) and each
kept feature's by logit(0.5 - 0.5 d). The importance of a probe is the softmax of its scores over
the target's features. A probe stops once, with only its ``keep_top_n`` most important features
kept (the others replaced by fresh draws), the target is among the ``stopping_condition_top_k``
highest outputs; the score of a feature is the mean importance over the probes that stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context

LOGIT_CLAMP = 1e-12  # logit(0.5 + 0.5 d) is infinite at d = +-1: the argument is kept in [1e-12, 1 - 1e-12]


@register("reagent", kind="perturbation", cost="1 + steps x (probes + running target-probe pairs) forward",
          summary="Recursive random token replacement; scores from probability drops, stopped by a top-k test")
@dataclass
class Reagent:
    """ReAGent as Inseq 0.7.1 computes it (``attr/feat/ops/reagent.py``, ``reagent_core/``), for every
    target at once.

    Score: the share of the target's importance (>= 0, summing to 1 over the features that can
    influence the target; NaN for the others), averaged over the probes that stopped. The explained
    output is the target's probability (``output="probability"``; other outputs are refused, the
    update rescales a probability change in [-1, 1]). No baseline: replaced tokens are random
    vocabulary tokens (uniform over the tokenizer's vocabulary without special tokens; each
    replaced position draws its own, a word feature's tokens independently). Special tokens (BOS,
    [CLS], a chat template's) are never replaced and get no score.

    Parameters (Inseq's names and defaults): ``keep_top_n`` features kept in the stopping test
    (``keep_ratio``, if given, keeps ceil(ratio x features) instead, as Inseq with keep_top_n=0);
    ``stopping_condition_top_k``: the target must be within that many of the highest outputs (a
    classifier with C classes: within min(k, C - 1), so the test can fail: with 2 classes the
    target must be the predicted class); ``replacing_ratio``: chance that a feature is replaced
    in a probe step; ``max_probe_steps``; ``num_probes``.

    Cost in forward rows: 1 (the input) + per step, the probe rows still needed (at most
    ``num_probes``, shared by all targets) + one stopping row per (target, probe) not yet stopped.
    Inseq spends, per target, num_probes rows for the input and 2 x num_probes rows per step.

    Where Salience departs from Inseq: (1) all targets of a generation share the probe rows: probe
    row p replaces each feature with the same draw for every target, and target t reads only the
    features that can influence it (a causal LM's earlier tokens), which are replaced independently
    with probability ``replacing_ratio`` as in a run of its own; the initial scores and the stopping
    rows' replacement tokens are shared the same way, so each target's scores have the distribution
    of a separate run. With one target, token features and no special tokens, the draws (and so the
    scores) are Inseq's own for the same seed and replacement sampler. (2) Replacements are drawn
    uniformly from the vocabulary without special tokens; Inseq and the official configs draw
    uniformly among tokens with the same part-of-speech tag (nltk's tagger on each decoded
    vocabulary token), which needs nltk and a tagging pass over the vocabulary. (3) Features are
    Salience's (tokens, words or spans), not positions: a word's tokens are replaced together;
    special tokens are never replaced (Inseq replaces BOS too). (4) A stopped probe's rows are no
    longer run (Inseq runs them and discards the result). (5) The rescaled change is clamped to
    [1e-12, 1 - 1e-12] before the logit (Inseq's becomes infinite when p - p' = +-1). (6) When no
    probe of a target stops within ``max_probe_steps``, the score is the mean over all its probes
    and a warning says so (Inseq divides by zero stopped probes: NaN). Details record each
    target's steps and stopped probes.
    """

    keep_top_n: int = 5
    keep_ratio: float | None = None
    stopping_condition_top_k: int = 3
    replacing_ratio: float = 0.3
    max_probe_steps: int = 3000
    num_probes: int = 16

    default_output: ClassVar[str] = "probability"
    needs: ClassVar[tuple[str, ...]] = ("score_replaced", "replacement_ids")

    def attribute(self, ctx: Context) -> Attribution:
        self._check(ctx)
        top_k = self._top_k(ctx)
        available = torch.as_tensor(ctx.available, dtype=torch.bool)  # (T, F)
        scores = torch.full(available.shape, float("nan"), dtype=torch.float64)
        drawn = available.any(dim=0).nonzero()[:, 0]  # features some target can see: the ones drawn for
        if len(drawn) == 0:
            return Attribution(scores=scores.numpy(), details={"steps": [0] * len(ctx.targets)})
        probes = _Probes(self, ctx, drawn, top_k)
        probes.run()
        importance, warnings = probes.result()
        scores[:, drawn] = torch.where(available[:, drawn], importance, float("nan"))
        return Attribution(scores=scores.numpy(), output_value=probes.original.numpy(), warnings=warnings,
                           details={"replacements": "uniform over the vocabulary without special tokens",
                                    "stopping_top_k": top_k, "steps": probes.steps.tolist(),
                                    "stopped_probes": (~probes.running).sum(dim=1).tolist(),
                                    "original_rank": probes.original_rank.tolist(), **probes.rows})

    def _check(self, ctx: Context) -> None:
        for name in ("keep_top_n", "stopping_condition_top_k", "max_probe_steps", "num_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "keep_top_n" else 1):
                least = 0 if name == "keep_top_n" else 1
                raise ParameterError(f"reagent's {name} must be an integer >= {least}, got {value!r}")
        if not 0.0 < float(self.replacing_ratio) < 1.0:
            raise ParameterError(f"reagent's replacing_ratio must be in (0, 1), got {self.replacing_ratio!r}")
        if self.keep_ratio is not None and not 0.0 < float(self.keep_ratio) < 1.0:
            raise ParameterError(f"reagent's keep_ratio must be in (0, 1) or None, got {self.keep_ratio!r}")
        if self.keep_ratio is None and self.keep_top_n == 0:
            raise ParameterError("reagent's keep_top_n is 0: give keep_ratio (the share of features kept) instead")
        outputs = sorted({t.output for t in ctx.targets} - {"probability"})
        if outputs:
            raise ParameterError(f"reagent updates its scores from changes in probability; explain output='probability', "
                                 f"not {outputs[0]!r}")
        if any(t.foil is not None for t in ctx.targets):
            raise ParameterError("reagent explains a token's or class's probability, not a contrast (a probability "
                                 "difference has no top-k test); drop the contrast")

    def _top_k(self, ctx: Context) -> int:
        """The stopping test's k: capped at C - 1 for C classes, so that the test can fail."""
        classes = len(getattr(ctx.model, "labels", []) or [])
        if classes == 0:
            return int(self.stopping_condition_top_k)
        if classes < 2:
            raise ParameterError("reagent needs a model with at least 2 outputs: its stopping test ranks the target")
        return min(int(self.stopping_condition_top_k), classes - 1)

    def kept_count(self, features: int) -> int:
        """Features kept in a stopping row of a target with ``features`` features (Inseq's rule)."""
        return int(math.ceil(float(self.keep_ratio) * features)) if self.keep_ratio is not None else int(self.keep_top_n)


class _Probes:
    """The probes of every target: logit-scale scores (T, P, U) over the U drawn features, which
    (target, probe) pairs still run, and the shared random draws, in Inseq's order: initial scores
    (P, U); then per step the replacement mask (P, U), the probe rows' tokens (P, N) and the
    stopping rows' tokens (P, N), N the positions of the drawn features."""

    def __init__(self, method: Reagent, ctx: Context, drawn: torch.Tensor, top_k: int) -> None:
        self.method, self.ctx, self.top_k = method, ctx, top_k
        self.visible = torch.as_tensor(ctx.available, dtype=torch.bool)[:, drawn]  # (T, U)
        self.member = ctx.features.position_mask()[drawn]  # (U, L)
        self.positions = self.member.any(dim=0).nonzero()[:, 0]  # (N,)
        self.vocabulary = ctx.model.replacement_ids()  # type: ignore[attr-defined]
        self.generator = ctx.generator()
        count, n_probes = len(ctx.targets), method.num_probes
        length = self.member.shape[1]
        nothing = torch.zeros(1, length, dtype=torch.bool)
        original, rank = self._score(nothing, torch.zeros(1, length, dtype=torch.long))
        self.original, self.original_rank = original[0], rank[0].long()  # (T,)
        initial = torch.rand((n_probes, len(drawn)), generator=self.generator).double()
        self.logits = initial[None].expand(count, -1, -1).clone()  # (T, P, U)
        self.running = torch.ones(count, n_probes, dtype=torch.bool)
        self.steps = torch.zeros(count, dtype=torch.long)
        self.rows = {"probe_rows": 0, "stopping_rows": 0}  # forward rows spent after the input's

    def _score(self, replaced: torch.Tensor, ids: torch.Tensor, which: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ctx.model.score_replaced(self.ctx.encoded, replaced, ids, self.ctx.targets,  # type: ignore[attr-defined]
                                             self.ctx.batch_size, which=which)

    def _tokens(self) -> torch.Tensor:
        """Replacement ids (P, L) drawn uniformly from the vocabulary at the drawn features' positions."""
        uniform = torch.rand((self.method.num_probes, len(self.positions)), generator=self.generator)
        ids = torch.zeros(self.method.num_probes, self.member.shape[1], dtype=torch.long)
        ids[:, self.positions] = self.vocabulary[(uniform * len(self.vocabulary)).long()]
        return ids

    def _rows(self, features: torch.Tensor) -> torch.Tensor:
        """Positions replaced (B, L) when features (B, U) are."""
        return (features.double() @ self.member.double()) > 0

    def importance(self) -> torch.Tensor:
        """Softmax of the scores over each target's features (T, P, U); 0 for the features it cannot see."""
        masked = torch.where(self.visible[:, None, :], self.logits, -torch.inf)
        return torch.softmax(masked, dim=-1)

    def run(self) -> None:
        method = self.method
        for _ in range(method.max_probe_steps):
            if not self.running.any():
                break
            chosen = torch.rand(self.logits.shape[1:], generator=self.generator) < method.replacing_ratio  # (P, U)
            probe_ids, stop_ids = self._tokens(), self._tokens()
            self.steps += self.running.any(dim=1).long()
            self._update(chosen, probe_ids)
            self._stop(stop_ids)

    def _update(self, chosen: torch.Tensor, ids: torch.Tensor) -> None:
        """One probe step: rows of probes still running for some target, every running pair's scores
        moved by logit(0.5 +- 0.5 (p - p'))."""
        rows = self.running.any(dim=0).nonzero()[:, 0]  # (R,)
        self.rows["probe_rows"] += len(rows)
        values, _ = self._score(self._rows(chosen[rows]), ids[rows])  # (R, T)
        delta = (self.original[:, None] - values.T)[..., None]  # (T, R, 1)
        signed = torch.where(chosen[rows][None], delta, -delta)  # (T, R, U)
        step = torch.logit((signed * 0.5 + 0.5).clamp(LOGIT_CLAMP, 1 - LOGIT_CLAMP))
        live = self.running[:, rows, None]
        self.logits[:, rows] = torch.where(live, self.logits[:, rows] + step, self.logits[:, rows])

    def _stop(self, ids: torch.Tensor) -> None:
        """Each running pair's stopping row: its top features kept, its other features replaced; the
        pair stops when the target is within the top k outputs."""
        pairs = self.running.nonzero()  # (Q, 2): target, probe
        self.rows["stopping_rows"] += len(pairs)
        importance = self.importance()[pairs[:, 0], pairs[:, 1]]  # (Q, U)
        order = torch.argsort(importance, dim=-1, descending=True)
        place = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))  # rank of each feature
        counts = torch.tensor([self.method.kept_count(int(c)) for c in self.visible.sum(dim=1)])
        kept = place < counts[pairs[:, 0], None]
        replace = self.visible[pairs[:, 0]] & ~kept
        _, rank = self._score(self._rows(replace), ids[pairs[:, 1]], which=pairs[:, 0])
        hit = rank < self.top_k
        self.running[pairs[hit, 0], pairs[hit, 1]] = False

    def result(self) -> tuple[torch.Tensor, list[str]]:
        """Each target's mean importance (T, U) over its stopped probes (over all, with a warning, when none stopped)."""
        importance, stopped = self.importance(), ~self.running
        warnings = []
        weights = stopped.double()
        for t in (~stopped.any(dim=1)).nonzero()[:, 0].tolist():
            weights[t] = 1.0
            label = self.ctx.targets[t].label
            warnings.append(f"target {t} ({label!r}): no probe met the stopping condition in {self.method.max_probe_steps} "
                            "steps; its scores are the mean of all probes' (raise max_probe_steps)")
        mean = (importance * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        return mean, warnings
