"""t2i: a plugin-based SDK for text-to-image generation on top of diffusers.

The public surface is re-exported here; everything else is internal. Names are imported on first
use (PEP 562), so ``import t2i_core`` costs next to nothing and never imports torch, diffusers or
transformers: ``t2i --help`` and a plugin's registration stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
"""The version of t2i-core ([Versions and compatibility](../versioning.md) says what a version promises)."""

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "PHASES": "accelerator",
    "Accelerator": "accelerator",
    "AcceleratorParameter": "accelerator",
    "LoadContext": "accelerator",
    "Preset": "accelerator",
    "BatchSummary": "batch",
    "run_batch": "batch",
    "Worker": "batch.worker",
    "Commands": "command",
    "Call": "conditioner",
    "Conditioner": "conditioner",
    "DegenerateImageWarning": "engine",
    "Engine": "engine",
    "PromptTruncatedWarning": "engine",
    "clear_cache": "engine",
    "load": "engine",
    "expand_prompt": "prompt_tags",
    "GenerationCancelled": "errors",
    "GenerationError": "errors",
    "IncompatibleAcceleratorsError": "errors",
    "InvalidRequestError": "errors",
    "ModelNotFoundError": "errors",
    "OutputError": "errors",
    "PluginError": "errors",
    "T2IError": "errors",
    "UndetectedFamilyError": "errors",
    "UnknownAcceleratorError": "errors",
    "UnknownFamilyError": "errors",
    "UnsupportedFeatureError": "errors",
    "Executor": "executor",
    "ExecutorSettings": "executor",
    "Outcome": "executor",
    "WorkItem": "executor",
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "loading_lock": "_locks",
    "FamilyDefaults": "provider",
    "ModelProvider": "provider",
    "Option": "provider",
    "PluginWarning": "registry",
    "get_registry": "registry",
    "reset_registry": "registry",
    "Control": "request_values",
    "Embedding": "request_values",
    "GenerationRequest": "request",
    "GenerationResult": "request",
    "HiresFix": "request_values",
    "ImagePrompt": "request_values",
    "Lora": "request_values",
}

__all__ = [
    "Accelerator",
    "AcceleratorParameter",
    "BatchSummary",
    "Call",
    "Commands",
    "Conditioner",
    "Control",
    "DegenerateImageWarning",
    "Embedding",
    "Engine",
    "Executor",
    "ExecutorSettings",
    "FamilyDefaults",
    "GenerationCancelled",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "HiresFix",
    "ImagePrompt",
    "IncompatibleAcceleratorsError",
    "InvalidRequestError",
    "LoadContext",
    "Lora",
    "ModelNotFoundError",
    "ModelProvider",
    "Option",
    "Outcome",
    "OutputError",
    "PHASES",
    "PluginError",
    "PluginWarning",
    "Preset",
    "PromptTruncatedWarning",
    "T2IError",
    "UndetectedFamilyError",
    "UnknownAcceleratorError",
    "UnknownFamilyError",
    "UnsupportedFeatureError",
    "WorkItem",
    "Worker",
    "__version__",
    "clear_cache",
    "expand_prompt",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load",
    "loading_lock",
    "reset_registry",
    "run_batch",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 't2i_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from ._locks import loading_lock
    from .accelerator import PHASES, Accelerator, AcceleratorParameter, LoadContext, Preset
    from .batch import BatchSummary, run_batch
    from .batch.worker import Worker
    from .command import Commands
    from .conditioner import Call, Conditioner
    from .engine import DegenerateImageWarning, Engine, PromptTruncatedWarning, clear_cache, load
    from .errors import (
        GenerationCancelled,
        GenerationError,
        IncompatibleAcceleratorsError,
        InvalidRequestError,
        ModelNotFoundError,
        OutputError,
        PluginError,
        T2IError,
        UndetectedFamilyError,
        UnknownAcceleratorError,
        UnknownFamilyError,
        UnsupportedFeatureError,
    )
    from .executor import Executor, ExecutorSettings, Outcome, WorkItem
    from .hookspecs import hookimpl, hookspec
    from .prompt_tags import expand_prompt
    from .provider import FamilyDefaults, ModelProvider, Option
    from .registry import PluginWarning, get_registry, reset_registry
    from .request import GenerationRequest, GenerationResult
    from .request_values import Control, Embedding, HiresFix, ImagePrompt, Lora
