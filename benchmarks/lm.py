"""Causal LM benchmark: SmolLM2-135M, a 64-token prompt, 16 greedily generated tokens. Salience's
shared passes (every generated token explained from one set of rows) against 16 independent
per-target runs (the prompt plus the continuation up to that token, teacher-forced, one target),
and against Captum's LLMAttribution / LLMGradientAttribution and Inseq (``--parts inseq``; Inseq
installed with ``pip install --no-deps inseq==0.7.1``, as scripts/setup.sh's test mode does). See
benchmarks/README.md.

    OMP_NUM_THREADS=1 python benchmarks/lm.py            # writes benchmarks/RESULTS-lm.md
    OMP_NUM_THREADS=1 python benchmarks/lm.py --quick    # 16-token prompt, 4 new tokens (smoke test)
    OMP_NUM_THREADS=1 python benchmarks/lm.py --prompt-tokens 128 --new-tokens 16 --parts inseq --output ...
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RowCounter, Rows, fmt_s, load_average, log, median, run_and_write, table, timed  # noqa: E402

import salience  # noqa: E402
from salience.datasets.movie_snippets import split_movie_snippets  # noqa: E402

PACKAGES = ("salience", "torch", "transformers", "captum", "inseq", "numpy")
# the first test-split sentence from which the prompt is built (checked at run time: the 64-token
# cut re-tokenises to itself and every prefix of the greedy continuation re-tokenises to its own
# tokens, so the per-target runs can be given as text; the earlier starts end in "\n\n", which
# the model generates as two tokens and the tokenizer reads as one)
PROMPT_START = 6


@dataclass
class Result:
    name: str
    runs: list[float] = field(default_factory=list)
    rows: Rows = field(default_factory=Rows)
    cost: tuple[int, int, int] | None = None  # Salience's Explanation.cost: forward, backward, calls (summed per target)
    explanation: Any = None  # the shared run's Explanation
    scores: np.ndarray | None = None  # (T, F) on the shared features; NaN where not available
    note: str = ""

    @property
    def seconds(self) -> float | None:
        return median(self.runs) if self.runs else None


# ----------------------------------------------------------------------------------------- input
def prompt_of_length(tokenizer: Any, length: int, start: int) -> str | None:
    """Test-split movie sentences from ``start`` on, cut after exactly ``length`` tokens at a word
    boundary (the next token starts a word), if that cut re-tokenises to the same ids."""
    sentences = [s.text for s in split_movie_snippets()["test"]]
    text = " ".join(sentences[start:start + 40])
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) <= length or not tokenizer.convert_ids_to_tokens(ids[length]).startswith("Ġ"):
        return None
    prompt = text[: offsets[length - 1][1]]
    return prompt if tokenizer(prompt)["input_ids"] == ids[:length] else None


def prefixes_round_trip(lm: salience.CausalLM, prompt: str, encoded: Any) -> list[str] | None:
    """The continuation's text up to each token, if each re-tokenises to exactly those tokens."""
    start = int(encoded.extras["prompt_length"])
    ids = encoded.input_ids[start:].tolist()
    texts = []
    for t in range(len(ids)):
        text = lm.tokenizer.decode(ids[: t + 1], clean_up_tokenization_spaces=False)
        if lm.encode(prompt, continuation=text).input_ids[start:].tolist() != ids[: t + 1]:
            return None
        texts.append(text)
    return texts


def build_input(lm: salience.CausalLM, prompt_tokens: int, new_tokens: int, counter: RowCounter) -> tuple[str, Any, list[str], float, Rows]:
    """The prompt, its greedy continuation (encoded), the continuation prefixes as texts, and the
    generation's seconds and rows."""
    for start in [PROMPT_START, *range(200)]:
        prompt = prompt_of_length(lm.tokenizer, prompt_tokens, start)
        if prompt is None:
            continue
        seconds, encoded, rows = timed(lambda p=prompt: lm.encode(p, max_new_tokens=new_tokens), counter)
        if encoded.length - int(encoded.extras["prompt_length"]) != new_tokens:
            continue  # stopped at an end token
        prefixes = prefixes_round_trip(lm, prompt, encoded)
        if prefixes is not None:
            if start != PROMPT_START:
                log(f"note: prompt built from sentence {start}, not {PROMPT_START}")
            return prompt, encoded, prefixes, seconds, rows
    raise RuntimeError("no prompt whose continuation prefixes re-tokenise to themselves")


