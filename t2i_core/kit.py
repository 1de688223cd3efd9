"""The helpers for plugin authors: what t2i's own plugins use, public and covered by docs/versioning.md.

A plugin imports `t2i_core` (the request, the base classes, ``hookimpl``), this module,
`t2i_core.testing` and `t2i_core.tiny`, and nothing else of t2i. Everything here is light to
import (no torch, diffusers or transformers until a function that needs them runs).

- **Checkpoints**: `is_hub_id`, `hub_offline`, `read_model_index`, `has_variant`.
- **Weights files** (LoRAs, embeddings): `resolve_file`, `WeightsFile`, `file_digest`; the files of
  LoRA and embedding folders, by the names prompts use: `folder_files`, `FolderFile`.
- **Single files**: `load_single_file_component` (a denoiser from one file: dtype, GGUF,
  quantization), `is_gguf`.
- **Text encoders**: `clip_hidden_states` (CLIP skip, as diffusers' ``clip_skip``), `clip_layers`.
- **Running**: `report_progress`, `ProgressCallback`, `takes_latents`, `private_components`,
  `is_offloaded`, `loading_lock`.
- **State**: `SharedState`, one value per set of loaded weights, shared by the engines over them;
  `Turns`, a gate that lets runs needing those weights in one state run together while a run
  needing another state waits.
- **Schedulers**: `DEFAULT_SCHEDULER`, `build_scheduler`, `scheduler_names`.
- **Settings**: `env_int`, a positive-integer environment setting with a clear error.
- **Files**: `write_atomically`, a file written whole or not at all (temporary name, fsync, rename).
- **Images**: `ImageReader`, the images a conditioner takes, checked before any work and decoded once.
"""

from __future__ import annotations

import importlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import InvalidRequestError

#: public name -> (the t2i_core module that defines it, its name there): imported on first use
#: (PEP 562), so that a plugin importing one helper does not pay for the others
_EXPORTS: dict[str, tuple[str, str]] = {
    "write_atomically": ("_files", "write_atomically"),
    "ImageReader": ("_images", "ImageReader"),
    "clip_hidden_states": ("_clip", "clip_hidden_states"),
    "clip_layers": ("_clip", "clip_layers"),
    "has_variant": ("_hub", "has_variant"),
    "hub_offline": ("_hub", "hub_offline"),
    "is_hub_id": ("_hub", "is_hub_id"),
    "read_model_index": ("_hub", "read_model_index"),
    "loading_lock": ("_locks", "loading_lock"),
    "is_offloaded": ("_modules", "is_offloaded"),
    "private_components": ("_modules", "private_components"),
    "pipeline_over": ("_modules", "pipeline_over"),
    "ProgressCallback": ("_progress", "ProgressCallback"),
    "report_progress": ("_progress", "report_progress"),
    "takes_latents": ("_progress", "takes_latents"),
    "Turns": ("_turns", "Turns"),
    "WeightsFile": ("_weight_files", "WeightsFile"),
    "file_digest": ("_weight_files", "file_digest"),
    "resolve_file": ("_weight_files", "resolve_file"),
    "FolderFile": ("prompt_tags", "FolderFile"),
    "folder_files": ("prompt_tags", "folder_files"),
    "is_gguf": ("_single_file_components", "is_gguf"),
    "load_single_file_component": ("_single_file_components", "load_single_file_component"),
    "DEFAULT_SCHEDULER": ("schedulers", "DEFAULT"),
    "build_scheduler": ("schedulers", "build"),
    "scheduler_names": ("schedulers", "family_names"),
}

__all__ = [
    "DEFAULT_SCHEDULER",
    "FolderFile",
    "ImageReader",
    "ProgressCallback",
    "SharedState",
    "Turns",
    "WeightsFile",
    "build_scheduler",
    "clip_hidden_states",
    "clip_layers",
    "denoiser",
    "env_int",
    "file_digest",
    "folder_files",
    "has_variant",
    "hub_offline",
    "is_gguf",
    "is_hub_id",
    "is_offloaded",
    "load_single_file_component",
    "loading_lock",
    "pipeline_over",
    "private_components",
    "read_model_index",
    "report_progress",
    "resolve_file",
    "scheduler_names",
    "takes_latents",
    "write_atomically",
]

