"""Plugins: discovery of the ``t2i`` entry points (`discovery`), the registry of what they offer
(`registry`) and the process-wide instance (`current`)."""

from __future__ import annotations

from .current import get_registry, reset_registry, using_registry
from .discovery import (
    BUILTIN,
    DEBUG_ENV,
    ENTRY_POINT_GROUP,
    FIRST_PARTY,
    FIRST_PARTY_DISTRIBUTIONS,
    IN_PROCESS,
    LOAD_PLUGINS_ENV,
    STRICT_PLUGINS_ENV,
    THIRD_PARTY,
)
from .registry import CORE_COMMANDS, SLOW_IMPORT_SECONDS, TRACE_PLUGINS_ENV, PluginInfo, PluginWarning, Registry

__all__ = [
    "BUILTIN",
    "CORE_COMMANDS",
    "DEBUG_ENV",
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY",
    "FIRST_PARTY_DISTRIBUTIONS",
    "IN_PROCESS",
    "LOAD_PLUGINS_ENV",
    "SLOW_IMPORT_SECONDS",
    "STRICT_PLUGINS_ENV",
    "THIRD_PARTY",
    "TRACE_PLUGINS_ENV",
    "PluginInfo",
    "PluginWarning",
    "Registry",
    "get_registry",
    "reset_registry",
    "using_registry",
]