# ------------------------------------------------------------------------------------ Salience
def salience_shared(lm: salience.CausalLM, encoded: Any, method: str, counter: RowCounter, repeats: int,
                    **params: Any) -> Result:
    """One explanation of every generated token on the already generated input."""
    result = Result(f"Salience {method}, shared (T targets)")
    for _ in range(repeats):
        seconds, e, rows = timed(lambda: salience.explain(lm, encoded, method, output="probability", **params), counter)
        result.runs.append(seconds)
    result.rows, result.explanation, result.scores = rows, e, np.asarray(e.scores, dtype=np.float64)
    result.cost = (e.cost.forward_passes, e.cost.backward_passes, e.cost.model_calls)
    return result


def salience_per_target(lm: salience.CausalLM, prompt: str, prefixes: list[str], method: str, counter: RowCounter,
                        repeats: int, width: int, **params: Any) -> Result:
    """For each target t: the prompt plus the continuation up to token t, teacher-forced, one target
    (index t, the last token); the runs' seconds, rows and costs summed; row t of the matrix."""
    result = Result(f"Salience {method}, {len(prefixes)} independent per-target runs")
    scores = np.full((len(prefixes), width), np.nan)
    for _ in range(repeats):
        total, rows, cost = 0.0, Rows(), [0, 0, 0]
        for t, text in enumerate(prefixes):
            seconds, e, used = timed(lambda t=t, text=text: salience.explain(lm, prompt, method, continuation=text, target=[t],
                                                                              output="probability",
                                                                              **params), counter)
            total += seconds
            rows = Rows(rows.forward + used.forward, rows.backward + used.backward, rows.calls + used.calls,
                        rows.tokens + used.tokens)
            cost = [cost[0] + e.cost.forward_passes, cost[1] + e.cost.backward_passes, cost[2] + e.cost.model_calls]
            row = np.asarray(e.scores, dtype=np.float64).reshape(-1)
            scores[t, : len(row)] = row
        result.runs.append(total)
    result.rows, result.scores, result.cost = rows, scores, (cost[0], cost[1], cost[2])
    return result


def max_diff(a: np.ndarray | None, b: np.ndarray | None) -> tuple[float, float] | None:
    """Max |a - b| over the cells both define, and that relative to the largest |a|."""
    if a is None or b is None:
        return None
    both = ~np.isnan(a) & ~np.isnan(b)
    if a.shape != b.shape or not both.any():
        return None
    diff = float(np.abs(a[both] - b[both]).max())
    return diff, diff / max(float(np.abs(a[both]).max()), 1e-300)


# -------------------------------------------------------------------------------------- Captum
def captum_ablation(lm: salience.CausalLM, prompt: str, target_ids: torch.Tensor, counter: RowCounter,
                    forward_in_tokens: bool, first: int | None = None) -> Result:
    """Captum's LLMAttribution(FeatureAblation) over the prompt's tokens, baseline token id 0 (its
    default; the unk token here, as Salience's baseline="unk"), per-token attributions of the
    probability (attr_target="prob"), one perturbation per call (its forward takes one row).
    ``forward_in_tokens=True`` is Captum's default (each perturbation decodes the target token by
    token, use_cached_outputs=True); False runs one teacher-forced pass per perturbation."""
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    inp = TextTokenInput(prompt, lm.tokenizer, baselines=0)
    attr = LLMAttribution(FeatureAblation(lm.model), lm.tokenizer, attr_target="prob")
    how = ("default forward_in_tokens=True, use_cached_outputs=True" if forward_in_tokens else
           "forward_in_tokens=False: one teacher-forced pass per perturbation")
    if first is not None and first < len(target_ids):
        target_ids, how = target_ids[:first], how + f"; first {first} targets only"
    result = Result(f"Captum LLMAttribution(FeatureAblation) ({how})")
    seconds, out, rows = timed(lambda: attr.attribute(inp, target=target_ids, forward_in_tokens=forward_in_tokens), counter)
    result.runs, result.rows = [seconds], rows
    result.scores = out.token_attr.detach().double().cpu().numpy()  # (T, prompt tokens)
    return result


