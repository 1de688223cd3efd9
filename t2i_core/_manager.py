"""Deprecated: the plugin registry moved to `t2i_core.registry` (t2i 0.2); this module goes in 0.3."""

from __future__ import annotations

import warnings

from .registry import *  # noqa: F403
from .registry import __all__ as __all__
from .registry.discovery import normalize as _normalize  # noqa: F401

warnings.warn(
    "t2i_core._manager is deprecated: import from t2i_core (get_registry, reset_registry, PluginWarning) "
    "or t2i_core.registry",
    DeprecationWarning,
    stacklevel=2,
)
