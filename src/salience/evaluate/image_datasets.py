"""Image evaluation datasets: the built-in ``imagenet-photos`` and ``fashion-mnist``, an image folder
(ImageNet style: one sub-folder per class) and a CSV of ``path,label[,box]``.

Every image example stores a *reference* (a file path, ``imagenet-photos:chelsea``,
``fashion-mnist:test:17``) in the results database, never its pixels. A ``box`` is the object's
``(left, top, right, bottom)`` in the pixels of the ORIGINAL image (PIL convention: right and bottom
exclusive), passed to the metrics that declare ``needs=("box",)``. Labels become class indices of
the model: a folder name or a CSV label is matched to the model's labels by name (exactly, then
ignoring case and reading ``_`` as a space); a CSV label may also be a class index.

* ``imagenet-photos``: :mod:`salience.datasets.photos` (8 photos, ImageNet labels, hand-made boxes).
* ``fashion-mnist``: the test split (10,000 images) by default, ``split="train"`` for the 60,000
  training images; labels 0..9 (:data:`salience.datasets.fashion_mnist.CLASS_NAMES`); no boxes.
* a folder: ``ROOT/<class>/**/*.png|jpg|...``; files of other types are ignored. Examples are taken
  in turn from each class (every class's first image, then every second one, ...: classes and files
  in name order), so ``limit`` covers the classes evenly. Example ids are the paths below ``ROOT``.
* a ``.csv`` file with a header: ``path`` (relative to the CSV file's folder, or absolute), optional
  ``label`` (class name or index), optional ``box`` (four numbers ``left top right bottom``,
  separated by spaces or commas; empty: no box) and optional ``id`` (default: the path as written).

A file's content is part of the dataset fingerprint (so a run resumes only on the same pixels): the
photos, the Fashion-MNIST arrays, every image of a folder or CSV and the CSV itself are hashed.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from salience.evaluate.datasets import MAX_LISTED, Box, Dataset, DatasetError, Example, check_problems

IMAGE_BUILTIN = ("imagenet-photos", "fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CSV_FIELDS = ("id", "path", "label", "box")
LISTED_LABELS = 20  # an unknown class folder's error lists the model's labels when it has at most this many


def is_image_model(model: Any) -> bool:
    """Whether ``model`` explains images (its explanations are of kind "image")."""
    return getattr(model, "explanation_kind", None) == "image"


def require_image_model(dataset: str, model: Any) -> None:
    if not is_image_model(model):
        raise DatasetError(f"dataset {dataset} holds images, and {getattr(model, 'name', 'the model')} is a "
                           f"{getattr(model, 'kind', 'model')}: evaluate it with an image classifier (e.g. zoo:efficientnet-lite0)")


def _no_split(dataset: str, split: str | None) -> None:
    if split is not None:
        raise DatasetError(f"dataset {dataset} has no splits (split is for movie-snippets and fashion-mnist)")


# ---------------------------------------------------------------- labels and boxes
def _normalised(name: str) -> str:
    return " ".join(name.replace("_", " ").casefold().split())


def label_index(label: str, labels: Sequence[str]) -> int:
    """The class index of ``label``: a label name (exact, then ignoring case and reading ``_`` as a
    space) or a class index. ``ValueError`` naming the nearest label when none matches."""
    if label in labels:
        return list(labels).index(label)
    text = label.strip()
    if re.fullmatch(r"\d+", text):
        index = int(text)
        if index >= len(labels):
            raise ValueError(f"class index {index} is out of range: the model has {len(labels)} classes")
        return index
    matches = [i for i, name in enumerate(labels) if _normalised(name) == _normalised(text)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"label {label!r} matches several classes ({', '.join(map(str, matches))}): give the class index")
    close = difflib.get_close_matches(_normalised(text), [_normalised(n) for n in labels], n=1, cutoff=0.6)
    hint = f" (did you mean {labels[[_normalised(n) for n in labels].index(close[0])]!r}?)" if close else ""
    raise ValueError(f"label {label!r} is not a class of the model{hint}")


def parse_box(text: str) -> Box | None:
    """``"left top right bottom"`` (spaces or commas) -> a box; empty -> None. ``ValueError`` otherwise."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        return None
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"box {text!r} is not four numbers 'left top right bottom'") from None
    if len(values) != 4:
        raise ValueError(f"box {text!r} has {len(values)} numbers, not four (left top right bottom)")
    left, top, right, bottom = (int(v) if v.is_integer() else v for v in values)
    return (left, top, right, bottom)


