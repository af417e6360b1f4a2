"""Run Salience's integrated_gradients once with a memory budget and report the memory it added.

Run in a fresh process by run.py (so nothing else has raised the process's peak); prints one JSON
line. On CPU the measure is the growth of the peak resident set (VmHWM, reset just before the call)
over the resident set before the call; on a GPU, the growth of the CUDA allocator's peak.

    python benchmarks/memory_case.py --model base --length 512 --max-memory 2GB
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import torch  # noqa: E402

import salience  # noqa: E402
from salience.core.batching import choose_batch_size, parse_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="base", choices=cases.MODEL_NAMES)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--max-memory", default="2GB")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    dev = cases.device()
    clf = cases.build_model(args.model, dev)
    text = cases.text_of_length(clf.tokenizer, args.length)
    warm = cases.text_of_length(clf.tokenizer, 8)
    salience.explain(clf, warm, "integrated_gradients", level="token", max_memory=args.max_memory)  # load code paths
    gc.collect()
    rss_before = cases.rss_bytes()
    with cases.PeakMemory(dev) as peak:
        cases.sync(dev)
        started = time.perf_counter()
        e = salience.explain(clf, text, "integrated_gradients", level="token", max_memory=args.max_memory)
        cases.sync(dev)
        seconds = time.perf_counter() - started
    rows = choose_batch_size(args.length, backward=True, max_memory=args.max_memory,
                             bytes_per_row=clf.bytes_per_row(args.length, backward=True))
    gap = (e.output_value or 0.0) - (e.baseline_value or 0.0)
    print(json.dumps({
        "model": args.model, "length": args.length, "device": dev.type, "max_memory": args.max_memory,
        "budget_bytes": parse_memory(args.max_memory), "added_bytes": peak.added,
        "rss_before_bytes": rss_before, "peak_rss_bytes": cases.rss_bytes("VmHWM"),
        "estimated_bytes_per_row": clf.bytes_per_row(args.length, backward=True), "rows_per_chunk": rows,
        "seconds": seconds, "steps": e.params.get("steps_used"), "forward_passes": e.cost.forward_passes,
        "backward_passes": e.cost.backward_passes, "model_calls": e.cost.model_calls,
        "completeness": abs(e.delta or 0.0) / abs(gap) if gap else None,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
