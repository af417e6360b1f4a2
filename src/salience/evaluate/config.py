"""What an evaluation run is: model, dataset, methods, metrics and options, and its identity.

A run's identity (``RunConfig.run_id``) is a hash of everything that decides the stored values:
the model (a fingerprint of its weights), the dataset (a fingerprint: file content, split,
threshold), methods with their parameters, metrics with theirs, target, output and seed. Running the same command again gives the
same id and so resumes the same run. ``limit`` (how many examples to take), the batch size and
where results go are not part of it: a larger ``--limit`` extends a run, it does not start anew.

Method and metric *specs* are ``NAME[:KEY=VALUE,KEY=VALUE...]`` on the command line (values are
JSON where they parse as JSON, else strings), or tables ``{name, label, params}`` in a study file.

``salience bench`` reads a study file, TOML (or YAML when PyYAML is installed)::

    db = "results/salience.db"          # optional
    out = "results/my-study"            # optional; one sub-folder per study
    [[study]]
    name = "minilm"
    model = "zoo:minilm-l6-sentiment"
    dataset = "movie-snippets"
    limit = 500
    dataset_options = { split = "test", lexicon_threshold = 1.5 }
    methods = ["ig", { label = "SIG (pad)", name = "sig", params = { baseline = "pad" } }]
    metrics = ["log_odds", "sufficiency:fraction=0.2"]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from salience.errors import ParameterError, SalienceError

TARGETS = ("predicted", "label")
DATASET_OPTIONS = ("split", "lexicon_threshold", "n", "seed")
STUDY_KEYS = ("name", "model", "dataset", "dataset_options", "methods", "metrics", "limit", "target", "output", "seed",
              "truncate", "max_length", "batch_size", "prompt_template", "labels")


class ConfigError(SalienceError, ValueError):
    """A study file or a method/metric spec is malformed."""


@dataclass(frozen=True)
class Spec:
    """A method or a metric with its parameters, under a label unique within its run."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name, "params": dict(sorted(self.params.items()))}


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets and quotes."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _label(name: str, params: dict[str, Any]) -> str:
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(params.items()))


def parse_method_spec(item: str | dict[str, Any]) -> Spec:
    """``"sig:baseline=pad"`` or ``{"name": "sig", "params": {...}, "label": "SIG (pad)"}`` -> Spec,
    checked against the method registry (canonical name; unknown parameters are errors)."""
    from salience.core.registry import get_method

    name, params, label = _raw_spec(item, "method")
    info = get_method(name)
    input_options = _input_option_names()
    info.build({k: v for k, v in params.items() if k not in input_options})  # unknown names fail here, before any work
    return Spec(label or _label(info.name, params), info.name, params)


def _input_option_names() -> set[str]:
    """Parameters of a method spec that are not the method's: the features' ``level`` and the
    feature / encoding options of any adapter (``patch_size``, SLIC's ``n_segments``, ``spans``,
    ...). Which of them the study's model accepts is checked when the run starts (one ParameterError)."""
    from salience.models.causal_lm import CausalLM
    from salience.models.image import ImageClassifier
    from salience.models.tokens import TokenAdapter

    names = {"level"}
    for adapter in (ImageClassifier, TokenAdapter, CausalLM):
        names.update(getattr(adapter, "feature_options", ()), getattr(adapter, "encode_options", ()))
    return names


def parse_metric_spec(item: str | dict[str, Any]) -> Spec:
    """``"sufficiency:fraction=0.2"`` or a table -> Spec, checked against the metric registry."""
    from salience.metrics.base import get_metric

    name, params, label = _raw_spec(item, "metric")
    info = get_metric(name)
    for given in ("rationale", "box"):
        if given in params:
            raise ParameterError(f"metric {info.name}: the {given} comes from the dataset, not from parameters")
    return Spec(label or _label(info.name, params), info.name, params)


