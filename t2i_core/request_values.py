"""The values a request holds: `Control`, `Lora`, `Embedding`, `ImagePrompt` and `HiresFix`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import attrs

from ._validators import chain, in_range, multiple_of, non_blank, of_type, optional, to_int
from .errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL.Image import Image


def _number(v: Any) -> Any:
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _control_image(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, (str, os.PathLike)):
        if not str(value):
            raise InvalidRequestError(attribute.name, value, "a PIL image or the path of an image file")
        return
    from PIL.Image import Image

    if not isinstance(value, Image):
        raise InvalidRequestError(attribute.name, value, "a PIL image or the path of an image file")


def _below_one(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value >= 1.0:
        raise InvalidRequestError(attribute.name, value, "a number in [0, 1)")


def _control_window(inst: Control, _attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= inst.start:
        raise InvalidRequestError("end", value, f"a fraction of the schedule greater than start={inst.start}")


@attrs.frozen(kw_only=True)
class Control:
    """One ControlNet conditioning: an image, the ControlNet that reads it, and its weight.

    `start` and `end` bound the fraction of the schedule during which the control applies;
    `preprocess` names a weight-free preprocessing of the image (``"canny"``) or None.
    `guess_mode` lets the ControlNet recognise the image's content without relying on the
    prompt (diffusers' ``guess_mode``); it applies to the whole call, so every control of one
    request must agree on it.
    """

    image: str | os.PathLike[str] | Image = attrs.field(validator=_control_image)
    """The control image (a pose, an edge map, a depth map...): a PIL image or the path of an image file.
    Checked to exist before the model loads; resized to the request's size.
    """
    model: str = attrs.field(validator=chain(of_type(str, what="a hub id, local folder or tiny: name"), non_blank))
    """The ControlNet that reads `image`: a hub id (``lllyasviel/sd-controlnet-openpose``), a local folder
    or a ``tiny:`` name; it must match the engine's family.
    """
    scale: float = attrs.field(
        default=1.0,
        converter=_number,
        # Bounded like a LoRA's scale: far beyond what a ControlNet was trained for, the output overflows.
        validator=chain(of_type(float, what="a number in [0, 10]"), in_range(0.0, 10.0, what="a number in [0, 10]")),
    )
    """How strongly the control steers the image (diffusers' ``controlnet_conditioning_scale``): 0 ignores
    it, 1 is as trained. A number in [0, 10]; default 1.0.
    """
    start: float = attrs.field(
        default=0.0,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in [0, 1)"), in_range(0.0, 1.0, what="a number in [0, 1)"), _below_one
        ),
    )
    """The fraction of the schedule at which the control starts to apply (diffusers'
    ``control_guidance_start``): a number in [0, 1); default 0.0.
    """
    end: float = attrs.field(
        default=1.0,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in (0, 1]"), in_range(0.0, 1.0, what="a number in (0, 1]"), _control_window
        ),
    )
    """The fraction of the schedule at which the control stops applying (diffusers'
    ``control_guidance_end``): a number in (0, 1] greater than `start`; default 1.0.
    """
    preprocess: str | None = attrs.field(default=None, validator=optional(of_type(str)))
    """A weight-free preprocessing that turns `image` into what the ControlNet reads (``"canny"``: edges of
    a photo); None (the default) uses the image as it is.
    """
    guess_mode: bool = attrs.field(default=False, validator=of_type(bool, what="True or False"))
    """Let the ControlNet recognise the image's content without relying on the prompt (diffusers'
    ``guess_mode``). It applies to the whole call: every control of one request must agree. Default
    False.
    """


def _weights_source(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(attribute.name, value, "a local .safetensors file, a local folder or a hub id")


def _source_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _token(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or value != value.strip() or "\0" in value:
        raise InvalidRequestError(
            attribute.name, value, "None or the token to use in prompts: text without surrounding spaces"
        )


@attrs.frozen
class Lora:
    """One LoRA adapter to apply to the denoiser (and text encoders, if the file has theirs).

    `source` is a local ``.safetensors`` file, a local folder or a hub id; `weight_name` picks
    the file in a folder or repository that holds several. `scale` multiplies the adapter's
    effect (diffusers' ``adapter_weights``): 0 turns it off, 1 is as trained, negative values
    push away from it. See [Apply LoRA adapters](../lora.md). Positional as ``Lora("style.safetensors", 0.8)``.
    """

    source: str = attrs.field(converter=_source_text, validator=_weights_source)
    """The adapter's weights: a local ``.safetensors`` file, a local folder or a hub id (a path-like is
    turned into text).
    """
    scale: float = attrs.field(
        default=1.0,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in [-10, 10]"), in_range(-10.0, 10.0, what="a number in [-10, 10]")
        ),
    )
    """How strongly the adapter applies (diffusers' ``adapter_weights``): 0 turns it off, 1 is as trained,
    negative values push away from it. A number in [-10, 10]; default 1.0.
    """
    weight_name: str | None = attrs.field(
        default=None, validator=optional(chain(of_type(str, what="None or a file name"), non_blank))
    )
    """The file to read when `source` is a folder or repository that holds several; None (the default)
    picks the one file, or diffusers' own ``pytorch_lora_weights.safetensors``.
    """


@attrs.frozen
class Embedding:
    """One textual-inversion embedding: new token(s) for the text encoder(s).

    `source` is a local ``.safetensors`` file, a local folder or a hub id; `token` is the word
    that stands for it in prompts (None = the token the file names, or for files that name none,
    such as SDXL embeddings, the file's stem). See [Use textual-inversion embeddings](../embeddings.md).
    """

    source: str = attrs.field(converter=_source_text, validator=_weights_source)
    """The embedding's weights: a local ``.safetensors`` file, a local folder or a hub id."""
    token: str | None = attrs.field(default=None, validator=optional(_token))
    """The word that stands for the embedding in prompts; None (the default) uses the token the file names
    or, for files that name none (SDXL embeddings), the file's stem. Text without surrounding spaces.
    """


@attrs.frozen
class ImagePrompt:
    """One image prompt (IP-Adapter): a reference image whose content and style steer the image.

    `model` is the IP-Adapter: a hub id (``h94/IP-Adapter``, ``XLabs-AI/flux-ip-adapter``), a
    local folder or weights file, or ``tiny:ip-adapter-<family>``, with `subfolder` and
    `weight_name` picking its weights file when they are not the family's defaults (``models``
    and ``ip-adapter_sd15.safetensors`` for SD 1.5). `scale` weighs the image against the text
    prompt: 0 gives the plain image, 1 is as trained. See ``docs/conditioners/ip-adapter.md``.
    Positional as ``ImagePrompt("ref.png", "h94/IP-Adapter", 0.6)``.
    """

    image: str | os.PathLike[str] | Image = attrs.field(validator=_control_image)
    """The reference image: a PIL image or the path of an image file."""
    model: str = attrs.field(validator=chain(of_type(str, what="a hub id, local folder or tiny: name"), non_blank))
    """The IP-Adapter: a hub id (``h94/IP-Adapter``), a local folder or a ``tiny:`` name."""
    scale: float = attrs.field(
        default=1.0,
        converter=_number,
        validator=chain(of_type(float, what="a number in [0, 10]"), in_range(0.0, 10.0, what="a number in [0, 10]")),
    )
    """How much the reference image weighs against the text prompt: 0 gives the plain image, 1 is as
    trained. A number in [0, 10]; default 1.0.
    """
    subfolder: str | None = attrs.field(
        default=None, validator=optional(chain(of_type(str, what="None or a folder name"), non_blank))
    )
    """The folder of `model` that holds the weights (``models`` for SD 1.5, ``sdxl_models`` for SDXL); None
    (the default): the family's default.
    """
    weight_name: str | None = attrs.field(
        default=None, validator=optional(chain(of_type(str, what="None or a file name"), non_blank))
    )
    """The weights file in `subfolder` (``ip-adapter_sd15.bin``); None (the default): the family's default."""


#: The ways `HiresFix` enlarges the first pass's image, by name.
HIRES_UPSCALERS = ("latent", "latent-nearest", "lanczos")


def _upscaler(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in HIRES_UPSCALERS:
        allowed = ", ".join(HIRES_UPSCALERS)
        raise InvalidRequestError(attribute.name, value, f"one of {allowed}")


def _strength(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value <= 0.0:
        raise InvalidRequestError(attribute.name, value, "a number in (0, 1]")


@attrs.frozen(kw_only=True)
class HiresFix:
    """A second, larger pass over the image (AUTOMATIC1111's "hires fix").

    The request runs at its own size first; the result is enlarged by `upscaler` to
    (int(width x `scale`), int(height x `scale`)) — or to `width` x `height` when given — and
    the family's image-to-image pipeline, built from the loaded components, runs over it with
    `strength` (the fraction of the schedule it re-noises) for `steps` steps (None: the first
    pass's). `prompt` and `negative_prompt` replace the request's for the second pass (None: the
    same). ``latent`` and ``latent-nearest`` resize the latents (bilinear without antialias,
    nearest-exact); ``lanczos`` decodes, resizes the image with PIL's LANCZOS and encodes it
    again. See ``docs/hires-fix.md``.
    """

    scale: float = attrs.field(
        default=2.0,
        converter=_number,
        validator=chain(of_type(float, what="a number in [1, 8]"), in_range(1.0, 8.0, what="a number in [1, 8]")),
    )
    """How much larger the second pass is: width and height are multiplied by it (ignored when `width` and
    `height` are given). A number in [1, 8]; default 2.0.
    """
    upscaler: str = attrs.field(default="latent", validator=_upscaler)
    """How the first pass's image is enlarged: ``latent`` (the latents, bilinear), ``latent-nearest`` (the
    latents, nearest-exact) or ``lanczos`` (decoded, resized with PIL's LANCZOS, encoded again). Default
    ``latent``.
    """
    strength: float = attrs.field(
        default=0.55,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in (0, 1]"), in_range(0.0, 1.0, what="a number in (0, 1]"), _strength
        ),
    )
    """The fraction of the schedule the second pass re-noises and denoises again: low keeps the first
    image, 1 redraws it. A number in (0, 1]; default 0.55.
    """
    steps: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="an integer >= 1"), in_range(1, what="an integer >= 1"))),
    )
    """Steps of the second pass; None (the default): the first pass's `num_inference_steps`. An integer >=
    1.
    """
    width: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="a positive multiple of 8"), multiple_of(8))),
    )
    """Width of the final image, a multiple of 8; None (the default): the request's width times `scale`,
    or, with `height` alone, the width that keeps the request's aspect ratio (see `size`).
    """
    height: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="a positive multiple of 8"), multiple_of(8))),
    )
    """Height of the final image, a multiple of 8; None (the default): the request's height times `scale`,
    or, with `width` alone, the height that keeps the request's aspect ratio (see `size`).
    """
    prompt: str | None = attrs.field(default=None, validator=optional(chain(of_type(str), non_blank)))
    """The second pass's prompt; None (the default): the request's."""
    negative_prompt: str | None = attrs.field(default=None, validator=optional(of_type(str)))
    """The second pass's negative prompt; None (the default): the request's."""

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) of the final image for a first pass of `width` x `height`.

        `width` and `height` of this `HiresFix` when both are set; one of them alone keeps the
        aspect ratio (``height x self.width // width``); else (int(`width` x `scale`),
        int(`height` x `scale`)). Computed sizes are rounded down to multiples of 8, as
        AUTOMATIC1111's are: 512 x 1.3 gives 664, not 665.6.
        """
        if self.width is not None and self.height is not None:
            return self.width, self.height
        if self.width is not None:
            return self.width, _down_to_8(self.width * height // width)
        if self.height is not None:
            return _down_to_8(self.height * width // height), self.height
        return _down_to_8(int(width * self.scale)), _down_to_8(int(height * self.scale))


def _down_to_8(size: int) -> int:
    return size // 8 * 8
