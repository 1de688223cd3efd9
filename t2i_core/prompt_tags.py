"""AUTOMATIC1111's prompt conventions: ``<lora:NAME:WEIGHT>`` tags and embedding-folder words.

`expand_prompt` turns a request written the A1111 way into the plain request t2i runs: each tag
becomes a `Lora` of the file NAME names in the LoRA folders, and each word of the prompt or the
negative prompt that is the name of a file in the embedding folders becomes an `Embedding` with
that word as its token. Nothing here loads weights; the files are found by name only.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import attrs

from .errors import InvalidRequestError
from .request import GenerationRequest
from .request_values import Embedding, Lora

#: The environment variables that give engines their LoRA and embedding folders (``os.pathsep``-separated).
LORA_DIRS_ENV = "T2I_LORA_DIR"
EMBEDDING_DIRS_ENV = "T2I_EMBEDDINGS_DIR"
#: The suffix of the files the folders are searched for (pickles are never loaded: reading one can run code).
SUFFIX = ".safetensors"
_PICKLES = (".pt", ".ckpt", ".bin")
#: A1111's extra-network tag: ``<KIND:ARGUMENTS>``; t2i reads the ``lora`` and ``lyco`` kinds.
_TAG = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")
_REFUSED_KINDS = {"hypernet": "hypernetworks are not supported"}
#: how many names an unknown-name error lists
_SHOWN = 8


@attrs.frozen
class FolderFile:
    """A ``.safetensors`` file found in a LoRA or embedding folder."""

    name: str
    """The name prompts use: the file's name without ``.safetensors``."""
    relative: str
    """Where it is, inside its folder, with ``/`` separators (``styles/ink.safetensors``)."""
    path: Path
    """Its full path."""


@attrs.frozen
class LoraTag:
    """One ``<lora:NAME:WEIGHT>`` tag of a prompt, as written and as read."""

    text: str
    name: str
    weight: float


def dirs_from_env(variable: str) -> tuple[str, ...]:
    """The folders an environment variable lists (``os.pathsep``-separated; empty entries skipped)."""
    return tuple(part for part in os.environ.get(variable, "").split(os.pathsep) if part.strip())


def folder_files(dirs: Iterable[str | os.PathLike[str]], *, field: str = "lora_dirs") -> list[FolderFile]:
    """Every ``.safetensors`` file in `dirs` and their sub-folders, folder by folder, each sorted by path.

    A name found twice is listed twice; look-ups take the first. Raises `InvalidRequestError`
    naming `field` when a folder does not exist.
    """
    found: list[FolderFile] = []
    for folder in _folders(dirs, field):
        seen = {os.path.realpath(folder)}
        for root, subdirs, names in os.walk(folder, followlinks=True):
            # Linked sub-folders are followed (as AUTOMATIC1111 does), each real folder once: no loops.
            subdirs[:] = sorted(d for d in subdirs if _first_visit(Path(root, d), seen))
            for name in sorted(names):
                if not name.endswith(SUFFIX) or name.startswith("."):
                    continue
                path = Path(root, name)
                relative = path.relative_to(folder).as_posix()
                found.append(FolderFile(name=name[: -len(SUFFIX)], relative=relative, path=path))
    return found


def lora_tags(text: str) -> tuple[str, tuple[LoraTag, ...]]:
    """`text` without its ``<lora:NAME:WEIGHT>`` (and ``<lyco:...>``) tags, and the tags in order.

    Each tag is removed exactly, as AUTOMATIC1111 removes it (the text around it is kept as it
    is); ``<lora:NAME>`` has weight 1. Other ``<kind:...>`` text is left alone, except kinds t2i
    cannot apply (``<hypernet:...>``), which are refused, like tags with more than one weight.
    """
    tags: list[LoraTag] = []

    def read(match: re.Match[str]) -> str:
        kind, arguments = match.group(1), match.group(2)
        if kind in _REFUSED_KINDS:
            raise InvalidRequestError(
                "prompt", match.group(0), f"<lora:NAME:WEIGHT> tags only ({_REFUSED_KINDS[kind]})"
            )
        if kind not in _LORA_KINDS:
            return match.group(0)
        parts = arguments.split(":")
        name = parts[0].strip()
        if len(parts) > 2 or any("=" in part for part in parts):
            raise InvalidRequestError(
                "prompt",
                match.group(0),
                "<lora:NAME> or <lora:NAME:WEIGHT>: one weight, for the denoiser and the text encoders alike",
            )
        try:
            weight = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            weight = float("nan")
        if not name or not -10.0 <= weight <= 10.0:
            raise InvalidRequestError("prompt", match.group(0), "<lora:NAME:WEIGHT> with a weight in [-10, 10]")
        tags.append(LoraTag(text=match.group(0), name=name, weight=weight))
        return ""

    return _TAG.sub(read, text), tuple(tags)


