"""Weight files named by users (LoRAs, embeddings): where they are, and what they contain.

A source is a local file, a local folder or a hub id; `resolve_file` finds the one file it
means (never downloading when ``HF_HUB_OFFLINE=1``), and `file_digest` hashes its content once
per process, so that PNG metadata can name it by file name and content hash, not by path.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import attrs

from ._hub import hub_offline, is_hub_id
from .errors import InvalidRequestError

#: the file diffusers' own trainers write, preferred when a folder or repository holds several
DEFAULT_NAMES = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")
#: suffixes of weight files; pickles (.bin, .pt, .ckpt) are refused: t2i reads weights from safetensors
SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@attrs.frozen
class WeightsFile:
    """A source resolved to one local file."""

    source: str
    """How the user named it (a path, or a hub id)."""
    path: Path
    """The local file: the file named, the one picked in a folder, or the hub file's copy in the cache."""
    name: str
    """What metadata calls it: the file name, or ``owner/repo/file`` for a hub file."""


def resolve_file(source: str, weight_name: str | None, *, field: str) -> WeightsFile:
    """The one ``.safetensors`` file `source` (and `weight_name`) names; `field` names it in errors."""

    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:
        raise InvalidRequestError(field, source, f"a usable path ({exc.strerror or exc})") from None
    if exists and path.is_file():
        if weight_name is not None:
            raise InvalidRequestError(_weight_field(field), weight_name, "None for a file source")
        return WeightsFile(source, _checked(path, source, field), path.name)
    if exists:
        chosen = _pick(sorted(p.name for p in path.iterdir() if p.is_file()), weight_name, source, field, str(path))
        return WeightsFile(source, _checked(path / chosen, source, field), chosen)
    if path.is_symlink():  # exists() is False for a dangling link and a link loop alike
        raise InvalidRequestError(field, source, f"an existing file, folder or hub id ({_broken_link(path)})")
    names_a_file = path.suffix.lower() in (SAFE_SUFFIX, *PICKLE_SUFFIXES)
    if names_a_file or not is_hub_id(source, namespaced=True):
        raise InvalidRequestError(field, source, f"an existing file, folder or hub id ({path} does not exist)")
    return _hub_file(source, weight_name, field)


def _broken_link(path: Path) -> str:
    """Why the symbolic link `path` leads nowhere: a loop, or the missing file it points to."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return f"{path} is a symbolic link loop"
    except OSError as exc:
        import errno

        if exc.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop"
    return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"


def _weight_field(field: str) -> str:
    """``loras[0].source`` → ``loras[0].weight_name``."""
    return f"{field.rpartition('.')[0]}.weight_name" if "." in field else "weight_name"


def _checked(path: Path, source: str, field: str) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidRequestError(
            field, source, f"a .safetensors file ({path.name} is a pickle, which can run code when read; convert it)"
        )
    if path.suffix.lower() != SAFE_SUFFIX:
        raise InvalidRequestError(field, source, f"a .safetensors file (not {path.name})")
    return path


def _pick(names: list[str], weight_name: str | None, source: str, field: str, where: str) -> str:
    if weight_name is not None:
        if weight_name not in names:
            raise InvalidRequestError(_weight_field(field), weight_name, f"a file in {where}")
        return weight_name
    candidates = [name for name in names if name.endswith(SAFE_SUFFIX)]
    for preferred in DEFAULT_NAMES:
        if preferred in candidates:
            return preferred
    if len(candidates) == 1:
        return candidates[0]
    listed = ", ".join(candidates[:8]) or "none"
    raise InvalidRequestError(
        field, source, f"a folder with one .safetensors file, or a weight_name to pick one (it holds: {listed})"
    )


#: (repo, weight_name) → the file's path in the Hugging Face cache: each hub source is looked up once a process
_hub_files: dict[tuple[str, str | None], tuple[Path, str]] = {}


def _hub_file(repo: str, weight_name: str | None, field: str) -> WeightsFile:

    known = _hub_files.get((repo, weight_name))
    if known is not None:
        return WeightsFile(repo, known[0], f"{repo}/{known[1]}")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        chosen = weight_name
        if chosen is None:
            names = _cached_names(repo) if hub_offline() else list_repo_files(repo)
            if not names:
                raise LookupError(repo)  # offline and not cached: the error below says so
            chosen = _pick(sorted(names), None, repo, field, f"the hub repository {repo}")
        path = Path(hf_hub_download(repo, chosen))
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure means the same to the user
        if hub_offline():
            why = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            why = f"it could not be fetched from the Hugging Face Hub ({type(exc).__name__})"
        raise InvalidRequestError(field, repo, f"an existing file, folder or reachable hub id ({why})") from None
    checked = _checked(path, repo, field)
    _hub_files[(repo, weight_name)] = (checked, chosen)
    return WeightsFile(repo, checked, f"{repo}/{chosen}")


def _cached_names(repo: str) -> list[str]:
    """The files of `repo` in the local Hugging Face cache (offline, a repository's listing is unknown)."""
    from huggingface_hub import scan_cache_dir

    for cached in scan_cache_dir().repos:
        if cached.repo_id == repo and cached.repo_type == "model":
            return sorted({file.file_name for revision in cached.revisions for file in revision.files})
    return []


_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the file's content, hex; computed once per process for an unchanged file."""
    real = os.path.realpath(path)
    status = os.stat(real)
    key = (real, status.st_size, status.st_mtime_ns)
    with _digests_lock:
        known = _digests.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _digests_lock:
        _digests[key] = value
    return value


def describe(source: str, weight_name: str | None) -> dict[str, str]:
    """``{"name": file name, "sha256": content hash}`` for PNG metadata; never the full path.

    A source that no longer resolves (a file deleted since) keeps its name and an empty hash.
    """
    try:
        found = resolve_file(source, weight_name, field="source")
    except InvalidRequestError:
        return {"name": Path(source).name or source, "sha256": ""}
    return {"name": found.name, "sha256": file_digest(found.path)}