def captum_lig(lm: salience.CausalLM, prompt: str, target_ids: torch.Tensor, counter: RowCounter, steps: int) -> Result:
    """Captum's LLMGradientAttribution(LayerIntegratedGradients) on the word-embedding layer: one IG
    per generated token (log-probability, baseline token id 0, earlier generated tokens fixed)."""
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    inp = TextTokenInput(prompt, lm.tokenizer)
    attr = LLMGradientAttribution(LayerIntegratedGradients(lm.model, lm.embedding_layer), lm.tokenizer)
    result = Result(f"Captum LLMGradientAttribution(LayerIntegratedGradients) n_steps={steps}, internal_batch_size={steps}")
    seconds, out, rows = timed(lambda: attr.attribute(inp, target=target_ids, n_steps=steps, internal_batch_size=steps), counter)
    result.runs, result.rows = [seconds], rows
    result.scores = out.token_attr.detach().double().cpu().numpy()
    return result


# --------------------------------------------------------------------------------------- Inseq
INSEQ_METHODS = {"occlusion": "occlusion", "saliency": "saliency", "input_x_gradient": "input_x_gradient",
                 "integrated_gradients": "integrated_gradients"}


def inseq_run(lm: salience.CausalLM, prompt: str, encoded: Any, method: str, counter: RowCounter, width: int,
              first: int | None = None, repeats: int = 1, **params: Any) -> Result:
    """Inseq's ``attribute`` on the given continuation (its default attributed function: each
    generated token's probability; baseline where one is used: the unk token's embedding, as
    Salience's ``baseline="unk"``); one attribution step per generated token. Per-token scores:
    the sum over embedding dimensions (occlusion comes per token already). ``first``: only the first targets, time extrapolated to
    all of them in proportion to the rows a step costs (prompt + t tokens, one row per token)."""
    import inseq

    start = int(encoded.extras["prompt_length"])
    ids = encoded.input_ids[start:].tolist()
    targets = len(ids) if first is None else min(first, len(ids))
    text = prompt + lm.tokenizer.decode(ids[:targets], clean_up_tokenization_spaces=False)
    device = next(lm.model.parameters()).device.type  # Inseq would otherwise pick cuda whenever there is one; it refuses "cuda:0"
    wrapped = inseq.load_model(lm.model, INSEQ_METHODS[method], tokenizer=lm.tokenizer, device=device)
    name = f"Inseq {method}" + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")
    result = Result(name)
    runs = []
    for _ in range(repeats):
        seconds, out, rows = timed(lambda: wrapped.attribute(prompt, generated_texts=text, show_progress=False, **params), counter)
        runs.append(seconds)
    seconds = median(runs)
    attributions = out.sequence_attributions[0].target_attributions.double()  # (positions, targets[, dims])
    scores = (attributions.sum(-1) if attributions.dim() == 3 else attributions).numpy().T
    scores = scores[:, scores.shape[1] - (start + targets):]  # drop a start token Salience does not score
    result.scores = np.full((targets, width), np.nan)
    result.scores[:, : scores.shape[1]] = scores
    result.runs, result.rows = runs, rows
    if targets < len(ids):
        done = sum(start + t for t in range(targets))
        every = sum(start + t for t in range(len(ids)))
        result.runs = [seconds * every / done]
        result.note = (f"first {targets} of {len(ids)} targets run ({seconds:.1f} s, rows counted for those); time "
                       f"extrapolated x{every / done:.2f} (rows per step grow with the prefix)")
    return result


