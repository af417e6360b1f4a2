"""The live page's image upload: a ``multipart/form-data`` body (the form's ``image`` file and its
``method`` boxes) read with the standard library's MIME parser, checked before any model sees it.

Checks, each a one-line ParameterError (HTTP 400): the body is at most ``MAX_UPLOAD`` bytes
(5 MiB) plus ``MAX_FORM_EXTRA`` for the other fields (the server stops reading past that); the
content type is multipart/form-data with a boundary; exactly one non-empty file named ``image``;
Pillow identifies it as an image of at most ``MAX_PIXELS`` pixels (read from its header before any
pixel is decoded: no decompression bomb) and decodes it whole; 1..MAX_METHODS known methods.
"""

from __future__ import annotations

import io
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np

from salience.errors import ParameterError

MAX_UPLOAD = 5 * 1024 * 1024  # bytes of an uploaded image
MAX_FORM_EXTRA = 64 * 1024  # bytes of everything else in an upload's form (boundaries, headers, methods)
MAX_PIXELS = 25_000_000  # width x height of an uploaded image
MAX_PARTS = 16


def parse_upload(body: bytes, content_type: str, offered: list[str], max_methods: int) -> tuple[np.ndarray, list[str], str]:
    """(H x W x 3 uint8 pixels, methods, the file name as sent) of an upload form."""
    if len(body) > MAX_UPLOAD + MAX_FORM_EXTRA:
        raise ParameterError(f"the upload is larger than {MAX_UPLOAD // (1024 * 1024)} MB")
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type.lower():
        raise ParameterError("an image is sent as multipart/form-data (the page's form does it)")
    try:
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    except (ValueError, UnicodeError) as error:
        raise ParameterError(f"the upload cannot be read: {str(error)[:80]}") from None
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if not parts or len(parts) > MAX_PARTS:
        raise ParameterError("the upload cannot be read as a form")
    files, methods = [], []
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if name == "image":
            files.append(part)
        elif name == "method":
            methods.append(_text(part))
    if len(files) != 1:
        raise ParameterError("choose one image file to upload")
    data = files[0].get_payload(decode=True) or b""
    if not data:
        raise ParameterError("choose one image file to upload (the file sent was empty)")
    if len(data) > MAX_UPLOAD:
        raise ParameterError(f"the image has {len(data)} bytes; the live page takes at most {MAX_UPLOAD // (1024 * 1024)} MB")
    if not methods:
        raise ParameterError("pick at least one method")
    for method in methods:
        if method not in offered:
            raise ParameterError(f"unknown method {method[:60]!r}; the live page offers {', '.join(offered)}")
    filename = files[0].get_param("filename", header="content-disposition") or "upload"
    return decode_image(data), list(dict.fromkeys(methods))[:max_methods], str(filename)[:200]


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True) or b""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ParameterError("a form field is not UTF-8 text") from None


def decode_image(data: bytes) -> np.ndarray:
    """The pixels of an image file's bytes as H x W x 3 uint8 (RGB), or a ParameterError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise ParameterError(f"the image has {width} x {height} pixels; the live page takes at most "
                                     f"{MAX_PIXELS:,} pixels")
            pixels = np.asarray(opened.convert("RGB"))
    except ParameterError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) else f"a broken image ({str(error)[:60]})"
        raise ParameterError(f"the uploaded file is {reason}") from None
    if pixels.ndim != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ParameterError("the uploaded image has no pixels")
    return pixels
