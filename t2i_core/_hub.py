"""The Hugging Face Hub as t2i sees it: what a hub id looks like, offline mode, ``model_index.json``.

The lowest layer of loading: the engine, the weights-file resolver and the providers' default
loaders all read checkpoints through these, and plugins reach them through `t2i_core.kit`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import ModelNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_NAMESPACED_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(value: str, *, namespaced: bool = False) -> bool:
    """Whether `value` is shaped like a Hugging Face Hub id (``name`` or ``owner/name``).

    Paths never are: they start with ``.``, ``/`` or ``~``, or hold a backslash or two slashes.
    `namespaced` requires the ``owner/`` part.
    """
    return bool((_NAMESPACED_HUB_ID if namespaced else _HUB_ID).match(value))


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def read_model_index(model: str, source: str, is_local: bool) -> dict[str, Any]:
    """Read only ``model_index.json`` (never weights) from a local folder or the hub.

    :param model: what the user named (for the error message)
    :param source: the local folder or hub id to read from
    :param is_local: whether `source` is a local folder
    :raises ModelNotFoundError: naming `model` and why, when it is absent or unreadable
    """
    if is_local:
        path = Path(source) / "model_index.json"
        if not path.is_file():
            raise ModelNotFoundError(model, f"{path} does not exist: not a diffusers pipeline folder")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "model_index.json"))
        except Exception as exc:  # noqa: BLE001 - every hub failure means the same to the user
            raise ModelNotFoundError(model, hub_failure(exc)) from None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers JSON and Unicode decoding errors
        raise ModelNotFoundError(model, f"{path} is not a readable model_index.json ({type(exc).__name__})") from None
    if not isinstance(index, dict):
        raise ModelNotFoundError(model, f"{path} is not a model_index.json (expected a JSON object)")
    return index


def hub_failure(exc: BaseException) -> str:
    """Why a hub download failed, in the user's terms, from the type of `exc` (huggingface_hub's errors)."""
    if hub_offline():
        return (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it "
            "(a tiny:<family> model, such as tiny:sd15, needs neither the Hub nor its cache)"
        )
    name = type(exc).__name__
    try:
        from huggingface_hub import errors as hub_errors
    except ImportError:  # huggingface_hub < 0.23 has no errors module: only the offline case is typed
        hub_errors = None
    if hub_errors is not None:
        if isinstance(exc, hub_errors.GatedRepoError):
            return (
                "it is gated on the Hugging Face Hub: accept its licence on its page, then log in "
                "(hf auth login) or set HF_TOKEN"
            )
        if isinstance(exc, hub_errors.RepositoryNotFoundError):
            return "no such repository on the Hugging Face Hub (or it is private: log in or set HF_TOKEN)"
        if isinstance(exc, hub_errors.LocalEntryNotFoundError):
            return (
                "it is not in the local Hugging Face cache and the Hub could not be reached: check the network, "
                "or work offline with a tiny:<family> model or HF_HUB_OFFLINE=1 and a cached checkpoint"
            )
        if isinstance(exc, hub_errors.EntryNotFoundError):
            return f"the repository has no such file ({name})"
    return (
        f"it could not be fetched from the Hugging Face Hub ({name}); check the id and the network, "
        "or work without them: a tiny:<family> model (tiny:sd15) is built offline, and HF_HUB_OFFLINE=1 "
        "loads checkpoints already in the local cache without waiting for the network"
    )


def has_variant(source: str, variant: str) -> bool:
    """Whether the checkpoint at `source` (folder or hub id) ships weights of `variant`."""
    folder = Path(source)
    pattern = f"*.{variant}.*"
    if folder.is_dir():
        return any(folder.glob(f"*/{pattern}")) or any(folder.glob(pattern))
    try:
        from huggingface_hub import list_repo_files

        return any(f".{variant}." in name for name in list_repo_files(source))
    except Exception:  # noqa: BLE001 - offline or unreachable: look at what the local cache holds
        pass
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached either: load the default weights
        return False
    return any(cached.glob(f"*/{pattern}")) or any(cached.glob(pattern))
