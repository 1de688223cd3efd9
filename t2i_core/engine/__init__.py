"""The engine: `load()` a model (`loading`, `sources`), check requests (`checks`) and run them (`run`).

request → `Engine` (a provider's loaded pipeline, accelerators applied once at load) →
conditioners build the call → the provider runs it → `GenerationResult`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from .loading import clear_cache, load
from .prompts import DegenerateImageWarning, PromptTruncatedWarning
from .run import Engine

__all__ = ["DegenerateImageWarning", "Engine", "PromptTruncatedWarning", "clear_cache", "load"]

#: Names plugins imported from ``t2i_core.engine`` before t2i 0.2: where they live now. They keep
#: working, with a DeprecationWarning, until 0.3.
_MOVED = {
    "is_hub_id": "t2i_core.kit",
    "hub_offline": "t2i_core.kit",
    "read_model_index": "t2i_core.kit",
    "resolve_device": "t2i_core.engine.sources",
    "DEFAULT_MAX_PIXELS": "t2i_core.engine.checks",
    "MAX_PIXELS_ENV": "t2i_core.engine.checks",
    "MAX_GUIDANCE_SCALE": "t2i_core.engine.checks",
    "warn_truncated_prompts": "t2i_core.engine.prompts",
}


def __getattr__(name: str) -> Any:
    target = _MOVED.get(name)
    if target is None:
        raise AttributeError(f"module 't2i_core.engine' has no attribute {name!r}")
    warnings.warn(
        f"t2i_core.engine.{name} is deprecated: import it from {target} (removed in t2i 0.3)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(target), name)
