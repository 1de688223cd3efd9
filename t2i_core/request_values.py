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
    model: str = attrs.field(validator=chain(of_type(str, what="a hub id, local folder or tiny: name"), non_blank))
    scale: float = attrs.field(
        default=1.0,
        converter=_number,
        # Bounded like a LoRA's scale: far beyond what a ControlNet was trained for, the output overflows.
        validator=chain(of_type(float, what="a number in [0, 10]"), in_range(0.0, 10.0, what="a number in [0, 10]")),
    )
    start: float = attrs.field(
        default=0.0,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in [0, 1)"), in_range(0.0, 1.0, what="a number in [0, 1)"), _below_one
        ),
    )
    end: float = attrs.field(
        default=1.0,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in (0, 1]"), in_range(0.0, 1.0, what="a number in (0, 1]"), _control_window
        ),
    )
    preprocess: str | None = attrs.field(default=None, validator=optional(of_type(str)))
    guess_mode: bool = attrs.field(default=False, validator=of_type(bool, what="True or False"))


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
    push away from it. See ``docs/lora.md``. Positional as ``Lora("style.safetensors", 0.8)``.
    """

    source: str = attrs.field(converter=_source_text, validator=_weights_source)
    scale: float = attrs.field(
        default=1.0,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in [-10, 10]"), in_range(-10.0, 10.0, what="a number in [-10, 10]")
        ),
    )
    weight_name: str | None = attrs.field(
        default=None, validator=optional(chain(of_type(str, what="None or a file name"), non_blank))
    )


@attrs.frozen
class Embedding:
    """One textual-inversion embedding: new token(s) for the text encoder(s).

    `source` is a local ``.safetensors`` file, a local folder or a hub id; `token` is the word
    that stands for it in prompts (None = the token the file names, or for files that name none,
    such as SDXL embeddings, the file's stem). See ``docs/embeddings.md``.
    """

    source: str = attrs.field(converter=_source_text, validator=_weights_source)
    token: str | None = attrs.field(default=None, validator=optional(_token))


@attrs.frozen
class ImagePrompt:
    """One image prompt (IP-Adapter): a reference image whose content and style steer the image.

    `model` is the IP-Adapter: a hub id or local folder (``h94/IP-Adapter``), with `subfolder`
    and `weight_name` picking its weights file (``models`` and ``ip-adapter_sd15.bin`` for SD
    1.5) when they are not the family's defaults. `scale` weighs the image against the text
    prompt: 0 gives the plain image, 1 is as trained. See ``docs/conditioners/ip-adapter.md``.
    Positional as ``ImagePrompt("ref.png", "h94/IP-Adapter", 0.6)``.
    """

    image: str | os.PathLike[str] | Image = attrs.field(validator=_control_image)
    model: str = attrs.field(validator=chain(of_type(str, what="a hub id, local folder or tiny: name"), non_blank))
    scale: float = attrs.field(
        default=1.0,
        converter=_number,
        validator=chain(of_type(float, what="a number in [0, 10]"), in_range(0.0, 10.0, what="a number in [0, 10]")),
    )
    subfolder: str | None = attrs.field(
        default=None, validator=optional(chain(of_type(str, what="None or a folder name"), non_blank))
    )
    weight_name: str | None = attrs.field(
        default=None, validator=optional(chain(of_type(str, what="None or a file name"), non_blank))
    )


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
    upscaler: str = attrs.field(default="latent", validator=_upscaler)
    strength: float = attrs.field(
        default=0.55,
        converter=_number,
        validator=chain(
            of_type(float, what="a number in (0, 1]"), in_range(0.0, 1.0, what="a number in (0, 1]"), _strength
        ),
    )
    steps: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="an integer >= 1"), in_range(1, what="an integer >= 1"))),
    )
    width: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="a positive multiple of 8"), multiple_of(8))),
    )
    height: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="a positive multiple of 8"), multiple_of(8))),
    )
    prompt: str | None = attrs.field(default=None, validator=optional(chain(of_type(str), non_blank)))
    negative_prompt: str | None = attrs.field(default=None, validator=optional(of_type(str)))
