#!/usr/bin/env python
"""Train and measure the sentiment model-size ladder (seeded, deterministic at a fixed thread count, CPU).

Sub-commands (run each long one under ``flock /tmp/salience-cpu.lock``):

* ``minilm --layers 2 4 6``: all-MiniLM-L6-v2 cut to its first k layers and fine-tuned IN FULL
  (every parameter) on the ``"train"`` split of ``split_movie_snippets(seed)``; AdamW, linear
  warm-up 10 % then linear decay, length-bucketed batches; the epoch is chosen by validation
  accuracy, training stops early after ``--patience`` epochs without improvement. Writes
  ``~/.cache/salience/ladder/minilm_l{k}_sentiment.safetensors`` (float32, every parameter) and
  ``.json`` (record: accuracies with bootstrap 95 % intervals, the test predictions, history). The
  test split is read once, at the end, through the loader ``build_cached_ladder(k)``.
* ``pack --layers 6``: pack a trained rung into the package as an int8 difference from
  all-MiniLM-L6-v2 (``src/salience/zoo/minilm_l{k}_sentiment.safetensors`` + ``.json``: the training
  record, the packing error and the rebuilt model's test accuracy and predictions, measured through
  the public loader ``build_minilm_ladder(k)``).
* ``smollm2-head``: SmolLM2-135M-Instruct body frozen; the final hidden state of each sentence's
  last token is computed once (cached in ``ladder/smollm2_features.pt``); a linear head (2 x 576, no
  bias) is fitted by L-BFGS on L2-regularised cross-entropy, the L2 strength chosen on validation.
  Writes ``src/salience/zoo/smollm2_sentiment_head.safetensors`` + ``.json``.
* ``baseline``: today's ``zoo:minilm-sentiment`` on the same test split (accuracy + interval + predictions).
* ``zero-shot``: SmolLM2-135M-Instruct through ``salience.PromptClassifier`` (no training) on the
  movie test split and on VADER's tweets / Amazon / NYT sets (all, or a seeded sample of ``--n``).
* ``table``: the markdown accuracy table from the records.

    flock /tmp/salience-cpu.lock python scripts/train_size_ladder.py minilm --layers 2 4 6
    flock /tmp/salience-cpu.lock python scripts/train_size_ladder.py smollm2-head
    flock /tmp/salience-cpu.lock python scripts/train_size_ladder.py baseline
    flock /tmp/salience-cpu.lock python scripts/train_size_ladder.py zero-shot --n 400
    python scripts/train_size_ladder.py pack --layers 6
    python scripts/train_size_ladder.py table
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

from salience.datasets.movie_snippets import Snippet, split_movie_snippets
from salience.datasets.vader_sets import VADER_SET_FILES, load_vader_set
from salience.evaluate.summary import bootstrap_ci
from salience.zoo import minilm_ladder as ladder
from salience.zoo.minilm_sentiment import MAX_LENGTH

Log = Callable[[str], None]
START = time.perf_counter()
ZERO_SHOT_TEMPLATES: dict[str, dict[str, Any]] = {
    "plain": {"template": "Review: {text}\nSentiment:", "labels": {"negative": " negative", "positive": " positive"}},
    "chat": {"template": [{"role": "user", "content": "Is the sentiment of this text positive or negative? "
                                                      "Answer with one word.\n\nText: {text}"}],
             "labels": {"negative": "negative", "positive": "positive"}},
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def seed_everything(seed: int, threads: int) -> None:
    """Seed Python, numpy and torch; deterministic kernels; a fixed thread count (results depend on it)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def environment(threads: int) -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": threads, "cpu_count": os.cpu_count(), "load_average_end": list(os.getloadavg())}


def command(argv: Sequence[str] | None) -> str:
    return " ".join(["python scripts/train_size_ladder.py", *(sys.argv[1:] if argv is None else argv)])