def check_box(box: Box, size: tuple[int, int]) -> None:
    """``ValueError`` unless 0 <= left < right <= width and 0 <= top < bottom <= height."""
    left, top, right, bottom = box
    width, height = size
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"box ({left}, {top}, {right}, {bottom}) is empty or not inside the {width}x{height} image "
                         "(left top right bottom, in pixels, right and bottom exclusive)")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header; ``ValueError`` when it is not a readable image."""
    if not path.is_file():
        raise ValueError(f"no image file at {path}")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path} is not an image file Pillow can read ({type(error).__name__})") from None


def _file_digest(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def _fingerprint(kind: str, parts: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return f"{kind}/sha256-{digest.hexdigest()}"


# ---------------------------------------------------------------- built-in
def imagenet_photos(model: Any, split: str | None, limit: int | None) -> Dataset:
    """The scikit-image and scikit-learn photos with ImageNet labels and hand-made boxes."""
    from salience.datasets.photos import PHOTOS_FILE, load_photos

    require_image_model("imagenet-photos", model)
    _no_split("imagenet-photos", split)
    photos = load_photos()
    examples = [Example(p.id, str(p.path), p.label, box=p.box, reference=f"imagenet-photos:{p.id}") for p in photos]
    return Dataset(
        name="imagenet-photos",
        examples=examples[:limit],
        fingerprint=_fingerprint("imagenet-photos", [PHOTOS_FILE.read_bytes(), *(_file_digest(p.path) for p in photos)]),
        description=f"imagenet-photos ({len(photos)} scikit-image and scikit-learn photos; ImageNet labels, hand-made boxes)",
        reference="boxes",
        total=len(photos),
        kind="image",
    )


def fashion_mnist(model: Any, split: str | None, limit: int | None) -> Dataset:
    """Fashion-MNIST's test (default) or train split, in the files' order; no boxes."""
    from salience.datasets import fashion_mnist as source

    require_image_model("fashion-mnist", model)
    split = split or "test"
    if split not in ("test", "train"):
        raise DatasetError(f"fashion-mnist has no split {split!r}; choose test or train")
    images, labels = source.load_fashion_mnist(split)
    examples = [Example(f"{split}-{i:05d}", images[i], int(labels[i]), reference=f"fashion-mnist:{split}:{i}")
                for i in range(len(images) if limit is None else min(limit, len(images)))]
    return Dataset(
        name="fashion-mnist",
        examples=examples,
        fingerprint=_fingerprint(f"fashion-mnist/{split}", [images.tobytes(), labels.astype("<i8").tobytes()]),
        description=f"fashion-mnist ({split} split, {len(images):,} 28x28 grey images, 10 classes)",
        total=len(images),
        kind="image",
    )


# ---------------------------------------------------------------- folder
def image_folder(root: Path, model: Any, split: str | None, limit: int | None, skip_invalid: bool) -> Dataset:
    """``root/<class name>/**/<image>``; the class folders' names must be labels of ``model``."""
    require_image_model(f"folder {root}", model)
    _no_split(f"folder {root}", split)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not folders:
        raise DatasetError(f"{root} has no class folders: an image folder holds one sub-folder per class "
                           f"(named as the model's labels) with the images inside")
    classes, unknown = {}, []
    for folder in folders:
        try:
            classes[folder] = label_index(folder.name, model.labels)
        except ValueError as error:
            unknown.append(f"{folder.name!r}{_hint(str(error))}")
    if unknown:
        more = f", ... ({len(unknown) - MAX_LISTED} more)" if len(unknown) > MAX_LISTED else ""
        known = f"; its labels: {', '.join(model.labels)}" if len(model.labels) <= LISTED_LABELS else ""
        raise DatasetError(f"{root}: {len(unknown)} class folder{'s' if len(unknown) > 1 else ''} match no label of "
                           f"{getattr(model, 'name', 'the model')} (matched by name, ignoring case and _): "
                           + ", ".join(unknown[:MAX_LISTED]) + more + known)
    problems = [f"{name}: an image outside the class folders" for name in stray]
    per_class: list[list[Example]] = []
    parts: list[bytes] = []
    for folder, label in classes.items():
        found = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            relative = path.relative_to(root).as_posix()
            try:
                image_size(path)
            except ValueError as error:
                problems.append(f"{relative}: {error}")
                continue
            parts += [relative.encode(), str(label).encode(), _file_digest(path)]
            found.append(Example(relative, str(path.resolve()), label, reference=str(path.resolve())))
        per_class.append(found)
    check_problems(problems, str(root), skip_invalid, "file")
    examples = [group[i] for i in range(max(map(len, per_class), default=0)) for group in per_class if i < len(group)]
    if not examples:
        raise DatasetError(f"{root} holds no image ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return Dataset(
        name=root.name,
        examples=examples[:limit],
        fingerprint=_fingerprint("folder", parts),
        description=f"{root.name} (image folder: {len(examples)} images in {len(classes)} classes)",
        total=len(examples),
        skipped=problems,
        kind="image",
    )


