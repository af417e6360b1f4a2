"""What is explained: a class of a classifier, or a token a causal LM generated at a position, read
as a probability, a logit or a log-probability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from salience.errors import ParameterError, TargetError

Output = Literal["probability", "logit", "log_probability", "log_odds"]
OUTPUTS: tuple[str, ...] = get_args(Output)


@dataclass(frozen=True)
class Target:
    """The explained scalar: ``output`` (probability by default) of class ``index`` named ``label``.

    For a causal LM, ``index`` is the token id, ``label`` its text and ``position`` the index of the
    token in the teacher-forced sequence (its output is read from the logits at ``position - 1``).

    ``foil`` (a contrast): the explained scalar is output(``index``) - output(``foil``), both read
    from the same logits (a logit difference, or a probability difference for ``"probability"``).
    ``span`` (causal LMs): the token ids at positions ``position``, ``position + 1``, ...; the
    target is the whole span, its log-probability the sum of the tokens' (see
    ``salience.models.lm_targets``).
    """

    index: int
    label: str
    output: str = "probability"
    position: int | None = None
    foil: int | None = None
    span: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.span is not None and not isinstance(self.span, tuple):  # a list read back from JSON
            object.__setattr__(self, "span", tuple(int(i) for i in self.span))


@dataclass(frozen=True)
class Prediction:
    """The model's prediction on the unperturbed input: class index, its label and all probabilities."""

    index: int
    label: str
    probabilities: tuple[float, ...]


def prediction_from_logits(logits: torch.Tensor, labels: Sequence[str]) -> Prediction:
    """The prediction of one row of logits (C,): the argmax class, its label, the softmax (float64)."""
    probabilities = torch.softmax(logits.detach().double().cpu(), dim=-1)
    index = int(probabilities.argmax())
    return Prediction(index, labels[index], tuple(probabilities.tolist()))  # Python floats, converted at once


def check_output(output: str) -> str:
    """Validate an ``output`` name."""
    if output not in OUTPUTS:
        raise ParameterError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    return output


def resolve_target(target: int | str | None, labels: list[str], prediction: Prediction, output: str) -> Target:
    """Turn ``None`` (the predicted class), a class index or a label name into a :class:`Target`."""
    check_output(output)
    if target is None:
        return Target(prediction.index, prediction.label, output)
    if isinstance(target, bool):
        raise TargetError(f"target must be a class index or label name, not {target!r}")
    if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit() and target not in labels):
        index = int(target)
        if not 0 <= index < len(labels):
            raise TargetError(f"target index {index} is out of range: the model has {len(labels)} classes (0-{len(labels) - 1})")
        return Target(index, labels[index], output)
    if target in labels:
        return Target(labels.index(target), target, output)
    lowered = [label.lower() for label in labels]
    if isinstance(target, str) and target.lower() in lowered:
        index = lowered.index(target.lower())
        return Target(index, labels[index], output)
    raise TargetError(f"unknown target label {target!r}; the model's labels are: {', '.join(labels)}")


def read_outputs(logits: torch.Tensor, targets: list[Target]) -> torch.Tensor:
    """The explained scalar of every target per row of ``logits`` (B, C) -> (B, T); the targets share
    one output kind (the API enforces it), so the softmax is computed once.

    Kinds: ``probability`` p_t (softmax), ``logit`` z_t, ``log_probability`` log p_t, and
    ``log_odds`` log(p_t / (1 - p_t)) = z_t - logsumexp(z_c, c != t): it does not saturate as a
    probability does near 0 and 1, and for two classes it is the logit difference z_t - z_other."""
    kinds = {t.output for t in targets}
    if len(kinds) != 1:
        raise ParameterError(f"targets of one explanation must share one output kind, got {sorted(kinds)}")
    (kind,) = kinds
    if all(t.foil is None for t in targets):
        return _read_kind(logits, [t.index for t in targets], kind)
    # contrasts: minus the foil's output, read from the same logits (one softmax for both)
    both = _read_kind(logits, [t.index for t in targets] + [t.index if t.foil is None else t.foil for t in targets], kind)
    has_foil = torch.tensor([t.foil is not None for t in targets], device=logits.device)
    return both[:, :len(targets)] - torch.where(has_foil, both[:, len(targets):], 0)


def _read_kind(logits: torch.Tensor, indices: list[int], kind: str) -> torch.Tensor:
    """Output ``kind`` of the classes ``indices`` per row of ``logits`` (B, C) -> (B, len(indices))."""
    index = torch.tensor(indices, device=logits.device)
    if kind == "logit":
        return logits[:, index]
    if kind == "log_probability":
        return torch.log_softmax(logits, dim=-1)[:, index]
    if kind == "log_odds":
        others = logits[:, None, :].expand(-1, len(indices), -1).clone()  # (B, K, C)
        others[:, torch.arange(len(indices)), index] = -torch.inf
        return logits[:, index] - torch.logsumexp(others, dim=-1)
    return torch.softmax(logits, dim=-1)[:, index]


def resolve_targets(target: int | str | Sequence[int | str] | None, labels: list[str], prediction: Prediction,
                    output: str) -> list[Target]:
    """A classifier's targets: one (``None``, an index or a label), several (a list) or ``"all"``."""
    if isinstance(target, str) and target == "all" and "all" not in labels:
        return [Target(i, label, check_output(output)) for i, label in enumerate(labels)]
    if isinstance(target, (list, tuple)):
        if not target:
            raise TargetError("the list of targets is empty")
        return [resolve_target(t, labels, prediction, output) for t in target]
    return [resolve_target(target, labels, prediction, output)]  # type: ignore[arg-type]
