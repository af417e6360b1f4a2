"""Study: does attribution-guided steering (GrAInS, ``salience.steer``) make SmolLM2-135M-Instruct
answer "positive" more often than plain mean-difference steering, and at what cost in fluency?
(docs/studies/steering.md)

    flock /tmp/salience-cpu.lock env OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        .venv/bin/python scripts/study_steering.py --out results/steering/study.json

Task: 40 movie-review snippets of the VADER movie set (``salience.datasets.movie_snippets``) with
human valence |v| < 1 (near neutral) and at most 100 characters, drawn with
``numpy.random.default_rng(seed)``, split 20 train / 20 test. Prompt:
``"Review: <snippet>\\nIs this review positive or negative? Answer:"``; preferred " positive",
dispreferred " negative" (one token each).

Measured on the test prompts, per condition (unsteered; GrAInS, mean difference and a random unit
direction per layer, at each alpha):

- ``preferred rate``: the fraction of prompts where log p(" positive") > log p(" negative") at the
  answer position (the higher of the two label log-probabilities; the greedy next token is "\\n"
  for almost every prompt, so the greedy rate would read 0 everywhere);
- ``margin``: the mean of logit(" positive") - logit(" negative") there;
- ``ppl``: perplexity, under the UNsteered model, of the 20-token greedy continuations generated
  with the steering on (pooled: exp of the total negative log-likelihood over all generated tokens);
  the unsteered row is the unsteered model's perplexity of its own greedy text.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import salience
from salience.datasets.movie_snippets import load_movie_snippets

TEMPLATE = "Review: {text}\nIs this review positive or negative? Answer:"
GOOD, BAD = " positive", " negative"


def task(seed: int, count: int = 40) -> tuple[list[str], list[str]]:
    """20 train and 20 test prompts from near-neutral snippets (seeded)."""
    snippets = sorted((s for s in load_movie_snippets() if abs(s.valence) < 1.0 and len(s.text) <= 100), key=lambda s: int(s.id))
    chosen = np.random.default_rng(seed).choice(len(snippets), size=count, replace=False)
    prompts = [TEMPLATE.format(text=snippets[i].text) for i in chosen]
    return prompts[:count // 2], prompts[count // 2:]


def label_margins(lm: salience.CausalLM, prompts: list[str]) -> np.ndarray:
    """logit(" positive") - logit(" negative") at the answer position of each prompt (one forward each)."""
    good, bad = (lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (GOOD, BAD))
    margins = []
    with torch.no_grad():
        for prompt in prompts:
            ids = lm.encode(prompt, continuation=GOOD).input_ids[:-1]
            logits = lm.model(input_ids=ids[None]).logits[0, -1].double()
            margins.append(float(logits[good] - logits[bad]))
    return np.array(margins)


def generations(lm: salience.CausalLM, prompts: list[str], tokens: int) -> list[tuple[torch.Tensor, int]]:
    """Greedy continuations (with whatever steering is applied): (prompt + new ids, prompt length)."""
    out = []
    for prompt in prompts:
        encoded = lm.encode(prompt, max_new_tokens=tokens)
        out.append((encoded.input_ids, int(encoded.extras["prompt_length"])))
    return out


def perplexity(lm: salience.CausalLM, sequences: list[tuple[torch.Tensor, int]]) -> float:
    """exp(total NLL / total tokens) of the generated tokens under the (unsteered) model."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, start in sequences:
            log_p = torch.log_softmax(lm.model(input_ids=ids[None]).logits[0].double(), dim=-1)
            positions = torch.arange(start, len(ids))
            total -= float(log_p[positions - 1, ids[positions]].sum())
            count += len(positions)
    return float(np.exp(total / count))


def random_steering(like: salience.Steering, seed: int) -> salience.Steering:
    """A control: independent random unit directions (Gaussian, seeded) at the same layers."""
    rng = np.random.default_rng(seed)
    directions = {}
    for layer, direction in like.directions.items():
        v = rng.standard_normal(direction.shape)
        directions[layer] = v / np.linalg.norm(v)
    return salience.Steering(directions=directions, alpha=like.alpha, strategy="random", model=like.model)