def try_peer(fn: Any, *args: Any, **kwargs: Any) -> Result | str:
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - a peer failing must not stop the benchmark
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


# ---------------------------------------------------------------------------------------- report
def describe_rows(r: Result) -> tuple[str, str, str, str]:
    cost = " / ".join(map(str, r.cost)) if r.cost is not None else "—"
    return str(r.rows.forward), str(r.rows.backward), f"{r.rows.calls} ({r.rows.tokens} tokens)", cost


def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Runs everything; returns (summary lines, the report's body lines)."""
    lm = salience.load_model("zoo:smollm2-135m")
    lm.model.to(args.device)
    base = getattr(lm.model, lm.model.base_model_prefix)  # Captum calls model.forward: hook the base model
    counter = RowCounter(base)
    prompt, encoded, prefixes, gen_seconds, gen_rows = build_input(lm, args.prompt_tokens, args.new_tokens, counter)
    P, G = int(encoded.extras["prompt_length"]), encoded.length - int(encoded.extras["prompt_length"])
    target_ids = encoded.input_ids[P:]
    width = encoded.length
    log(f"prompt {P} tokens, continuation {G} tokens: {encoded.extras['continuation']!r}; generation {gen_seconds:.1f} s")
    # warm-up on a short input (kernels, allocator), not timed
    short = lm.encode("The capital of France is", continuation=" Paris.")
    for method in ("occlusion", "saliency"):
        salience.explain(lm, short, method)

    groups: list[tuple[str, list[Result | str]]] = []
    # occlusion: the same baseline as Captum's default (token id 0, the unk token)
    if not args.no_occlusion:
        occ = dict(baseline="unk")
        log(f"occlusion shared ... (load {load_average()})")
        shared_occ = salience_shared(lm, encoded, "occlusion", counter, 1, **occ)
        log(f"  {fmt_s(shared_occ.seconds)} s")
        occ_rows: list[Result | str] = [shared_occ]
        if "per-target" in args.parts:
            occ_rows.append(salience_per_target(lm, prompt, prefixes, "occlusion", counter, 1, width, **occ))
        if "captum" in args.parts:
            log("captum FeatureAblation forward_in_tokens=False ...")
            occ_rows.append(try_peer(captum_ablation, lm, prompt, target_ids, counter, False))
            if args.captum_default_targets:
                log(f"captum FeatureAblation default (first {args.captum_default_targets} targets) ...")
                occ_rows.append(try_peer(captum_ablation, lm, prompt, target_ids, counter, True, args.captum_default_targets))
        if "inseq" in args.parts:
            log("inseq occlusion ...")
            occ_rows.append(try_peer(inseq_run, lm, prompt, encoded, "occlusion", counter, width, first=args.inseq_occlusion_targets))
        groups.append(("occlusion", occ_rows))

    if not args.no_gradients:
        log(f"saliency ... (load {load_average()})")
        shared_sal = salience_shared(lm, encoded, "saliency", counter, args.repeats)
        sal_rows: list[Result | str] = [shared_sal]
        if "per-target" in args.parts:
            sal_rows.append(salience_per_target(lm, prompt, prefixes, "saliency", counter, args.repeats, width))
        if "inseq" in args.parts:
            log("inseq saliency ...")
            sal_rows.append(try_peer(inseq_run, lm, prompt, encoded, "saliency", counter, width, repeats=args.repeats))
        groups.append(("saliency", sal_rows))
        if "inseq" in args.parts:
            log(f"input x gradient ... (load {load_average()})")
            ixg_rows: list[Result | str] = [salience_shared(lm, encoded, "input_x_gradient", counter, args.repeats)]
            ixg_rows.append(try_peer(inseq_run, lm, prompt, encoded, "input_x_gradient", counter, width, repeats=args.repeats))
            groups.append(("input_x_gradient", ixg_rows))

    if "ig" in args.parts:
        ig = dict(steps=args.steps, baseline="unk")  # the unk embedding: the baseline of Inseq and of Captum (token id 0)
        log(f"IG shared ... (load {load_average()})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the completeness warning of a fixed 16-step rule (reported below)
            shared_ig = salience_shared(lm, encoded, "integrated_gradients", counter, 1, **ig)
            log(f"  {fmt_s(shared_ig.seconds)} s")
            ig_rows: list[Result | str] = [shared_ig]
            if "per-target" in args.parts:
                ig_rows.append(salience_per_target(lm, prompt, prefixes, "integrated_gradients", counter, 1, width, **ig))
        if "captum" in args.parts:
            log("captum LayerIntegratedGradients ...")
            ig_rows.append(try_peer(captum_lig, lm, prompt, target_ids, counter, args.steps))
        if "inseq" in args.parts:
            log("inseq integrated gradients ...")
            ig_rows.append(try_peer(inseq_run, lm, prompt, encoded, "integrated_gradients", counter, width,
                                    n_steps=args.steps, internal_batch_size=args.steps))
        groups.append((f"integrated_gradients (steps={args.steps}, gausslegendre)", ig_rows))

    bound = P + G + 1
    body = ["## Input", "",
            f"- prompt: {P} tokens (test-split movie sentences cut at a word boundary): {prompt!r}",
            f"- continuation: {G} tokens generated greedily by Salience (KV cache; {gen_rows.forward} counted rows, "
            f"{gen_seconds:.2f} s, not included below: every row below explains this already generated input): "
            f"{encoded.extras['continuation']!r}",
            "- features: the prompt's and the continuation's tokens (Salience's default token level; later tokens NaN "
            f"for earlier targets), F = {width}; output: each generated token's probability",
            "- per-target runs: for target t, `salience.explain(lm, prompt, method, continuation=<text of tokens 0..t>, "
            "target=[t])` (each prefix re-tokenises to the same tokens, checked); its scores are row t of a matrix "
            "compared with the shared one", "",
            "## Results", "",
            f"Passes are rows through the model's base module counted by a forward hook (the same counter for every "
            f"implementation; a backward row is one whose output took part in a backward pass). Salience's own "
            f"`Explanation.cost` (forward / backward / calls) is shown next to it. Bound for occlusion: prompt + "
            f"generated + 1 = {bound} forward rows. Ratios are to the shared Salience run of the same method, measured "
            f"in this process.", ""]
    head = ["method", "implementation", "runs", "median s", "fwd rows", "bwd rows", "calls (tokens)",
            "Salience cost fwd / bwd / calls", "time / shared", "max abs diff to shared (rel. to max |score|)", "note"]
    rows: list[list[str]] = []
    summary: list[str] = []
    for method, results in groups:
        shared = results[0]
        assert isinstance(shared, Result)
        for r in results:
            if isinstance(r, str):
                rows.append([method, "peer", "—", "—", "—", "—", "—", "—", "—", "—", r])
                continue
            compare = shared.scores if r.scores is None else shared.scores[: r.scores.shape[0], : r.scores.shape[1]]
            diff = max_diff(compare, r.scores) if r is not shared else None
            ratio = f"{r.seconds / shared.seconds:.2f}" if r is not shared and r.seconds and shared.seconds else ""
            note = r.note
            if r is shared and method == "occlusion":
                note = f"{r.rows.forward} rows {'<=' if r.rows.forward <= bound else '>'} {bound} (prompt + generated + 1)"
            if r.name.startswith("Inseq occlusion"):
                diff = max_diff(np.abs(compare), r.scores)
                note = (r.note + "; " if r.note else "") + ("Inseq returns the absolute value of each occlusion difference: "
                                                             "compared with the absolute value of Salience's score")
            if "LayerIntegrated" in r.name:
                diff, note = None, "not compared: log-probability of each token, earlier generated tokens kept fixed"
            elif "use_cached_outputs=True" in r.name and diff is not None and diff[1] > 1e-3:
                note = ("wrong for every target after the first: each decoding step passes the whole sequence again "
                        "together with the previous step's KV cache (see the tokens), so the probabilities differ from "
                        "a plain forward pass; the forward_in_tokens=False row agrees with Salience")
            cells = [method, r.name, str(len(r.runs)), fmt_s(r.seconds), *describe_rows(r), ratio,
                     "" if diff is None else f"{diff[0]:.1e} ({diff[1]:.1e})", note]
            rows.append(cells)
        for r in results[1:]:
            if isinstance(r, Result) and r.seconds and shared.seconds:
                summary.append(f"- {method}: shared {fmt_s(shared.seconds)} s / {shared.rows.forward} fwd + "
                               f"{shared.rows.backward} bwd rows; {r.name}: {fmt_s(r.seconds)} s / {r.rows.forward} fwd + "
                               f"{r.rows.backward} bwd rows ({r.seconds / shared.seconds:.2f}x the shared time)")
    body += table(head, rows)
    if "ig" in args.parts:
        delta = completeness_error(shared_ig.explanation)
        body += ["", f"IG with a fixed {args.steps}-step Gauss-Legendre rule on this model: largest completeness error "
                 f"over the targets {delta:.3g} of F(x) - F(baseline) (baseline: the unk token embedding; Salience warns above 5 %)."]
    return summary, body


def completeness_error(e: Any) -> float:
    """Largest |delta| / |F(x) - F(x')| over the targets of an IG explanation."""
    gap = np.abs(np.asarray(e.output_value, dtype=np.float64) - np.asarray(e.baseline_value, dtype=np.float64))
    return float(np.max(np.abs(np.asarray(e.delta, dtype=np.float64)) / np.maximum(gap, 1e-12)))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Salience on SmolLM2-135M: shared passes vs per-target runs vs Captum.")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16-token prompt, 4 new tokens, 1 repeat")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--steps", type=int, default=16, help="IG fixed steps (default 16)")
    parser.add_argument("--repeats", type=int, help="timed runs of the cheap rows (saliency; default 3)")
    parser.add_argument("--captum-default-targets", type=int, default=2,
                        help="run Captum's default FeatureAblation forward (token by token, use_cached_outputs=True) on the "
                        "first N generated tokens only (default 2; 0: skip; its cost grows with N x the sequence length)")
    parser.add_argument("--no-occlusion", action="store_true", help="skip the occlusion rows (gradient methods only)")
    parser.add_argument("--no-gradients", action="store_true",
                        help="skip the saliency and input x gradient rows (occlusion, or IG, only)")
    parser.add_argument("--inseq-occlusion-targets", type=int,
                        help="run Inseq's occlusion on the first N generated tokens only and extrapolate its time (default: all)")
    parser.add_argument("--parts", nargs="*", default=["ig", "captum", "per-target"],
                        choices=["ig", "captum", "inseq", "per-target"],
                        help="optional parts (Salience's shared occlusion and saliency run unless --no-occlusion / "
                        "--no-gradients; per-target: Salience run "
                        "once per generated token)")
    parser.add_argument("--device", default="cpu",
                        help="where the model runs (cpu, cuda); every implementation gets the same moved model")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (16 if args.quick else 64)
    args.new_tokens = args.new_tokens or (4 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.output = args.output or HERE / ("RESULTS-lm-quick.md" if args.quick else "RESULTS-lm.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    run_and_write("Causal LM benchmark (SmolLM2-135M)", "lm.py", argv, PACKAGES, args.output, lambda: run(args))


if __name__ == "__main__":
    main()
