#!/usr/bin/env python
"""Train the zoo model ``zoo:minilm-sentiment`` (reproducible, CPU, a few minutes on 2 cores).

``BertForSequenceClassification`` on all-MiniLM-L6-v2: embeddings and encoder layers 0-4 stay
frozen at the MiniLM weights. Their output (the hidden states entering layer 5) is computed once
for every sentence and cached; the top is then trained on the cache. Two candidate tops are
trained on the ``"train"`` split and compared on ``"validation"``:

* ``head``: pooler + classifier only (on layer 5's frozen [CLS] output);
* ``last-layer``: encoder layer 5 + pooler + classifier.

The better one (by best-epoch validation accuracy) is kept; test accuracy is measured once, at
the end, with the real model rebuilt by :func:`salience.zoo.minilm_sentiment.build_minilm_sentiment`
from the written weights (which also checks that the cached training path matches the model).

Only the [CLS] position of layer 5 reaches the pooler, so the top computes layer 5 for the
[CLS] query alone (keys and values over all tokens): the same function as the full layer at that
position, about 6x cheaper.

Writes ``src/salience/zoo/minilm_sentiment.safetensors`` (trained parameters only, with their
``BertForSequenceClassification`` names) and ``minilm_sentiment.json`` (the training record).

    python -m salience.assets fetch
    python scripts/train_zoo_minilm.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

from salience import assets
from salience.datasets.movie_snippets import Snippet, split_movie_snippets
from salience.zoo import minilm_sentiment as zoo

MAX_LENGTH = zoo.MAX_LENGTH
TOP_LAYER = 5
HEAD_PREFIXES = ("bert.pooler.", "classifier.")
LAST_LAYER_PREFIXES = (f"bert.encoder.layer.{TOP_LAYER}.", *HEAD_PREFIXES)

# Validation-only exploration (run with --variant last-layer --skip-test) that chose the defaults.
HYPERPARAMETER_SEARCH = {
    "criterion": "best-epoch validation accuracy; the test split was not consulted for the choice",
    "note": "a first trial run with epochs=4 lr=1e-4 measured test accuracy 0.8045 before this search",
    "last-layer": {"epochs=4 lr=1e-4": 0.793, "epochs=6 lr=1e-4": 0.806,
                   "epochs=4 lr=2e-4": 0.802, "epochs=6 lr=2e-4": 0.815},
}

Batch = tuple[torch.Tensor, torch.Tensor]  # (hidden states [B, L, H], attention mask [B, L])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def tokenize(tokenizer, snippets: Sequence[Snippet]) -> list[list[int]]:
    """Token ids of each sentence, truncated to ``MAX_LENGTH``."""
    enc = tokenizer([s.text for s in snippets], truncation=True, max_length=MAX_LENGTH)
    return enc["input_ids"]


@torch.inference_mode()
def frozen_states(model: nn.Module, ids: list[list[int]], batch_size: int = 64) -> list[torch.Tensor]:
    """Hidden states entering layer ``TOP_LAYER`` for each sentence, unpadded ([L_i, H] each)."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lengths = [len(ids[i]) for i in idx]
        input_ids = torch.zeros(len(idx), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(idx):
            input_ids[row, :lengths[row]] = torch.tensor(ids[i])
            mask[row, :lengths[row]] = 1
        hidden = model.bert(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = hidden[TOP_LAYER]  # hidden_states[k] is the output of layer k-1, i.e. the input of layer k
        for row, i in enumerate(idx):
            out[i] = states[row, :lengths[row]].clone()
    return out  # type: ignore[return-value]


def collate(states: Sequence[torch.Tensor]) -> Batch:
    """Pad a list of [L_i, H] tensors into a batch with its attention mask."""
    lengths = torch.tensor([s.shape[0] for s in states])
    hidden = nn.utils.rnn.pad_sequence(list(states), batch_first=True)
    mask = torch.arange(hidden.shape[1])[None, :] < lengths[:, None]
    return hidden, mask


def top_layer_cls(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Layer ``TOP_LAYER``'s output at the [CLS] position ([B, 1, H]), using the layer's own modules."""
    layer = model.bert.encoder.layer[TOP_LAYER]
    att = layer.attention.self
    b, length, h = hidden.shape
    heads, size = att.num_attention_heads, att.attention_head_size
    q = att.query(hidden[:, :1]).view(b, 1, heads, size).transpose(1, 2)
    k = att.key(hidden).view(b, length, heads, size).transpose(1, 2)
    v = att.value(hidden).view(b, length, heads, size).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * att.scaling
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(-1), p=att.dropout.p, training=model.training)
    context = (probs @ v).transpose(1, 2).reshape(b, 1, h)
    attended = layer.attention.output(context, hidden[:, :1])
    return layer.output(layer.intermediate(attended), attended)


def head_logits(model: nn.Module, cls_out: torch.Tensor) -> torch.Tensor:
    """Pooler + dropout + classifier on the last layer's [CLS] output ([B, 1, H] -> [B, 2])."""
    return model.classifier(model.dropout(model.bert.pooler(cls_out)))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def train_top(
    model: nn.Module,
    prefixes: tuple[str, ...],
    forward: Callable[[list[int]], torch.Tensor],
    n_train: int,
    train_labels: torch.Tensor,
    evaluate: Callable[[], float],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    log: Callable[[str], None],
) -> dict:
    """Train the parameters whose names start with ``prefixes``; keep the best epoch by validation.

    ``forward(indices)`` returns the logits of those training examples; ``evaluate()`` returns the
    validation accuracy. AdamW with linear warm-up (10%) and linear decay.
    """
    params = {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    optim = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, epochs * steps_per_epoch // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    gen = torch.Generator().manual_seed(seed)
    best = {"validation_accuracy": -1.0}
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n_train, generator=gen).tolist()
        losses, correct = [], 0
        for start in range(0, n_train, batch_size):
            idx = perm[start:start + batch_size]
            logits = forward(idx)
            labels = train_labels[idx]
            loss = F.cross_entropy(logits, labels)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            losses.append(loss.item())
            correct += (logits.argmax(-1) == labels).sum().item()
        model.eval()
        val = evaluate()
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                  "train_accuracy_running": correct / n_train, "validation_accuracy": val}
        history.append(record)
        log(f"  epoch {epoch}: loss {record['train_loss']:.4f}, validation accuracy {val:.4f}")
        if val > best["validation_accuracy"]:
            best = {"epoch": epoch, "validation_accuracy": val,
                    "state": {n: p.detach().clone() for n, p in params.items()}}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best["state"][n])
    for p in model.parameters():
        p.requires_grad_(False)
    return {"best_epoch": best["epoch"], "validation_accuracy": best["validation_accuracy"],
            "history": history, "trained_parameters": sorted(params),
            "n_trained_parameters": int(sum(p.numel() for p in params.values())),
            "state": best["state"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batches")
    parser.add_argument("--variant", choices=["auto", "head", "last-layer"], default="auto",
                        help="auto: train both and keep the better on validation")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of last-layer training")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of last-layer training")
    parser.add_argument("--head-epochs", type=int, default=10, help="epochs of head-only training")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="AdamW learning rate of head-only training")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--out-dir", type=Path, default=zoo.WEIGHTS_PATH.parent)
    parser.add_argument("--skip-test", action="store_true",
                        help="hyper-parameter exploration: report validation only, never touch the test split")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    seed_everything(args.seed)

    split = split_movie_snippets(seed=args.seed)
    log("split sizes: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    torch.manual_seed(args.seed)
    base_model, tokenizer = zoo.build_base_classifier()
    init_state = {n: t.clone() for n, t in base_model.state_dict().items()}

    cache = {}
    for name in ("train", "validation"):
        cache[name] = frozen_states(base_model, tokenize(tokenizer, split[name]))
        log(f"cached frozen layers 0-{TOP_LAYER - 1} for {name} ({len(cache[name])} sentences)")
    labels = {k: torch.tensor([s.label for s in v]) for k, v in split.items()}

    def cached_logits(model: nn.Module, name: str, batch_size: int = 256) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([
                head_logits(model, top_layer_cls(model, *collate(cache[name][i:i + batch_size])))
                for i in range(0, len(cache[name]), batch_size)
            ])

    common = dict(n_train=len(split["train"]), train_labels=labels["train"], batch_size=args.batch_size,
                  weight_decay=args.weight_decay, seed=args.seed, log=log)
    results: dict[str, dict] = {}

    if args.variant in ("auto", "head"):
        base_model.load_state_dict(init_state)
        base_model.eval()
        with torch.no_grad():  # layer 5 is frozen too: its [CLS] output is a fixed feature
            cls_feats = {name: torch.cat([top_layer_cls(base_model, *collate(cache[name][i:i + 256]))
                                          for i in range(0, len(cache[name]), 256)])
                         for name in ("train", "validation")}
        log("training head only (pooler + classifier)")
        results["head"] = train_top(
            base_model, HEAD_PREFIXES, lambda idx: head_logits(base_model, cls_feats["train"][idx]),
            evaluate=lambda: accuracy(head_logits(base_model, cls_feats["validation"]), labels["validation"]),
            epochs=args.head_epochs, lr=args.head_lr, **common)
        results["head"]["hyperparameters"] = {"epochs": args.head_epochs, "lr": args.head_lr}

    if args.variant in ("auto", "last-layer"):
        base_model.load_state_dict(init_state)
        log(f"training encoder layer {TOP_LAYER} + pooler + classifier")
        results["last-layer"] = train_top(
            base_model, LAST_LAYER_PREFIXES,
            lambda idx: head_logits(base_model, top_layer_cls(base_model, *collate([cache["train"][i] for i in idx]))),
            evaluate=lambda: accuracy(cached_logits(base_model, "validation"), labels["validation"]),
            epochs=args.epochs, lr=args.lr, **common)
        results["last-layer"]["hyperparameters"] = {"epochs": args.epochs, "lr": args.lr}

    chosen = max(results, key=lambda k: results[k]["validation_accuracy"])
    best = results[chosen]
    log("validation accuracy by variant: "
        + ", ".join(f"{k} {v['validation_accuracy']:.4f}" for k, v in results.items()) + f"; keeping {chosen}")
    base_model.load_state_dict(init_state)
    with torch.no_grad():
        for n, p in base_model.named_parameters():
            if n in best["state"]:
                p.copy_(best["state"][n])
    base_model.eval()
    train_acc = accuracy(cached_logits(base_model, "train"), labels["train"])
    val_cached = cached_logits(base_model, "validation")
    train_seconds = time.perf_counter() - t0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = args.out_dir / zoo.WEIGHTS_PATH.name
    save_file({n: t.contiguous() for n, t in sorted(best["state"].items())}, str(weights_path),
              metadata={"format": "pt", "model": "zoo:minilm-sentiment"})
    weights_path.chmod(0o644)  # safetensors writes 0600; the file ships as package data

    # Rebuild the shipped model through the public loader and measure it end to end.
    if weights_path.resolve() == zoo.WEIGHTS_PATH.resolve():
        model, tok = zoo.build_minilm_sentiment()
    else:
        model, tok = base_model, tokenizer

    @torch.inference_mode()
    def full_logits(snippets: Sequence[Snippet]) -> torch.Tensor:
        out = []
        for i in range(0, len(snippets), 64):
            enc = tok([s.text for s in snippets[i:i + 64]], truncation=True, max_length=MAX_LENGTH,
                      padding=True, return_tensors="pt")
            out.append(model(**enc).logits)
        return torch.cat(out)

    val_full = full_logits(split["validation"])
    max_diff = (val_full - val_cached).abs().max().item()
    log(f"end-to-end check on validation: max |logit difference| {max_diff:.2e}")
    if max_diff > 1e-3:
        raise SystemExit(f"cached training path disagrees with the full model (max diff {max_diff})")
    val_acc = accuracy(val_full, labels["validation"])
    if args.skip_test:
        log(f"{chosen}: train {train_acc:.4f}, validation {val_acc:.4f} (test skipped, nothing written)")
        weights_path.unlink()
        return 0
    test_acc = accuracy(full_logits(split["test"]), labels["test"])  # the one and only look at "test"
    log(f"{chosen}: train {train_acc:.4f}, validation {val_acc:.4f}, test {test_acc:.4f}")

    record = {
        "name": "zoo:minilm-sentiment",
        "architecture": "BertForSequenceClassification",
        "id2label": {str(k): v for k, v in zoo.ID2LABEL.items()},
        "label2id": dict(zoo.LABEL2ID),
        "base_model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "pip_package": assets.MINILM_DIST,
                       "version": assets.minilm_version()},
        "dataset": {"name": "movieReviewSnippets_GroundTruth (hutto_ICWSM_2014, Rotten Tomatoes)",
                    "source": f"{assets.VADER_DIST}=={assets.VADER_VERSION} sdist",
                    "labels": "1 if mean valence > 0, 0 if < 0; 37 zero-valence sentences dropped",
                    "split": f"salience.datasets.movie_snippets.split_movie_snippets(seed={args.seed})",
                    "split_sizes": {k: len(v) for k, v in split.items()}},
        "variant": chosen,
        "trained_parameters": best["trained_parameters"],
        "n_trained_parameters": best["n_trained_parameters"],
        "frozen": f"bert.embeddings, bert.encoder.layer.0-{TOP_LAYER - 1}"
                  + ("" if chosen == "last-layer" else f", bert.encoder.layer.{TOP_LAYER}"),
        "seed": args.seed,
        "best_epoch": best["best_epoch"],
        "accuracy": {"train": round(train_acc, 4), "validation": round(val_acc, 4), "test": round(test_acc, 4)},
        "variant_comparison_validation_accuracy": {k: round(v["validation_accuracy"], 4) for k, v in results.items()},
        "hyperparameters": {"optimizer": "AdamW", "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                            "schedule": "linear warm-up 10% then linear decay", "max_length": MAX_LENGTH,
                            "dropout": "BERT defaults (0.1) in trained modules", **best["hyperparameters"],
                            "epoch_selection": "best validation accuracy"},
        "history": {k: v["history"] for k, v in results.items()},
        "hyperparameter_search": HYPERPARAMETER_SEARCH,
        "training_seconds": round(train_seconds, 1),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count()},
        "trained_on": datetime.date.today().isoformat(),
        "command": " ".join(["python scripts/train_zoo_minilm.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    meta_path = args.out_dir / zoo.METADATA_PATH.name
    meta_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {weights_path} ({weights_path.stat().st_size / 2**20:.2f} MiB) and {meta_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
