"""Text rows, old core against new: the zoo MiniLM sentiment classifier at 32 and 128 tokens, the same
work on both sides (saliency, input x gradient, occlusion, SIG, LIME, KernelSHAP, IG at fixed
steps), each core in its own subprocess with PYTHONPATH at its src/, old and new runs interleaved
over several rounds; medians. See benchmarks/README.md.

    git worktree add /work/oldcore fec575b      # the old core, once
    OMP_NUM_THREADS=1 python benchmarks/text_cores.py --old /work/oldcore/src   # writes RESULTS-text-cores.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import command_line, fmt_s, header, load_average, log, median, table  # noqa: E402

PACKAGES = ("torch", "transformers", "numpy", "scikit-learn")
LENGTHS = (32, 128)
# (label, registered name, parameters): the same explicit settings on both cores
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "saliency": ("saliency", {"level": "token"}),
    "input_x_gradient": ("input_x_gradient", {"level": "token"}),
    "occlusion": ("occlusion", {"level": "word", "baseline": "mask"}),
    "sig": ("sequential_integrated_gradients", {"level": "token", "baseline": "mask", "form": "exact"}),
    "lime": ("lime", {"level": "word", "n_samples": 500, "baseline": "delete"}),
    "kernel_shap": ("kernel_shap", {"level": "word", "n_samples": 512, "baseline": "mask"}),
    "ig": ("integrated_gradients", {"level": "token", "baseline": "pad", "steps": 50, "rule": "gausslegendre"}),
}
ADAPTIVE = ("integrated_gradients", {"level": "token", "baseline": "pad"})  # each core's own default stopping rule


# ---------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """In a subprocess whose PYTHONPATH picks one core: time every case ``args.runs`` times after a
    warm-up on an 8-token input; print one JSON line per case."""
    from cases import text_of_length

    import salience

    warnings.simplefilter("ignore")
    clf = salience.load_model("zoo:minilm-sentiment")
    texts = {length: text_of_length(clf.tokenizer, length) for length in (8, *args.lengths)}
    cases = [(name, *CASES[name]) for name in args.methods]
    if args.adaptive:
        cases.append(("ig adaptive", *ADAPTIVE))
    for _, method, params in cases:  # warm-up
        salience.explain(clf, texts[8], method, seed=0, output="probability", **params)
    for length in args.lengths:
        for label, method, params in cases:
            times: list[float] = []
            while len(times) < args.runs or (sum(times) < args.case_seconds and len(times) < 20):
                started = time.perf_counter()
                e = salience.explain(clf, texts[length], method, seed=0, output="probability", **params)
                times.append(time.perf_counter() - started)
            print(json.dumps({"case": label, "length": length, "times": times, "forward": e.cost.forward_passes,
                              "backward": e.cost.backward_passes, "calls": e.cost.model_calls,
                              "steps": e.params.get("steps_used")}), flush=True)


def spawn(src: Path, args: argparse.Namespace, adaptive: bool) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--lengths", *map(str, args.lengths),
               "--methods", *args.methods, "--runs", str(args.runs), "--case-seconds", str(args.case_seconds),
               *(["--adaptive"] if adaptive else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker on {src} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def git_head(src: Path) -> str:
    out = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True, check=False)
    return out.stdout.strip()[:90] + (" (+ uncommitted changes in src/)" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Old core vs new core on the text classifier: no slowdown.")
    parser.add_argument("--old", type=Path, default=Path("/work/oldcore/src"), help="src/ of the old core's checkout")
    parser.add_argument("--new", type=Path, default=HERE.parent / "src", help="src/ of the new core (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=3, help="old/new subprocess pairs, order alternating (default 3)")
    parser.add_argument("--runs", type=int, default=1, help="least timed runs per case in each subprocess (default 1)")
    parser.add_argument("--case-seconds", type=float, default=1.5,
                        help="more runs (at most 20) while a case's runs in one subprocess took less (default 1.5 s)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS-text-cores.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adaptive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    started, load_start = time.perf_counter(), load_average()
    command = command_line("text_cores.py", sys.argv[1:] if argv is None else argv)
    sources = {"old": args.old.resolve(), "new": args.new.resolve()}
    results: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    loads = []
    for round_ in range(args.rounds):
        for side in (("old", "new") if round_ % 2 == 0 else ("new", "old")):
            begun = time.perf_counter()
            results[side] += spawn(sources[side], args, adaptive=round_ == 0)
            loads.append(load_average())
            log(f"round {round_ + 1} {side}: {time.perf_counter() - begun:.0f} s (load {loads[-1]})")

    def collect(side: str, case: str, length: int) -> tuple[list[float], dict[str, Any]]:
        entries = [r for r in results[side] if r["case"] == case and r["length"] == length]
        return [t for r in entries for t in r["times"]], entries[-1]

    rows, summary = [], []
    for length in args.lengths:
        for case in args.methods:
            old_times, old = collect("old", case, length)
            new_times, new = collect("new", case, length)
            ratio = median(new_times) / median(old_times)
            same = (old["forward"], old["backward"]) == (new["forward"], new["backward"])
            passes = f"{new['forward']} / {new['backward']}" if same else \
                f"NO: old {old['forward']} / {old['backward']}, new {new['forward']} / {new['backward']}"
            name, params = CASES[case]
            rows.append([str(length), case, ", ".join(f"{k}={v}" for k, v in params.items()), f"{len(old_times)} / {len(new_times)}",
                         fmt_s(median(old_times)), fmt_s(median(new_times)), f"{ratio:.2f}",
                         f"{min(new_times) / min(old_times):.2f}", "yes" if same else "no", passes,
                         f"{old['calls']} / {new['calls']}"])
            if ratio > 1.1 or not same:
                summary.append(f"- {case} at {length} tokens: new/old {ratio:.2f}" + ("" if same else " (passes differ)"))
    adaptive_rows = []
    for length in args.lengths:
        cells = [str(length)]
        for side in ("old", "new"):
            times, entry = collect(side, "ig adaptive", length)
            cells += [str(entry["steps"]), f"{entry['forward']} / {entry['backward']}", fmt_s(median(times))]
        adaptive_rows.append(cells)
    ratios = [float(r[6]) for r in rows]
    summary.insert(0, f"- new/old median time ratio over the {len(rows)} rows: median {median(ratios):.2f}, range "
                   f"{min(ratios):.2f}-{max(ratios):.2f}; passes equal in {sum(r[8] == 'yes' for r in rows)} of {len(rows)} rows")
    text = "\n".join([
        *header("Text rows: old core vs new core (zoo:minilm-sentiment)", command, started, PACKAGES, load_start),
        f"- old core: {sources['old']} at {git_head(sources['old'])}",
        f"- new core: {sources['new']} at {git_head(sources['new'])}",
        f"- load average after each subprocess: {'; '.join(loads)}", "",
        "## Key numbers", *summary, "",
        "## Method",
        "",
        f"Each core runs in its own subprocess (`PYTHONPATH=<core>/src`, same interpreter and packages): it loads the "
        f"model, warms every case up on an 8-token input, then times each case at least "
        f"{args.runs} time(s) and until its runs took {args.case_seconds} s (at most 20 runs) with "
        f"`salience.explain(clf, text, method, seed=0, output='probability', **settings)`. {args.rounds} rounds of one old and one new "
        "subprocess, the order alternating (old first in odd rounds), so slow phases of the shared machine hit both. "
        "Inputs: test-split movie sentences cut at a word boundary to exactly 32 and 128 tokens ([CLS] and [SEP] "
        "included), as in benchmarks/run.py; target: the predicted class; output: its probability. Passes are "
        "`Explanation.cost` (forward rows / rows with a backward pass); calls: model calls, old / new.", "",
        *table(["tokens", "method", "settings (both cores)", "runs old / new", "old median s", "new median s",
                "new/old (median)", "new/old (best)", "passes equal", "fwd / bwd passes", "calls old / new"], rows), "",
        "## Adaptive IG (each core's default stopping rule, not the same work)", "",
        "The old rule stops when the summed error of the pieces is within 1 % of |F(x) - F(baseline)|; the new one "
        "bounds every feature's error (Gauss-Kronrod 7/15) within 1 % of the largest feature score, so it spends more "
        "gradients. Timed in the first round only (runs as above).", "",
        *table(["tokens", "old steps", "old fwd / bwd", "old s", "new steps", "new fwd / bwd", "new s"], adaptive_rows), ""])
    args.output.write_text(text, encoding="utf-8")
    print(text)
    log(f"(written to {args.output}; {(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
