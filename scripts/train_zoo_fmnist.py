#!/usr/bin/env python
"""Train the zoo models ``zoo:fmnist-cnn`` and ``zoo:fmnist-bnn`` on Fashion-MNIST (seeded, CPU, 2 threads).

The architecture is :class:`salience.zoo.fmnist.FashionCNN` (full precision, or binarized: sign
activations and sign weights in the two middle convolutions, straight-through estimator; see that
module). Protocol:

* the 60,000 training images are split once (seeded) into 55,000 for training and 5,000 for
  validation (reported per epoch; the shipped settings were set beforehand, not searched: each
  model was trained once with them);
* inputs normalised with the training mean and std (as :class:`salience.zoo.fmnist.GreyPreprocess`);
  seeded random horizontal flips (a garment mirrored is the same garment);
* Adam, cross-entropy, batch size 128, the learning rate decayed to 0 by a cosine over all steps;
  the BNN's latent binary weights are clipped to [-1, 1] after every step (BinaryConnect), so that
  the straight-through estimator keeps them trainable;
* a fixed number of epochs, the last epoch's model kept (no selection by any accuracy);
* the 10,000 test images are scored once, at the end, with the model rebuilt from the written
  file by :func:`salience.zoo.fmnist.build_fmnist`.

Writes ``src/salience/zoo/fmnist_{cnn,bnn}.safetensors`` and ``fmnist_{cnn,bnn}.json`` (the training record).

    python -m salience.assets fetch
    python scripts/train_zoo_fmnist.py --kind cnn
    python scripts/train_zoo_fmnist.py --kind bnn
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from salience.datasets.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from salience.zoo import fmnist as zoo

DEFAULTS = {  # kind -> (epochs, lr)
    "cnn": (8, 2e-3),
    "bnn": (12, 5e-3),
}
N_VALIDATION = 5_000
BATCH_SIZE = 128
EVAL_BATCH = 1_000


def split_train(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the 55,000 training and 5,000 validation images of the training split (seeded)."""
    order = np.random.default_rng(seed).permutation(60_000)
    return np.sort(order[N_VALIDATION:]), np.sort(order[:N_VALIDATION])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum()) for i in range(0, len(x), EVAL_BATCH))
    return correct / len(x)


def clip_latent_weights(model: zoo.FashionCNN) -> None:
    """BinaryConnect: keep each binary layer's latent weights in [-1, 1], where the STE passes gradients."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, zoo.BinaryConv2d):
                module.weight.clamp_(-1.0, 1.0)


def train(kind: str, epochs: int, lr: float, seed: int, limit: int | None) -> tuple[zoo.FashionCNN, list[dict[str, float]], dict[str, Any]]:
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    train_idx, val_idx = split_train(seed)
    if limit is not None:
        train_idx = train_idx[:limit]
    x_all, y_all = zoo.images_to_tensor(images), torch.from_numpy(labels)
    x_train, y_train, x_val, y_val = x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx]
    model = zoo.FashionCNN(binary=kind == "bnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(x_train) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        start, total_loss, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), BATCH_SIZE):
            batch = order[i:i + BATCH_SIZE]
            x, y = x_train[batch], y_train[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if kind == "bnn":
                clip_latent_weights(model)
            total_loss += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == y).sum())
        row = {"epoch": epoch, "train_loss": total_loss / len(x_train), "train_accuracy_running": correct / len(x_train),
               "validation_accuracy": accuracy(model, x_val, y_val), "seconds": round(time.perf_counter() - start, 1)}
        history.append(row)
        print(f"{kind} epoch {epoch:2d}/{epochs}  loss {row['train_loss']:.4f}  train {row['train_accuracy_running']:.4f}  "
              f"validation {row['validation_accuracy']:.4f}  {row['seconds']:.0f} s", flush=True)
    model.eval()
    accuracies = {"train": accuracy(model, x_train, y_train), "validation": history[-1]["validation_accuracy"]}
    return model, history, accuracies


def _without_out(argv: list[str]) -> list[str]:
    """The arguments that decide the weights: ``--out`` only says where they are written."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        skip = arg == "--out"
        if not skip:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=zoo.KINDS, required=True)
    (cnn_epochs, cnn_lr), (bnn_epochs, bnn_lr) = DEFAULTS["cnn"], DEFAULTS["bnn"]
    parser.add_argument("--epochs", type=int, help=f"default: cnn {cnn_epochs}, bnn {bnn_epochs}")
    parser.add_argument("--lr", type=float, help=f"Adam's initial learning rate (default: cnn {cnn_lr:g}, bnn {bnn_lr:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="train on the first N training images only (a quick trial)")
    parser.add_argument("--out", type=Path, default=zoo.ZOO_DIR, help="folder for the .safetensors and .json (default: the package)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    epochs, lr = args.epochs or DEFAULTS[args.kind][0], args.lr or DEFAULTS[args.kind][1]
    start = time.perf_counter()
    model, history, accuracies = train(args.kind, epochs, lr, args.seed, args.limit)
    seconds = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / zoo.weights_path(args.kind).name
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, weights)
    # the test split, once, on the model as users load it (checks the file round trip too)
    rebuilt = zoo.FashionCNN(binary=args.kind == "bnn")
    rebuilt.load_state_dict(load_file(weights), strict=True)
    test_images, test_labels = load_fashion_mnist("test")
    accuracies["test"] = accuracy(rebuilt, zoo.images_to_tensor(test_images), torch.from_numpy(test_labels))
    record = {
        "name": f"zoo:fmnist-{args.kind}",
        "architecture": "salience.zoo.fmnist.FashionCNN" + ("(binary=True)" if args.kind == "bnn" else ""),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "binary_layers": list(zoo.BINARY_LAYERS) if args.kind == "bnn" else [],
        "grad_cam_layer": zoo.GRAD_CAM_LAYER,
        "labels": list(CLASS_NAMES),
        "dataset": {"name": "Fashion-MNIST", "source": "Debian package dataset-fashion-mnist",
                    "split": f"training split: {60_000 - N_VALIDATION} train / {N_VALIDATION} validation (seeded permutation); "
                             "test split: 10,000, scored once at the end",
                    "n_train": len(split_train(args.seed)[0]) if args.limit is None else args.limit},
        "preprocessing": {"mean": zoo.TRAIN_MEAN, "std": zoo.TRAIN_STD, "augmentation": "random horizontal flip (p = 0.5)"},
        "accuracy": {name: round(value, 4) for name, value in accuracies.items()},
        "seed": args.seed,
        "hyperparameters": {"optimizer": "Adam", "lr": lr, "schedule": "cosine to 0 over all steps", "batch_size": BATCH_SIZE,
                            "epochs": epochs, "weight_decay": 0.0, "epoch_selection": "the last epoch",
                            "latent_weight_clip": [-1.0, 1.0] if args.kind == "bnn" else None},
        "history": history,
        "training_seconds": seconds,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": args.threads,
                        "cpu_count": os.cpu_count()},
        "trained_on": datetime.date.today().isoformat(),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "command": " ".join(["python scripts/train_zoo_fmnist.py", *_without_out(sys.argv[1:] if argv is None else argv)]),
    }
    (args.out / zoo.metadata_path(args.kind).name).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{args.kind}: test accuracy {accuracies['test']:.4f} (10,000 images), {seconds:.0f} s; wrote {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
