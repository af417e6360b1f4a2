"""Fashion-MNIST: 70,000 grey 28 x 28 pictures of clothing in 10 classes (Xiao, Rasul & Vollgraf,
2017, arXiv:1708.07747; MIT license, Zalando SE).

Source: the IDX files of the Debian package ``dataset-fashion-mnist`` (gzipped), found or fetched by
:func:`salience.assets.fashion_mnist_dir`. 60,000 training and 10,000 test images, 6,000 and 1,000 per
class; pixel 0 is the (black) background, 255 the brightest part of the garment.

IDX format (big-endian): two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions,
then one 4-byte size per dimension, then the values in row-major order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from salience.assets import fashion_mnist_dir, fashion_mnist_file
from salience.errors import InputError, ParameterError

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": "train", "test": "t10k"}  # split -> file prefix
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
IMAGE_SIZE = 28
_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped if its name ends in ``.gz``) into a uint8 array
    of the shape its header gives.

    Raises:
        InputError: the header is not an IDX header of unsigned bytes, or the data is short or long.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise InputError(f"{path} is not an IDX file (it must start with two zero bytes)")
    if raw[2] != _UBYTE:
        raise InputError(f"{path} holds IDX type 0x{raw[2]:02x}; only unsigned bytes (0x08) are read")
    n_dims = raw[3]
    header = 4 + 4 * n_dims
    if len(raw) < header:
        raise InputError(f"{path} ends inside its IDX header ({len(raw)} bytes, {n_dims} dimensions)")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=n_dims, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise InputError(f"{path} has {len(raw) - header} data bytes; its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_fashion_mnist(split: str = "test", limit: int | None = None, *, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of a Fashion-MNIST split, in the files' order.

    Args:
        split: ``"test"`` (10,000 images) or ``"train"`` (60,000).
        limit: keep only the first ``limit`` images (None: all).
        folder: where the IDX files are (default :func:`salience.assets.fashion_mnist_dir`).

    Returns:
        images: uint8 ``(N, 28, 28)``, 0 = black background. labels: int64 ``(N,)`` in ``0..9``,
        indices into :data:`CLASS_NAMES`.

    Raises:
        ParameterError: an unknown split or a negative limit.
        AssetMissingError: the files are neither installed nor fetched.
        InputError: a file is not a valid IDX file, or images and labels disagree.
    """
    if split not in SPLITS:
        raise ParameterError(f"unknown Fashion-MNIST split {split!r}; choose {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise ParameterError(f"limit must be >= 0 or None, got {limit}")
    folder = fashion_mnist_dir() if folder is None else folder
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        path = fashion_mnist_file(folder, f"{SPLITS[split]}-{kind}")
        if path is None:
            raise InputError(f"{folder} has no {SPLITS[split]}-{kind}[.gz]")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"{paths[0]} holds shape {images.shape}, expected (N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(f"{paths[1]} holds {labels.shape} labels for {len(images)} images")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise InputError(f"{paths[1]} has label {int(labels.max())}; Fashion-MNIST labels are 0..{len(CLASS_NAMES) - 1}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels.astype(np.int64)