def find_lora(tag: LoraTag, dirs: Sequence[str | os.PathLike[str]], *, field: str = "prompt") -> Path:
    """The file `tag` names in the LoRA folders `dirs`.

    NAME is a file's path inside one of the folders without ``.safetensors`` (``ink`` or
    ``styles/ink``); a NAME without ``/`` also finds ``NAME.safetensors`` in any sub-folder. The
    first folder that has it wins. Raises `InvalidRequestError` naming `field`, the tag and the
    names available (the closest first).
    """
    if not dirs:
        raise InvalidRequestError(
            field,
            tag.text,
            "a prompt without <lora:...> tags, or LoRA folders to find them in "
            f"(lora_dirs, t2i --lora-dir DIR or ${LORA_DIRS_ENV})",
        )
    name = PurePosixPath(tag.name)
    if "\\" in tag.name or name.is_absolute() or any(part in ("..", ".") for part in name.parts):
        raise InvalidRequestError(field, tag.text, "a LoRA name inside the LoRA folders (no absolute path, no ..)")
    folders = _folders(dirs, "lora_dirs")
    for folder in folders:
        direct = folder / f"{tag.name}{SUFFIX}"
        if direct.is_file():
            return direct
    files = folder_files(folders)
    if "/" not in tag.name:
        for each in files:
            if each.name == tag.name:
                return each.path
    for folder in folders:
        for suffix in _PICKLES:
            if (folder / f"{tag.name}{suffix}").is_file():
                raise InvalidRequestError(
                    field,
                    tag.text,
                    f"a .safetensors LoRA ({tag.name}{suffix} is a pickle, which t2i does not load: convert it "
                    "to .safetensors)",
                )
    # The folders are not named: a server's client must not learn its paths (the operator knows them).
    raise InvalidRequestError(
        field, tag.text, f"the name of a .safetensors file in the LoRA folders: {_available(tag.name, files)}"
    )


def expand_prompt(
    request: GenerationRequest,
    *,
    lora_dirs: Sequence[str | os.PathLike[str]] = (),
    embedding_dirs: Sequence[str | os.PathLike[str]] = (),
) -> GenerationRequest:
    """`request` with its A1111 prompt conventions turned into `Lora` and `Embedding` values.

    - Each ``<lora:NAME:WEIGHT>`` tag of the prompt (``<lora:NAME>``: weight 1; ``<lyco:...>``
      alike) is removed from it and adds ``Lora(file, WEIGHT)`` after the request's own `loras`,
      the file found by `find_lora` in `lora_dirs`. As in AUTOMATIC1111, only the prompt is read
      for tags: the negative prompt is left as written. A tag without `lora_dirs` is refused.
    - With `embedding_dirs`, each file there whose name (without ``.safetensors``) is a word of
      the prompt or the negative prompt adds ``Embedding(file, token=NAME)`` after the request's
      own `embeddings` (unless one of them has that token already). Only those files are used.
    - A `HiresFix` prompt (A1111's ``hr_prompt``) must have the prompt's tags, which are removed
      from it, as in A1111 (where they pick the second pass's LoRAs): both passes run with one set.

    A request with neither is returned as it is. Raises `InvalidRequestError` (field ``prompt``)
    for an unknown name, a tag read twice or a prompt that is nothing but tags.
    """
    prompt, tags = lora_tags(request.prompt)
    changes: dict[str, object] = {}
    if tags:
        if not prompt.strip():
            raise InvalidRequestError("prompt", request.prompt, "a prompt with text besides its <lora:...> tags")
        loras = list(request.loras)
        seen = {os.path.realpath(lora.source): "loras" for lora in loras if os.path.isfile(lora.source)}
        for tag in tags:
            path = find_lora(tag, lora_dirs)
            key = os.path.realpath(path)
            if key in seen:
                raise InvalidRequestError(
                    "prompt", tag.text, f"each LoRA once (this file is in {seen[key]} already): give it one weight"
                )
            seen[key] = f"the tag {tag.text}"
            loras.append(Lora(str(path), tag.weight))
        changes.update(prompt=prompt, loras=tuple(loras))
    hires = request.hires
    if hires is not None and hires.prompt is not None:
        hires_prompt, hires_tags = lora_tags(hires.prompt)
        if [(t.name, t.weight) for t in hires_tags] != [(t.name, t.weight) for t in tags]:
            raise InvalidRequestError(
                "hires.prompt",
                hires.prompt,
                "the same <lora:...> tags as the prompt (t2i runs both passes with one set of LoRAs)",
            )
        if hires_tags:
            if not hires_prompt.strip():
                raise InvalidRequestError("hires.prompt", hires.prompt, "text besides its <lora:...> tags")
            hires = attrs.evolve(hires, prompt=hires_prompt)
            changes["hires"] = hires
    if embedding_dirs:
        texts = (prompt, request.negative_prompt, *((hires.prompt, hires.negative_prompt) if hires else ()))
        words = "\n".join(text for text in texts if text)
        tokens = {embedding.token for embedding in request.embeddings}
        added = list(request.embeddings)
        for each in folder_files(embedding_dirs, field="embedding_dirs"):
            if each.name in tokens or not _has_word(words, each.name):
                continue
            tokens.add(each.name)
            added.append(Embedding(str(each.path), token=each.name))
        if len(added) > len(request.embeddings):
            changes["embeddings"] = tuple(added)
    return request.evolve(**changes) if changes else request


def _first_visit(folder: Path, seen: set[str]) -> bool:
    real = os.path.realpath(folder)
    if real in seen:
        return False
    seen.add(real)
    return True


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _folders(dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], field: str) -> list[Path]:
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]  # one folder given as such (engine.lora_dirs = "loras"), not its letters
    folders = []
    for folder in dirs:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise InvalidRequestError(field, os.fspath(folder), "an existing folder")
        folders.append(path)
    return folders


def _available(name: str, files: list[FolderFile]) -> str:
    if not files:
        return "the folders hold no .safetensors file"
    names = list(dict.fromkeys(each.name for each in files))
    close = difflib.get_close_matches(name, names, n=_SHOWN, cutoff=0.5)
    shown = close + [each for each in names if each not in close][: _SHOWN - len(close)]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return f"one of {', '.join(shown)}{more}"
