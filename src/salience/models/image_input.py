"""Reading what a user gives an image classifier (a path, a PIL image, an H x W [x C] uint8 array)
into a PIL image of the mode the model needs, with a short description and notes on conversions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from salience.errors import InputError


def read_image(inputs: Any, mode: str) -> tuple[Image.Image, str, list[str]]:
    """The image converted to ``mode`` ("RGB" or "L"), a description of the input (its path, or its
    kind and size) and notes (e.g. "the RGBA image was converted to RGB (alpha dropped)")."""
    if isinstance(inputs, (str, Path)):
        image, description = _open(Path(inputs)), str(inputs)
    elif isinstance(inputs, Image.Image):
        image, description = inputs, f"PIL image {inputs.width}x{inputs.height} {inputs.mode}"
    elif isinstance(inputs, np.ndarray):
        image, description = _from_array(inputs), f"array {'x'.join(map(str, inputs.shape))} {inputs.dtype}"
    else:
        raise InputError(f"cannot read a {type(inputs).__name__} as an image; give a path, a PIL image, an HxWxC uint8 "
                         "array or a CxHxW tensor")
    notes = []
    if image.mode != mode:
        dropped = " (alpha dropped)" if "A" in image.mode or "transparency" in image.info else ""
        notes.append(f"the {image.mode} image was converted to {mode}{dropped}")
        image = image.convert(mode)
    return image, description, notes


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise InputError(f"no image file at {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path} is not an image file Pillow can read ({type(error).__name__})") from None


def _from_array(array: np.ndarray) -> Image.Image:
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))
    if array.dtype != np.uint8 or not shape_ok:
        raise InputError(f"an image array must be HxW or HxWxC uint8 with C = 1, 3 or 4; got shape {array.shape}, "
                         f"dtype {array.dtype} (give a CxHxW tensor for normalised values)")
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
