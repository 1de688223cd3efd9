"""t2i: a plugin-based SDK for text-to-image generation on top of diffusers.

The public surface is re-exported here; everything else is internal. Importing this module
never imports torch, diffusers or transformers.
"""

from __future__ import annotations

from ._manager import get_registry, reset_registry
from .accelerator import PHASES, Accelerator, LoadContext, Preset
from .conditioner import Call, Conditioner
from .engine import Engine, clear_cache, load
from .errors import (
    GenerationError,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    ModelNotFoundError,
    PluginError,
    T2IError,
    UndetectedFamilyError,
    UnknownAcceleratorError,
    UnknownFamilyError,
    UnsupportedFeatureError,
)
from .hookspecs import hookimpl, hookspec
from .provider import FamilyDefaults, ModelProvider, Option
from .request import Control, GenerationRequest, GenerationResult

__version__ = "0.1.0"

__all__ = [
    "PHASES",
    "Accelerator",
    "Call",
    "Conditioner",
    "Control",
    "Engine",
    "FamilyDefaults",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "IncompatibleAcceleratorsError",
    "InvalidRequestError",
    "LoadContext",
    "ModelNotFoundError",
    "ModelProvider",
    "Option",
    "PluginError",
    "Preset",
    "T2IError",
    "UndetectedFamilyError",
    "UnknownAcceleratorError",
    "UnknownFamilyError",
    "UnsupportedFeatureError",
    "__version__",
    "clear_cache",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load",
    "reset_registry",
]
