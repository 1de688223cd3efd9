"""Image prompts' images: read and checked before any work, decoded once per request.

The images go to diffusers as they are (in RGB): the adapter's feature extractor resizes and
crops them as it does for any diffusers user.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2i_core import InvalidRequestError

if TYPE_CHECKING:
    from PIL.Image import Image

ALLOWED_IMAGE = "a PIL image or the path of an image file"


class ImageReader:
    """Reads image prompts' images; those of the latest request are kept, so that checking and using them decodes once."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, int, int], Image] = {}

    def check(self, images: list[tuple[Any, str]]) -> None:
        """Read every ``(image, field)``, raising `InvalidRequestError` for one that is not a usable image."""
        latest: dict[tuple[str, int, int], Image] = {}
        for image, field in images:
            if isinstance(image, (str, os.PathLike)):
                key = _file_key(image, field)
                cached = self._latest.get(key)
                latest[key] = cached if cached is not None else _read(image, field)
            else:
                _check_size(image, field)
        self._latest = latest

    def rgb(self, image: Any, field: str) -> Image:
        """`image` (a PIL image or a path) in RGB."""
        if isinstance(image, (str, os.PathLike)):
            cached = self._latest.get(_file_key(image, field))
            return cached if cached is not None else _read(image, field)
        return image if image.mode == "RGB" else image.convert("RGB")


def _file_key(path: str | os.PathLike[str], field: str) -> tuple[str, int, int]:
    text = os.fspath(path)
    file = Path(text).expanduser()
    try:
        stat = file.stat()
    except OSError:
        raise InvalidRequestError(field, text, f"{ALLOWED_IMAGE} (no such file)") from None
    if not file.is_file():
        raise InvalidRequestError(field, text, f"{ALLOWED_IMAGE} (it is not a file)")
    return (text, stat.st_mtime_ns, stat.st_size)


def _read(path: str | os.PathLike[str], field: str) -> Image:
    from PIL import Image as PILImage

    text = os.fspath(path)
    try:
        with PILImage.open(Path(text).expanduser()) as opened:
            image = opened.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as exc:
        reason = "PIL cannot read it as an image" if isinstance(exc, PILImage.UnidentifiedImageError) else str(exc)
        raise InvalidRequestError(field, text, f"{ALLOWED_IMAGE} ({reason})") from None
    _check_size(image, field)
    return image


def _check_size(image: Image, field: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidRequestError(field, image, f"{ALLOWED_IMAGE} with at least one pixel (it is {width}x{height})")
