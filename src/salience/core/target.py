"""What is explained: a class of a classifier, read as a probability, a logit or a log-probability."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from salience.errors import ParameterError, TargetError

Output = Literal["probability", "logit", "log_probability"]
OUTPUTS: tuple[str, ...] = get_args(Output)


@dataclass(frozen=True)
class Target:
    """The explained scalar: ``output`` (probability by default) of class ``index`` named ``label``."""

    index: int
    label: str
    output: str = "probability"


@dataclass(frozen=True)
class Prediction:
    """The model's prediction on the unperturbed input: class index, its label and all probabilities."""

    index: int
    label: str
    probabilities: tuple[float, ...]


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


def read_output(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """The explained scalar per row of ``logits`` (B, C) -> (B,)."""
    if target.output == "logit":
        return logits[:, target.index]
    if target.output == "log_probability":
        return torch.log_softmax(logits, dim=-1)[:, target.index]
    return torch.softmax(logits, dim=-1)[:, target.index]
