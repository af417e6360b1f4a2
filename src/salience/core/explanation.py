"""The one result type for every model kind: scores per feature (one row per target) plus the
provenance needed to trust and reproduce them.

Serialises to a versioned JSON document (``SCHEMA``) and back without pickle; version 1 files
(single-target text explanations) still load. See docs/formats.md. Rendering lives in
``salience.render``, which registers its renderers here (:func:`register_renderer`) when the
package is imported, so that core imports nothing above it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from salience.core import aggregate as _aggregate
from salience.core.features import Feature, FeatureSet
from salience.core.target import Prediction, Target

SCHEMA = "salience.explanation/2"
SCHEMA_V1 = "salience.explanation/1"
KINDS = ("text", "image", "generation")
# arrays with more values than this are written as base64 (dtype, shape, little-endian bytes)
INLINE_LIMIT = 256

__all__ = ["SCHEMA", "Cost", "Explanation", "Feature", "decode_array", "encode_array", "register_renderer"]

_RENDERERS: dict[str, Callable[..., Any]] = {}


def register_renderer(name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` the renderer ``name`` ("html", "terminal", "print", "png") of explanations."""
    _RENDERERS[name] = function


def _renderer(name: str) -> Callable[..., Any]:
    if name not in _RENDERERS:
        raise RuntimeError(f"no {name} renderer is registered; import salience (which loads salience.render) first")
    return _RENDERERS[name]


@dataclass(frozen=True)
class Cost:
    """Work an explanation took. Passes count rows: one batch of 16 inputs is 16 forward passes."""

    forward_passes: int = 0
    backward_passes: int = 0
    model_calls: int = 0
    seconds: float = 0.0
    # token positions of forward rows taken from a key/value cache instead of recomputed (a causal LM's
    # unchanged prefix under token replacement): the work saved, in rows x positions
    cached_positions: int = 0


Values = float | np.ndarray | None


