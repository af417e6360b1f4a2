"""Command line: ``salience explain``, ``salience methods``, the evaluation commands
``salience evaluate``, ``salience bench`` and ``salience runs`` (see :mod:`salience.evaluate.commands`)
and ``salience patch`` (:mod:`salience.patching.commands`).

Errors a user can cause print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salience.core.target import OUTPUTS
from salience.errors import ParameterError, SalienceError, indefinite
from salience.evaluate.commands import add_commands
from salience.models.prompt_options import parse_prompt_options
from salience.patching.commands import add_commands as add_patch_commands
from salience.serve.commands import add_commands as add_serve_commands
from salience.steering_commands import add_commands as add_steer_commands

BUNDLE_SCHEMA = "salience.explanations/1"


def _parse_params(items: Sequence[str], method_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``KEY=VALUE`` (every method that has KEY) or ``METHOD.KEY=VALUE`` -> per-method params."""
    from salience.core.registry import get_method

    infos = [get_method(name) for name in method_names]
    result: dict[str, dict[str, Any]] = {info.name: {} for info in infos}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--param {item!r} is not KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        scope, dot, name = key.rpartition(".")
        targets = [get_method(scope)] if dot else [i for i in infos if key in i.parameters()]
        if not targets:
            raise ParameterError(f"no chosen method has a parameter {key!r}")
        for info in targets:
            if info.name not in result:
                raise ParameterError(f"--param {item!r} names method {scope!r}, which is not among the --method choices")
            result[info.name][name if dot else key] = value
    return result


def _inputs(args: argparse.Namespace, model: Any) -> list[Any]:
    """The inputs of ``salience explain`` for this kind of model; a flag for another kind is an error."""
    kind = getattr(model, "kind", "text classifier")
    given = {"--text/--pair": [*args.text, *[tuple(p) for p in args.pair]], "--image": list(args.image),
             "--prompt/--chat": [*args.prompt, *[_chat(value) for value in args.chat]]}
    if args.context is not None or args.query is not None:  # ContextCite's input: one prompt built from them
        if any(given.values()):
            raise ParameterError("--context/--query build the prompt; give them or inputs (--prompt, --chat, --text, ...), not both")
        return [None]
    wanted = {"image classifier": "--image", "causal LM": "--prompt/--chat"}.get(kind, "--text/--pair")
    for flag, values in given.items():
        if values and flag != wanted:
            raise ParameterError(f"{flag} was given, but {args.model} is {indefinite(kind)}: give {wanted}")
    if not given[wanted]:
        raise ParameterError(f"give at least one {wanted} for {args.model} ({indefinite(kind)})")
    return given[wanted]