def evaluate(lm: salience.CausalLM, steering: salience.Steering | None, alpha: float, test: list[str], tokens: int,
             fluency: bool) -> dict[str, Any]:
    started = time.perf_counter()
    if steering is None:
        margins = label_margins(lm, test)
        texts = generations(lm, test, tokens) if fluency else []
    else:
        with steering.applied(lm, alpha=alpha):
            margins = label_margins(lm, test)
            texts = generations(lm, test, tokens) if fluency else []
    row: dict[str, Any] = {"strategy": "none" if steering is None else steering.strategy, "alpha": alpha,
                           "preferred_rate": float((margins > 0).mean()), "margin": float(margins.mean()),
                           "margins": margins.tolist()}
    if fluency:
        row["ppl"] = perplexity(lm, texts)
        ids, start = texts[0]
        row["example"] = lm.tokenizer.decode(ids[start:].tolist(), skip_special_tokens=False)
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="6,7,8,9,10", help="decoder layers steered (comma-separated)")
    parser.add_argument("--alphas", default="10,25,50", help="steering strengths (hidden-state units)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="fixed Gauss-Legendre IG steps")
    parser.add_argument("--tokens", type=int, default=20, help="tokens generated per prompt for the fluency proxy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate-on", choices=("test", "train"), default="test",
                        help="'train' only to choose layers and alphas without looking at the test prompts")
    parser.add_argument("--no-fluency", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    layers = [int(v) for v in args.layers.split(",")]
    alphas = [float(v) for v in args.alphas.split(",")]
    started = time.perf_counter()
    lm = salience.load_model("zoo:smollm2-135m")
    train, test = task(args.seed)
    evaluated = test if args.evaluate_on == "test" else train
    grains = salience.steer(lm, train, GOOD, BAD, layers=layers, top_k=args.top_k, steps=args.steps)
    plain = salience.steer(lm, train, GOOD, BAD, layers=layers, strategy="mean_difference")
    control = random_steering(plain, args.seed)
    print(f"directions: GrAInS {grains.seconds:.1f} s, mean difference {plain.seconds:.1f} s")
    cosines = {layer: float(grains.directions[layer] @ plain.directions[layer]) for layer in layers}
    print("cos(GrAInS, mean difference) per layer:", {k: round(v, 3) for k, v in cosines.items()})
    print("mean token norm per layer:", {k: round(v, 1) for k, v in grains.norms.items()})
    rows = [evaluate(lm, None, 0.0, evaluated, args.tokens, not args.no_fluency)]
    for steering in (grains, plain, control):
        for alpha in alphas:
            rows.append(evaluate(lm, steering, alpha, evaluated, args.tokens, not args.no_fluency))
    fluency = not args.no_fluency
    print(f"\nevaluated on {len(evaluated)} {args.evaluate_on} prompts; layers {layers}, top_k {args.top_k}, IG steps {args.steps}")
    print("| steering | alpha | preferred rate | mean margin (logit) |" + (" ppl (unsteered model) |" if fluency else ""))
    print("|---|---:|---:|---:|" + ("---:|" if fluency else ""))
    for row in rows:
        line = f"| {row['strategy']} | {row['alpha']:g} | {row['preferred_rate']:.2f} | {row['margin']:+.3f} |"
        print(line + (f" {row['ppl']:.2f} |" if fluency else ""))
    if fluency:
        print("\nfirst test prompt's continuation per condition:")
        for row in rows:
            print(f"  {row['strategy']} alpha={row['alpha']:g}: {row['example']!r}")
    picks = [(p["positive"], p["negative"]) for p in grains.picks[:3]]
    for positive, negative in picks:
        print("  GrAInS picks +", [q["token"] for q in positive], " -", [q["token"] for q in negative])
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s; torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cosines": cosines,
                                        "norms": grains.norms, "picks": grains.picks, "rows": rows,
                                        "grains_seconds": grains.seconds, "total_seconds": total}, indent=1))


if __name__ == "__main__":
    main()
