"""Where ``t2i generate`` writes: output paths checked before any work, free space, and the outputs
that ``--skip-existing`` keeps (which must be images of this same run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidRequestError, OutputError

if TYPE_CHECKING:
    from ..engine import Engine
    from ..request import GenerationRequest


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise InvalidRequestError("--output", output, "a file name ending in .png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def check_output(path: Path, existing_ok: bool) -> None:
    """Refuse, before any work, an output that exists (unless `existing_ok`) or cannot be written."""
    try:
        if path.is_symlink() and not path.exists():
            raise InvalidRequestError(
                "--output",
                str(path),
                f"a file path, not a dangling symbolic link (to {os.readlink(path)}, which does not exist)",
            )
        if path.is_dir():
            raise InvalidRequestError("--output", str(path), "a file path (this is a folder)")
        if path.exists() and not existing_ok:
            raise InvalidRequestError(
                "--output",
                str(path),
                "a path that does not exist yet (or pass --overwrite, or --skip-existing to keep it)",
            )
        if not path.parent.is_dir():
            raise InvalidRequestError("--output", str(path), "a path in an existing folder")
    except OSError as exc:  # e.g. a name too long for the file system
        raise InvalidRequestError("--output", str(path), f"a usable file path ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK):
        raise InvalidRequestError("--output", str(path), "a path in a folder you can write to")


#: Room a PNG needs at the very least: with less free space, t2i refuses before loading the model.
MIN_PNG_BYTES = 16 * 1024


def png_bound(request: GenerationRequest) -> int:
    """The most bytes one RGB PNG of `request` with t2i's metadata can take (stored, not compressed)."""
    assert request.height is not None and request.width is not None
    raw = request.height * (request.width * 3 + 1)  # a filter byte per row
    text = len(request.prompt) + len(request.negative_prompt or "")
    return raw + raw // 1000 + 4 * text + 8 * 1024  # deflate's framing; UTF-8 text; chunks and other fields


def check_space(paths: list[Path], bytes_per_image: int) -> None:
    """Refuse, before the work, to write PNGs into a folder that clearly has no room for them."""
    if not paths:
        return
    folder = paths[0].parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # the folder was checked already; some file systems cannot say
        return
    needed = len(paths) * bytes_per_image
    if free < needed:
        raise OutputError(
            str(paths[0]),
            f"no space left on the device: {_size(free)} free in {folder}, "
            f"{len(paths)} image(s) may need up to {_size(needed)}; nothing was written",
        )


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def kept_outputs(outputs: list[Path]) -> dict[int, dict[str, str]]:
    """For --skip-existing: the outputs that exist, by index, with their PNG text metadata."""
    from PIL import Image

    kept = {}
    for index, path in enumerate(outputs):
        if not path.exists():
            continue
        try:
            with Image.open(path) as image:
                image.load()  # a PNG cut short (by an older t2i, or a copy) fails here
                text = getattr(image, "text", {})
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidRequestError(
                "--output",
                str(path),
                f"a complete PNG to keep with --skip-existing (it cannot be read: {exc}); "
                "move it away or pass --overwrite instead",
            ) from None
        kept[index] = {str(key): str(value) for key, value in text.items()}
    return kept


def resume(
    request: GenerationRequest, kept: dict[int, dict[str, str]], outputs: list[Path], model: str
) -> GenerationRequest:
    """The request that made the kept outputs: without --seed, the seed read from the first of them."""
    first = min(kept)
    seed = request.seed
    if seed is None:
        try:
            seed = int(kept[first]["seed"]) - first
        except (KeyError, ValueError):
            seed = -1
        if seed < 0:
            raise InvalidRequestError(
                "--output",
                str(outputs[first]),
                "a PNG saved by t2i, whose metadata holds its seed, to keep with --skip-existing "
                "(or pass the run's --seed)",
            )
        request = request.evolve(seed=seed)
    for index, text in kept.items():
        identity = {
            "seed": str(seed + index),
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or "",
            "model": model,
        }
        _check_metadata(outputs[index], text, identity)
    return request


def check_same_run(
    kept: dict[int, dict[str, str]], outputs: list[Path], resolved: GenerationRequest, engine: Engine
) -> None:
    """Every kept output carries exactly the metadata this run would write into it (steps, size, ...)."""
    from ..request import GenerationResult

    assert resolved.seed is not None
    seeds = [resolved.seed + index for index in range(len(outputs))]
    expected = GenerationResult(
        images=[],
        seeds=seeds,
        request=resolved,
        model=engine.model,
        family=engine.family,
        accelerators=engine.accelerators,
    )
    for index, text in kept.items():
        metadata = expected.metadata(index)
        if "accelerators" not in text:
            metadata.pop("accelerators", None)  # saved by t2i 0.1, which did not write them
        _check_metadata(outputs[index], text, metadata)


def _check_metadata(path: Path, text: dict[str, str], expected: dict[str, str]) -> None:
    for key, value in expected.items():
        if text.get(key) != value:
            found = f"its {key} is {_clip(text[key])}" if key in text else f"it has no {key} in its metadata"
            raise InvalidRequestError(
                "--output",
                str(path),
                f"an image of this same run to keep with --skip-existing, but {found} "
                f"(this run: {_clip(value)}); pass --overwrite to replace it or choose another --output",
            )


def _clip(value: str, limit: int = 60) -> str:
    return repr(value) if len(value) <= limit else repr(value[: limit - 3] + "...")
