"""Control images: size them to the request and preprocess them (`t2i_core.kit.ImageReader` reads them).

Images are sized with Lanczos resampling to exactly width x height (the aspect ratio is not
kept), the filter diffusers' ControlNet pipelines use themselves, so a control image of any
size gives the same picture through t2i as through diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from t2i_core import InvalidRequestError

from .canny import DEFAULT_HIGH, DEFAULT_LOW

if TYPE_CHECKING:
    from PIL.Image import Image

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


def sized(image: Image, width: int, height: int, preprocess: Preprocess | None) -> Image:
    """`image` stretched to width x height with Lanczos, then preprocessed (edges are found at the output size)."""
    from PIL import Image as PILImage

    if image.size != (width, height):
        image = image.resize((width, height), resample=PILImage.Resampling.LANCZOS)
    return preprocess.apply(image) if preprocess is not None else image
