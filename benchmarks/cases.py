"""What the benchmark runs on: models, inputs, a pass counter shared by every library, and the
model's throughput limit (the best measured time per pass)."""

from __future__ import annotations

import gc
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import salience
from salience.assets import minilm_base_path
from salience.datasets.movie_snippets import split_movie_snippets

MODEL_NAMES = ("small", "minilm", "base")
MODEL_SEED = 0
# Random-weight BertForSequenceClassification shapes (the MiniLM tokenizer, its vocabulary).
SHAPES: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
DESCRIPTIONS = {
    "small": "random BERT, hidden 256, 4 layers, 4 heads",
    "minilm": "zoo:minilm-sentiment (trained MiniLM-L6, hidden 384, 6 layers)",
    "base": "random BERT-base shape, hidden 768, 12 layers, 12 heads",
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_base_path(), use_fast=True, local_files_only=True)


def build_model(name: str, dev: torch.device) -> salience.TextClassifier:
    """The adapter around a seeded random model of a named shape, or the zoo MiniLM classifier."""
    if name == "minilm":
        return salience.load_model("zoo:minilm-sentiment", device=str(dev))
    from transformers import BertConfig, BertForSequenceClassification

    tok = tokenizer()
    torch.manual_seed(MODEL_SEED)
    config = BertConfig(vocab_size=tok.vocab_size, num_labels=2, max_position_embeddings=512, **SHAPES[name])
    model = BertForSequenceClassification(config).to(dev).eval()
    return salience.TextClassifier(model, tok, name=f"bench-{name}")


# ------------------------------------------------------------------------------------------ inputs
def _sentences() -> list[str]:
    return [s.text for s in split_movie_snippets()["test"]]


def text_of_length(tok: Any, length: int) -> str:
    """Real movie sentences, concatenated and cut at a word boundary so that the text is exactly
    ``length`` tokens with [CLS] and [SEP]. Starts at the first test sentence where such a cut exists."""
    sentences = _sentences()
    content = length - 2
    for start in range(len(sentences)):
        text = ""
        for sentence in sentences[start:]:
            text = f"{text} {sentence}".strip()
            if len(tok(text, add_special_tokens=False, verbose=False)["input_ids"]) > content + 1:
                break
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if len(enc["input_ids"]) <= content:
            continue
        next_token = enc.tokens()[content]
        if next_token.startswith("##"):
            continue  # a cut inside a word would re-tokenise differently
        cut = text[: enc["offset_mapping"][content - 1][1]]
        if len(tok(cut)["input_ids"]) == length:
            return cut
    raise RuntimeError(f"no input of exactly {length} tokens found")


WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def text_of_words(n_words: int) -> str:
    """The first test sentence with exactly ``n_words`` words (Salience's word rule)."""
    for sentence in _sentences():
        if len(WORD.findall(sentence)) == n_words:
            return sentence
    raise RuntimeError(f"no test sentence has {n_words} words")


# --------------------------------------------------------------------------------- pass counting
@dataclass
class Passes:
    forward: int = 0
    backward: int = 0
    calls: int = 0
    forward_tokens: int = 0  # rows x padded length of each call
    backward_tokens: int = 0


