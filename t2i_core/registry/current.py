"""The process-wide registry: loaded once, lazily, on first use; swappable for tests and long-lived apps."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..errors import PluginError
from .discovery import STRICT_PLUGINS_ENV
from .registry import Registry, _debug, _enabled

_registry: Registry | None = None
_lock = threading.RLock()
_loading = False


def get_registry() -> Registry:
    """The process-wide registry, loading the entry points on first use."""
    global _registry, _loading
    with _lock:
        if _registry is None:
            if _loading:
                # A plugin module asked for the registry while being imported: refuse (the error
                # is recorded against that plugin) rather than recurse or deadlock.
                raise PluginError("t2i", "a plugin called get_registry() or load() while plugins were loading")
            _loading = True
            try:
                registry = Registry()
                registry.load_entry_points()
            finally:
                _loading = False
            _check_strict(registry)
            _registry = registry
        return _registry


def _check_strict(registry: Registry) -> None:
    """With STRICT_PLUGINS_ENV set, the first broken plugin is an error rather than a report."""
    if not _enabled(STRICT_PLUGINS_ENV):
        return
    broken = registry.failures()
    if broken:
        first = broken[0]
        detail = str(first.error).removeprefix(f"plugin {first.name!r}: ")
        if _debug() and first.traceback:
            detail = f"{detail}\n{first.traceback}"
        others = f" ({len(broken) - 1} more broken plugin(s): see t2i plugins)" if len(broken) > 1 else ""
        raise PluginError(first.name, f"it failed to load and ${STRICT_PLUGINS_ENV} is set: {detail}{others}")


def reset_registry() -> None:
    """Forget loaded plugins; the next `get_registry()` discovers them again (tests, long-lived apps)."""
    global _registry
    with _lock:
        _registry = None


@contextlib.contextmanager
def using_registry(registry: Registry | None) -> Iterator[Registry | None]:
    """Make `registry` the process-wide one inside the block (None: discover afresh on next use),
    then restore the previous one (the conformance kit's fixtures and t2i's tests use this)."""
    global _registry
    with _lock:
        previous = _registry
        _registry = registry
    try:
        yield registry
    finally:
        with _lock:
            _registry = previous
