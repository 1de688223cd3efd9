"""t2i: a plugin-based SDK for text-to-image generation on top of diffusers.

The public surface is re-exported here; everything else is internal. Importing this module
never imports torch, diffusers or transformers.
"""

from __future__ import annotations

from ._locks import loading_lock
from ._manager import PluginWarning, get_registry, reset_registry
from .accelerator import PHASES, Accelerator, LoadContext, Preset
from .batch import BatchSummary, run_batch
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
from .executor import Executor, ExecutorSettings, Outcome, Worker, WorkItem
from .hookspecs import hookimpl, hookspec
from .provider import FamilyDefaults, ModelProvider, Option
from .request import Control, Embedding, GenerationRequest, GenerationResult, Lora

__version__ = "0.1.0"
"""The version of t2i-core (see docs/versioning.md for what a version promises)."""

__all__ = [
    "PHASES",
    "Accelerator",
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
    "IncompatibleAcceleratorsError",
    "InvalidRequestError",
    "LoadContext",
    "Lora",
    "ModelNotFoundError",
    "ModelProvider",
    "Option",
    "Outcome",
    "OutputError",
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
    "get_registry",
    "hookimpl",
    "hookspec",
    "load",
    "loading_lock",
    "reset_registry",
    "run_batch",
]
