"""The values that cross the public API: `GenerationRequest` and `GenerationResult` (the values a request holds are in `request_values`)."""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._validators import chain, encodable, in_range, multiple_of, non_blank, of_type, optional, to_int
from .errors import InvalidRequestError
from .request_values import Control as Control
from .request_values import Embedding as Embedding
from .request_values import HiresFix as HiresFix
from .request_values import ImagePrompt as ImagePrompt
from .request_values import Lora as Lora
from .request_values import _number

if TYPE_CHECKING:
    from PIL.Image import Image

#: Largest seed accepted: torch generators take 64-bit seeds, and image i uses seed + i.
MAX_SEED = 2**63 - 1


def _as_tuple(value: Any, kind: type) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, kind):
        return (value,)
    return value


def _to_loras(value: Any) -> Any:
    return _as_tuple(value, Lora)


def _to_embeddings(value: Any) -> Any:
    return _as_tuple(value, Embedding)


def _to_image_prompts(value: Any) -> Any:
    return _as_tuple(value, ImagePrompt)


def _tuple_of(kind: type) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(item, kind) for item in value):
            raise InvalidRequestError(attribute.name, value, f"a tuple of t2i_core.{kind.__name__}")

    return check


def _to_controls(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, Control):
        return (value,)
    return value


def _controls(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(c, Control) for c in value):
        raise InvalidRequestError(attribute.name, value, "a tuple of t2i_core.Control")


def _to_options(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType(dict(value))
    return value


def _options(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidRequestError(attribute.name, value, "a mapping of option names (str) to values")


@attrs.frozen(kw_only=True)
class GenerationRequest:
    """Everything that decides an image, independent of the model it is made with.

    ``None`` means "the family's default" for size, steps and guidance, "no negative prompt"
    for `negative_prompt`, and "a fresh random seed" for `seed` (the seed used is reported in
    `GenerationResult.seeds`). [Concepts](../concepts.md) explains the fields together.
    """

    prompt: str = attrs.field(validator=chain(of_type(str), non_blank, encodable))
    """What the image shows: non-blank text. Longer than the text encoder reads, it is cut (a
    `PromptTruncatedWarning` says where) unless a `prompt_weighting` reads long prompts.
    """
    negative_prompt: str | None = attrs.field(default=None, validator=optional(chain(of_type(str), encodable)))
    """What the image should not show; None (the default): no negative prompt."""
    height: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="a positive multiple of 8"), multiple_of(8))),
    )
    """Image height in pixels, a positive multiple of 8; None (the default): the family's
    (`FamilyDefaults.height`).
    """
    width: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="a positive multiple of 8"), multiple_of(8))),
    )
    """Image width in pixels, a positive multiple of 8; None (the default): the family's
    (`FamilyDefaults.width`).
    """
    num_inference_steps: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(chain(of_type(int, what="an integer >= 1"), in_range(1, what="an integer >= 1"))),
    )
    """Denoising steps, an integer >= 1; None (the default): the family's
    (`FamilyDefaults.num_inference_steps`).
    """
    guidance_scale: float | None = attrs.field(
        default=None,
        converter=_number,
        validator=optional(chain(of_type(float, what="a number >= 0"), in_range(0.0, what="a number >= 0"))),
    )
    """How closely the image follows the prompt (classifier-free guidance; FLUX.1-dev's distilled
    guidance), a number >= 0; None (the default): the family's.
    """
    seed: int | None = attrs.field(
        default=None,
        converter=to_int,
        validator=optional(
            chain(
                of_type(int, what=f"an integer in [0, {MAX_SEED}]"),
                in_range(0, MAX_SEED, what=f"an integer in [0, {MAX_SEED}]"),
            )
        ),
    )
    """The seed of image 0 (image i uses ``seed + i``), an integer in [0, 2**63 - 1]; None (the default): a
    fresh random seed, reported in `GenerationResult.seeds`.
    """
    num_images: int = attrs.field(
        default=1,
        converter=to_int,
        validator=chain(of_type(int, what="an integer >= 1"), in_range(1, what="an integer >= 1")),
    )
    """How many images, from seeds ``seed``, ``seed + 1``...: an integer >= 1; default 1."""
    prompt_weighting: str | None = attrs.field(
        default=None, validator=optional(of_type(str, what='None or a weighting syntax name such as "compel"'))
    )
    """The syntax that reads weights in the prompt (``"compel"``: ``(word)1.2``; ``"a1111"``:
    ``(word:1.2)``), served by a conditioner plugin; None (the default): the prompt is plain text.
    """
    controls: tuple[Control, ...] = attrs.field(default=(), converter=_to_controls, validator=_controls)
    """ControlNet conditionings (`Control`), applied together; a single `Control` or a list is turned into
    a tuple. Default: none.
    """
    loras: tuple[Lora, ...] = attrs.field(default=(), converter=_to_loras, validator=_tuple_of(Lora))
    """LoRA adapters (`Lora`), applied together for this request only; a single `Lora` or a list is turned
    into a tuple. Default: none.
    """
    embeddings: tuple[Embedding, ...] = attrs.field(
        default=(), converter=_to_embeddings, validator=_tuple_of(Embedding)
    )
    """Textual-inversion embeddings (`Embedding`) whose tokens the prompts may use; a single one or a list
    is turned into a tuple. Default: none.
    """
    scheduler: str | None = attrs.field(default=None, validator=optional(chain(of_type(str), non_blank)))
    """The scheduler (sampler) by name (``euler``, ``dpm++-2m-karras``; ``t2i schedulers`` lists a
    family's); None (the default): the checkpoint's own.
    """
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_to_options, validator=_options)
    """Family options by name (``{"true_cfg_scale": 4.0}``), checked against the family's declared
    `Option`s before any work. Default: none.
    """
    image_prompts: tuple[ImagePrompt, ...] = attrs.field(
        default=(), converter=_to_image_prompts, validator=_tuple_of(ImagePrompt)
    )
    """Image prompts (`ImagePrompt`, IP-Adapter); a single one or a list is turned into a tuple. Default:
    none.
    """
    hires: HiresFix | None = attrs.field(
        default=None, validator=optional(of_type(HiresFix, what="None or a t2i_core.HiresFix"))
    )
    """A second, larger pass over the image (`HiresFix`); None (the default): one pass."""

    def __attrs_post_init__(self) -> None:
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise InvalidRequestError("seed", self.seed, f"an integer such that seed + num_images - 1 <= {MAX_SEED}")

    def evolve(self, **changes: Any) -> GenerationRequest:
        """A copy with `changes` applied and validated again."""
        return attrs.evolve(self, **changes)


