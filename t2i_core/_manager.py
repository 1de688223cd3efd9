"""Plugin discovery: load the ``t2i`` entry points once, lazily, and collect what they register."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .accelerator import PHASES, Accelerator, Preset
from .conditioner import Conditioner
from .errors import PluginError, UnknownAcceleratorError, UnknownFamilyError
from .provider import ModelProvider

ENTRY_POINT_GROUP = "t2i"
#: Comma-separated entry-point names to load; unset = all, empty = none (built-ins always load).
LOAD_PLUGINS_ENV = "T2I_LOAD_PLUGINS"
CORE_DISTRIBUTION = "t2i-core"


@attrs.define(kw_only=True)
class PluginInfo:
    """One plugin as ``t2i plugins`` shows it."""

    name: str
    distribution: str | None
    version: str | None
    registered: list[str] = attrs.Factory(list)
    error: str | None = None


class Registry:
    """The plugin manager and everything the plugins registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.providers: dict[str, ModelProvider] = {}
        self.conditioners: dict[str, Conditioner] = {}
        self.accelerators: dict[str, Accelerator] = {}
        self.presets: dict[str, Preset] = {}
        self.plugins: dict[str, PluginInfo] = {}

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        wanted = os.environ.get(LOAD_PLUGINS_ENV)
        allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
            dist = entry_point.dist
            dist_name = dist.metadata["Name"] if dist is not None else None
            is_core = dist_name is not None and dist_name.lower().replace("_", "-") == CORE_DISTRIBUTION
            if allowed is not None and not is_core and entry_point.name not in allowed:
                continue
            if entry_point.name in self.plugins:
                continue
            info = PluginInfo(
                name=entry_point.name,
                distribution=dist_name,
                version=dist.version if dist is not None else None,
            )
            try:
                plugin = entry_point.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the SDK down
                info.error = f"plugin {info.name!r}: import failed: {type(exc).__name__}: {exc}"
                self.plugins[info.name] = info
                continue
            self._add(plugin, info)

    def register_plugin(self, plugin: object, name: str) -> PluginInfo:
        """Register a plugin object (a module, or any object with hook implementations) by hand."""
        if name in self.plugins:
            raise PluginError(name, "a plugin of this name is already registered")
        return self._add(plugin, PluginInfo(name=name, distribution=None, version=None))

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        info = self.plugins.pop(name, None)
        if info is None:
            return
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        for item in info.registered:
            kind, _, item_name = item.partition(":")
            self._table(kind).pop(item_name, None)

    def _add(self, plugin: object, info: PluginInfo) -> PluginInfo:
        self.plugins[info.name] = info
        try:
            self.pm.register(plugin, name=info.name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - pluggy's PluginValidationError, a name clash, ...
            if self.pm.has_plugin(info.name):
                self.pm.unregister(name=info.name)
            info.error = f"plugin {info.name!r}: registration failed: {exc}"
            return info
        pending: list[tuple[str, Any]] = []
        try:
            for hook_name in ("register_providers", "register_conditioners", "register_accelerators"):
                caller = getattr(self.pm.hook, hook_name)
                for impl in caller.get_hookimpls():
                    if impl.plugin_name == info.name:
                        impl.function(register=self._collector(hook_name, info.name, pending))
            for index, (kind, item) in enumerate(pending):
                self._check_new(kind, item, info.name, pending[:index])
            for kind, item in pending:
                self._table(kind)[item.name] = item
        except Exception as exc:  # noqa: BLE001
            self.pm.unregister(name=info.name)
            info.error = (
                str(exc) if isinstance(exc, PluginError) else f"plugin {info.name!r}: {type(exc).__name__}: {exc}"
            )
            return info
        info.registered = [f"{kind}:{item.name}" for kind, item in pending]  # type: ignore[attr-defined]
        return info

    def _collector(self, hook_name: str, plugin: str, pending: list[tuple[str, Any]]) -> Callable[[Any], None]:
        expected: dict[str, tuple[type[Any], ...]] = {
            "register_providers": (ModelProvider,),
            "register_conditioners": (Conditioner,),
            "register_accelerators": (Accelerator, Preset),
        }

        def register(item: Any) -> None:
            kinds = expected[hook_name]
            if not isinstance(item, kinds):
                names = " or ".join(t.__name__ for t in expected[hook_name])
                raise PluginError(plugin, f"{hook_name} got {item!r}, expected a {names} instance")
            kind_name = "preset" if isinstance(item, Preset) else hook_name.removeprefix("register_").removesuffix("s")
            if kind_name == "accelerator" and item.phase not in PHASES:
                raise PluginError(
                    plugin, f"accelerator {item.name!r} has phase {item.phase!r}; expected one of {PHASES}"
                )
            pending.append((kind_name, item))

        return register

    def _table(self, kind: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            "provider": self.providers,
            "conditioner": self.conditioners,
            "accelerator": self.accelerators,
            "preset": self.presets,
        }
        return tables[kind]

    def _check_new(self, kind: str, item: Any, plugin: str, earlier: list[tuple[str, Any]]) -> None:
        """Refuse a name (or alias) already taken, by another plugin or earlier in this one."""
        namespace = ("accelerator", "preset") if kind in ("accelerator", "preset") else (kind,)
        taken = {name for k in namespace for name in self._table(k)}
        taken |= {other.name for k, other in earlier if k in namespace}
        if item.name in taken:
            raise PluginError(plugin, f"{kind} {item.name!r} is already registered")
        if kind == "provider":
            providers = [*self.providers.values(), *(other for k, other in earlier if k == "provider")]
            for alias in item.aliases:
                for other in providers:
                    if alias in other.aliases:
                        raise PluginError(plugin, f"alias {alias!r} is already registered by family {other.name!r}")

    # -- lookups -------------------------------------------------------------------------
    def provider(self, family: str) -> ModelProvider:
        try:
            return self.providers[family]
        except KeyError:
            raise UnknownFamilyError(family, self.providers) from None

    def accelerator(self, name: str) -> Accelerator:
        try:
            return self.accelerators[name]
        except KeyError:
            raise UnknownAcceleratorError(name, [*self.accelerators, *self.presets]) from None

    def ordered_conditioners(self) -> list[Conditioner]:
        return sorted(self.conditioners.values(), key=lambda c: (c.order, c.name))

    def failures(self) -> list[PluginInfo]:
        return [info for info in self.plugins.values() if info.error]

    def resolve_accelerators(self, names: Iterable[str], device: str) -> tuple[Accelerator, ...]:
        """Expand presets and order accelerators by phase (stable within a phase, duplicates dropped)."""
        expanded: list[str] = []
        for name in names:
            if name in self.presets:
                expanded.extend(self.presets[name].resolve(device))
            else:
                expanded.append(name)
        unique = list(dict.fromkeys(expanded))
        accelerators = [self.accelerator(name) for name in unique]
        return tuple(sorted(accelerators, key=lambda a: PHASES.index(a.phase)))


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
            _registry = registry
        return _registry


def reset_registry() -> None:
    """Forget loaded plugins; the next `get_registry()` discovers them again (tests, long-lived apps)."""
    global _registry
    with _lock:
        _registry = None
