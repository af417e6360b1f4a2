"""What the focused benchmark scripts (lm.py, images.py, text_cores.py) share: a row counter hooked
on a torch module (the same for Salience and its peers), the machine / versions / load lines of a
results file, timing and number formatting."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------- pass counting
@dataclass
class Rows:
    forward: int = 0  # rows through the module (forward-only and forward-with-backward)
    backward: int = 0  # rows whose output took part in a backward pass
    calls: int = 0
    tokens: int = 0  # rows x positions per call (sequence models), for calls of unequal width

    def __sub__(self, other: Rows) -> Rows:
        return Rows(self.forward - other.forward, self.backward - other.backward, self.calls - other.calls,
                    self.tokens - other.tokens)


class RowCounter:
    """A forward hook on ``module``: each call adds its batch size to ``forward`` (and batch x length
    to ``tokens`` when the first tensor input has a second dimension); when the call's output takes
    part in a backward pass (a hook on that tensor), its batch size is added to ``backward``.

    Hook an inner module when a peer calls ``model.forward`` directly (Captum's LLM wrappers do,
    which skips the outer module's hooks): for a Hugging Face model, its base model.
    """

    def __init__(self, module: Any, *, sequence: bool = True) -> None:
        self.counts = Rows()
        self.sequence = sequence
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: Any, kwargs: Any, output: Any) -> None:
        import torch

        given = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if v is not None), None)
        if given is None:
            given = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if given is None:
            return
        rows = int(given.shape[0])
        self.counts.forward += rows
        self.counts.calls += 1
        if self.sequence and given.dim() >= 2:
            self.counts.tokens += rows * int(given.shape[1])
        out = output if isinstance(output, torch.Tensor) else getattr(output, "last_hidden_state", None)
        if out is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            out = output[0]
        if out is not None and out.requires_grad:
            out.register_hook(lambda grad, rows=rows: self._backward(rows))

    def _backward(self, rows: int) -> None:
        self.counts.backward += rows

    def snapshot(self) -> Rows:
        return Rows(**vars(self.counts))

    def close(self) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], counter: RowCounter | None = None) -> tuple[float, Any, Rows]:
    """Seconds of one call of ``fn`` (on a GPU, until the work it queued has finished: a plain torch
    call returns before its kernels run), its result and the rows ``counter`` saw during it."""
    import torch

    before = counter.snapshot() if counter else Rows()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return seconds, result, (counter.snapshot() - before) if counter else Rows()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 1:
        return f"{seconds:.2f}"
    return f"{seconds:.3g}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- results files
def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line(script: str, argv: Sequence[str]) -> str:
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return threads + shlex.join(["python", f"benchmarks/{script}", *argv])


def git_revision(root: Path = HERE.parent) -> str:
    """HEAD of the checkout whose code is imported, and whether its src/ has uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in src/" if dirty else "")


def cpu_line() -> str:
    """Markdown bullet: CPU model, logical cores, RAM, torch threads and OMP_NUM_THREADS."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"- CPU: {cpu}, {os.cpu_count()} logical cores{memory}; torch threads {torch.get_num_threads()}"
            f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


def versions(packages: Sequence[str]) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def machine_lines(packages: Sequence[str], *, load_start: str | None = None) -> list[str]:
    """Markdown bullet lines: CPU, threads, OS, load average (at the start and now), versions."""
    import torch

    load = f"at the start {load_start}, at the end {load_average()}" if load_start else f"at the end {load_average()}"
    return [cpu_line(),
            "- device: " + ("cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else "cpu"),
            f"- OS: {platform.platform()}; Python {platform.python_version()}",
            f"- load average (1/5/15 min): {load} (the CPU is shared with other processes: absolute seconds are "
            "noisy; compare only numbers measured in the same run)",
            f"- versions: {versions(packages)}; code: {git_revision()}"]


def header(title: str, command: str, started: float, packages: Sequence[str], load_start: str) -> list[str]:
    """Title, date, duration, command and machine lines of a results file."""
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return [f"# {title}", "", f"Latest run: {now}, {(time.perf_counter() - started) / 60:.1f} min. Command:", "",
            f"    {command}", "", "## Machine", *machine_lines(packages, load_start=load_start), ""]


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def run_and_write(title: str, script: str, argv: Sequence[str] | None, packages: Sequence[str], output: Path,
                  body: Callable[[], tuple[list[str], list[str]]]) -> None:
    """Run ``body`` (returning the key-number lines and the report's other lines), then print and
    write the results file: title, date, duration, command, machine, key numbers, body."""
    started, load_start = time.perf_counter(), load_average()
    command = command_line(script, sys.argv[1:] if argv is None else argv)
    summary, lines = body()
    text = "\n".join([*header(title, command, started, packages, load_start), "## Key numbers", *summary, "", *lines, ""])
    output.write_text(text, encoding="utf-8")
    print(text)
    log(f"(written to {output}; {(time.perf_counter() - started) / 60:.1f} min)")