@dataclass
class Explanation:
    """Attribution scores for one input.

    ``scores[i]`` (one target: shape (F,)) or ``scores[t, i]`` (several targets: (T, F)) is the
    contribution of ``features[i]`` to the explained output of target t (``targets[t]``: a class,
    or a generated token); sign and units are those of the method (see ``method`` docs): positive
    scores push the output up. A feature that cannot influence a target (a causal LM's later
    tokens) scores NaN for it. ``delta`` is the method's completeness error (sum of scores minus
    ``output_value - baseline_value``) where the method defines one; with several targets
    ``output_value``, ``baseline_value`` and ``delta`` are arrays (T,). ``token_scores`` holds
    per-position scores where the method has them (tokens for text, pixels of the model's grid for
    images), shape (P,) or (T, P). ``kind`` is "text", "image" or "generation"; ``extras`` keeps what
    a kind needs to map scores back to the input (an image's geometry, the generated text); keys
    starting with "_" stay in memory and are never serialised (``_image``: the picture explained).
    """

    input: Any
    features: Sequence[Feature]
    scores: np.ndarray
    method: str
    params: dict[str, Any]
    model: str
    target: Target
    prediction: Prediction | None
    level: str = "word"
    output_value: Values = None
    baseline_value: Values = None
    delta: Values = None
    cost: Cost = field(default_factory=Cost)
    truncated: bool = False
    tokens: list[str] = field(default_factory=list)
    token_scores: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    kind: str = "text"
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if not self.targets:
            self.targets = [self.target]
        expected = (len(self.features),) if self.scores.ndim == 1 else (len(self.targets), len(self.features))
        if self.scores.shape != expected:
            raise ValueError(f"scores have shape {self.scores.shape}, expected {expected}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown explanation kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.token_scores is not None:
            self.token_scores = np.asarray(self.token_scores, dtype=np.float64)

    # ----------------------------------------------------------------- views
    @property
    def multi_target(self) -> bool:
        """True when ``scores`` has one row per target (T, F)."""
        return self.scores.ndim == 2

    def row(self, target: int = 0) -> np.ndarray:
        """The scores (F,) of target number ``target``."""
        return self.scores[target] if self.multi_target else self.scores

    def top(self, k: int = 5, target: int = 0) -> list[tuple[Feature, float]]:
        """The ``k`` features with the largest scores for one target, highest first (NaN last)."""
        row = np.nan_to_num(self.row(target), nan=-np.inf)
        order = np.argsort(-row, kind="stable")[:k]
        return [(self.features[i], float(self.row(target)[i])) for i in order]

    @property
    def relative_delta(self) -> float | None:
        """``|delta|`` divided by ``|output_value - baseline_value|`` (the largest over targets;
        None when undefined)."""
        if self.delta is None or self.output_value is None or self.baseline_value is None:
            return None
        gap = np.abs(np.asarray(self.output_value, dtype=float) - np.asarray(self.baseline_value, dtype=float))
        delta = np.abs(np.asarray(self.delta, dtype=float))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(gap > 0, delta / np.where(gap > 0, gap, 1), np.nan)
        return None if np.all(np.isnan(ratio)) else float(np.nanmax(ratio))

    def heatmap(self, target: int = 0) -> np.ndarray:
        """Image explanations: (H, W) scores in the pixel grid of the image the user gave (before
        resizing and cropping); pixels the model never saw (cropped away) are NaN. A pixel's value is
        its own score for pixel-level methods, else the mean score of the features covering it."""
        if self.kind != "image":
            raise ValueError(f"heatmap() is for image explanations; this one explains a {self.kind}")
        from salience.core.grid import model_grid_scores, to_original_grid

        return to_original_grid(model_grid_scores(self, target), self.extras["geometry"])

    # ------------------------------------------------------------- aggregate
    def aggregate(self, level: str | None = None, *, spans: Sequence[Sequence[int]] | None = None, rule: str = "sum",
                  strict: bool = False, target_spans: Sequence[Sequence[int]] | None = None) -> Explanation:
        """A new explanation with features joined into words (``"word"``), sentences (``"sentence"``)
        or character ``spans`` ((start, end) in the first text, or (segment, start, end)), and/or
        targets joined into ``target_spans`` ((start, end) target indices), from these scores alone
        (no model call). ``rule``: "sum" (default), "mean" or "max_abs" (the signed score of largest
        magnitude). NaN parts (features that cannot influence a target) contribute nothing; a group
        is NaN when all its parts are, or with ``strict`` when any is. A feature belongs to the group
        holding its first character. The rule is recorded in ``params["aggregation"]``; see
        :mod:`salience.core.aggregate` and docs/explanations.md."""
        result = self  # targets first, while the features still give the tokens' offsets for labels
        if target_spans is not None:
            result = _aggregate.aggregate_targets(result, target_spans, rule=rule, strict=strict)
        if level is not None or spans is not None or target_spans is None:
            result = _aggregate.aggregate_features(result, level, spans=spans, rule=rule, strict=strict)
        return result

    def aggregate_targets(self, spans: Sequence[Sequence[int]], *, rule: str = "sum", strict: bool = False) -> Explanation:
        """A new explanation with one target per span (start, end) of target indices, e.g. a
        generation's tokens [0, 3) and [3, 7): the ``rule`` (default sum) of their score rows. For
        additive methods the summed row is the attribution of the summed outputs (with
        log-probabilities: of the span's log-probability). See
        :func:`salience.core.aggregate.aggregate_targets`."""
        return _aggregate.aggregate_targets(self, spans, rule=rule, strict=strict)

    # ------------------------------------------------------------- serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict following ``SCHEMA``; large arrays are base64 (see :func:`encode_array`)."""
        return {
            "schema": SCHEMA,
            "kind": self.kind,
            "input": _input_json(self.input),
            "input_is_pair": isinstance(self.input, tuple),
            "level": self.level,
            "features": _features_json(self.features),
            "scores": encode_array(self.scores),
            "method": self.method,
            "params": _jsonable(self.params),
            "model": self.model,
            "target": asdict(self.target),  # the first target (the only one for one class)
            "targets": [asdict(t) for t in self.targets],
            "prediction": None if self.prediction is None else asdict(self.prediction),
            "output_value": _values_json(self.output_value),
            "baseline_value": _values_json(self.baseline_value),
            "delta": _values_json(self.delta),
            "cost": asdict(self.cost),
            "truncated": self.truncated,
            "tokens": list(self.tokens),
            "token_scores": _token_scores_json(self.token_scores, self.scores),
            "warnings": list(self.warnings),
            "extras": _jsonable({k: v for k, v in self.extras.items() if not str(k).startswith("_")}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to the documented JSON format (``SCHEMA``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        """Rebuild from :meth:`to_dict` output (this version or version 1); refuses unknown versions."""
        schema = data.get("schema")
        if schema == SCHEMA_V1:
            data = _upgrade_v1(data)
        elif schema != SCHEMA:
            raise ValueError(f"unsupported explanation schema {schema!r}; expected {SCHEMA!r} (or {SCHEMA_V1!r})")
        raw_input = data["input"]
        targets = [Target(**t) for t in data["targets"]]
        prediction = data.get("prediction")
        return cls(
            input=tuple(raw_input) if data.get("input_is_pair") else raw_input,
            features=_features_from_json(data["features"]),
            scores=decode_array(data["scores"]),
            method=data["method"],
            params=data["params"],
            model=data["model"],
            target=targets[0],
            targets=targets,
            prediction=None if prediction is None else Prediction(**{**prediction, "probabilities": tuple(prediction["probabilities"])}),
            level=data["level"],
            output_value=_values_from_json(data["output_value"]),
            baseline_value=_values_from_json(data["baseline_value"]),
            delta=_values_from_json(data["delta"]),
            cost=Cost(**data["cost"]),
            truncated=data["truncated"],
            tokens=list(data["tokens"]),
            token_scores=_token_scores_from_json(data["token_scores"], data["scores"]),
            warnings=list(data.get("warnings", [])),
            kind=data.get("kind", "text"),
            extras=dict(data.get("extras") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> Explanation:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------- render
    def to_html(self, *, standalone: bool = True) -> str:
        """Self-contained HTML; every piece of input text is escaped."""
        return str(_renderer("html")([self], standalone=standalone))

    def to_png(self, path: str, *, image: Any = None) -> str:
        """Write a PNG (for images: the heatmap over the image with a colour bar; ``image`` is the
        picture to draw on, by default the one explained in this process); returns the path."""
        return str(_renderer("png")([self], path, image=image))

    def _repr_html_(self) -> str:
        return self.to_html(standalone=False)

    def __rich__(self) -> Any:
        return _renderer("terminal")(self)

    def show(self) -> None:
        """Print the explanation to the terminal."""
        _renderer("print")([self])


# ------------------------------------------------------------------ arrays
def encode_array(values: np.ndarray) -> Any:
    """Small arrays as (nested) JSON lists; larger ones as ``{"dtype", "shape", "base64"}`` with the
    little-endian bytes of the array (float64 scores keep full precision)."""
    array = np.asarray(values)
    if array.size <= INLINE_LIMIT:
        return array.tolist()
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": little.dtype.str, "shape": list(array.shape), "base64": base64.b64encode(little.tobytes()).decode("ascii")}


def decode_array(data: Any) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    if isinstance(data, dict):
        raw = base64.b64decode(data["base64"])
        return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).astype(np.float64)
    return np.asarray(data, dtype=np.float64)


def _token_scores_json(token_scores: np.ndarray | None, scores: np.ndarray) -> Any:
    """Per-position scores; ``{"same_as": "scores"}`` when they equal the feature scores exactly
    (an image explained at pixel level: one feature per position), which halves such a document."""
    if token_scores is None:
        return None
    if np.shape(token_scores) == np.shape(scores) and np.array_equal(token_scores, scores, equal_nan=True):
        return {"same_as": "scores"}
    return encode_array(token_scores)


def _token_scores_from_json(data: Any, scores: Any) -> np.ndarray | None:
    if data is None:
        return None
    return decode_array(scores if isinstance(data, dict) and data.get("same_as") == "scores" else data)


def _values_json(values: Values) -> Any:
    if values is None or isinstance(values, (int, float)):
        return values
    return encode_array(np.asarray(values, dtype=np.float64))


def _values_from_json(data: Any) -> Values:
    if data is None or isinstance(data, (int, float)):
        return data
    return decode_array(data)


def _input_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, (str, list, dict)) or value is None else repr(value)


def _features_json(features: Sequence[Feature]) -> Any:
    if isinstance(features, FeatureSet) and features.layout is not None:
        return {"layout": _jsonable(features.layout)}
    rows = []
    for f in features:
        row: dict[str, Any] = {"text": f.text, "start": f.start, "end": f.end, "segment": f.segment, "tokens": list(f.tokens)}
        if f.box is not None:
            row["box"] = list(f.box)
        rows.append(row)
    return rows


def _features_from_json(data: Any) -> Sequence[Feature]:
    if isinstance(data, dict):
        from salience.core.grid import features_from_layout

        return features_from_layout(data["layout"])
    return [Feature(f["text"], f["start"], f["end"], f["segment"], tuple(f["tokens"]),
                    tuple(f["box"]) if f.get("box") is not None else None) for f in data]


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 document (one target, text) in the version-2 layout."""
    return {**data, "schema": SCHEMA, "kind": "text", "targets": [data["target"]], "extras": {}}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
