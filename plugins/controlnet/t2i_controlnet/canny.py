"""Canny edge maps for ``Control(preprocess="canny")``: OpenCV's algorithm in numpy and scipy.

The result matches ``cv2.Canny(pixels, low, high)`` with OpenCV's defaults (3x3 Sobel, L1
gradient magnitude, replicated borders), so thresholds tuned for OpenCV carry over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

DEFAULT_LOW = 100
DEFAULT_HIGH = 200

_SOBEL_X = ((-1, 0, 1), (-2, 0, 2), (-1, 0, 1))
# OpenCV's fixed-point direction test: tan(22.5 degrees) scaled by 2**15.
_SHIFT = 15
_TAN_22_5 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def canny(image: Image, low: int = DEFAULT_LOW, high: int = DEFAULT_HIGH) -> Image:
    """White edges on black, as an RGB image the size of `image`.

    A pixel is an edge when its gradient magnitude is a local maximum across the edge and
    exceeds `high`, or exceeds `low` and touches (8-connected) such a pixel. On a colour
    image each pixel takes the gradient of the channel where it is strongest.
    """
    import numpy as np
    from PIL import Image as PILImage
    from scipy import ndimage

    if low > high:
        raise ValueError(f"canny thresholds: low={low} must not exceed high={high}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    sobel_x = np.array(_SOBEL_X, dtype=np.int32)
    dx = np.stack([ndimage.correlate(pixels[..., c], sobel_x, mode="nearest") for c in range(3)], axis=-1)
    dy = np.stack([ndimage.correlate(pixels[..., c], sobel_x.T, mode="nearest") for c in range(3)], axis=-1)
    magnitudes = np.abs(dx) + np.abs(dy)
    strongest = np.argmax(magnitudes, axis=-1)[..., None]  # first channel wins ties, as in OpenCV
    dx = np.take_along_axis(dx, strongest, axis=-1)[..., 0]
    dy = np.take_along_axis(dy, strongest, axis=-1)[..., 0]
    magnitude = np.take_along_axis(magnitudes, strongest, axis=-1)[..., 0]

    candidates = (magnitude > low) & _local_maxima(magnitude, dx, dy)
    strong = candidates & (magnitude > high)
    labels, _count = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(labels.max() + 1, dtype=bool)
    keep[labels[strong]] = True
    keep[0] = False
    edges = np.where(keep[labels], 255, 0).astype(np.uint8)
    return PILImage.fromarray(np.repeat(edges[..., None], 3, axis=-1), mode="RGB")


def _local_maxima(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression across the gradient direction, quantised to 0/45/90/135 degrees.

    Neighbours outside the image count as 0. The mixed strict/non-strict comparisons are
    OpenCV's: of two equal neighbours along an edge, exactly one survives.
    """
    import numpy as np

    padded = np.pad(magnitude, 1)
    m = magnitude
    left, right = padded[1:-1, :-2], padded[1:-1, 2:]
    up, down = padded[:-2, 1:-1], padded[2:, 1:-1]
    up_left, up_right = padded[:-2, :-2], padded[:-2, 2:]
    down_left, down_right = padded[2:, :-2], padded[2:, 2:]

    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << _SHIFT
    tan22x = x * _TAN_22_5
    tan67x = tan22x + (x << (_SHIFT + 1))
    horizontal = y < tan22x
    vertical = ~horizontal & (y > tan67x)
    same_sign = (dx ^ dy) >= 0
    diagonal = np.where(same_sign, (m > up_left) & (m > down_right), (m > up_right) & (m > down_left))
    return np.where(horizontal, (m > left) & (m >= right), np.where(vertical, (m > up) & (m >= down), diagonal))