def _chat(value: str) -> list[dict[str, Any]]:
    """``--chat``: inline JSON messages (``[{"role": "user", "content": "..."}]``) or a JSON file of them
    (a list, or an object with "messages")."""
    source = value if value.lstrip().startswith(("[", "{")) else None
    if source is None:
        try:
            source = Path(value).read_text(encoding="utf-8")
        except OSError as error:
            raise ParameterError(f"--chat {value!r} is neither JSON messages nor a readable file ({error.strerror})") from None
    try:
        data = json.loads(source)
    except json.JSONDecodeError as error:
        raise ParameterError(f"--chat {value[:40]!r}: not valid JSON ({error.msg} at character {error.pos})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ParameterError("--chat holds a list of {\"role\": ..., \"content\": ...} messages (or {\"messages\": [...]})")
    return messages


def _input_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options for the adapter (generation, contrast, image features), only those the user set."""
    options = {"max_new_tokens": args.max_new_tokens, "continuation": args.continuation, "contrast": args.contrast,
               "patch_size": args.patch_size, "stride": args.stride, "n_segments": args.n_segments,
               "spans": [_span(text) for text in args.span] or None,
               "context": args.context, "query": args.query, "sources": args.sources}
    return {key: value for key, value in options.items() if value is not None}


def _span(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise ParameterError(f"--span {text!r} is not START:END (character offsets)")
    return int(start), int(end)


def _explain(args: argparse.Namespace) -> int:
    import salience
    from salience.core.registry import get_method
    from salience.render.html import explanation_html
    from salience.render.terminal import print_explanations

    method_names = args.method or ["sig"]
    params = _parse_params(args.param, method_names)
    model: Any = salience.load_model(args.model, max_length=args.max_length)
    if args.zero_shot:
        labels = [label.strip() for label in args.zero_shot.split(",") if label.strip()]
        model = salience.ZeroShotClassifier(model, labels, template=args.template)
    template, labels = parse_prompt_options(args.prompt_template, args.labels)
    if template is not None and labels is not None:
        model = _prompt_classifier(model, template, labels)
    inputs = _inputs(args, model)
    explanations: list[salience.Explanation] = []
    for name in method_names:
        info = get_method(name)
        for item in inputs:
            result = salience.explain(
                model, item, method=name, target=args.target, output=args.output, level=args.level,
                batch_size=args.batch_size, max_memory=args.max_memory, truncate=args.truncate, seed=args.seed,
                params=params[info.name], **_input_options(args),
            )
            assert isinstance(result, salience.Explanation)  # one input -> one Explanation
            explanations.append(result.aggregate(args.aggregate) if args.aggregate else result)
    from rich.console import Console

    if args.png:
        if not all(e.kind == "image" for e in explanations):
            raise ParameterError("--png draws image explanations; use --html for texts and generations")
        _png(explanations, args.png)
    print_explanations(explanations, Console(no_color=args.no_color, highlight=False))
    if args.png:
        print(f"wrote {args.png}")
    if args.html:
        Path(args.html).write_text(explanation_html(explanations), encoding="utf-8")
        print(f"wrote {args.html}")
    if args.json:
        bundle = {"schema": BUNDLE_SCHEMA, "explanations": [e.to_dict() for e in explanations]}
        Path(args.json).write_text(json.dumps(bundle, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _prompt_classifier(model: Any, template: Any, labels: dict[str, str]) -> Any:
    """``--prompt-template`` (a text with {text}, backslash escapes \\n \\t read; or a JSON list of chat
    messages) and ``--labels`` (NAME=VERBALISATION,... or a JSON object; a bare NAME is verbalised
    as ' NAME'), parsed, turn the --model causal LM into a :class:`~salience.PromptClassifier`."""
    import salience

    if getattr(model, "kind", None) != "causal LM":
        raise ParameterError(f"--prompt-template needs a causal LM as --model, and {model.name} is {indefinite(model.kind)}")
    return salience.PromptClassifier(model, template, labels)


def _png(explanations: Sequence[Any], path: str) -> None:
    from salience.render.png import explanation_png

    explanation_png(list(explanations), path)


def _methods(_: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from salience.core.registry import all_methods

    table = Table(title="Salience attribution methods")
    for column in ("name", "aliases", "kind", "what it computes", "cost (model passes)"):
        table.add_column(column)
    for info in all_methods():
        table.add_row(info.name, ", ".join(info.aliases), info.kind, info.summary, info.cost)
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="salience", description="Explain model predictions and evaluate explanations.")
    commands = parser.add_subparsers(dest="command", required=True)
    explain = commands.add_parser("explain", help="explain a model's prediction on texts, images or prompts")
    explain.add_argument("--model", required=True,
                         help="zoo:minilm-l6-sentiment, zoo:efficientnet-lite0, zoo:smollm2-135m, a local model directory, or a hub id")
    explain.add_argument("--text", action="append", default=[], help="a text to explain (repeatable)")
    explain.add_argument("--pair", nargs=2, action="append", default=[], metavar=("PREMISE", "HYPOTHESIS"),
                         help="a text pair to explain (repeatable)")
    explain.add_argument("--image", action="append", default=[], help="an image file to explain (image models; repeatable)")
    explain.add_argument("--prompt", action="append", default=[], help="a prompt whose continuation to explain (causal LMs)")
    explain.add_argument("--max-new-tokens", type=int, help="causal LMs: tokens to generate greedily and explain")
    explain.add_argument("--continuation", help="causal LMs: explain this continuation instead of generating one")
    explain.add_argument("--chat", action="append", default=[], metavar="JSON",
                         help="causal LMs: chat messages (inline JSON or a JSON file) to which the model's chat template "
                              "is applied (repeatable)")
    explain.add_argument("--context", help="causal LMs: a document; the prompt is 'Context: ... Query: ...' and the features "
                                           "are its --sources (e.g. --method context_cite)")
    explain.add_argument("--query", help="causal LMs, with --context: the question asked about it (may be empty)")
    explain.add_argument("--sources", choices=["sentence", "word"], help="with --context: the features (default: sentence)")
    explain.add_argument("--contrast", help="causal LMs: a foil text aligned with the continuation token by token: "
                                            "explain output(token) - output(foil)")
    explain.add_argument("--patch-size", type=int, help="images, --level patch: square patch side in pixels")
    explain.add_argument("--stride", type=int, help="images, --level patch: step between patches in pixels")
    explain.add_argument("--n-segments", type=int, help="images, --level superpixel: SLIC segments wanted")
    explain.add_argument("--method", action="append", help="method name or alias (repeatable; default sig); see `salience methods`")
    explain.add_argument("--param", action="append", default=[], metavar="[METHOD.]KEY=VALUE", help="method parameter (repeatable)")
    explain.add_argument("--target", help="class index or label name (default: the predicted class)")
    explain.add_argument("--zero-shot", metavar="LABEL,LABEL,...",
                         help="classify into these labels with the --model NLI model (hypothesis template)")
    explain.add_argument("--template", default="This example is {}.", help="zero-shot hypothesis template")
    explain.add_argument("--prompt-template", metavar="TEMPLATE",
                         help="causal LMs as zero-shot classifiers: a prompt with {text} (\\n for a line break) or a JSON "
                              "list of chat messages; class scores = log-probabilities of the --labels' verbalisations after it")
    explain.add_argument("--labels", metavar="NAME=VERBALISATION,...",
                         help='with --prompt-template: e.g. negative=" negative",positive=" positive" (a bare NAME means " NAME"; '
                              "or a JSON object)")
    explain.add_argument("--output", choices=list(OUTPUTS),
                         help="what is explained (default: log_odds for classifiers, probability for causal LMs)")
    explain.add_argument("--span", action="append", default=[], metavar="START:END",
                         help="with --level span: a character span of the text or prompt as one feature (repeatable)")
    explain.add_argument("--level", choices=["word", "token", "span", "pixel", "patch", "superpixel"],
                         help="features: word/token (text, prompts), pixel/patch/superpixel (images); default: the model's")
    explain.add_argument("--aggregate", choices=["word", "sentence"],
                         help="texts and generations: sum the feature scores into words or sentences (no recomputation)")
    explain.add_argument("--truncate", action="store_true", help="cut texts over the model's limit instead of failing")
    explain.add_argument("--max-length", type=int, help="token limit (default: the model's)")
    explain.add_argument("--batch-size", type=int, help="rows per model call (default: chosen by Salience)")
    explain.add_argument("--max-memory", help="memory budget for one chunk of model work, e.g. 2GB")
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--html", help="write a self-contained HTML file")
    explain.add_argument("--png", help="image models: write the heatmap overlays (one panel per explanation)")
    explain.add_argument("--json", help="write the explanations as JSON")
    explain.add_argument("--no-color", action="store_true", help="plain text output")
    explain.set_defaults(run=_explain)
    listing = commands.add_parser("methods", help="list every attribution method with its cost")
    listing.set_defaults(run=_methods)
    add_commands(commands)
    add_serve_commands(commands)
    add_patch_commands(commands)
    add_steer_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # explanations carry their warnings; printed once
            return int(args.run(args))
    except SalienceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
