"""The planted-token task: a synthetic text classification whose relevant words are known.

Each sentence is 6-14 distractor words with 1-3 *planted* tokens inserted at random positions, all
planted tokens of one class: class ``A`` tokens (azure, amber, anvil, aspen) or class ``B`` tokens
(bronze, basalt, birch, bramble). The label is the class of the planted tokens, so the planted
tokens are exactly the evidence for the label and everything else is noise: attribution accuracy
(precision@k, AUPRC) can be measured against them.

A tiny BERT (2 layers, hidden 32, whole-word vocabulary) learns the rule in a few seconds on CPU.
Training replaces some distractors by [MASK], [PAD] or [UNK], so that removal-based methods and
metrics see familiar inputs. The model is trained once per seed and cached under
``salience.assets.cache_dir()/planted/`` (about 0.1 MiB); ``salience.load_model("zoo:planted")``
loads it. Training and test sentences come from different seeded random streams.

With two or three planted tokens the class probability saturates: removing one planted token
leaves the others, so single-removal scores (occlusion, exact SIG) can miss them. That is a
property of those methods that the task exposes, not noise in the ground truth.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TASK_VERSION = 1
LABELS = ("A", "B")
PLANTED = (("azure", "amber", "anvil", "aspen"), ("bronze", "basalt", "birch", "bramble"))
DISTRACTORS = (
    "the", "a", "of", "and", "to", "in", "it", "is", "was", "that", "on", "for", "with", "as", "this", "by",
    "at", "from", "or", "an", "but", "not", "are", "be", "one", "all", "so", "out", "up", "about", "who", "which",
    "movie", "film", "story", "plot", "scene", "actor", "director", "script", "camera", "music", "time", "year",
    "city", "house", "road", "window", "table", "river", "morning", "evening", "paper", "voice", "hand", "door",
)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
METADATA = "planted.json"
TRAIN_STEPS = 200
BATCH = 32
AUGMENT = 0.15  # probability that a training distractor is replaced by a removal token
REPLACEMENTS = ("[MASK]", "[PAD]", "[UNK]")


@dataclass(frozen=True)
class PlantedSentence:
    """A sentence, its label index (0 = A, 1 = B) and the word indices of its planted tokens."""

    text: str
    label: int
    planted: tuple[int, ...]


def generate(n: int, rng: random.Random) -> list[PlantedSentence]:
    """``n`` sentences drawn from ``rng``."""
    sentences = []
    for _ in range(n):
        words = [rng.choice(DISTRACTORS) for _ in range(rng.randint(6, 14))]
        label = rng.randint(0, 1)
        positions: list[int] = []
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(words))
            words.insert(at, rng.choice(PLANTED[label]))
            positions = [p + (p >= at) for p in positions] + [at]
        sentences.append(PlantedSentence(" ".join(words), label, tuple(sorted(positions))))
    return sentences


def planted_examples(n: int = 500, seed: int = 0) -> list[PlantedSentence]:
    """The ``n`` test sentences for ``seed`` (a stream separate from the training sentences)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return generate(n, random.Random(f"planted-test-{TASK_VERSION}-{seed}"))


def train_planted_model(folder: Path, *, seed: int = 0, steps: int = TRAIN_STEPS) -> dict[str, object]:
    """Train the tiny classifier, ``save_pretrained`` it with its tokenizer into ``folder`` and
    write ``planted.json`` (task version, seed, steps, held-out accuracy). Returns that record.
    Torch's global random state is left as it was."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # type: ignore[attr-defined]

    from salience.zoo.quiet import quiet_transformers

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + PLANTED[0] + PLANTED[1] + DISTRACTORS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    if tokenizer.convert_tokens_to_ids("azure") == tokenizer.unk_token_id:
        raise RuntimeError("the planted vocabulary was not read by the tokenizer")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})  # type: ignore[call-arg]
    rng = random.Random(f"planted-train-{TASK_VERSION}-{seed}")
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            batch = generate(BATCH, rng)
            encoded = tokenizer([_augment(s, rng) for s in batch], padding=True, return_tensors="pt")
            loss = model(**encoded, labels=torch.tensor([s.label for s in batch])).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        test = planted_examples(500, seed)
        with torch.no_grad():
            encoded = tokenizer([s.text for s in test], padding=True, return_tensors="pt")
            predicted = model(**encoded).logits.argmax(-1)
        accuracy = float((predicted == torch.tensor([s.label for s in test])).double().mean())
    with quiet_transformers():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    record: dict[str, object] = {
        "task_version": TASK_VERSION, "seed": seed, "steps": steps, "batch": BATCH, "train_sentences": steps * BATCH, "augment": AUGMENT,
        "test_accuracy": accuracy, "labels": list(LABELS), "planted": [list(p) for p in PLANTED],
        "seconds": round(time.perf_counter() - started, 2),
    }
    (folder / METADATA).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: float sums in one order give the same model on every machine and
    OMP setting (with two threads and with one the trained models differed)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _augment(sentence: PlantedSentence, rng: random.Random) -> str:
    """Training text with some distractors replaced by [MASK], [PAD] or [UNK], so that the model
    learns these tokens carry no evidence: removing a word by masking it (occlusion, SIG, the
    faithfulness metrics) then means "no evidence" rather than an input never seen in training."""
    words = sentence.text.split()
    planted = set(sentence.planted)
    return " ".join(rng.choice(REPLACEMENTS) if i not in planted and rng.random() < AUGMENT else w for i, w in enumerate(words))


def planted_model_dir(seed: int = 0) -> Path:
    """The cached model folder for ``seed``, training it first (seconds) when missing.

    Training writes into a temporary folder that is renamed into place, so concurrent callers and
    interrupted training never leave a half-written model.
    """
    from salience.assets import cache_dir

    parent = cache_dir() / "planted"
    target = parent / f"v{TASK_VERSION}-seed{seed}"
    if (target / METADATA).is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=".train-"))
    try:
        train_planted_model(scratch / "model", seed=seed)
        try:
            os.rename(scratch / "model", target)
        except OSError:
            if not (target / METADATA).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def planted_metadata(seed: int = 0) -> dict[str, object]:
    """The training record of the cached model (trains it first when missing)."""
    return dict(json.loads((planted_model_dir(seed) / METADATA).read_text(encoding="utf-8")))