class PassCounter:
    """A forward hook on the Hugging Face model: each call adds its batch size to ``forward``; when
    the call's logits take part in a backward pass (a hook on the logits tensor), its batch size is
    added to ``backward``. Every library's passes are counted the same way, Salience's included."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counts = Passes()
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: Any, kwargs: Any, output: Any) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        rows = int(logits.shape[0])
        given = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if given is None and args:
            given = args[0]
        length = int(given.shape[1]) if given is not None and given.dim() >= 2 else 0
        self.counts.forward += rows
        self.counts.forward_tokens += rows * length
        self.counts.calls += 1
        if logits.requires_grad:
            logits.register_hook(lambda grad: self._backward(rows, length))

    def _backward(self, rows: int, length: int) -> None:
        self.counts.backward += rows
        self.counts.backward_tokens += rows * length

    def reset(self) -> Passes:
        before, self.counts = self.counts, Passes()
        return before

    def close(self) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------ throughput limit
@dataclass
class Limit:
    """Seconds per call at each measured batch size, forward-only and forward + backward (w.r.t.
    the word embeddings, parameters frozen)."""

    forward: dict[int, float] = field(default_factory=dict)
    backward: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def _best_time(table: dict[int, float], rows: int) -> float:
        """Least time to run ``rows`` rows in equal calls of one measured batch size."""
        if rows <= 0:
            return 0.0
        return min(math.ceil(rows / b) * t for b, t in table.items())

    def seconds(self, forward_only: int, with_backward: int, *, forward_scale: float = 1.0,
                backward_scale: float = 1.0) -> float:
        """The limit of a method that made ``forward_only`` forward-only passes and ``with_backward``
        forward + backward passes; a scale < 1 when its rows were shorter than the measured input
        (deleted words), taking time as proportional to row length."""
        return (forward_scale * self._best_time(self.forward, forward_only)
                + backward_scale * self._best_time(self.backward, with_backward))

    def merge(self, other: Limit) -> None:
        """Keep the faster time of each batch size measured in either."""
        for mine, theirs in ((self.forward, other.forward), (self.backward, other.backward)):
            for batch, seconds in theirs.items():
                mine[batch] = min(mine.get(batch, seconds), seconds)

    def best_batch(self, backward: bool) -> int:
        """The largest measured batch whose time per row is within 10 % of the best (large batches
        are less sensitive to per-call overhead and to a busy moment during the measurement)."""
        table = self.backward if backward else self.forward
        best = min(t / b for b, t in table.items())
        return max(b for b, t in table.items() if t / b <= 1.1 * best)

    def per_row(self, backward: bool) -> float:
        table = self.backward if backward else self.forward
        return min(t / b for b, t in table.items())

    def describe(self) -> str:
        f, b = self.best_batch(False), self.best_batch(True)
        return (f"fwd {1e3 * self.per_row(False):.2f} ms/row (batch {f}); "
                f"fwd+bwd {1e3 * self.per_row(True):.2f} ms/row (batch {b})")


def _time_call(fn: Any, dev: torch.device, min_seconds: float, max_calls: int) -> float:
    """Least seconds of one call: at least 3 calls and ``min_seconds`` in all, fewer for slow calls
    (1 call over 2.5 s, 2 over 1 s)."""
    best, spent, calls = math.inf, 0.0, 0
    while calls < max_calls and (calls < 3 or spent < min_seconds):
        sync(dev)
        started = time.perf_counter()
        fn()
        sync(dev)
        elapsed = time.perf_counter() - started
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
        if elapsed > 2.5 or (elapsed > 1.0 and calls >= 2):
            break
    return best


def measure_limit(clf: salience.TextClassifier, ids: torch.Tensor, *, target: int, max_call_seconds: float,
                  batches: dict[bool, list[int]] | None = None) -> Limit:
    """Time the model on the input ``ids`` (T,) repeated in batches of 1, 2, 4, ...: stop when the
    time per row got worse twice in a row, at the row/token cap, or when one call is too slow.
    ``batches`` (for forward-only: False, forward+backward: True): time only these batch sizes."""
    model, dev = clf.model, clf.device
    length = int(ids.shape[0])
    cuda = dev.type == "cuda"
    token_cap = {False: 262144 if cuda else 16384, True: 65536 if cuda else 8192}
    limit = Limit()
    for backward in (False, True):
        table = limit.backward if backward else limit.forward

        def call(batch: int, backward: bool = backward) -> None:
            rows = ids.to(dev)[None].expand(batch, length)
            mask = torch.ones_like(rows)
            if not backward:
                with torch.no_grad():
                    model(input_ids=rows, attention_mask=mask)
                return
            with torch.no_grad():
                embeds = clf.embedding_layer(rows)
            embeds.requires_grad_(True)
            saved = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in saved:
                p.requires_grad_(False)
            try:
                probs = model(inputs_embeds=embeds, attention_mask=mask).logits.softmax(-1)[:, target]
                torch.autograd.grad(probs.sum(), embeds)
            finally:
                for p, flag in saved:
                    p.requires_grad_(flag)

        call(1)  # warm-up
        if batches is not None:
            for batch in batches[backward]:
                table[batch] = _time_call(lambda batch=batch: call(batch), dev, min_seconds=0.5, max_calls=8)
            continue
        batch, worse = 1, 0
        while batch <= 256 and batch * length <= token_cap[backward]:
            seconds = _time_call(lambda batch=batch: call(batch), dev, min_seconds=0.5, max_calls=8)
            best = min((t / b for b, t in table.items()), default=math.inf)
            table[batch] = seconds
            worse = worse + 1 if seconds / batch > 1.02 * best else 0
            if worse >= 2 or seconds > max_call_seconds:
                break
            batch *= 2
    return limit


# ----------------------------------------------------------------------------------- memory
def rss_bytes(field_name: str = "VmRSS") -> int | None:
    """Resident set size (or its peak, ``VmHWM``) of this process in bytes; None where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"{field_name}:\s+(\d+)\s+kB", status.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that the resident set is
    close to the live set before a measurement; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory added by a block: CUDA allocator peak on a GPU, else peak RSS (VmHWM) growth."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.added: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            self._before = torch.cuda.memory_allocated(self.dev)
        else:
            gc.collect()
            release_free_memory()
            self._ok = reset_peak_rss()
            self._before = rss_bytes() or 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dev.type == "cuda":
            self.added = torch.cuda.max_memory_allocated(self.dev) - self._before
        elif self._ok:
            peak = rss_bytes("VmHWM")
            self.added = None if peak is None else max(0, peak - self._before)
