"""The flags of ``t2i generate`` that take a small syntax: ``--control``, ``--lora``, ``--embedding``, ``--image-prompt``."""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidRequestError

CONTROL_SYNTAX = "IMAGE=MODEL[@SCALE][,start=F][,end=F][,preprocess=NAME][,guess_mode=true|false]"
#: the IP-Adapter of ``--image-prompt`` without ``--image-prompt-model``: the reference adapters of SD 1.5
#: and SDXL, whose plugin picks the family's weights file in it
DEFAULT_IMAGE_PROMPT_MODEL = "h94/IP-Adapter"


def controls(items: list[str]) -> tuple[Any, ...]:
    """Parse ``--control`` values: ``IMAGE=MODEL[@SCALE]`` plus optional ``,key=value`` settings."""
    from ..request import Control

    controls = []
    for item in items:
        image, sep, rest = item.partition("=")
        model, *settings = rest.split(",")
        if not sep or not image or not model:
            raise InvalidRequestError("--control", item, CONTROL_SYNTAX)
        fields: dict[str, Any] = {}
        head, at, tail = model.rpartition("@")
        if at:
            fields["scale"] = _control_number(item, tail)
            model = head
        for setting in settings:
            key, eq, value = setting.partition("=")
            key = key.strip()
            if not eq or key not in ("start", "end", "preprocess", "guess_mode"):
                raise InvalidRequestError("--control", item, CONTROL_SYNTAX)
            if key in ("start", "end"):
                fields[key] = _control_number(item, value)
            elif key == "guess_mode":
                if value.lower() not in ("true", "false"):
                    raise InvalidRequestError("--control", item, CONTROL_SYNTAX)
                fields[key] = value.lower() == "true"
            else:
                fields[key] = value
        controls.append(Control(image=image, model=model, **fields))
    return tuple(controls)


def loras(items: list[str]) -> tuple[Any, ...]:
    """Parse ``--lora SOURCE[@SCALE]``: an ``@`` followed by a number sets the scale.

    A source that exists as given (a path with ``@`` in it) is taken whole.
    """
    from ..request import Lora

    loras = []
    for item in items:
        source, at, scale = item.rpartition("@")
        if not at or os.path.exists(item):
            loras.append(Lora(item))
            continue
        try:
            value = float(scale)
        except ValueError:
            if "/" in scale or os.sep in scale:  # an @ inside a path: the whole text is the source
                loras.append(Lora(item))
                continue
            raise InvalidRequestError("--lora", item, "SOURCE[@SCALE] with a number for SCALE") from None
        if not source:
            raise InvalidRequestError("--lora", item, "SOURCE[@SCALE] with a SOURCE")
        loras.append(Lora(source, value))
    return tuple(loras)


def image_prompts(items: list[str], model: str | None) -> tuple[Any, ...]:
    """Parse ``--image-prompt FILE[@SCALE]``, each with the IP-Adapter `model` (``--image-prompt-model``).

    A file that exists as given (a name with ``@`` in it) is taken whole.
    """
    from ..request import ImagePrompt

    prompts = []
    for item in items:
        image, at, scale = item.rpartition("@")
        fields: dict[str, Any] = {"image": item}
        if at and not os.path.exists(item):
            try:
                fields = {"image": image, "scale": float(scale)}
            except ValueError:
                raise InvalidRequestError("--image-prompt", item, "FILE[@SCALE] with a number for SCALE") from None
            if not image:
                raise InvalidRequestError("--image-prompt", item, "FILE[@SCALE] with a FILE")
        prompts.append(ImagePrompt(model=model or DEFAULT_IMAGE_PROMPT_MODEL, **fields))
    return tuple(prompts)


def check_image_files(request: Any) -> None:
    """Refuse a control or reference image whose path names no file before the model loads (seconds to
    minutes): the conditioner reads the images themselves later, with the same field in its error."""
    named = [(control.image, f"controls[{i}].image") for i, control in enumerate(request.controls)]
    named += [(prompt.image, f"image_prompts[{i}].image") for i, prompt in enumerate(request.image_prompts)]
    for image, field in named:
        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(os.path.expanduser(os.fspath(image))):
            raise InvalidRequestError(
                field, os.fspath(image), "a PIL image or the path of an image file (no such file)"
            )


def check_folders(folders: list[str], flag: str) -> None:
    """Refuse a ``--lora-dir`` / ``--embeddings-dir`` that is not a folder, before anything loads."""
    for folder in folders:
        if not os.path.isdir(os.path.expanduser(folder)):
            raise InvalidRequestError(flag, folder, "an existing folder")


def embeddings(items: list[str]) -> tuple[Any, ...]:
    """Parse ``--embedding SOURCE[=TOKEN]``; a source that exists as given is taken whole."""
    from ..request import Embedding

    embeddings = []
    for item in items:
        source, eq, token = item.rpartition("=")
        if not eq or os.path.exists(item):
            embeddings.append(Embedding(item))
            continue
        if not source or not token.strip():
            raise InvalidRequestError("--embedding", item, "SOURCE[=TOKEN] with a SOURCE and a TOKEN after =")
        embeddings.append(Embedding(source, token))
    return tuple(embeddings)


#: ``--hires-*`` flag dests → the `HiresFix` field each sets
HIRES_FLAGS = {
    "hires_scale": "scale",
    "hires_upscaler": "upscaler",
    "hires_strength": "strength",
    "hires_steps": "steps",
}


def hires(args: Any) -> Any:
    """The `HiresFix` of the ``--hires-*`` flags over the one a ``--from`` PNG saved (``args.saved_hires``);
    None when neither asks for one. A flag left out takes the saved value, else the `HiresFix` default."""
    from ..request_values import HiresFix

    fields = dict(getattr(args, "saved_hires", None) or {})
    given = {field: getattr(args, dest) for dest, field in HIRES_FLAGS.items() if getattr(args, dest) is not None}
    if not fields and not given:
        return None
    fields.update(given)
    try:
        return HiresFix(**fields)
    except InvalidRequestError as exc:
        if exc.field not in given:
            raise
        flag = "--" + next(dest for dest, name in HIRES_FLAGS.items() if name == exc.field).replace("_", "-")
        raise InvalidRequestError(flag, given[exc.field], exc.allowed) from None


def _control_number(item: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError("--control", item, CONTROL_SYNTAX + " with numbers for SCALE, start, end") from None
