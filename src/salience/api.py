"""The entry point: ``explain(model, inputs, method=...)`` -> Explanation(s)."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

from salience.core.batching import choose_batch_size
from salience.core.explanation import Cost, Explanation
from salience.core.registry import MethodInfo, all_methods, get_method
from salience.core.target import check_output, resolve_target
from salience.errors import ParameterError
from salience.methods.base import Context
from salience.models.base import Adapter, Encoded

TextInput = str | tuple[str, str] | Encoded
LEVELS = ("word", "token")


class SalienceWarning(UserWarning):
    """An explanation was computed but may be inaccurate (large completeness delta, truncation)."""


def methods() -> list[MethodInfo]:
    """Every registered method (name, aliases, summary, cost, parameters)."""
    return all_methods()


def explain(
    model: Adapter,
    inputs: TextInput | Sequence[TextInput],
    method: str = "integrated_gradients",
    *,
    target: int | str | None = None,
    output: str = "probability",
    level: str = "word",
    batch_size: int | None = None,
    max_memory: int | str | None = None,
    truncate: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    params: dict[str, Any] | None = None,
    **method_params: Any,
) -> Explanation | list[Explanation]:
    """Explain ``model``'s output on one input (a text, a (premise, hypothesis) pair, or an already
    encoded input, e.g. one a metric perturbed) or a list of them.

    ``target``: class index or label name (default: the predicted class). ``output``: what is
    explained, "probability" (default), "logit" or "log_probability". ``level``: "word" (subword
    scores summed per word, special tokens left out) or "token". ``batch_size``: rows per model
    call (default: chosen from the input length); ``max_memory`` (e.g. "2GB"): instead, size the
    chunks so that the activations of one chunk stay within this budget. Method parameters go in ``params`` or as keywords.
    Returns one Explanation for one input, a list for a list.
    """
    info = get_method(method)
    algorithm = info.build({**(params or {}), **method_params})
    if level not in LEVELS:
        raise ParameterError(f"unknown level {level!r}; choose 'word' or 'token'")
    check_output(output)
    single = isinstance(inputs, (str, tuple, Encoded))
    items: list[TextInput] = [inputs] if single else list(inputs)  # type: ignore[list-item,arg-type]
    show = progress if progress is not None else len(items) > 1
    results = [
        _explain_one(model, item, info, algorithm, target, output, level, batch_size, max_memory, truncate, seed)
        for item in _progress(items, show, info.name)
    ]
    return results[0] if single else results


def _explain_one(model: Adapter, item: TextInput, info: MethodInfo, algorithm: Any, target: int | str | None,
                 output: str, level: str, batch_size: int | None, max_memory: int | str | None, truncate: bool,
                 seed: int) -> Explanation:
    counter = model.counter  # type: ignore[attr-defined]
    before = dataclasses.replace(counter)
    started = time.perf_counter()
    encoded = item if isinstance(item, Encoded) else model.encode(item, truncate=truncate)
    input_gradient = None
    if getattr(algorithm, "uses_input_gradient", False) and hasattr(model, "predict_with_input_gradient"):
        # one forward + backward gives the prediction, the target and the gradient at the input
        prediction, resolved, value, gradient = model.predict_with_input_gradient(
            encoded, lambda predicted: resolve_target(target, model.labels, predicted, output))
        input_gradient = (value, gradient)
    else:
        prediction = model.predict(encoded)
        resolved = resolve_target(target, model.labels, prediction, output)
    if batch_size is None and max_memory is not None:
        backward = info.kind in ("gradient", "path")  # perturbation and attention methods run forward only
        per_row = model.bytes_per_row(encoded.length, backward=backward)  # type: ignore[attr-defined]
        batch_size = choose_batch_size(encoded.length, backward=backward, max_memory=max_memory, bytes_per_row=per_row)
    ctx = Context(model, encoded, resolved, encoded.features(level), batch_size, seed, input_gradient)
    result = algorithm.attribute(ctx)
    cost = Cost(
        forward_passes=counter.forward_passes - before.forward_passes,
        backward_passes=counter.backward_passes - before.backward_passes,
        model_calls=counter.model_calls - before.model_calls,
        seconds=time.perf_counter() - started,
    )
    notes = list(result.warnings)
    if encoded.truncated:
        notes.append(f"the input was truncated to the model's limit of {model.max_length} tokens")  # type: ignore[attr-defined]
    for note in notes:
        warnings.warn(f"{info.name}: {note}", SalienceWarning, stacklevel=3)
    params = {**dataclasses.asdict(algorithm), "level": level, "seed": seed, **result.details}
    return Explanation(
        input=encoded.input,
        features=ctx.features,
        scores=result.scores,
        method=info.name,
        params=params,
        model=model.name,
        target=resolved,
        prediction=prediction,
        level=level,
        output_value=result.output_value,
        baseline_value=result.baseline_value,
        delta=result.delta,
        cost=cost,
        truncated=encoded.truncated,
        tokens=list(encoded.tokens),
        token_scores=result.token_scores,
        warnings=notes,
    )


def _progress(items: list[TextInput], show: bool, label: str) -> Any:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"explaining ({label})", unit="input")
