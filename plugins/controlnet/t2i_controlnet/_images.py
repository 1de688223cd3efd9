"""Control images: read and check them, size them to the request, and preprocess them.

Images are sized with Lanczos resampling to exactly width x height (the aspect ratio is not
kept), the filter diffusers' ControlNet pipelines use themselves, so a control image of any
size gives the same picture through t2i as through diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import InvalidRequestError

from .canny import DEFAULT_HIGH, DEFAULT_LOW

if TYPE_CHECKING:
    from PIL.Image import Image

ALLOWED_IMAGE = "a PIL image or the path of an image file"
ALLOWED_PREPROCESS = 'None, "canny" or "canny:LOW:HIGH" with integers 0 <= LOW <= HIGH'


@attrs.frozen
class Preprocess:
    """A parsed ``Control.preprocess``: a weight-free transformation of the sized image."""

    name: str
    low: int
    high: int

    def apply(self, image: Image) -> Image:
        from .canny import canny

        return canny(image, self.low, self.high)


def parse_preprocess(value: str | None, field: str) -> Preprocess | None:
    """``None``, ``"canny"`` (thresholds 100 and 200) or ``"canny:LOW:HIGH"``."""
    if value is None:
        return None
    name, *thresholds = value.strip().split(":")
    if name != "canny" or len(thresholds) not in (0, 2):
        raise InvalidRequestError(field, value, ALLOWED_PREPROCESS)
    if not thresholds:
        return Preprocess("canny", DEFAULT_LOW, DEFAULT_HIGH)
    try:
        low, high = (int(t) for t in thresholds)
    except ValueError:
        raise InvalidRequestError(field, value, ALLOWED_PREPROCESS) from None
    if not 0 <= low <= high:
        raise InvalidRequestError(field, value, ALLOWED_PREPROCESS)
    return Preprocess("canny", low, high)


#: what identifies a file's content cheaply: its path, modification time and size
FileKey = tuple[str, int, int]


class ImageReader:
    """Reads control images, keeping those of the latest request so that checking and using them decodes once."""

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
                _check_in_memory(image, field)
        self._latest = latest

    def rgb(self, image: Any, field: str) -> Image:
        """`image` (a PIL image or a path) in RGB."""
        if isinstance(image, (str, os.PathLike)):
            cached = self._latest.get(_file_key(image, field))
            return cached if cached is not None else _read(image, field)
        return image if image.mode == "RGB" else image.convert("RGB")


def _file_key(path: str | os.PathLike[str], field: str) -> FileKey:
    text = os.fspath(path)
    try:
        stat = Path(text).expanduser().stat()
    except OSError:
        raise InvalidRequestError(field, text, f"{ALLOWED_IMAGE} (no such file)") from None
    if not Path(text).expanduser().is_file():
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
    _check_in_memory(image, field)
    return image


def _check_in_memory(image: Image, field: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidRequestError(field, image, f"{ALLOWED_IMAGE} with at least one pixel (it is {width}x{height})")


def sized(image: Image, width: int, height: int, preprocess: Preprocess | None) -> Image:
    """`image` stretched to width x height with Lanczos, then preprocessed (edges are found at the output size)."""
    from PIL import Image as PILImage

    if image.size != (width, height):
        image = image.resize((width, height), resample=PILImage.Resampling.LANCZOS)
    return preprocess.apply(image) if preprocess is not None else image