def _raw_spec(item: str | dict[str, Any], kind: str) -> tuple[str, dict[str, Any], str | None]:
    if isinstance(item, dict):
        unknown = set(item) - {"name", "label", "params"}
        if unknown or not isinstance(item.get("name"), str):
            raise ConfigError(f"a {kind} table needs 'name' and may have 'label' and 'params'; got {item!r}")
        table_params = item.get("params") or {}
        label = item.get("label")
        if not isinstance(table_params, dict) or (label is not None and not isinstance(label, str)):
            raise ConfigError(f"{kind} {item['name']!r}: 'params' must be a table and 'label' a string")
        return item["name"], dict(table_params), label
    if not isinstance(item, str) or not item.strip():
        raise ConfigError(f"a {kind} must be a name or NAME:KEY=VALUE,...; got {item!r}")
    name, _, rest = item.strip().partition(":")
    params: dict[str, Any] = {}
    for part in _split_top_level(rest, ",") if rest.strip() else []:
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"{kind} spec {item!r}: {part!r} is not KEY=VALUE")
        params[key.strip()] = _value(raw.strip())
    return name.strip(), params, None


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the values of a run (see the module docstring)."""

    model: str
    dataset: str
    methods: tuple[Spec, ...]
    metrics: tuple[Spec, ...]
    dataset_options: dict[str, Any] = field(default_factory=dict)
    target: str = "predicted"
    output: str = "probability"
    seed: int = 0
    truncate: bool = False
    max_length: int | None = None
    name: str | None = None  # a study's name (display only)
    # a causal LM as a zero-shot classifier (salience.PromptClassifier): the template with {text}
    # (a string or chat messages) and the labels (name -> verbalisation); both or neither
    prompt_template: str | tuple[dict[str, str], ...] | None = None
    labels: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("give at least one method")
        if not self.metrics:
            raise ConfigError("give at least one metric")
        for kind, specs in (("method", self.methods), ("metric", self.metrics)):
            labels = [s.label for s in specs]
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ConfigError(f"{kind} {repeated[0]!r} is given twice; give repeats distinct labels")
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        unknown = set(self.dataset_options) - set(DATASET_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown dataset option {sorted(unknown)[0]!r}; known: {', '.join(DATASET_OPTIONS)}")
        if (self.prompt_template is None) != (self.labels is None):
            raise ConfigError("'prompt_template' and 'labels' go together (a causal LM as a zero-shot classifier)")

    def identity(self, fingerprint: str) -> dict[str, Any]:
        """The part of the configuration that decides the values: the model's and the dataset's
        fingerprints (not their spelling: a model folder or data file reached by another path is the
        same run), the methods and metrics, and the options."""
        return {
            "model": model_fingerprint(self.model),
            "dataset": fingerprint,
            "methods": sorted((s.to_dict() for s in self.methods), key=lambda d: d["label"]),
            "metrics": sorted((s.to_dict() for s in self.metrics), key=lambda d: d["label"]),
            "target": self.target,
            "output": self.output,
            "seed": self.seed,
            "truncate": self.truncate,
            "max_length": self.max_length,
        } | self._prompt_identity()

    def _prompt_identity(self) -> dict[str, Any]:
        """The prompt classifier's template and labels; absent without one, so that the ids of runs
        on plain classifiers stay what they were."""
        if self.prompt_template is None:
            return {}
        return {"prompt_template": self.prompt_template, "labels": self.labels}

    def run_id(self, fingerprint: str) -> str:
        """16 hex digits of the SHA-256 of :meth:`identity` (canonical JSON)."""
        canonical = json.dumps(self.identity(fingerprint), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["methods"] = [s.to_dict() for s in self.methods]
        data["metrics"] = [s.to_dict() for s in self.metrics]
        return data


def model_fingerprint(name: str) -> str:
    """What identifies a model's weights: the SHA-256 of a local folder's weight, config and
    vocabulary files; of a zoo model's weights (the ``.safetensors`` shipped in ``salience/zoo``
    under the model's name, e.g. ``minilm_sentiment.safetensors``, EfficientNet-Lite0's asset, or,
    for a size-ladder MiniLM that does not ship, its weights in the user's cache);
    the task version of ``zoo:planted``; else (a hub id, a zoo model not installed) the name."""
    weights = _zoo_weights(name)
    if weights is not None:
        return f"{name}/sha256-" + hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    if name == "zoo:planted":
        from salience.zoo.planted import TASK_VERSION

        return f"zoo:planted/v{TASK_VERSION}"
    folder = Path(name).expanduser()
    if not name.startswith("zoo:") and folder.is_dir():
        digest = hashlib.sha256()
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
                digest.update(file.name.encode())
                with file.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
        return "folder/sha256-" + digest.hexdigest()[:16]
    return name


def _zoo_weights(name: str) -> Path | None:
    if not name.startswith("zoo:"):
        return None
    if name == "zoo:efficientnet-lite0":
        from salience.assets import efficientnet_lite0_weights_path

        try:
            return efficientnet_lite0_weights_path()
        except SalienceError:
            return None  # loading the model will say what is missing
    import salience.zoo
    from salience.models.loading import LADDER_ZOO

    shipped = Path(salience.zoo.__file__).with_name(name.removeprefix("zoo:").replace("-", "_") + ".safetensors")
    if shipped.is_file():
        return shipped
    layers = LADDER_ZOO.get(name.removeprefix("zoo:"))
    if layers:  # a MiniLM rung of the size ladder, trained into the user's cache
        from salience.zoo.minilm_ladder import ladder_weights_path

        cached = ladder_weights_path(layers)
        return cached if cached.is_file() else None
    return None


@dataclass(frozen=True)
class Study:
    """One ``[[study]]`` of a bench file: a run configuration plus execution options."""

    config: RunConfig
    limit: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class BenchFile:
    studies: tuple[Study, ...]
    db: str | None = None
    out: str | None = None


def load_bench_file(path: str | Path) -> BenchFile:
    """Parse and check a study file (``.toml``, or ``.yaml``/``.yml`` with PyYAML) without running it."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read study file {file}: {error.strerror or error}") from error
    data = _parse(file, text)
    unknown = set(data) - {"db", "out", "study", "defaults"}
    if unknown:
        raise ConfigError(f"{file}: unknown top-level key {sorted(unknown)[0]!r} (expected db, out, defaults, study)")
    studies_raw = data.get("study")
    if not isinstance(studies_raw, list) or not studies_raw:
        raise ConfigError(f"{file}: no [[study]] table")
    defaults = data.get("defaults") or {}
    studies = []
    for number, raw in enumerate(studies_raw, start=1):
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: study {number} is not a table")
        merged = {**defaults, **raw}
        where = f"{file}: study {merged.get('name', number)!r}"
        try:
            studies.append(_study(merged))
        except SalienceError as error:
            raise ConfigError(f"{where}: {error}") from error
    names = [s.config.name for s in studies]
    if len(set(names)) != len(names):
        raise ConfigError(f"{file}: study names must be distinct")
    return BenchFile(tuple(studies), _optional_str(data, "db", file), _optional_str(data, "out", file))


