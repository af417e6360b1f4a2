"""The scikit-image and scikit-learn sample photos that show an ImageNet-1k class, with that class
and a hand-made box around the object (``photos.json``, next to this module).

The photos themselves are not copied: each entry names the installed package file it is
(``skimage/data/chelsea.png`` is what ``skimage.data.chelsea()`` reads). The label is the true
class (where ImageNet-1k has no exact class, the nearest one, said in the entry's ``note``), not a
model's prediction; ``efficientnet_lite0`` records whether ``zoo:efficientnet-lite0`` gets it right.
Boxes are ``(left, top, right, bottom)`` in the photo's own pixels, right and bottom exclusive
(PIL's convention), drawn by hand (see ``scripts/check_photo_boxes.py``).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image

from salience.errors import AssetMissingError

PHOTOS_FILE = Path(__file__).with_name("photos.json")
INSTALL = {"skimage": "scikit-image", "sklearn": "scikit-learn"}  # import name -> pip name


@dataclass(frozen=True)
class Photo:
    """One photo: ``id`` (e.g. ``"chelsea"``), ``source`` (the function that loads it), ``path`` of
    the installed file, ``size`` (width, height), ImageNet ``label`` index and ``label_name``,
    ``box`` (left, top, right, bottom) in the photo's pixels, ``note`` (what is labelled and boxed),
    ``predicted``: zoo:efficientnet-lite0's top-1 class index when the entry was made."""

    id: str
    source: str
    path: Path
    size: tuple[int, int]
    label: int
    label_name: str
    box: tuple[int, int, int, int]
    note: str
    predicted: int


@cache
def photos_metadata() -> dict[str, Any]:
    """``photos.json`` as a dict (read once)."""
    data: dict[str, Any] = json.loads(PHOTOS_FILE.read_text(encoding="utf-8"))
    return data


def package_file(package: str, relative: str) -> Path:
    """The installed file ``relative`` of ``package`` (an import name); AssetMissingError saying what
    to install when the package or the file is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise AssetMissingError(f"the imagenet-photos dataset needs {INSTALL.get(package, package)}: "
                                f"pip install {INSTALL.get(package, package)}")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise AssetMissingError(f"{package} has no file {relative} (another version?); "
                                f"the imagenet-photos dataset was made with scikit-image 0.26 and scikit-learn 1.9")
    return path


def load_photos() -> list[Photo]:
    """Every photo of ``photos.json``, in its order, checked: the file exists and has the recorded
    size, and the box lies inside it."""
    photos = []
    for entry in photos_metadata()["photos"]:
        path = package_file(entry["package"], entry["file"])
        width, height = entry["size"]
        with Image.open(path) as image:
            if image.size != (width, height):
                raise AssetMissingError(f"{path} is {image.size[0]}x{image.size[1]} pixels, not the {width}x{height} its "
                                        "box was drawn on (another version of the package?)")
        left, top, right, bottom = entry["box"]
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ValueError(f"photos.json: the box of {entry['id']} {entry['box']} is not inside {width}x{height}")
        photos.append(Photo(entry["id"], entry["source"], path, (width, height), int(entry["label"]), entry["label_name"],
                            (left, top, right, bottom), entry["note"], int(entry["efficientnet_lite0"]["predicted"])))
    return photos