def _image_text(image: Any) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<in-memory image>"


def _describe_control(control: Control) -> dict[str, Any]:
    return {
        "image": _image_text(control.image),
        "model": control.model,
        "scale": control.scale,
        "start": control.start,
        "end": control.end,
        "preprocess": control.preprocess,
        "guess_mode": control.guess_mode,
    }


@attrs.frozen(kw_only=True)
class GenerationResult:
    """What `Engine.generate` returns.

    `request` is the request as it was run: defaults filled in and the seed of image 0 set.
    """

    images: list[Image]
    """The images, as PIL images, in seed order."""
    seeds: list[int]
    """The seed of each image: ``seeds[i]`` remakes ``images[i]`` alone."""
    request: GenerationRequest
    """The request as it was run: the family's defaults filled in and the seed of image 0 set, so that
    ``engine.generate(result.request)`` makes the same images.
    """
    model: str
    """The model as it was loaded: a hub id, a folder, a file or a ``tiny:`` name."""
    family: str
    """The family that made the images (``sd15``, ``flux``...)."""
    accelerators: tuple[str, ...] = ()
    """The engine's accelerators as written (``fp32``, ``first-block-cache@0.2``), saved in the PNG; empty
    when none.
    """

    prompt_loras: tuple[Lora, ...] = ()
    """The LoRAs the prompt's ``<lora:NAME:WEIGHT>`` tags named (`Engine.lora_dirs`), applied after
    ``request.loras``, which holds only the request's own: ``request.prompt`` keeps the tags as written.
    """
    prompt_embeddings: tuple[Embedding, ...] = ()
    """The embeddings the prompts' words named (`Engine.embedding_dirs`), used after ``request.embeddings``."""

    def metadata(self, index: int = 0) -> dict[str, str]:
        """The text metadata that `save` writes into image `index`'s PNG."""
        request = self.request
        data = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or "",
            "seed": str(self.seeds[index]),
            "model": self.model,
            "family": self.family,
            "steps": str(request.num_inference_steps),
            "guidance_scale": str(request.guidance_scale),
            "height": str(request.height),
            "width": str(request.width),
        }
        if self.accelerators:
            data["accelerators"] = ",".join(self.accelerators)
        if request.scheduler:
            data["scheduler"] = request.scheduler
        if request.prompt_weighting:
            data["prompt_weighting"] = request.prompt_weighting
        if request.controls:
            data["controls"] = json.dumps([_describe_control(control) for control in request.controls])
        if request.image_prompts:
            data["image_prompts"] = json.dumps(
                [{**attrs.asdict(each), "image": _image_text(each.image)} for each in request.image_prompts]
            )
        if request.hires is not None:
            data["hires"] = json.dumps(attrs.asdict(request.hires))
        if request.loras or request.embeddings:
            from ._weight_files import describe

            # File name and content hash, never the path: a PNG shared on the web tells no folder names.
            if request.loras:
                loras = [{**describe(lora.source, lora.weight_name), "scale": lora.scale} for lora in request.loras]
                data["loras"] = json.dumps(loras)
            if request.embeddings:
                embeddings = [{**describe(e.source, None), "token": e.token} for e in request.embeddings]
                data["embeddings"] = json.dumps(embeddings)
        if self.prompt_loras or self.prompt_embeddings:
            from ._weight_files import describe

            # Apart from loras/embeddings: `t2i generate --from` reads the tags again (--lora-dir), not --lora.
            if self.prompt_loras:
                tagged = [{**describe(lora.source, None), "scale": lora.scale} for lora in self.prompt_loras]
                data["prompt_loras"] = json.dumps(tagged)
            if self.prompt_embeddings:
                words = [{**describe(e.source, None), "token": e.token} for e in self.prompt_embeddings]
                data["prompt_embeddings"] = json.dumps(words)
        for key, value in request.options.items():
            if value is None:
                continue  # an option set to None is an option left unset
            # As ``--option`` takes it back (``t2i generate --from``): a pair as "512,512".
            is_sequence = isinstance(value, (tuple, list))
            data[f"option.{key}"] = ",".join(str(item) for item in value) if is_sequence else str(value)
        return data

    def png(self, index: int = 0) -> bytes:
        """Image `index` as the bytes of a PNG file with its metadata: what `save` writes."""
        import io

        buffer = io.BytesIO()
        self._write_png(buffer, index)
        return buffer.getvalue()

    def _write_png(self, handle: Any, index: int) -> None:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in self.metadata(index).items():
            if "\0" in value:
                info.add_itxt(key, value)  # tEXt forbids NUL (it ends the keyword); iTXt carries any UTF-8
            else:
                info.add_text(key, value)
        self.images[index].save(handle, format="PNG", pnginfo=info)

    def save(self, path: str | os.PathLike[str], index: int = 0, *, overwrite: bool = False) -> None:
        """Write image `index` as a PNG with its metadata; never replaces a file unless `overwrite`.

        The PNG is written to a hidden temporary file in the same folder and renamed into place,
        so an interrupted or failed save leaves no partial file (and, with `overwrite`, the old
        file intact). Raises `InvalidRequestError` (field ``output``) when the file exists and
        `overwrite` is false, and `OutputError` when it cannot be written (e.g. a full disk).
        """
        from ._files import write_atomically

        try:
            write_atomically(path, lambda handle: self._write_png(handle, index), overwrite=overwrite)
        except FileExistsError:
            raise InvalidRequestError(
                "output", str(path), "a path that does not exist yet (or pass overwrite)"
            ) from None