def _hint(message: str) -> str:
    match = re.search(r"\(did you mean .*\?\)", message)
    return f" {match.group(0)}" if match else ""


# ---------------------------------------------------------------- CSV
def image_csv(path: Path, model: Any, split: str | None, limit: int | None, skip_invalid: bool) -> Dataset:
    """A CSV of ``path,label[,box]`` rows (header first; see the module docstring)."""
    require_image_model(path.name, model)
    _no_split(path.name, split)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read dataset {path}: {error.strerror or error}") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 ({error.reason} at byte {error.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    _check_header(path, header)
    examples: list[Example] = []
    problems: list[str] = []
    parts: list[bytes] = [raw]
    seen: dict[str, int] = {}
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise DatasetError(f"{path}: line {reader.line_num}: not valid CSV ({error})") from None
        number, start = start, reader.line_num + 1  # a quoted field may span lines: the row starts at ``number``
        if not any(cell.strip() for cell in cells):
            continue  # blank lines are not examples
        try:
            if len(cells) > len(header):
                raise ValueError(f"{len(cells)} fields, more than the header's {len(header)}")
            example, digest = _csv_example(dict(zip(header, cells)), number, path.parent, model)
            if example.id in seen:
                raise ValueError(f"id {example.id!r} repeats line {seen[example.id]}")
        except ValueError as error:
            problems.append(f"line {number}: {error}")
            continue
        seen[example.id] = number
        parts += [example.id.encode(), digest]
        examples.append(example)
    check_problems(problems, str(path), skip_invalid)
    if not examples:
        raise DatasetError(f"{path} holds no valid example")
    boxed = any(e.box is not None for e in examples)
    return Dataset(
        name=path.name,
        examples=examples[:limit],
        fingerprint=_fingerprint("csv", parts),
        description=f"{path.name} ({len(examples)} images{', with boxes' if boxed else ''})",
        reference="boxes" if boxed else None,
        total=len(examples),
        skipped=problems,
        kind="image",
    )


def _check_header(path: Path, header: list[str]) -> None:
    if "path" not in header:
        raise DatasetError(f"{path}: the first line must be a header with a 'path' column (and optional "
                           f"{', '.join(f for f in CSV_FIELDS if f != 'path')}); got {','.join(header) or 'nothing'}")
    for name in header:
        if name not in CSV_FIELDS:
            close = difflib.get_close_matches(name, CSV_FIELDS, n=1, cutoff=0.75)
            if close:
                raise DatasetError(f"{path}: unknown column {name!r} (did you mean {close[0]!r}?)")
    repeated = sorted({name for name in header if header.count(name) > 1 and name in CSV_FIELDS})
    if repeated:
        raise DatasetError(f"{path}: column {repeated[0]!r} appears twice in the header")


def _csv_example(row: dict[str, str], number: int, folder: Path, model: Any) -> tuple[Example, bytes]:
    written = (row.get("path") or "").strip()
    if not written:
        raise ValueError("no path")
    file = Path(written).expanduser()
    file = file if file.is_absolute() else folder / file
    size = image_size(file)
    label_text = (row.get("label") or "").strip()
    label = label_index(label_text, model.labels) if label_text else None
    box = parse_box(row.get("box") or "")
    if box is not None:
        check_box(box, size)
    example_id = (row.get("id") or "").strip() or written
    resolved = str(file.resolve())
    return Example(example_id, resolved, label, box=box, reference=resolved, line=number), _file_digest(file)
