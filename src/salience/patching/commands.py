"""``salience patch`` (registered by :mod:`salience.cli` with :func:`add_commands`): attribution or
activation patching between a clean and a corrupted input, printed as layer tables, optionally
written as JSON and PNG."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from salience.core.target import OUTPUTS
from salience.patching.run import KINDS, METHODS


def add_commands(commands: Any) -> None:
    """Add ``patch`` to the ``salience`` subparsers."""
    patch = commands.add_parser("patch", help="score layers and attention heads by patching a corrupted input into a clean one",
                                description="Attribution patching (AtP, the gradient estimate: 2 forward + 1 backward) or "
                                            "exact activation patching (one forward row per component) of the residual "
                                            "stream (layer x position) and the attention heads (layer x head).")
    patch.add_argument("--model", required=True, help="zoo:smollm2-135m, zoo:minilm-l6-sentiment, a local model directory or a hub id")
    patch.add_argument("--clean", required=True, help="the clean input (a prompt or a text)")
    patch.add_argument("--corrupted", required=True, help="the corrupted input, of the same token length")
    patch.add_argument("--continuation", help="causal LMs: the target token (the metric reads its output)")
    patch.add_argument("--contrast", help="causal LMs: a foil token; the metric is then the logit difference target - foil")
    patch.add_argument("--target", help="class index or label (classifiers), or the continuation token's index")
    patch.add_argument("--output", choices=list(OUTPUTS), help="the metric's output kind (default: logit with --contrast, "
                                                               "else log_probability for causal LMs, log_odds for classifiers)")
    patch.add_argument("--method", choices=list(METHODS), default="atp", help="atp (gradient estimate, default), relp (AtP with AttnLRP's "
                                                                             "modified gradient; logit metrics) or exact")
    patch.add_argument("--components", default=",".join(KINDS), help=f"comma-separated among {', '.join(KINDS)} (default both)")
    patch.add_argument("--scale", type=float, default=1.0, help="patch part-way: a_clean + scale (a_corrupt - a_clean)")
    patch.add_argument("--json", help="write the result as JSON")
    patch.add_argument("--png", help="write one heatmap per component kind (PATH with the kind before the suffix)")
    patch.add_argument("--no-color", action="store_true", help="plain text output")
    patch.set_defaults(run=_patch)


def _patch(args: argparse.Namespace) -> int:
    from rich.console import Console

    import salience
    from salience.patching.run import attribution_patching

    model = salience.load_model(args.model)
    options = {k: v for k, v in (("continuation", args.continuation), ("contrast", args.contrast)) if v is not None}
    target: Any = int(args.target) if args.target is not None and args.target.lstrip("-").isdigit() else args.target
    result = attribution_patching(model, args.clean, args.corrupted, target=target, output=args.output,
                                  components=[k.strip() for k in args.components.split(",") if k.strip()],
                                  method=args.method, scale=args.scale, **options)
    console = Console(no_color=args.no_color, width=max(Console().width, 100))
    kinds = [k for k in KINDS if getattr(result, k) is not None]
    for kind in kinds:
        console.print(result.table(kind))
    if args.json:
        Path(args.json).write_text(result.to_json())
        console.print(f"wrote {args.json}")
    if args.png:
        base = Path(args.png)
        for kind in kinds:
            path = result.to_png(base.with_name(f"{base.stem}-{kind}{base.suffix or '.png'}"), kind)
            console.print(f"wrote {path}")
    return 0
