"""``t2i generate --from IMAGE.png``: the settings t2i saved in a PNG, read back as flags."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError, T2IError
from .args import integer, number

if TYPE_CHECKING:
    from ..request import GenerationRequest

#: PNG text fields (as `GenerationResult.metadata` writes them) that --from reads, with the flag's dest.
_SAVED_FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "model": "model",
    "seed": "seed",
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "height": "height",
    "width": "width",
    "scheduler": "scheduler",
    "prompt_weighting": "weighting",
}
_SAVED_NUMBERS: dict[str, Any] = {
    "seed": integer,
    "steps": integer,
    "height": integer,
    "width": integer,
    "guidance_scale": number,
}
_IN_MEMORY = "<in-memory image>"


def apply_saved_run(args: argparse.Namespace) -> tuple[Any, ...]:
    """Fill `args` from the metadata of ``--from IMAGE.png`` where no flag was given; return its controls.

    Flags given on the command line win (any ``--accelerator`` replaces every saved accelerator);
    ``--option`` values are merged over the saved ones, and any ``--control`` replaces every saved control.
    """
    path = Path(args.from_image)
    text = _png_text(path)
    missing = [key for key in ("prompt", "model", "seed") if key not in text]
    if missing:
        raise InvalidRequestError("--from", str(path), f"a PNG saved by t2i (it has no {', '.join(missing)} metadata)")
    model_is_saved = args.model is None
    for key, dest in _SAVED_FIELDS.items():
        if key not in text or getattr(args, dest) is not None:
            continue
        value = text[key]
        if key == "negative_prompt" and not value:
            continue  # t2i writes "" when there was no negative prompt
        try:
            setattr(args, dest, _SAVED_NUMBERS[key](value) if key in _SAVED_NUMBERS else value)
        except argparse.ArgumentTypeError:
            raise InvalidRequestError("--from", str(path), f"a PNG whose {key} is a number, not {value!r}") from None
    if model_is_saved and args.family is None:
        args.family = text.get("family")  # the family the saved model was run as
    if args.accelerator is None and text.get("accelerators"):
        args.accelerator = text["accelerators"].split(",")  # as applied: presets expanded, values written
    saved_options = [f"{key[7:]}={_saved_option(value)}" for key, value in text.items() if key.startswith("option.")]
    args.option = [*saved_options, *args.option]  # later values win: the command line's
    args.saved_hires = _saved_hires(path, text["hires"]) if "hires" in text else None
    if args.control or "controls" not in text:
        return ()
    return _saved_controls(path, text["controls"])


def saved_weights(path: Path, request: GenerationRequest, args: argparse.Namespace) -> GenerationRequest:
    """Check ``--lora`` / ``--embedding`` against the LoRAs and embeddings a ``--from`` PNG was made with.

    The PNG names them by file name and content hash, never by path, so they must be given again,
    in the same order; a given file must have the saved content. A ``--lora`` without ``@SCALE``
    (an ``--embedding`` without ``=TOKEN``) takes the saved scale (token).
    """
    import attrs

    from .._weight_files import describe

    text = _png_text(path)
    changes: dict[str, Any] = {}
    kinds: list[tuple[str, str, tuple[Any, ...], list[str], str]] = [
        ("loras", "--lora", request.loras, args.lora, "scale"),
        ("embeddings", "--embedding", request.embeddings, args.embedding, "token"),
    ]
    for key, flag, given, flags, setting in kinds:
        if key not in text:
            continue
        try:
            saved = [dict(item) for item in json.loads(text[key])]
            files = [(str(item["name"]), str(item["sha256"])) for item in saved]
        except (ValueError, TypeError, KeyError):
            raise InvalidRequestError("--from", str(path), f"a PNG with t2i's {key} metadata") from None
        ours = [describe(item.source, getattr(item, "weight_name", None))["sha256"] for item in given]
        if ours != [digest for _, digest in files]:
            listed = ", ".join(f"{name} (sha256 {digest[:12]})" for name, digest in files)
            raise InvalidRequestError(
                "--from", str(path), f"{flag} for each file it was made with, in this order: {listed}"
            )
        marker = "@" if setting == "scale" else "="
        items = []
        for item, flag_text, entry in zip(given, flags, saved, strict=True):
            explicit = marker in flag_text and not os.path.exists(flag_text)
            items.append(item if explicit else attrs.evolve(item, **{setting: entry[setting]}))
        changes[key] = tuple(items)
    return request.evolve(**changes) if changes else request


def saved_image_prompts(path: Path, model: str | None) -> tuple[Any, ...]:
    """The image prompts a ``--from`` PNG was made with (none when it has none); `model`
    (``--image-prompt-model``) replaces their IP-Adapter when given."""
    from ..request import ImagePrompt

    text = _png_text(path).get("image_prompts")
    if text is None:
        return ()
    try:
        described = json.loads(text)
        if not isinstance(described, list) or not all(isinstance(fields, dict) for fields in described):
            raise ValueError("not a list of image prompts")
        for index, fields in enumerate(described):
            if fields.get("image") == _IN_MEMORY:
                raise InvalidRequestError(
                    "--from",
                    str(path),
                    f"a PNG whose image prompts are files (image_prompts[{index}] was an image in memory, "
                    "which the PNG does not hold): pass --image-prompt FILE[@SCALE] with that image",
                )
            if model is not None:
                fields.update(model=model, subfolder=None, weight_name=None)
        return tuple(ImagePrompt(**fields) for fields in described)
    except T2IError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError("--from", str(path), f"a PNG with t2i's image_prompts metadata ({exc})") from None


def check_prompt_files(path: Path, expanded: GenerationRequest, request: GenerationRequest) -> None:
    """Check that the files a ``--from`` PNG's ``<lora:...>`` tags and embedding words find now (`expanded`,
    from `request` by `Engine.expand`) have the content the image was made with (``prompt_loras``,
    ``prompt_embeddings``: name and SHA-256)."""
    from .._weight_files import describe

    text = _png_text(path)
    found: dict[str, tuple[Any, ...]] = {
        "prompt_loras": expanded.loras[len(request.loras) :],
        "prompt_embeddings": expanded.embeddings[len(request.embeddings) :],
    }
    for key, items in found.items():
        if key not in text:
            continue
        try:
            saved = [(str(item["name"]), str(item["sha256"])) for item in json.loads(text[key])]
        except (ValueError, TypeError, KeyError):
            raise InvalidRequestError("--from", str(path), f"a PNG with t2i's {key} metadata") from None
        if [describe(item.source, None)["sha256"] for item in items] != [digest for _, digest in saved]:
            listed = ", ".join(f"{name} (sha256 {digest[:12]})" for name, digest in saved)
            raise InvalidRequestError(
                "--from",
                str(path),
                f"--lora-dir / --embeddings-dir folders where its prompts find the files it was made with: {listed}",
            )


def _png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {})
    except FileNotFoundError:
        raise InvalidRequestError("--from", str(path), "the path of an existing PNG") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequestError("--from", str(path), f"a PNG saved by t2i (it cannot be read: {exc})") from None
    return {str(key): str(value) for key, value in text.items()}


def _saved_option(value: str) -> str:
    """An option value as ``--option`` takes it; t2i 0.1.0 wrote pairs as Python tuples, ``(512, 512)``."""
    pair = re.fullmatch(r"\(\s*([^()]*?)\s*,?\s*\)", value)
    if pair and re.fullmatch(r"[-+0-9.eE\s,]+", pair.group(1)):
        return ",".join(part.strip() for part in pair.group(1).split(","))
    return value


def _saved_hires(path: Path, text: str) -> dict[str, Any]:
    """The `HiresFix` fields a PNG saved (as JSON); `HiresFix` checks their values when the request is made."""
    import attrs

    from ..request_values import HiresFix

    known = {field.name for field in attrs.fields(HiresFix)}
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict) or not set(fields) <= known:
            raise ValueError(f"an object with fields among {', '.join(sorted(known))}")
    except ValueError as exc:
        raise InvalidRequestError("--from", str(path), f"a PNG with t2i's hires metadata ({exc})") from None
    return fields


def _saved_controls(path: Path, text: str) -> tuple[Any, ...]:
    from ..request import Control

    try:
        described = json.loads(text)
        if not isinstance(described, list) or not all(isinstance(fields, dict) for fields in described):
            raise ValueError("not a list of controls")
        for index, fields in enumerate(described):
            if fields.get("image") == _IN_MEMORY:
                raise InvalidRequestError(
                    "--from",
                    str(path),
                    f"a PNG whose control images are files (controls[{index}] was an image in memory, "
                    "which the PNG does not hold): pass --control IMAGE=MODEL[@SCALE] with that image",
                )
        return tuple(Control(**fields) for fields in described)
    except T2IError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError("--from", str(path), f"a PNG with t2i's controls metadata ({exc})") from None
