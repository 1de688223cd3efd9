"""Image comparisons and seeded generators, as the t2i suite uses them against raw diffusers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def as_array(image: Any) -> Any:
    """A PIL image as a signed numpy array, so that differences do not wrap around."""
    import numpy as np

    return np.asarray(image, dtype=np.int16)


def levels_apart(ours: Any, theirs: Any) -> int:
    """The largest difference between two PIL images of the same size, in levels of 255."""
    import numpy as np

    return int(np.abs(as_array(ours) - as_array(theirs)).max())


def assert_images_equal(ours: Sequence[Any], theirs: Sequence[Any], what: str = "raw diffusers") -> None:
    """Bit-for-bit equality of two lists of PIL images.

    Only runs that do the same floating-point work are bit-exact: compare like with like (the
    same dtype, device, weights file format and batch size on both sides).
    """
    assert len(ours) == len(theirs), f"{len(ours)} images, {what} made {len(theirs)}"
    for index, (one, other) in enumerate(zip(ours, theirs, strict=True)):
        assert one.size == other.size, f"image {index}: size {one.size} != {other.size} ({what})"
        difference = levels_apart(one, other)
        assert difference == 0, f"image {index} differs from {what} (max {difference} / 255)"


def assert_images_close(ours: Sequence[Any], theirs: Sequence[Any], *, max_levels: int, why: str) -> None:
    """Two lists of PIL images within `max_levels` of 255 per pixel, for two different computations.

    `why` says why the two sides are not the same computation (a batch against lone runs,
    offloaded against resident weights, ...); float32 rounding may differ from one CPU to another.
    """
    assert why, "say why the two sides are not the same computation"
    assert len(ours) == len(theirs), f"{len(ours)} images against {len(theirs)}"
    for index, (one, other) in enumerate(zip(ours, theirs, strict=True)):
        assert one.size == other.size, f"image {index}: size {one.size} != {other.size}"
        difference = levels_apart(one, other)
        assert difference <= max_levels, f"image {index} is {difference} levels apart (bound {max_levels}: {why})"


def assert_images_differ(ours: Sequence[Any], theirs: Sequence[Any], what: str) -> None:
    """The first images differ (in size or in at least one pixel): `what` changed the image."""
    if ours[0].size == theirs[0].size:
        assert levels_apart(ours[0], theirs[0]) > 0, f"{what} left the image unchanged"


def cpu_generators(seed: int, count: int) -> Any:
    """What t2i seeds diffusers with: one CPU generator per image, seeded ``seed + i``; a lone one for one image."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed + index) for index in range(count)]
    return generators[0] if count == 1 else generators


def reference_call(resolved: Any, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """diffusers' call arguments for a request as an engine resolved it: its fields, CPU generators
    seeded ``seed + i``, `defaults` (a plugin's extra reference arguments), then its negative prompt."""
    assert resolved.seed is not None
    kwargs: dict[str, Any] = {
        "prompt": resolved.prompt,
        "height": resolved.height,
        "width": resolved.width,
        "num_inference_steps": resolved.num_inference_steps,
        "guidance_scale": resolved.guidance_scale,
        "num_images_per_prompt": resolved.num_images,
        "generator": cpu_generators(resolved.seed, resolved.num_images),
        **(defaults or {}),
    }
    if resolved.negative_prompt is not None:
        kwargs["negative_prompt"] = resolved.negative_prompt
    return kwargs