def accuracy_record(correct: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Accuracy and its percentile-bootstrap 95 % interval (2,000 resamples of the examples, seeded)."""
    low, high = bootstrap_ci(correct.astype(np.float64), seed=seed)
    return {"n": int(correct.size), "accuracy": round(float(correct.mean()), 4), "ci95": [round(low, 4), round(high, 4)]}


def tokenize(tokenizer: Any, snippets: Sequence[Snippet]) -> list[list[int]]:
    return tokenizer([s.text for s in snippets], truncation=True, max_length=MAX_LENGTH)["input_ids"]


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def length_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """A seeded epoch of batches with little padding: permute, sort chunks of 50 batches by length,
    cut into batches, shuffle the batches."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


@torch.inference_mode()
def classifier_logits(model: nn.Module, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """Logits (N, C) of a sequence classifier, computed in length-sorted batches, returned in input order."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.config.num_labels)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, mask = pad([ids[i] for i in idx], pad_id)
        out[idx] = model(input_ids=input_ids, attention_mask=mask).logits.float()
    return out


def get_split(args: argparse.Namespace) -> dict[str, list[Snippet]]:
    """The movie-snippet split; with ``--smoke N`` only the first N of each part (script check)."""
    split = split_movie_snippets(seed=args.seed)
    return {k: v[:args.smoke or None] for k, v in split.items()}


def labels_of(snippets: Sequence[Snippet]) -> torch.Tensor:
    return torch.tensor([s.label for s in snippets])


# ---------------------------------------------------------------------------------------- MiniLM
def train_minilm(layers: int, args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    seed_everything(args.seed, args.threads)
    split = get_split(args)
    model, tokenizer = ladder.build_cut_base(layers)  # the classifier's init draws from the seeded global RNG
    pad_id = tokenizer.pad_token_id
    ids = {k: tokenize(tokenizer, split[k]) for k in ("train", "validation")}
    labels = {k: labels_of(v) for k, v in split.items()}
    lengths = [len(r) for r in ids["train"]]
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(lengths) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(args.seed)
    best: dict[str, Any] = {"validation_accuracy": -1.0}
    history = []
    n_params = sum(p.numel() for p in model.parameters())
    log(f"minilm-l{layers}: {n_params:,} parameters, all trained; {steps_per_epoch} steps per epoch, up to {args.epochs} epochs")
    for epoch in range(1, args.epochs + 1):
        model.train()
        losses, tick = [], time.perf_counter()
        batches = length_batches(lengths, args.batch_size, gen)
        for step, batch in enumerate(batches):
            input_ids, mask = pad([ids["train"][i] for i in batch], pad_id)
            loss = F.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels["train"][batch])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            losses.append(loss.item())
            if args.estimate_batches and step + 1 == min(args.estimate_batches, len(batches)):
                per_batch = (time.perf_counter() - tick) / (step + 1)
                log(f"minilm-l{layers}: {per_batch:.3f} s per batch -> {per_batch * steps_per_epoch / 60:.1f} min per epoch "
                    f"(load average {os.getloadavg()[0]:.2f})")
                return {"seconds_per_batch": per_batch}
        val = float((classifier_logits(model, ids["validation"], pad_id).argmax(-1) == labels["validation"]).float().mean())
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_accuracy": round(val, 4),
                        "seconds": round(time.perf_counter() - tick, 1)})
        log(f"minilm-l{layers} epoch {epoch}: loss {np.mean(losses):.4f}, validation {val:.4f} "
            f"({time.perf_counter() - tick:.0f} s)")
        if val > best["validation_accuracy"]:
            best = {"epoch": epoch, "validation_accuracy": val,
                    "state": {n: t.detach().clone() for n, t in model.state_dict().items()}}
        elif epoch - best["epoch"] >= args.patience:
            log(f"minilm-l{layers}: no improvement for {args.patience} epoch(s): stopping")
            break
    train_seconds = time.perf_counter() - t0

    path = ladder.ladder_weights_path(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {n: t.contiguous() for n, t in sorted(best["state"].items()) if not n.endswith("position_ids")}
    save_file(state, str(path), metadata={"format": "pt"})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    # the one look at "test", through the loader of the written weights
    model, tokenizer = ladder.build_cached_ladder(layers)
    test_ids = tokenize(tokenizer, split["test"])
    val_logits = classifier_logits(model, ids["validation"], pad_id)
    val_acc = float((val_logits.argmax(-1) == labels["validation"]).float().mean())
    if abs(val_acc - best["validation_accuracy"]) > 1e-9:
        raise SystemExit(f"reloaded model's validation accuracy {val_acc} != trained {best['validation_accuracy']}")
    test_pred = classifier_logits(model, test_ids, pad_id).argmax(-1)
    correct = (test_pred == labels["test"]).numpy()
    with torch.no_grad():  # the same weights rounded to float16 (storage check)
        model.load_state_dict({n: t.half().float() for n, t in state.items()}, strict=False)
    fp16_correct = (classifier_logits(model, test_ids, pad_id).argmax(-1) == labels["test"]).numpy()
    record = {
        "name": f"zoo:minilm-l{layers}-sentiment",
        "architecture": "BertForSequenceClassification",
        "base_model": "all-MiniLM-L6-v2 cut to its first "
                      f"{layers} encoder layers (salience.zoo.minilm_ladder.cut_to_layers)",
        "trained": "all parameters (embeddings, encoder layers, pooler, classifier)",
        "n_parameters": n_params,
        "seed": args.seed,
        "split": f"salience.datasets.movie_snippets.split_movie_snippets(seed={args.seed})",
        "best_epoch": best["epoch"],
        "validation_accuracy": round(val_acc, 4),
        "test": accuracy_record(correct),
        "test_float16_weights": accuracy_record(fp16_correct),
        "test_predictions": "".join(map(str, test_pred.tolist())),
        "hyperparameters": {"optimizer": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay,
                            "batch_size": args.batch_size, "max_epochs": args.epochs, "patience": args.patience,
                            "schedule": "linear warm-up 10% then linear decay over max_epochs",
                            "batches": "length-bucketed (chunks of 50 batches sorted by length), seeded",
                            "max_length": MAX_LENGTH, "dropout": "BERT defaults (0.1)",
                            "epoch_selection": "best validation accuracy"},
        "history": history,
        "weights_sha256": digest,
        "weights_bytes": path.stat().st_size,
        "training_seconds": round(train_seconds, 1),
        "environment": environment(args.threads),
        "trained_on": datetime.date.today().isoformat(),
        "command": command(argv),
    }
    ladder.ladder_metadata_path(layers).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"minilm-l{layers}: validation {val_acc:.4f}, test {record['test']['accuracy']:.4f} {record['test']['ci95']} "
        f"(float16 weights: {record['test_float16_weights']['accuracy']:.4f}); wrote {path} (sha256 {digest[:12]})")
    return record


def cmd_minilm(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    for layers in args.layers:
        if args.budget_minutes and not args.estimate_batches:
            # time 10 batches first (the run restarts from the seed afterwards: same result as without)
            probe = argparse.Namespace(**{**vars(args), "estimate_batches": 10})
            per_batch = train_minilm(layers, probe, argv)["seconds_per_batch"]
            steps = math.ceil(len(get_split(args)["train"]) / args.batch_size)
            fit = max(1, int(args.budget_minutes * 60 / (per_batch * steps * 1.1)))  # 10 % for validation
            if fit < args.epochs:
                log(f"minilm-l{layers}: {args.epochs} epochs would take about {args.epochs * per_batch * steps / 60:.0f} min "
                    f"> budget {args.budget_minutes} min: cut to {fit} epochs")
            run = argparse.Namespace(**{**vars(args), "epochs": min(args.epochs, fit)})
        else:
            run = args
        train_minilm(layers, run, argv)


# ---------------------------------------------------------------------------------------- pack
def cmd_pack(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    from safetensors.torch import load_file

    from salience.zoo.minilm_sentiment import minilm_base_state
    from salience.zoo.weight_delta import FORMAT, base_checksums, decode_delta, encode_delta

    seed_everything(args.seed, args.threads)
    split = get_split(args)
    for layers in args.layers:
        record = json.loads(ladder.ladder_metadata_path(layers).read_text())
        tuned = load_file(ladder.ladder_weights_path(layers))
        base = minilm_base_state()
        packed = encode_delta(tuned, base)
        out = ladder.shipped_delta_path(layers)
        save_file(packed, str(out), metadata={"format": FORMAT})
        checksums = base_checksums(packed, base)
        rebuilt = decode_delta(load_file(out), base, checksums)
        error = max(float((rebuilt[n] - t.float()).abs().max()) for n, t in tuned.items())
        record["shipped"] = {"base_checksums": checksums}  # read by the public loader below
        ladder.shipped_metadata_path(layers).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        model, tokenizer = ladder.build_minilm_ladder(layers)  # the public loader reads the packed file
        logits = classifier_logits(model, tokenize(tokenizer, split["test"]), tokenizer.pad_token_id)
        pred = logits.argmax(-1)
        float32_pred = torch.tensor([int(c) for c in record["test_predictions"]])
        record["shipped"] = {
            "file": out.name, "format": FORMAT, "bytes": out.stat().st_size,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "packed_from_sha256": record["weights_sha256"],
            "max_abs_weight_error": error,
            "test": accuracy_record((pred == labels_of(split["test"])).numpy()),
            "test_predictions": "".join(map(str, pred.tolist())),
            "test_predictions_changed_by_packing": int((pred != float32_pred[:len(pred)]).sum()),
            "base_checksums": checksums,
            "command": command(argv),
        }
        ladder.shipped_metadata_path(layers).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        log(f"minilm-l{layers}: packed {out.stat().st_size / 1e6:.1f} MB (max weight error {error:.1e}); "
            f"test {record['shipped']['test']}, {record['shipped']['test_predictions_changed_by_packing']} "
            f"predictions changed by packing")


# ---------------------------------------------------------------------------------------- baseline
def cmd_baseline(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    from salience.zoo.minilm_sentiment import build_minilm_sentiment

    seed_everything(args.seed, args.threads)
    split = get_split(args)
    model, tokenizer = build_minilm_sentiment()
    pred = classifier_logits(model, tokenize(tokenizer, split["test"]), tokenizer.pad_token_id).argmax(-1)
    record = {"name": "zoo:minilm-sentiment", "test": accuracy_record((pred == labels_of(split["test"])).numpy()),
              "test_predictions": "".join(map(str, pred.tolist())), "command": command(argv)}
    ladder.ladder_dir().mkdir(parents=True, exist_ok=True)
    (ladder.ladder_dir() / "minilm_sentiment_test.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"zoo:minilm-sentiment: test {record['test']}")


# ---------------------------------------------------------------------------------------- SmolLM2 head
@torch.inference_mode()
def last_token_states(body: nn.Module, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
                      limit_batches: int = 0) -> torch.Tensor:
    """The body's final hidden state (after its final norm) at each text's last token (N, H);
    right padding, which a causal LM's real tokens never see."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.zeros(len(ids), body.config.hidden_size)
    for b, start in enumerate(range(0, len(order), batch_size)):
        if limit_batches and b == limit_batches:
            break
        idx = order[start:start + batch_size]
        input_ids, mask = pad([ids[i] for i in idx], pad_id)
        hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        out[idx] = hidden[torch.arange(len(idx)), mask.sum(1) - 1].float()
        if b % 20 == 0:
            log(f"  features: {start + len(idx)}/{len(ids)}")
    return out


def fit_head(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Weight (2, H), no bias, minimising mean cross-entropy + l2/2 ||W||^2 (L-BFGS, float64, from zero)."""
    x = x.double()
    weight = torch.zeros(2, x.shape[1], dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([weight], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                              history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = F.cross_entropy(x @ weight.T, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optim.step(closure)
    return weight.detach()


def cmd_smollm2_head(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    from salience.zoo.smollm2 import build_smollm2

    t0 = time.perf_counter()
    seed_everything(args.seed, args.threads)
    split = get_split(args)
    lm, tokenizer = build_smollm2()
    pad_id = tokenizer.pad_token_id
    ids = {k: tokenize(tokenizer, v) for k, v in split.items()}
    labels = {k: labels_of(v) for k, v in split.items()}
    if args.estimate_batches:
        tick = time.perf_counter()
        sample = sorted(ids["train"], key=len)[len(ids["train"]) // 2:][:args.batch_size * args.estimate_batches]
        last_token_states(lm.model, sample, pad_id, args.batch_size)
        rate = len(sample) / (time.perf_counter() - tick)
        log(f"smollm2 features: {rate:.1f} sentences/s (median-length and longer) -> about "
            f"{sum(map(len, ids.values())) / rate / 60:.1f} min for all {sum(map(len, ids.values()))}")
        return
    cache = ladder.ladder_dir() / "smollm2_features.pt"
    if cache.is_file():
        feats = torch.load(cache)
        log(f"read cached features {cache}")
    else:
        feats = {}
        for k in ("train", "validation", "test"):
            feats[k] = last_token_states(lm.model, ids[k], pad_id, args.batch_size)
            log(f"features of {k}: {tuple(feats[k].shape)}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, cache)
    feature_seconds = time.perf_counter() - t0
    search = {}
    best_l2, best_val, best_w = None, -1.0, None
    for l2 in args.l2:
        w = fit_head(feats["train"], labels["train"], l2)
        val = float(((feats["validation"].double() @ w.T).argmax(-1) == labels["validation"]).float().mean())
        train = float(((feats["train"].double() @ w.T).argmax(-1) == labels["train"]).float().mean())
        search[str(l2)] = {"train_accuracy": round(train, 4), "validation_accuracy": round(val, 4)}
        log(f"  l2 {l2}: train {train:.4f}, validation {val:.4f}")
        if val > best_val:
            best_l2, best_val, best_w = l2, val, w
    assert best_w is not None
    weight = best_w.float()
    save_file({"score.weight": weight.contiguous()}, str(ladder.HEAD_WEIGHTS_PATH),
              metadata={"format": "pt"})
    ladder.HEAD_WEIGHTS_PATH.chmod(0o644)
    test_pred = (feats["test"] @ weight.T).argmax(-1)
    # end-to-end check of the shipped classifier on 64 test sentences against the cached features
    model, tok = ladder.build_smollm2_sentiment_head()
    check_ids = ids["test"][:64]
    full = classifier_logits(model, check_ids, pad_id, batch_size=16)
    cached = feats["test"][:64] @ weight.T
    diff = (full - cached).abs().max().item()
    log(f"end-to-end check (64 test sentences, padded batches): max |logit difference| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"the shipped head classifier disagrees with the cached features (max diff {diff})")
    record = {
        "name": "zoo:smollm2-sentiment-head",
        "architecture": "LlamaForSequenceClassification (salience.zoo.minilm_ladder.lm_head_classifier)",
        "body": "SmolLM2-135M-Instruct (zoo:smollm2-135m), frozen",
        "pooling": "final hidden state (after the final norm) of the text's last token; no bias",
        "features": "computed once for every sentence (body frozen), then the head fitted on them",
        "trained_parameters": ["score.weight"],
        "n_trained_parameters": int(weight.numel()),
        "seed": args.seed,
        "split": f"salience.datasets.movie_snippets.split_movie_snippets(seed={args.seed})",
        "fit": "L-BFGS (strong Wolfe, 500 iterations, float64, from zero) on mean cross-entropy + l2/2 ||W||^2",
        "l2_search_validation": search,
        "l2": best_l2,
        "validation_accuracy": round(best_val, 4),
        "test": accuracy_record((test_pred == labels["test"]).numpy()),
        "test_predictions": "".join(map(str, test_pred.tolist())),
        "end_to_end_max_logit_difference": diff,
        "feature_seconds": round(feature_seconds, 1),
        "environment": environment(args.threads),
        "trained_on": datetime.date.today().isoformat(),
        "command": command(argv),
    }
    ladder.HEAD_METADATA_PATH.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"smollm2-head: l2 {best_l2}, validation {best_val:.4f}, test {record['test']}")


# ---------------------------------------------------------------------------------------- zero-shot
def cmd_zero_shot(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    from salience import PromptClassifier
    from salience.errors import InputError
    from salience.models.loading import load_model

    seed_everything(args.seed, args.threads)
    lm = load_model("zoo:smollm2-135m")
    sets = {"movies-test": get_split(args)["test"]}
    sets.update({name: load_vader_set(name)[:args.smoke or None] for name in VADER_SET_FILES})
    out_path = ladder.ladder_dir() / "zero_shot.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for form in args.forms:
        spec = ZERO_SHOT_TEMPLATES[form]
        clf = PromptClassifier(lm, spec["template"], spec["labels"])
        for name in args.sets:
            data = sets[name]
            if args.n and args.n < len(data):
                chosen = sorted(np.random.default_rng(args.seed).choice(len(data), args.n, replace=False).tolist())
                data = [data[i] for i in chosen]
            tick, correct, predicted, errors = time.perf_counter(), [], [], []
            for s in data:
                try:
                    pred = clf.predict(clf.encode(s.text, truncate=True))
                except InputError as error:
                    errors.append(f"{s.id}: {error}")
                    continue
                predicted.append(pred.index)
                correct.append(pred.index == s.label)
            seconds = time.perf_counter() - tick
            rec = accuracy_record(np.array(correct))
            rec.update({"of": len(sets[name]), "sample": f"seeded sample (numpy default_rng({args.seed}))"
                        if len(data) < len(sets[name]) else "all", "n_errors": len(errors), "errors": errors[:5],
                        "predicted_positive_share": round(float(np.mean(predicted)), 4),
                        "true_positive_share": round(float(np.mean([s.label for s in data])), 4),
                        "seconds": round(seconds, 1), "per_second": round(len(data) / seconds, 2)})
            results.setdefault(form, {"template": spec["template"], "labels": spec["labels"]})[name] = rec
            log(f"zero-shot {form} {name}: {rec}")
            results["command_" + form + "_" + name] = command(argv)
            results["environment"] = environment(args.threads)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- table
def cmd_table(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    rows = []
    base = ladder.ladder_dir() / "minilm_sentiment_test.json"
    records = [json.loads(base.read_text())] if base.is_file() else []
    records += [json.loads(ladder.ladder_metadata_path(k).read_text()) for k in ladder.LADDER_LAYERS
                if ladder.ladder_metadata_path(k).is_file()]
    if ladder.HEAD_METADATA_PATH.is_file():
        records.append(ladder.load_head_metadata())
    for r in records:
        t = r["test"]
        rows.append(f"| `{r['name']}` | {r.get('n_parameters', '')} | {r.get('validation_accuracy', '')} | "
                    f"{t['accuracy']:.4f} | [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] |")
    print("| model | parameters | validation | test accuracy | bootstrap 95 % |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if base.is_file() and ladder.ladder_metadata_path(6).is_file():
        y = np.array([s.label for s in split_movie_snippets(seed=0)["test"]])
        a = np.array(list(json.loads(base.read_text())["test_predictions"]), dtype=int) == y
        b = np.array(list(json.loads(ladder.ladder_metadata_path(6).read_text())["test_predictions"]), dtype=int) == y
        low, high = bootstrap_ci((b.astype(float) - a.astype(float)), seed=0)
        print(f"\npaired difference minilm-l6 - minilm-sentiment: {b.mean() - a.mean():+.4f} "
              f"(bootstrap 95 % [{low:+.4f}, {high:+.4f}])")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible at a fixed count)")
    parser.add_argument("--smoke", type=int, default=0, help="check the script: only the first N of each split / set")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("minilm", help="fine-tune the cut MiniLMs in full")
    p.add_argument("--layers", type=int, nargs="+", default=list(ladder.LADDER_LAYERS), choices=ladder.LADDER_LAYERS)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--estimate-batches", type=int, default=0, help="time this many batches, print the estimate, stop")
    p.add_argument("--budget-minutes", type=float, default=0,
                   help="time 10 batches first and cut the epochs so that training fits (0: no cut)")
    p = sub.add_parser("smollm2-head", help="fit the linear head on SmolLM2's frozen last-token states")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--l2", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--estimate-batches", type=int, default=0)
    p = sub.add_parser("pack", help="ship a trained rung as an int8 difference from all-MiniLM-L6-v2")
    p.add_argument("--layers", type=int, nargs="+", default=[6], choices=ladder.LADDER_LAYERS)
    sub.add_parser("baseline", help="zoo:minilm-sentiment on the test split")
    p = sub.add_parser("zero-shot", help="SmolLM2-135M-Instruct through PromptClassifier")
    p.add_argument("--n", type=int, default=0, help="a seeded sample of n per set (0: all)")
    p.add_argument("--forms", nargs="+", default=["plain"], choices=sorted(ZERO_SHOT_TEMPLATES))
    p.add_argument("--sets", nargs="+", default=["movies-test", *VADER_SET_FILES])
    sub.add_parser("table", help="print the accuracy table from the records")
    args = parser.parse_args(argv)
    {"minilm": cmd_minilm, "smollm2-head": cmd_smollm2_head, "baseline": cmd_baseline,
     "zero-shot": cmd_zero_shot, "table": cmd_table, "pack": cmd_pack}[args.command](args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
