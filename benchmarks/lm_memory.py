"""Memory of explaining a long generation with a budget: SmolLM2-135M, a 512-token prompt and a
64-token continuation (given, teacher-forced), every continuation token explained, ``max_memory``
set. Each case runs in a fresh process (the peak resident set is per process) and prints one
JSON line; without ``--case`` the script runs every case and writes a table.

    OMP_NUM_THREADS=1 python benchmarks/lm_memory.py                       # writes benchmarks/RESULTS-lm-memory.md
    OMP_NUM_THREADS=1 python benchmarks/lm_memory.py --case saliency 1GB   # one case, one JSON line

Measure: growth of the peak resident set (VmHWM, reset just before the call) over the resident
set before it, on CPU; on a GPU, the growth of the CUDA allocator's peak. The budget bounds the
activations of the rows in flight; the model's weights (0.5 GB in float32) are loaded before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = [("saliency", "256MB"), ("saliency", "1GB"), ("occlusion", "512MB")]
PROMPT_TOKENS, NEW_TOKENS = 512, 64


def text_of_tokens(tokenizer, count: int, start: int) -> str:
    """Test-split movie sentences from ``start`` on, cut to exactly ``count`` tokens (checked)."""
    from salience.datasets.movie_snippets import split_movie_snippets

    words = " ".join(s.text for s in split_movie_snippets()["test"][start:start + 200])
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:count]
    return tokenizer.decode(ids)


def one_case(method: str, budget: str) -> dict:
    import cases
    import torch

    import salience
    from salience.core.batching import choose_batch_size, parse_memory

    warnings.simplefilter("ignore")
    lm = salience.load_model("zoo:smollm2-135m")
    prompt = text_of_tokens(lm.tokenizer, PROMPT_TOKENS, 0)
    continuation = " " + text_of_tokens(lm.tokenizer, NEW_TOKENS, 300)
    encoded = lm.encode(prompt, continuation=continuation)
    params = {"baseline": "unk"} if method == "occlusion" else {}
    salience.explain(lm, "A short warm-up.", method=method, continuation=" Yes.", **params)
    with cases.PeakMemory(torch.device("cpu")) as peak:
        started = time.perf_counter()
        e = salience.explain(lm, encoded, method=method, max_memory=budget, **params)
        seconds = time.perf_counter() - started
    backward = method != "occlusion"
    length = encoded.length
    return {"method": method, "max_memory": budget, "budget_bytes": parse_memory(budget), "added_bytes": peak.added,
            "sequence": length, "targets": len(e.targets),
            "estimated_bytes_per_row": lm.bytes_per_row(length, backward=backward),
            "rows_per_chunk": choose_batch_size(length, backward=backward, max_memory=budget,
                                                bytes_per_row=lm.bytes_per_row(length, backward=backward)),
            "seconds": seconds, "forward_passes": e.cost.forward_passes, "backward_passes": e.cost.backward_passes,
            "model_calls": e.cost.model_calls, "cached_positions": e.cost.cached_positions,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "BUDGET"))
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS-lm-memory.md")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(*args.case)))
        return
    from common import load_average

    started, load_start = time.time(), load_average()
    results = []
    for method, budget in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", method, budget], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    mib = 2 ** 20
    lines = ["# Memory budget on a long generation (SmolLM2-135M, 512 + 64 tokens)", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/lm_memory.py` ({(time.time() - started) / 60:.1f} min; "
             f"load average at the start {load_start}, at the end {load_average()}). Every one of the 64 continuation "
             "tokens explained (output: probability); each case in a fresh process.", "",
             "| method | max_memory | added peak RSS (MiB) | within budget | rows per chunk (estimate) | est. MiB per row | "
             "fwd / bwd rows | calls | positions from cache | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        added = r["added_bytes"]
        lines.append(f"| {r['method']} | {r['max_memory']} | {added / mib:.0f} | {'yes' if added <= r['budget_bytes'] else 'NO'} | "
                     f"{r['rows_per_chunk']} | {r['estimated_bytes_per_row'] / mib:.0f} | {r['forward_passes']} / "
                     f"{r['backward_passes']} | {r['model_calls']} | {r['cached_positions']} | {r['seconds']:.0f} |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