def _optional_str(data: dict[str, Any], key: str, file: Path) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{file}: {key} must be a string")
    return value


def _parse(file: Path, text: str) -> dict[str, Any]:
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML study files need PyYAML (pip install pyyaml); or write the study in TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{file} is not valid YAML: {str(error).splitlines()[0]}") from error
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{file} is not valid TOML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a table at the top level")
    return data


def prompt_template_value(value: Any) -> str | tuple[dict[str, str], ...] | None:
    """A prompt template as a run keeps it: a string, or the chat messages as a tuple of dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return tuple(dict(m) for m in value)
    raise ConfigError("'prompt_template' must be a string with {text} or a list of chat messages (tables)")


def _labels(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError("'labels' must be a table of label name = verbalisation, e.g. { negative = \" negative\" }")
    return dict(value)


def _study(raw: dict[str, Any]) -> Study:
    unknown = set(raw) - set(STUDY_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]!r}; known: {', '.join(STUDY_KEYS)}")
    for key in ("name", "model", "dataset"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"'{key}' is required (a string)")
    methods, metrics = raw.get("methods"), raw.get("metrics")
    if not isinstance(methods, list) or not isinstance(metrics, list):
        raise ConfigError("'methods' and 'metrics' must be lists")
    config = RunConfig(
        model=raw["model"],
        dataset=raw["dataset"],
        methods=tuple(parse_method_spec(m) for m in methods),
        metrics=tuple(parse_metric_spec(m) for m in metrics),
        dataset_options=dict(raw.get("dataset_options") or {}),
        target=raw.get("target", "predicted"),
        output=raw.get("output", "probability"),
        seed=int(raw.get("seed", 0)),
        truncate=bool(raw.get("truncate", False)),
        max_length=raw.get("max_length"),
        name=raw["name"],
        prompt_template=prompt_template_value(raw.get("prompt_template")),
        labels=_labels(raw.get("labels")),
    )
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError("'limit' must be a positive integer")
    return Study(config, limit, raw.get("batch_size"))