T = TypeVar("T")

#: The pipeline attributes that hold a family's denoiser, in the order `denoiser` looks for them.
DENOISER_ATTRIBUTES = ("unet", "transformer", "prior")


def denoiser(pipeline: Any) -> Any:
    """The denoising model of `pipeline` (its ``unet``, else ``transformer``, else ``prior``).

    Engines made by `t2i_core.load` from one cached checkpoint share this module, so it is the
    key of per-weights state (`SharedState`).

    :raises TypeError: `pipeline` has none of them.
    """
    for name in DENOISER_ATTRIBUTES:
        module = getattr(pipeline, name, None)
        if module is not None:
            return module
    raise TypeError(f"{type(pipeline).__name__} has no {', '.join(DENOISER_ATTRIBUTES)} to key shared state on")


def _no_default(pipeline: Any) -> Any:
    raise TypeError("this SharedState has no make function: pass make= to get()")


class SharedState(Generic[T]):
    """One value per set of loaded weights, made on first use and shared by every engine over them.

    Engines from the same cached `t2i_core.load` share their torch modules (and each has its own
    pipeline object). What belongs to the weights rather than to one engine — LoRA adapters loaded
    into a UNet, a ControlNet loaded beside it, a refiner paired with a base — lives here, keyed
    weakly by the pipeline's denoiser: it goes when the weights go, and `make` runs once per weights
    however many threads ask at once.

    >>> controlnets: SharedState[dict[str, object]] = SharedState(lambda pipeline: {})
    >>> # controlnets.get(engine.pipeline) -> the same dict for every engine over these weights
    """

    def __init__(self, make: Callable[[Any], T] = _no_default, *, key: Callable[[Any], Any] = denoiser) -> None:
        """:param make: builds the value from the first pipeline that asks (called under a lock).
        :param key: the object the value is tied to (default: the pipeline's denoiser module);
            it must be weakly referenceable, as torch modules are.
        """
        self._make = make
        self._key = key
        self._values: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()

    def get(self, pipeline: Any, make: Callable[[Any], T] | None = None) -> T:
        """The value for `pipeline`'s weights, made by ``make(pipeline)`` if there is none yet.

        :param make: builds it this time instead of the `SharedState`'s own `make` (for a value that
            depends on more than the pipeline, such as the engine's accelerators).
        """
        key = self._key(pipeline)
        with self._lock:
            value = self._values.get(key)
            if value is None:
                value = self._values[key] = (make or self._make)(pipeline)
            return value

    def peek(self, pipeline: Any) -> T | None:
        """The value for `pipeline`'s weights if one was made, else None (never makes one)."""
        with self._lock:
            return self._values.get(self._key(pipeline))

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)


def env_int(name: str, default: int, *, minimum: int = 1, what: str | None = None) -> int:
    """A positive-integer setting from environment variable `name`; `default` when unset or empty.

    :raises InvalidRequestError: naming ``$NAME``, its text and what is allowed, when the value is
        not an integer >= `minimum`.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise InvalidRequestError(f"${name}", text, f"{what or 'an integer'} >= {minimum}")
    return value


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 't2i_core.kit' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"t2i_core.{module}"), attribute)
    globals()[name] = value  # once: later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from ._clip import clip_hidden_states, clip_layers
    from ._files import write_atomically
    from ._hub import has_variant, hub_offline, is_hub_id, read_model_index
    from ._images import ImageReader
    from ._locks import loading_lock
    from ._modules import is_offloaded, pipeline_over, private_components
    from ._progress import ProgressCallback, report_progress, takes_latents
    from ._single_file_components import is_gguf, load_single_file_component
    from ._turns import Turns
    from ._weight_files import WeightsFile, file_digest, resolve_file
    from .prompt_tags import FolderFile, folder_files
    from .schedulers import DEFAULT as DEFAULT_SCHEDULER
    from .schedulers import build as build_scheduler
    from .schedulers import family_names as scheduler_names
