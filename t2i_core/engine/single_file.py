"""Single-file checkpoints: which family a ``model.safetensors`` (or ``.gguf``) is, and where its configs come from.

A single file holds weights only. diffusers' ``from_single_file`` needs a diffusers folder for
the configs and tokenizers; t2i never lets it fetch one behind the user's back: the folder is
``config=`` (a local folder, a hub id, or ``tiny:<family>``), or else the family's default
repository as it is in the local Hugging Face cache, and otherwise the error says what to fetch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._hub import hub_offline, is_hub_id
from .._single_file_components import GGUF_SUFFIX, gguf_tensor_names
from ..errors import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError
from ..tiny import TINY_PREFIX, ensure_built

if TYPE_CHECKING:
    from ..provider import ModelProvider
    from ..registry import Registry

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: what from_single_file reads from a config repository: configs and tokenizer files, no weights
CONFIG_PATTERNS = ["*.json", "*/*.json", "*/*.txt", "*/*.model"]


def is_single_file(path: Path) -> bool:
    """Whether `path` names a file of a single-file checkpoint format (it may not exist)."""
    return path.suffix.lower() in (*SAFE_SUFFIXES, GGUF_SUFFIX, *PICKLE_SUFFIXES)


def tensor_names(model: str, path: Path, allow_pickle: bool) -> list[str]:
    """The tensor names of a single file: read from its safetensors or GGUF header, or from a pickle if allowed."""
    if path.suffix.lower() == GGUF_SUFFIX:
        return gguf_tensor_names(model, path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelNotFoundError(
                model,
                f"it is a pickle ({path.suffix}), which can run code when loaded; pass allow_pickle=True "
                "(--allow-pickle) if you trust it, or use a .safetensors file",
            )
        import torch

        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)  # allowed by the user
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unreadable file
            raise ModelNotFoundError(model, f"it is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = checkpoint["state_dict"]
        if not isinstance(checkpoint, dict):
            raise ModelNotFoundError(model, "it is not a checkpoint (no dictionary of tensors)")
        return [str(key) for key in checkpoint]
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types for damaged headers
        raise ModelNotFoundError(
            model, f"it is not a readable .safetensors file ({type(exc).__name__}: {exc})"
        ) from None


def detect(registry: Registry, model: str, names: list[str], family: str | None) -> ModelProvider:
    """The provider whose `detect_single_file` claims a file with tensor `names` (or `family`'s)."""
    provider = _claimed(registry, model, names, family)
    if Path(model).suffix.lower() == GGUF_SUFFIX and not provider.loads_gguf:
        able = sorted(name for name, other in registry.providers.items() if other.loads_gguf)
        raise UnsupportedFeatureError(provider.name, "GGUF single files", able)
    return provider


def _claimed(registry: Registry, model: str, names: list[str], family: str | None) -> ModelProvider:
    if family is not None:
        provider = registry.provider(family)
        if not provider.detect_single_file(names):
            raise ModelNotFoundError(
                model, f"it is not a single-file {family} checkpoint (its tensor names are another family's)"
            )
        return provider
    for provider in registry.providers.values():
        if provider.detect_single_file(names):
            return provider
    known = ", ".join(sorted(registry.providers)) or "none"
    broken = [info.name for info in registry.failures()]
    hint = f"; plugins that failed to load: {', '.join(broken)}" if broken else ""
    raise ModelNotFoundError(
        model,
        f"no installed family recognises this single file's tensor names (known families: {known}{hint}); "
        f"it may be a checkpoint of another family, or not a Stable Diffusion checkpoint",
    )


def config_folder(model: str, provider: ModelProvider, config: str | None) -> str:
    """The local diffusers folder whose configs and tokenizers ``from_single_file`` reads."""

    if config is None:
        repository = next(iter(provider.aliases.values()), None)
        if repository is None:
            raise InvalidRequestError(
                "config",
                None,
                f"a diffusers folder, hub id or tiny:{provider.name} with the configs (family "
                f"{provider.name!r} names no default repository)",
            )
        folder = _cached(repository)
        if folder is None:
            raise ModelNotFoundError(
                model,
                f"a single file needs the configs and tokenizers of its family's repository {repository}, which is "
                f"not in the local Hugging Face cache: fetch them (no weights) with `hf download {repository} "
                f"--include '*.json' '*/*.json' '*/*.txt'`, or pass config= (--config) a diffusers folder, "
                f"a hub id or tiny:{provider.name}",
            )
        return folder
    if not isinstance(config, str) or not config.strip():
        raise InvalidRequestError("config", config, "None, a diffusers folder, a hub id or tiny:<family>")
    if config.startswith(TINY_PREFIX):
        if config != f"{TINY_PREFIX}{provider.name}":
            raise InvalidRequestError("config", config, f"the configs of the file's family: tiny:{provider.name}")
        return str(ensure_built(provider.name, provider.tiny_version, provider.build_tiny))
    path = Path(config).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InvalidRequestError("config", config, f"a diffusers folder ({path} has no model_index.json)")
        return str(path)
    if not is_hub_id(config):
        raise InvalidRequestError(
            "config", config, f"a diffusers folder, hub id or tiny:<family> ({path} does not exist)"
        )
    folder = _cached(config)
    if folder is not None:
        return folder
    if hub_offline():
        raise ModelNotFoundError(
            model,
            f"its configs {config} are not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading "
            f"them: fetch them with `hf download {config} --include '*.json' '*/*.json' '*/*.txt'`",
        )
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(config, allow_patterns=CONFIG_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - every hub failure means the same to the user
        raise ModelNotFoundError(model, f"its configs {config} could not be fetched ({type(exc).__name__})") from None


def _cached(repository: str) -> str | None:
    """`repository`'s snapshot folder in the local Hugging Face cache if it holds its model_index.json."""
    from huggingface_hub import try_to_load_from_cache

    found: Any = try_to_load_from_cache(repository, "model_index.json")
    if isinstance(found, (str, os.PathLike)) and os.path.isfile(found):
        return str(Path(found).parent)
    return None
