"""The one result type: scores per feature plus the provenance needed to trust and reproduce them.

Serialises to a versioned JSON document (``SCHEMA``) and back without pickle; see docs/formats.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from salience.core.target import Prediction, Target

SCHEMA = "salience.explanation/1"


@dataclass(frozen=True)
class Feature:
    """One attributed unit of the input (a word or a token).

    ``start``/``end`` are character offsets into the input text the user gave (for a text pair,
    into text number ``segment``: 0 for the first, 1 for the second); ``tokens`` are the indices of
    the model tokens it covers.
    """

    text: str
    start: int
    end: int
    segment: int = 0
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Cost:
    """Work an explanation took. Passes count rows: one batch of 16 inputs is 16 forward passes."""

    forward_passes: int = 0
    backward_passes: int = 0
    model_calls: int = 0
    seconds: float = 0.0


@dataclass
class Explanation:
    """Attribution scores for one input.

    ``scores[i]`` is the contribution of ``features[i]`` to the explained output ``target.output``
    of class ``target.label``; its sign and units are those of the method (see ``method`` docs):
    positive scores push the output up. ``delta`` is the method's completeness error
    (sum of scores minus ``output_value - baseline_value``) where the method defines one.
    """

    input: str | tuple[str, str]
    features: list[Feature]
    scores: np.ndarray
    method: str
    params: dict[str, Any]
    model: str
    target: Target
    prediction: Prediction
    level: str = "word"
    output_value: float | None = None
    baseline_value: float | None = None
    delta: float | None = None
    cost: Cost = field(default_factory=Cost)
    truncated: bool = False
    tokens: list[str] = field(default_factory=list)
    token_scores: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.shape != (len(self.features),):
            raise ValueError(f"scores have shape {self.scores.shape}, expected ({len(self.features)},)")
        if self.token_scores is not None:
            self.token_scores = np.asarray(self.token_scores, dtype=np.float64)

    # ----------------------------------------------------------------- views
    def top(self, k: int = 5) -> list[tuple[Feature, float]]:
        """The ``k`` features with the largest scores, highest first."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [(self.features[i], float(self.scores[i])) for i in order]

    @property
    def relative_delta(self) -> float | None:
        """``|delta|`` divided by ``|output_value - baseline_value|`` (None when undefined)."""
        if self.delta is None or self.output_value is None or self.baseline_value is None:
            return None
        gap = abs(self.output_value - self.baseline_value)
        return abs(self.delta) / gap if gap > 0 else None

    # ------------------------------------------------------------- serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict following ``SCHEMA``."""
        return {
            "schema": SCHEMA,
            "input": list(self.input) if isinstance(self.input, tuple) else self.input,
            "input_is_pair": isinstance(self.input, tuple),
            "level": self.level,
            "features": [
                {"text": f.text, "start": f.start, "end": f.end, "segment": f.segment, "tokens": list(f.tokens)}
                for f in self.features
            ],
            "scores": [float(s) for s in self.scores],
            "method": self.method,
            "params": _jsonable(self.params),
            "model": self.model,
            "target": asdict(self.target),
            "prediction": asdict(self.prediction),
            "output_value": self.output_value,
            "baseline_value": self.baseline_value,
            "delta": self.delta,
            "cost": asdict(self.cost),
            "truncated": self.truncated,
            "tokens": list(self.tokens),
            "token_scores": None if self.token_scores is None else [float(s) for s in self.token_scores],
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to the documented JSON format (``SCHEMA``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        """Rebuild from :meth:`to_dict` output; refuses unknown schema versions."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unsupported explanation schema {data.get('schema')!r}; expected {SCHEMA!r}")
        raw_input = data["input"]
        return cls(
            input=tuple(raw_input) if data.get("input_is_pair") else raw_input,  # type: ignore[arg-type]
            features=[Feature(f["text"], f["start"], f["end"], f["segment"], tuple(f["tokens"])) for f in data["features"]],
            scores=np.asarray(data["scores"], dtype=np.float64),
            method=data["method"],
            params=data["params"],
            model=data["model"],
            target=Target(**data["target"]),
            prediction=Prediction(**{**data["prediction"], "probabilities": tuple(data["prediction"]["probabilities"])}),
            level=data["level"],
            output_value=data["output_value"],
            baseline_value=data["baseline_value"],
            delta=data["delta"],
            cost=Cost(**data["cost"]),
            truncated=data["truncated"],
            tokens=list(data["tokens"]),
            token_scores=None if data["token_scores"] is None else np.asarray(data["token_scores"]),
            warnings=list(data.get("warnings", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> Explanation:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------- render
    def to_html(self, *, standalone: bool = True) -> str:
        """Self-contained HTML; every piece of input text is escaped."""
        from salience.render.html import explanation_html

        return explanation_html([self], standalone=standalone)

    def _repr_html_(self) -> str:
        return self.to_html(standalone=False)

    def __rich__(self) -> Any:
        from salience.render.terminal import explanation_renderable

        return explanation_renderable(self)

    def show(self) -> None:
        """Print the coloured explanation to the terminal."""
        from salience.render.terminal import print_explanations

        print_explanations([self])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
