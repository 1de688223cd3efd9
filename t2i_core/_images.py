"""Images that conditioners take (control images, image prompts): read and checked before any work,
decoded once per request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL.Image import Image

ALLOWED_IMAGE = "a PIL image or the path of an image file"
#: what identifies a file's content cheaply: its path, modification time and size
FileKey = tuple[str, int, int]


class ImageReader:
    """Reads the images a conditioner takes (control images, image prompts), keeping those of the latest
    request, so that checking them before any work and using them later decodes each file once.

    Keep one per engine (in ``engine.state``): `check` in ``Conditioner.prepare`` refuses a missing,
    unreadable or empty image naming its field; `rgb` in ``Conditioner.condition`` gives it in RGB.
    """

    def __init__(self) -> None:
        self._latest: dict[FileKey, Image] = {}

    def check(self, images: list[tuple[Any, str]]) -> None:
        """Read every ``(image, field)``, raising `InvalidRequestError` for one that is not a usable image."""
        latest: dict[FileKey, Image] = {}
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


def _file_key(path: str | os.PathLike[str], field: str) -> FileKey:
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
