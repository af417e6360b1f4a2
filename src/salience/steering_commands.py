"""``salience steer`` (registered by :mod:`salience.cli` with :func:`add_commands`): build a steering
direction of a causal LM from training prompts and a preferred / dispreferred continuation
(:func:`salience.steer`), or read one saved earlier (``--load``); print what was made, optionally
save it (safetensors or JSON, never pickle) and print greedy continuations of the prompts without
and with the steering (``--generate N``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from salience.errors import InputError, ParameterError, indefinite

STRATEGY_CHOICES = ("grains", "mean_difference")
BUILD_FLAGS = {"preferred": "--preferred", "preferred_file": "--preferred-file", "dispreferred": "--dispreferred",
               "dispreferred_file": "--dispreferred-file", "layers": "--layers", "top_k": "--top-k", "strategy": "--strategy",
               "method": "--method", "steps": "--steps"}


def add_commands(commands: Any) -> None:
    """Add ``steer`` to the ``salience`` subparsers."""
    steer = commands.add_parser(
        "steer", help="steer a causal LM along a direction made from preferred vs dispreferred continuations",
        description="Build a steering direction per decoder layer (GrAInS: hidden states of the prompt tokens a contrastive "
                    "attribution ranks highest and lowest; or the plain mean difference of the continuations' hidden states), "
                    "or --load one; at generation every position's hidden state at those layers is shifted by alpha x "
                    "direction and rescaled to its norm. See docs/steering.md.")
    steer.add_argument("--model", required=True, help="zoo:smollm2-135m, a local causal LM directory or a hub id")
    steer.add_argument("--prompt", action="append", default=[],
                       help="a prompt (repeatable): a training prompt when building, a prompt to continue with --generate")
    steer.add_argument("--prompts", metavar="FILE", help="prompts from a file: a JSON list of texts, or one prompt per line")
    steer.add_argument("--preferred", action="append", default=[],
                       help="the preferred continuation: one for every prompt, or one per prompt in order (repeatable)")
    steer.add_argument("--dispreferred", action="append", default=[],
                       help="the dispreferred continuation, aligned with --preferred token by token (repeatable)")
    steer.add_argument("--preferred-file", metavar="FILE", help="preferred continuations from a file (JSON list or one a line)")
    steer.add_argument("--dispreferred-file", metavar="FILE", help="dispreferred continuations from a file (JSON list or one a line)")
    steer.add_argument("--strategy", choices=STRATEGY_CHOICES, help="grains (attribution-guided, default) or mean_difference")
    steer.add_argument("--layers", help="decoder-layer indices, 0-based: e.g. 6,7,8 or 6-10 (default: every layer)")
    steer.add_argument("--top-k", type=int, help="GrAInS: prompt tokens in each of the positive and negative sets (default 3)")
    steer.add_argument("--method", help="GrAInS: the attribution method (default integrated_gradients)")
    steer.add_argument("--steps", type=int, help="GrAInS: the attribution's steps (default: adaptive integrated gradients)")
    steer.add_argument("--alpha", type=float,
                       help="strength in hidden-state units (default 1.0 when building; with --load, the saved one)")
    steer.add_argument("--generate", type=int, metavar="N", help="print N greedy tokens per prompt, unsteered and steered")
    steer.add_argument("--save", metavar="PATH", help="write the steering: PATH.json as JSON, any other suffix as safetensors")
    steer.add_argument("--load", metavar="PATH", help="read a steering written by --save instead of building one")
    steer.add_argument("--no-color", action="store_true", help="plain text output")
    steer.set_defaults(run=_steer)


def _steer(args: argparse.Namespace) -> int:
    from rich.console import Console

    import salience

    prompts = _texts(args.prompt, args.prompts, "--prompt", "--prompts")
    alpha = _alpha(args.alpha)
    if args.generate is not None and args.generate < 1:
        raise ParameterError(f"--generate takes a positive number of tokens, got {args.generate}")
    if args.load is not None:
        given = [flag for key, flag in BUILD_FLAGS.items() if getattr(args, key) not in (None, [])]
        if given:
            raise ParameterError(f"--load reads a saved steering; {', '.join(given)} build one: give one or the other")
        if args.generate is not None and not prompts:
            raise InputError("--generate needs at least one --prompt or a --prompts file")
        steering = salience.Steering.load(args.load)
        lm = _causal_lm(salience.load_model(args.model), args.model)
    else:
        if not prompts:
            raise InputError("give at least one training prompt (--prompt or --prompts FILE)")
        preferred = _continuations(args.preferred, args.preferred_file, "--preferred", len(prompts))
        dispreferred = _continuations(args.dispreferred, args.dispreferred_file, "--dispreferred", len(prompts))
        layers = _layers(args.layers)
        options: dict[str, Any] = {key: value for key, value in (("top_k", args.top_k), ("strategy", args.strategy),
                                                                  ("method", args.method), ("steps", args.steps),
                                                                  ("alpha", alpha)) if value is not None}
        lm = _causal_lm(salience.load_model(args.model), args.model)
        steering = salience.steer(lm, prompts, preferred, dispreferred, layers=layers, **options)
    console = Console(no_color=args.no_color, highlight=False, width=max(Console().width, 100))
    _print_steering(console, steering, lm.name)
    if args.save:
        console.print(f"wrote {steering.save(args.save)}")
    if args.generate is not None:
        strength = steering.alpha if alpha is None else alpha
        for prompt in prompts:
            plain = str(lm.encode(prompt, max_new_tokens=args.generate).extras["continuation"])
            steered = steering.generate(lm, prompt, max_new_tokens=args.generate, alpha=strength)
            console.print(f"\nprompt: {prompt!r}")
            console.print(f"  unsteered:            {plain!r}")
            console.print(f"  steered (alpha {strength:g}): {steered!r}")
    return 0


# ------------------------------------------------------------------------------------- inputs
def _texts(values: list[str], path: str | None, flag: str, file_flag: str) -> list[str]:
    """Texts given inline (repeatable ``flag``) followed by those of the file ``path``; a text that is
    empty or only spaces is an error."""
    texts = list(values)
    if path is not None:
        texts += _read_texts(path, file_flag)
    for index, text in enumerate(texts):
        if not text.strip():
            raise InputError(f"{flag}/{file_flag}: text {index} is empty")
    return texts


def _read_texts(path: str, flag: str) -> list[str]:
    """A JSON list of strings (a ``.json`` file, or any file whose content starts with ``[``), else one
    text per non-empty line (the line break removed, leading spaces kept: continuations often start
    with one)."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot read it ({error.strerror})") from None
    if path.endswith(".json") or content.lstrip().startswith("["):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as error:
            raise InputError(f"{flag} {path}: not valid JSON ({error.msg} at character {error.pos})") from None
        if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise InputError(f"{flag} {path}: a JSON file of texts holds a list of strings")
        texts = data
    else:
        texts = [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise InputError(f"{flag} {path} holds no texts")
    return texts


def _continuations(values: list[str], path: str | None, flag: str, prompts: int) -> str | list[str]:
    """One continuation for every prompt (returned as a string) or one per prompt."""
    if values and path is not None:
        raise ParameterError(f"give {flag} or {flag}-file, not both")
    texts = _read_texts(path, f"{flag}-file") if path is not None else values
    if not texts:
        raise InputError(f"give {flag} (one text for every prompt, or one per prompt) or {flag}-file")
    if any(not text.strip() for text in texts):
        raise InputError(f"{flag}: a continuation is empty")
    if len(texts) == 1:
        return texts[0]
    if len(texts) != prompts:
        raise InputError(f"{flag}: {len(texts)} continuations but {prompts} prompt{'' if prompts == 1 else 's'}; "
                         "give one for all prompts or one per prompt")
    return texts


def _layers(text: str | None) -> list[int] | None:
    """``6,7,8``, ``6-10`` (inclusive) or a mix; None: every layer."""
    if text is None:
        return None
    layers: list[int] = []
    for part in text.split(","):
        start, dash, end = part.strip().partition("-")
        if not start.isdigit() or (dash and not end.isdigit()):
            raise ParameterError(f"--layers {text!r} is not a list of layer indices such as 6,7,8 or 6-10")
        first, last = int(start), int(end) if dash else int(start)
        if last < first:
            raise ParameterError(f"--layers {text!r}: the range {part.strip()} is empty")
        layers += range(first, last + 1)
    return layers


def _alpha(alpha: float | None) -> float | None:
    if alpha is not None and not math.isfinite(alpha):
        raise ParameterError(f"--alpha must be a finite number, got {alpha}")
    return alpha


def _causal_lm(model: Any, name: str) -> Any:
    import salience

    if not isinstance(model, salience.CausalLM):
        raise ParameterError(f"salience steer needs a causal LM, and {name} is {indefinite(getattr(model, 'kind', type(model).__name__))}")
    return model


# ------------------------------------------------------------------------------------- output
def _print_steering(console: Any, steering: Any, model: str) -> None:
    from rich.table import Table

    made = f"{steering.strategy}" + (f", {steering.method}, top_k {steering.top_k}" if steering.strategy == "grains" else "")
    console.print(f"steering of {steering.model} ({made}; {steering.prompts} training prompts, {steering.seconds:.1f} s); "
                  f"default alpha {steering.alpha:g}")
    if steering.model != model:
        console.print(f"note: it was made for {steering.model!r} and is applied to {model!r}")
    layers = Table(title="directions (unit vectors; alpha is in the units of the hidden-state norm)")
    for column in ("layer", "mean hidden-state norm", "norm of the mean difference"):
        layers.add_column(column)
    for layer in steering.layers:
        norm, magnitude = steering.norms.get(layer), steering.magnitudes.get(layer)
        layers.add_row(str(layer), "—" if norm is None else f"{norm:.4g}", "—" if magnitude is None else f"{magnitude:.4g}")
    console.print(layers)
    if steering.picks:
        picks = Table(title="GrAInS tokens per training prompt (contrastive scores, logit units)")
        for column in ("prompt", "positive", "negative", "completeness delta"):
            picks.add_column(column)
        for pick in steering.picks:
            delta = pick.get("completeness_delta")
            picks.add_row(repr(pick["prompt"]), _tokens(pick["positive"]), _tokens(pick["negative"]),
                          "—" if delta is None else f"{delta:.3g}")
        console.print(picks)


def _tokens(chosen: list[dict[str, Any]]) -> str:
    return ", ".join(f"{item['token']!r} {item['score']:+.3g}" for item in chosen)
