"""The entry point: ``explain(model, inputs, method=...)`` -> Explanation(s), for every model kind."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np

import salience.methods  # noqa: F401  (registers the built-in methods)
from salience.core.batching import choose_batch_size, default_memory_budget, parse_memory
from salience.core.explanation import Cost, Explanation
from salience.core.registry import MethodInfo, all_methods, get_method
from salience.core.target import Target, check_output, resolve_target, resolve_targets
from salience.errors import ParameterError, indefinite
from salience.methods.base import Attribution, Context
from salience.models.base import Adapter, Encoded
from salience.models.context_query import SourceSpec, context_prompt

# what a capability a method needs is called in messages, and which model kinds have it
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # .../salience/: this module's package
TRANSFORMERS = "text classifiers, causal LMs and vision transformers built on nn.MultiheadAttention"
CAPABILITIES = {"attention_maps": ("attention maps", TRANSFORMERS),
                "attention_query_rows": ("attention rows per target", TRANSFORMERS),
                "attention_gradients": ("gradients of attention maps", TRANSFORMERS),
                "layer_maps": ("layer activations", "image classifiers (CNNs and ViTs)"),
                "pixel_grid": ("a pixel grid", "image classifiers"),
                "score_replaced": ("outputs and ranks of inputs with tokens replaced by given tokens",
                                   "text classifiers and causal LMs"),
                "replacement_ids": ("a vocabulary to draw replacement tokens from", "text classifiers and causal LMs")}
TargetSpec = int | str | Sequence[int | str] | None
GROUP_SIZE = 8  # inputs per attribute_many call when the method does not say
T = TypeVar("T")


class SalienceWarning(UserWarning):
    """An explanation was computed but may be inaccurate (large completeness delta, truncation)."""


def methods() -> list[MethodInfo]:
    """Every registered method (name, aliases, summary, cost, parameters)."""
    return all_methods()


def explain(
    model: Adapter,
    inputs: Any = None,
    method: str = "integrated_gradients",
    *,
    context: str | None = None,
    query: str | None = None,
    sources: SourceSpec | None = None,
    target: TargetSpec = None,
    output: str | None = None,
    level: str | None = None,
    batch_size: int | None = None,
    max_memory: int | str | None = None,
    truncate: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    params: dict[str, Any] | None = None,
    **options: Any,
) -> Explanation | list[Explanation]:
    """Explain ``model``'s output on one input or a list of them.

    Inputs by model kind: a text or a (premise, hypothesis) pair (text classifiers); a path, PIL
    image, HxWxC uint8 array or CxHxW tensor (image classifiers); a prompt (causal LMs). ``target``:
    class index or label name (default: the predicted class), a list of them, or ``"all"``; for a
    causal LM every generated token is a target. ``output``: what is explained: "log_odds"
    log(p / (1 - p)) (the default for classifiers: it does not saturate, so a confident
    prediction still shows which words matter), "probability" (the default for causal LMs),
    "logit" or "log_probability"; a method may have its own default (RISE: the probability;
    NeuroMask: the log-probability its loss uses). ``level``: the features ("word"/"token" for
    text, "pixel"/"patch"/"superpixel" for images; default: the adapter's). ``batch_size``: rows per
    model call (default: chosen by Salience); ``max_memory`` (e.g. "2GB"): size the chunks to fit
    instead.

    Other keywords go, by name, to the adapter's input options (``model.encode_options``, e.g.
    ``continuation``, ``max_new_tokens``), its feature options (``model.feature_options``, e.g.
    ``patch_size``) or the method (e.g. ``steps=64``, ``baseline="pad"``; or all in ``params``).
    Causal LMs also take ``context=`` and ``query=`` instead of ``inputs`` (ContextCite's setting,
    :mod:`salience.models.context_query`): the prompt is "Context: ... Query: ..." (through the chat
    template when the tokenizer has one), the features are the context's ``sources``
    (``"sentence"``, the default; ``"word"``; or ``(start, end)`` character spans of the context)
    and, unless ``target``, ``target_span`` or ``contrast`` say otherwise, the target is the whole
    response (``target_span="all"``).

    Returns one Explanation for one input, a list for a list. A list is explained input by input,
    except by a method that explains several at once (``attribute_many``: NeuroMask optimises
    ``images_per_batch`` images' masks in one model call per iteration; the CAM family, SmoothGrad
    and guided backpropagation / deconvnet run up to 8 images of one grid in shared model calls).
    """
    info = get_method(method)
    options = {**(params or {}), **options}
    if context is not None or query is not None or sources is not None:
        inputs, level, options = _context_input(model, inputs, level, target, options, context, query, sources)
    elif inputs is None:
        raise ParameterError("nothing to explain: give the input (or, for a causal LM, context= and query=)")
    encode_options, feature_options, method_params = _route_options(model, info, options)
    algorithm = info.build(method_params)
    _check_capabilities(model, info)
    output = check_output(output or getattr(info.cls, "default_output", None) or getattr(model, "default_output", "probability"))
    single = _is_single_input(model, inputs)
    items = [inputs] if single else list(inputs)
    show = progress if progress is not None else len(items) > 1
    settings = _Settings(model, info, algorithm, target, output, level, batch_size, max_memory, truncate, seed,
                         encode_options, feature_options)
    results: list[Explanation] = []
    with _progress(len(items), show, info.name) as bar:
        for group in _groups(items, algorithm, model):
            results += _explain_group(settings, group)
            bar.update(len(group))
    return results[0] if single else results


@dataclass(frozen=True)
class _Settings:
    """What ``explain`` was asked, the same for every input."""

    model: Adapter
    info: MethodInfo
    algorithm: Any
    target: TargetSpec
    output: str
    level: str | None
    batch_size: int | None
    max_memory: int | str | None
    truncate: bool
    seed: int
    encode_options: dict[str, Any]
    feature_options: dict[str, Any]


@dataclass
class _Prepared:
    """One input ready for the method: its context, prediction and the cost of getting there."""

    item: Any
    ctx: Context
    prediction: Any
    level: str
    squeeze: bool
    encode_options: dict[str, Any]
    cost: Cost


def _groups(items: list[Any], algorithm: Any, model: Adapter) -> list[list[Any]]:
    """Inputs explained together: ``group_size`` at a time (default :data:`GROUP_SIZE`) for a method
    with ``attribute_many`` (e.g. NeuroMask optimises several images' masks in one model call)
    that can share calls on this model (its ``shares_calls(model)``, when it has one), one at a
    time otherwise (so each input's cost is its own)."""
    many = callable(getattr(algorithm, "attribute_many", None)) and getattr(algorithm, "shares_calls", lambda _model: True)(model)
    size = int(getattr(algorithm, "group_size", GROUP_SIZE)) if many else 1
    return [items[start:start + size] for start in range(0, len(items), max(size, 1))]


def _explain_group(settings: _Settings, items: list[Any]) -> list[Explanation]:
    """Prepare each input, run the method once for the group (``attribute_many``) or once per input,
    and finish each Explanation. A shared run's cost (model passes, calls, seconds) is split evenly
    between the group's inputs (its total is exact; each input's share is an average); the
    preparation (encoding, prediction) is each input's own."""
    model, algorithm = settings.model, settings.algorithm
    prepared = _prepare_group(settings, items)
    if callable(getattr(algorithm, "attribute_many", None)):
        results, cost = _measured(model, lambda: list(algorithm.attribute_many([p.ctx for p in prepared])))
        runs = list(zip(results, _split(cost, len(prepared))))
    else:
        runs = [_measured(model, lambda p=p: algorithm.attribute(p.ctx)) for p in prepared]
    return [_finish(settings, p, result, share) for p, (result, share) in zip(prepared, runs)]


def _context_input(model: Adapter, inputs: Any, level: str | None, target: TargetSpec, options: dict[str, Any],
                   context: str | None, query: str | None, sources: SourceSpec | None) -> tuple[Any, str, dict[str, Any]]:
    """The prompt, level and options for ``context=`` / ``query=`` / ``sources=``: the context's
    sources as span features, the whole response as the target unless one is chosen."""
    if inputs is not None:
        raise ParameterError("give the input either as a prompt or as context= and query=, not both")
    if context is None:
        raise ParameterError("query= and sources= go with a context=; give the context to attribute the response to")
    if "target_span" not in getattr(model, "encode_options", ()) or getattr(model, "tokenizer", None) is None:
        raise ParameterError(f"context= and query= are inputs of causal LMs, not of {indefinite(model.kind)}")
    if level not in (None, "span") or "spans" in options:
        raise ParameterError("with context=, choose the features with sources= ('sentence', 'word' or spans of the "
                             "context), not level= or spans=")
    built = context_prompt(model.tokenizer, context, query, sources="sentence" if sources is None else sources)  # type: ignore[attr-defined]
    options = {**options, "spans": [list(span) for span in built.spans]}
    if target is None and not {"target_span", "contrast"} & set(options):
        options["target_span"] = "all"
    return built.prompt, "span", options


def _is_single_input(model: Adapter, inputs: Any) -> bool:
    checker = getattr(model, "is_single_input", None)
    if callable(checker):
        return bool(checker(inputs))
    return isinstance(inputs, (str, tuple, Encoded))


def _route_options(model: Adapter, info: MethodInfo, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    encode_names = set(getattr(model, "encode_options", ()))
    feature_names = set(getattr(model, "feature_options", ()))
    encode = {k: v for k, v in options.items() if k in encode_names}
    feature = {k: v for k, v in options.items() if k in feature_names}
    rest = {k: v for k, v in options.items() if k not in encode_names | feature_names}
    unknown = sorted(set(rest) - set(info.parameters()))
    if unknown:
        known = [*info.parameters(), *sorted(encode_names), *sorted(feature_names)]
        raise ParameterError(f"method {info.name!r} has no parameter {unknown[0]!r}, nor does {indefinite(model.kind)}; "
                             f"known: {', '.join(known) or 'none'}")
    return encode, feature, rest


def _check_capabilities(model: Adapter, info: MethodInfo) -> None:
    for need in getattr(info.cls, "needs", ()):
        if not hasattr(model, need):
            what, kinds = CAPABILITIES.get(need, (need, "models that have it"))
            raise ParameterError(f"method {info.name!r} needs {what}, which {indefinite(model.kind)} does not provide; it works on {kinds}")


def _resolve(model: Adapter, encoded: Any, prediction: Any, target: TargetSpec, output: str) -> list[Target]:
    resolver = getattr(model, "resolve_targets", None)
    if callable(resolver):
        return list(resolver(encoded, prediction, target, output))
    return resolve_targets(target, model.labels, prediction, output)


def _one_class_target(model: Adapter, target: TargetSpec) -> bool:
    """A classifier asked for one class: its explanation keeps scores of shape (F,)."""
    return not callable(getattr(model, "resolve_targets", None)) and not isinstance(target, (list, tuple)) and target != "all"


def _prepare_group(settings: _Settings, items: list[Any]) -> list[_Prepared]:
    """Each input of a group explained together prepared by :func:`_prepare`; on an adapter with
    ``predict_many`` the inputs are encoded one by one and predicted in shared calls (each input's
    cost: its encoding plus an even share of the prediction). Not for a method whose prediction pass
    also gives the input gradient (``uses_input_gradient``)."""
    model = settings.model
    predict_many = getattr(model, "predict_many", None)
    if len(items) < 2 or not callable(predict_many) or getattr(settings.algorithm, "uses_input_gradient", False):
        return [_prepare(settings, item) for item in items]
    encoded = [_measured(model, lambda item=item: _encode(settings, item)) for item in items]
    predictions, cost = _measured(model, lambda: predict_many([e for e, _ in encoded], batch_size=settings.batch_size))
    return [dataclasses.replace(prepared, cost=_total(prepared.cost, own, share))
            for prepared, (_, own), share in zip([_prepare(settings, e, p) for (e, _), p in zip(encoded, predictions)],
                                                 encoded, _split(cost, len(items)))]


def _encode(settings: _Settings, item: Any) -> Any:
    """The input as the adapter encodes it (an input it already encoded is kept)."""
    model = settings.model
    if not _is_raw(model, item):
        return item
    return model.encode(item, truncate=settings.truncate, **_encode_options(settings))


def _encode_options(settings: _Settings) -> dict[str, Any]:
    if "seed" in getattr(settings.model, "encode_options", ()):  # e.g. a causal LM's sampling: the one seed of explain()
        return {**settings.encode_options, "seed": settings.seed}
    return settings.encode_options


def _prepare(settings: _Settings, item: Any, prediction: Any = None) -> _Prepared:
    """Encode the input, predict, resolve the targets and features (the method's :class:`Context`),
    counting the cost of doing so."""
    prepared, cost = _measured(settings.model, lambda: _prepare_unmeasured(settings, item, prediction))
    return dataclasses.replace(prepared, cost=cost)


def _prepare_unmeasured(settings: _Settings, item: Any, prediction: Any = None) -> _Prepared:
    model, info, target, output = settings.model, settings.info, settings.target, settings.output
    encode_options = _encode_options(settings)
    encoded = _encode(settings, item)
    squeeze = _one_class_target(model, target)
    input_gradient, state = None, None
    if squeeze and getattr(settings.algorithm, "uses_input_gradient", False) and hasattr(model, "predict_with_input_gradient"):
        # one forward + backward gives the prediction, the target and the gradient at the input (a
        # method's own pass, such as LRP's, gives its modified gradient and what it recorded)
        def resolve(predicted: Any) -> Any:
            return resolve_target(target, model.labels, predicted, output)  # type: ignore[arg-type]

        own = getattr(settings.algorithm, "input_gradient_pass", None)
        if callable(own):
            prediction, resolved, value, gradient, state = own(model, encoded, resolve)
        else:
            prediction, resolved, value, gradient = model.predict_with_input_gradient(encoded, resolve)  # type: ignore[attr-defined]
        targets = [resolved]
        input_gradient = (value.reshape(1), gradient[None])
    else:
        prediction = model.predict(encoded) if prediction is None else prediction
        targets = _resolve(model, encoded, prediction, target, output)
    level = settings.level or getattr(model, "default_levels", {}).get(info.kind) or getattr(model, "default_level", "word")
    features = model.features(encoded, level, **settings.feature_options)
    available = np.asarray(model.available(encoded, targets, features), dtype=bool)
    batch_size = settings.batch_size
    # a GPU's default chunks fill half its free memory (the CPU's fixed work budgets would starve it)
    max_memory = settings.max_memory if settings.max_memory is not None else default_memory_budget(getattr(model, "device", None))
    if batch_size is None and max_memory is not None:
        # perturbation and attention methods run forward only; CAM rows are sized for the gradient variants
        backward = info.kind in ("gradient", "path", "optimisation", "cam")
        per_row = model.bytes_per_row(encoded.length, backward=backward)
        batch_size = choose_batch_size(encoded.length, backward=backward, max_memory=max_memory, bytes_per_row=per_row)
        if settings.max_memory is not None and per_row > parse_memory(max_memory):
            warnings.warn(f"max_memory={max_memory} is below the estimated {per_row / 2 ** 20:.0f} MiB of one "
                          f"{'forward + backward' if backward else 'forward'} row of {encoded.length} positions; running "
                          "one row at a time, which may exceed the budget", SalienceWarning, stacklevel=_user_frame())
    ctx = Context(model, encoded, targets, features, available, batch_size, settings.seed, input_gradient, state)
    return _Prepared(item, ctx, prediction, level, squeeze, encode_options, Cost())


def _finish(settings: _Settings, prepared: _Prepared, result: Attribution, share: Cost) -> Explanation:
    """The Explanation of one input from the method's result; cost = preparation + its share of the run."""
    model, info, ctx, squeeze = settings.model, settings.info, prepared.ctx, prepared.squeeze
    encoded, targets, features = ctx.encoded, ctx.targets, ctx.features
    cost = _total(prepared.cost, share)
    scores = np.where(ctx.available, np.asarray(result.scores, dtype=np.float64), np.nan)
    notes = list(getattr(encoded, "notes", ())) + list(result.warnings)  # conversions of the input, then the method's
    if getattr(encoded, "truncated", False):
        notes.append(f"the input was truncated to the model's limit of {getattr(model, 'max_length', '?')} tokens")
    for note in notes:
        warnings.warn(f"{info.name}: {note}", SalienceWarning, stacklevel=_user_frame())
    # the parameters as given (shallow: asdict would deep-copy a module passed as ``layer``)
    given = {f.name: getattr(settings.algorithm, f.name) for f in dataclasses.fields(settings.algorithm)}
    params = {**given, "level": prepared.level, "seed": settings.seed,
              **settings.feature_options, **prepared.encode_options, **result.details}
    describe = getattr(model, "describe_input", None)
    extras = {**(dict(describe(encoded)) if callable(describe) else {}), **result.extras}
    return Explanation(
        input=getattr(encoded, "input", prepared.item),
        features=features if getattr(features, "layout", None) is not None else list(features),
        scores=scores[0] if squeeze else scores,
        method=info.name,
        params=params,
        model=model.name,
        target=targets[0],
        targets=targets,
        prediction=prepared.prediction,
        level=prepared.level,
        output_value=_squeeze(result.output_value, squeeze),
        baseline_value=_squeeze(result.baseline_value, squeeze),
        delta=_squeeze(result.delta, squeeze),
        cost=cost,
        truncated=bool(getattr(encoded, "truncated", False)),
        tokens=list(getattr(encoded, "tokens", [])),
        token_scores=None if result.position_scores is None else (result.position_scores[0] if squeeze else result.position_scores),
        warnings=notes,
        kind=getattr(model, "explanation_kind", "text"),
        extras=extras,
    )


def _user_frame() -> int:
    """The ``stacklevel`` that attributes a warning raised by the caller of this function to the
    first frame outside the salience package (the user's call of :func:`explain`), however deep
    the call chain inside it."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _measured(model: Adapter, run: Callable[[], T]) -> tuple[T, Cost]:
    """``run()`` and what it cost: the model's counted passes and calls, and the seconds."""
    counter = model.counter
    before = dataclasses.replace(counter)
    started = time.perf_counter()
    result = run()
    return result, Cost(forward_passes=counter.forward_passes - before.forward_passes,
                        backward_passes=counter.backward_passes - before.backward_passes,
                        model_calls=counter.model_calls - before.model_calls, seconds=time.perf_counter() - started,
                        cached_positions=getattr(counter, "cached_positions", 0) - getattr(before, "cached_positions", 0))


def _total(*costs: Cost) -> Cost:
    """The sum of ``costs``, field by field."""
    return Cost(*(sum(getattr(c, f.name) for c in costs) for f in dataclasses.fields(Cost)))


def _split(total: Cost, n: int) -> list[Cost]:
    """``total`` in ``n`` even shares: counts as integers (the first shares take the remainder, so
    they add up to the total), seconds as equal fractions."""
    def part(value: int, i: int) -> int:
        return value // n + (1 if i < value % n else 0)

    return [Cost(forward_passes=part(total.forward_passes, i), backward_passes=part(total.backward_passes, i),
                 model_calls=part(total.model_calls, i), seconds=total.seconds / n,
                 cached_positions=part(total.cached_positions, i)) for i in range(n)]


def _is_raw(model: Adapter, item: Any) -> bool:
    """False for an input the adapter already encoded (e.g. one a metric perturbed)."""
    encoded_type = getattr(model, "encoded_type", Encoded)
    return not isinstance(item, encoded_type)


def _squeeze(values: np.ndarray | None, squeeze: bool) -> float | np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return float(array[0]) if squeeze else array


def _progress(total: int, show: bool, label: str) -> Any:
    """A progress bar counting inputs (a context manager with ``update(n)``), or one that shows nothing."""
    if not show:
        return nullcontext(SimpleNamespace(update=lambda n: None))
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"explaining ({label})", unit="input")
