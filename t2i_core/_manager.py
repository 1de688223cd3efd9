"""Plugin discovery: load the ``t2i`` entry points once, lazily, and collect what they register.

Precedence does not depend on installation order or entry-point names: t2i-core's own built-ins
load first, then the plugins shipped from this repository, then every other plugin by
distribution and entry-point name. A name (family, alias, conditioner, accelerator, preset,
command, executor) belongs to the plugin that registered it first; a later plugin's clashing item is refused with a
warning while the rest of that plugin still loads. See docs/plugin-security.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import attrs
import pluggy

from . import hookspecs
from .accelerator import PHASES, Accelerator, Preset
from .command import Command, Commands
from .conditioner import Conditioner
from .errors import InvalidRequestError, PluginError, UnknownAcceleratorError, UnknownFamilyError
from .executor import Executor
from .provider import ModelProvider

ENTRY_POINT_GROUP = "t2i"
#: Comma-separated plugins to load: a name as ``t2i plugins`` shows it (``sd15``), or explicitly
#: ``distribution:entry-point`` (``t2i-sd15:sd15``). Unset = all, empty = none; built-ins always load.
LOAD_PLUGINS_ENV = "T2I_LOAD_PLUGINS"
#: Set to 1 to make a plugin that fails to load an error (`PluginError` from `get_registry()`,
#: exit status 2 from every ``t2i`` command) instead of a report: for CI.
STRICT_PLUGINS_ENV = "T2I_STRICT_PLUGINS"
#: Set to 1 for tracebacks: a broken plugin's in ``t2i plugins`` and in the error of `load()`.
DEBUG_ENV = "T2I_DEBUG"
CORE_DISTRIBUTION = "t2i-core"
#: The distributions shipped from this repository's ``plugins/`` folder, each with the import
#: package its entry points point into. They load right after the built-ins, before any other
#: plugin, so no third party can take their names. Add every new ``plugins/<name>`` here (a test
#: checks that none is missing).
FIRST_PARTY_DISTRIBUTIONS: dict[str, str] = {
    "t2i-sd15": "t2i_sd15",
    "t2i-sdxl": "t2i_sdxl",
    "t2i-kandinsky22": "t2i_kandinsky22",
    "t2i-compel": "t2i_compel",
    "t2i-controlnet": "t2i_controlnet",
    "t2i-lora": "t2i_lora",
    "t2i-server": "t2i_server",
    "t2i-ray": "t2i_ray",
}
#: ``t2i plugins`` flags a plugin whose import takes longer (seconds): it delays every command.
SLOW_IMPORT_SECONDS = 0.5

#: Where a plugin comes from (``PluginInfo.source``), in the order plugins load.
BUILTIN = "built-in"  # an entry point of the installed t2i-core into its own package
FIRST_PARTY = "first-party"  # one of FIRST_PARTY_DISTRIBUTIONS
THIRD_PARTY = "third-party"  # any other entry point
IN_PROCESS = "in-process"  # Registry.register_plugin
_PRECEDENCE = (BUILTIN, FIRST_PARTY, THIRD_PARTY)
_HOOKS = (
    "register_providers",
    "register_conditioners",
    "register_accelerators",
    "register_commands",
    "register_executors",
)
#: The ``t2i`` subcommands of t2i-core itself (t2i_core/cli.py): no plugin's command may take these names.
CORE_COMMANDS = ("generate", "plugins", "plugin", "warmup", "batch")
_CORE_PACKAGE = Path(__file__).resolve().parent


class PluginWarning(UserWarning):
    """A plugin's item was refused: an earlier plugin had already registered its name."""


@attrs.define(kw_only=True)
class PluginInfo:
    """One plugin as ``t2i plugins`` shows it."""

    #: its key in ``Registry.plugins``: the entry-point name, or ``distribution:name`` when an
    #: entry point earlier in precedence already has that name
    name: str
    distribution: str | None
    version: str | None
    registered: list[str] = attrs.Factory(list)
    error: str | None = None
    #: items refused because an earlier plugin had registered their name (the rest still loaded)
    warnings: list[str] = attrs.Factory(list)
    #: BUILTIN, FIRST_PARTY, THIRD_PARTY, or IN_PROCESS for ``register_plugin``
    source: str = IN_PROCESS
    entry_point: str | None = None
    #: the entry point's target (``t2i_sd15``) and the file it was imported from
    module: str | None = None
    location: str | None = None
    #: how long importing the entry point took; None when registered in-process
    import_seconds: float | None = None
    #: the traceback of `error` (``t2i plugins`` shows it with T2I_DEBUG=1)
    traceback: str | None = None


class Registry:
    """The plugin manager and everything the plugins registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.providers: dict[str, ModelProvider] = {}
        self.conditioners: dict[str, Conditioner] = {}
        self.accelerators: dict[str, Accelerator] = {}
        self.presets: dict[str, Preset] = {}
        #: ``t2i`` subcommands offered by plugins, by name
        self.commands: dict[str, Command] = {}
        #: batch executors (``t2i batch --executor``), by name
        self.executors: dict[str, Executor] = {}
        self.plugins: dict[str, PluginInfo] = {}

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every ``t2i`` entry point that LOAD_PLUGINS_ENV allows, in precedence order."""
        allowed = _allowed_plugins()
        for key, found in _keyed(_discover()):
            if allowed is not None and found.source != BUILTIN and not {key, found.explicit} & allowed:
                continue
            if key in self.plugins:
                continue
            self._load(key, found)

    def _load(self, key: str, found: _Found) -> None:
        entry_point = found.entry_point
        info = PluginInfo(
            name=key,
            distribution=found.distribution,
            version=found.version,
            source=found.source,
            entry_point=entry_point.name,
            module=getattr(entry_point, "value", None),
        )
        started = time.perf_counter()
        try:
            plugin = entry_point.load()
        except GeneratorExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - not even sys.exit() or a stray KeyboardInterrupt in a plugin takes t2i down
            info.import_seconds = time.perf_counter() - started
            info.error = f"plugin {key!r}: import failed: {_describe(exc)}"
            info.traceback = _traceback(exc)
            self.plugins[key] = info
            return
        info.import_seconds = time.perf_counter() - started
        location = getattr(plugin, "__file__", None)
        info.location = location if isinstance(location, str) else None
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
        """Register `plugin`'s hooks and what they offer: all of it, but for items whose name is taken.

        A hook that fails (raises, or registers something invalid) refuses the whole plugin, since
        what it meant to offer is unknown; a name already taken refuses only that item, with a warning.
        """
        self.plugins[info.name] = info
        try:
            self.pm.register(plugin, name=info.name)
            self.pm.check_pending()
        except GeneratorExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - pluggy's PluginValidationError, a name clash, ...
            if self.pm.has_plugin(info.name):
                self.pm.unregister(name=info.name)
            info.error = f"plugin {info.name!r}: registration failed: {_describe(exc)}"
            info.traceback = _traceback(exc)
            return info
        pending: list[tuple[str, Any]] = []
        try:
            for hook_name in _HOOKS:
                caller = getattr(self.pm.hook, hook_name)
                for impl in caller.get_hookimpls():
                    if impl.plugin_name == info.name:
                        register = self._collector(hook_name, info.name, pending)
                        if hook_name == "register_commands":
                            impl.function(cli=Commands(register, info.name))
                        else:
                            impl.function(register=register)
            for kind, item in pending:
                if kind == "command":
                    _check_command(info.name, item)
        except GeneratorExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - as at import: a plugin's hook never takes t2i down
            self.pm.unregister(name=info.name)
            info.error = str(exc) if isinstance(exc, PluginError) else f"plugin {info.name!r}: {_describe(exc)}"
            info.traceback = _traceback(exc)
            return info
        refusals: list[str] = []
        for kind, item in pending:
            refusal = self._refusal(kind, item)
            if refusal is not None:
                refusals.append(refusal)
                message = f"{_label(info)}: {refusal}; refused"
                info.warnings.append(message)
                warnings.warn(message, PluginWarning, stacklevel=2)
                continue
            self._table(kind)[item.name] = item
            info.registered.append(f"{kind}:{item.name}")
        if refusals and not info.registered:
            info.error = f"plugin {info.name!r}: nothing registered: {'; '.join(refusals)}"
        return info

    def _collector(self, hook_name: str, plugin: str, pending: list[tuple[str, Any]]) -> Callable[[Any], None]:
        expected: dict[str, tuple[type[Any], ...]] = {
            "register_providers": (ModelProvider,),
            "register_conditioners": (Conditioner,),
            "register_accelerators": (Accelerator, Preset),
            "register_commands": (Command,),
            "register_executors": (Executor,),
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
            "command": self.commands,
            "executor": self.executors,
        }
        return tables[kind]

    def _refusal(self, kind: str, item: Any) -> str | None:
        """Why `item` cannot be registered (its name or an alias is taken), naming the owner; None if it can."""
        if kind == "command" and item.name in CORE_COMMANDS:
            return f"command {item.name!r} is one of t2i-core's own commands"
        namespace = ("accelerator", "preset") if kind in ("accelerator", "preset") else (kind,)
        for other_kind in namespace:
            if item.name in self._table(other_kind):
                owner = self._owner(other_kind, item.name)
                taken = "" if other_kind == kind else f" (as {'an' if other_kind[0] in 'aeiou' else 'a'} {other_kind})"
                return f"{kind} {item.name!r} is already registered{taken} by {owner}"
        if kind == "provider":
            for alias in item.aliases:
                for other in self.providers.values():
                    if alias in other.aliases:
                        owner = self._owner("provider", other.name)
                        return (
                            f"provider {item.name!r}: alias {alias!r} is already registered "
                            f"by family {other.name!r} of {owner}"
                        )
        return None

    def _owner(self, kind: str, name: str) -> str:
        registered = f"{kind}:{name}"
        for info in self.plugins.values():
            if registered in info.registered:
                return _label(info)
        return "another plugin"

    # -- lookups -------------------------------------------------------------------------
    def provider(self, family: str) -> ModelProvider:
        try:
            return self.providers[family]
        except KeyError:
            pass
        broken = self.failures()
        offering = next((info for info in broken if _may_offer(info, family)), None)
        if offering is not None:
            error = str(offering.error)
            if _debug() and offering.traceback:
                error = f"{error}\n{offering.traceback}"
            raise UnknownFamilyError(family, self.providers, plugin_error=error)
        raise UnknownFamilyError(family, self.providers, broken_plugins=[info.name for info in broken])

    def first_party(self, kind: str) -> dict[str, Any]:
        """The items of `kind` (``"provider"``, ``"conditioner"``, ``"accelerator"``, ``"preset"``, ``"command"``)
        registered by t2i-core's built-ins and the plugins shipped from this repository, by name.

        What t2i's own tests and docs cover: items of third-party plugins are theirs to document.
        """
        shipped = {
            item for info in self.plugins.values() if info.source in (BUILTIN, FIRST_PARTY) for item in info.registered
        }
        return {name: item for name, item in self._table(kind).items() if f"{kind}:{name}" in shipped}

    def accelerator(self, name: str) -> Accelerator:
        try:
            return self.accelerators[name]
        except KeyError:
            raise UnknownAcceleratorError(name, [*self.accelerators, *self.presets]) from None

    def executor(self, name: str) -> Executor:
        """The batch executor registered as `name`; `InvalidRequestError` naming the known ones if none is."""
        try:
            return self.executors[name]
        except (KeyError, TypeError):
            pass
        known = ", ".join(sorted(self.executors)) or "none"
        broken = next((info for info in self.failures() if isinstance(name, str) and _may_offer(info, name)), None)
        if broken is not None:
            raise InvalidRequestError("executor", name, f"one of {known} (its plugin failed to load: {broken.error})")
        hint = " (install t2i-ray for ray)" if name == "ray" else ""
        raise InvalidRequestError("executor", name, f"one of {known}{hint}")

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


def _label(info: PluginInfo) -> str:
    """``plugin 'sd15' (t2i-sd15 0.1.0)``: a plugin and the distribution it came from."""
    if info.distribution is None:
        return f"plugin {info.name!r} ({'registered in-process' if info.source == IN_PROCESS else 'no distribution'})"
    return f"plugin {info.name!r} ({info.distribution}{f' {info.version}' if info.version else ''})"


def _check_command(plugin: str, command: Command) -> None:
    """Refuse a command whose arguments cannot become a ``t2i`` subcommand (e.g. its own ``-h``)."""
    try:
        argparse.ArgumentParser(prog=f"t2i {command.name}", parents=[command.parser])
    except (argparse.ArgumentError, TypeError, ValueError) as exc:
        raise PluginError(plugin, f"command {command.name!r} has unusable arguments: {exc}") from None


def _may_offer(info: PluginInfo, family: str) -> bool:
    """Whether broken plugin `info` looks like the one offering `family` (``sd3``, ``t2i-sd3``, ``t2i_sd3``)."""
    wanted = {_normalize(family), _normalize(f"t2i-{family}")}
    module = (info.module or "").split(":", 1)[0].split(".", 1)[0]
    names = (info.name.rpartition(":")[2], info.entry_point or "", info.distribution or "", module)
    return any(name and _normalize(name) in wanted for name in names)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({'' if exc.code is None else repr(exc.code)})"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: raised by the plugin, or Ctrl-C while it was loading"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- discovery ----------------------------------------------------------------------------


@attrs.frozen
class _Found:
    """A ``t2i`` entry point and where it comes from."""

    entry_point: Any
    distribution: str | None
    version: str | None
    project: str  # the normalised distribution name, "?" when unknown
    source: str

    @property
    def explicit(self) -> str:
        """``distribution:entry-point``, the form of LOAD_PLUGINS_ENV that cannot be ambiguous."""
        return f"{self.project}:{self.entry_point.name}"

    def precedence(self) -> tuple[int, str, str, str]:
        value = str(getattr(self.entry_point, "value", ""))
        return (_PRECEDENCE.index(self.source), self.project, self.entry_point.name, value)


def _discover() -> list[_Found]:
    """Every ``t2i`` entry point once, in precedence order."""
    entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    # entry_points() shows only the first distribution of each name on sys.path: look at every
    # copy of the core and of the first-party plugins too, so that a look-alike cannot hide them.
    for project in (CORE_DISTRIBUTION, *FIRST_PARTY_DISTRIBUTIONS):
        for dist in metadata.distributions(name=project):
            entry_points.extend(ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP)
    unique: dict[tuple[str, str, str], _Found] = {}
    for found in sorted(map(_classify, entry_points), key=_Found.precedence):
        unique.setdefault(found.precedence()[1:], found)  # the same entry point seen twice
    return list(unique.values())


def _classify(entry_point: Any) -> _Found:
    dist = getattr(entry_point, "dist", None)
    distribution = dist.name if dist is not None else None
    project = _normalize(distribution) if distribution else "?"
    try:
        module = getattr(entry_point, "module", None) or ""
    except Exception:  # noqa: BLE001 - a malformed value ("x = !"): third-party, and its load() reports it
        module = ""
    if dist is not None and _in_package(module, "t2i_core") and _is_core_module(module) and _installs_this_core(dist):
        source = BUILTIN
    elif project in FIRST_PARTY_DISTRIBUTIONS and _in_package(module, FIRST_PARTY_DISTRIBUTIONS[project]):
        source = FIRST_PARTY
    else:
        source = THIRD_PARTY
    version = dist.version if dist is not None else None
    return _Found(entry_point=entry_point, distribution=distribution, version=version, project=project, source=source)


def _normalize(name: str) -> str:
    """A distribution name as packaging compares them (PEP 503): ``T2I_Core`` -> ``t2i-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def _is_core_module(module: str) -> bool:
    """Whether `module` is a file of the t2i_core package that is running (not a look-alike)."""
    try:
        spec = importlib.util.find_spec(module)
    except Exception:  # noqa: BLE001 - no such module (or a parent that is not a package)
        return False
    origin = spec.origin if spec is not None else None
    return origin is not None and Path(origin).resolve().is_relative_to(_CORE_PACKAGE)


def _installs_this_core(dist: metadata.Distribution) -> bool:
    """Whether `dist` is the distribution that installed the running t2i_core package.

    A regular install (or an ``.egg-info`` next to the sources) keeps the package beside its
    metadata; an editable install (PEP 660) records the source folder in ``direct_url.json``.
    """
    try:
        roots = [Path(str(dist.locate_file("")))]
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    except Exception:  # noqa: BLE001 - unreadable metadata is not the core's
        return False
    url = urlparse(str(direct_url.get("url", ""))) if isinstance(direct_url, dict) else None
    if url is not None and url.scheme == "file":
        roots.append(Path(unquote(url.path)))
    return any((root / _CORE_PACKAGE.name).resolve() == _CORE_PACKAGE for root in roots)


def _keyed(found: Iterable[_Found]) -> list[tuple[str, _Found]]:
    """Each entry point with its key in ``Registry.plugins``: its name, or ``distribution:name``
    when an entry point earlier in precedence has that name (so a clash never hides a plugin)."""
    keyed: list[tuple[str, _Found]] = []
    taken: set[str] = set()
    for each in found:
        key = each.entry_point.name
        if key in taken:
            key = each.explicit
            copy = 2
            while key in taken:  # two copies of one distribution on sys.path
                key = f"{each.explicit}#{copy}"
                copy += 1
        taken.add(key)
        keyed.append((key, each))
    return keyed


def _allowed_plugins() -> set[str] | None:
    """LOAD_PLUGINS_ENV as a set of keys and ``distribution:name`` forms; None when unset."""
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    if wanted is None:
        return None
    allowed: set[str] = set()
    for token in (t.strip() for t in wanted.split(",")):
        project, colon, name = token.partition(":")
        if colon:
            allowed.add(f"{_normalize(project.strip())}:{name.strip()}")
        elif token:
            allowed.add(token)
    return allowed


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
    if os.environ.get(STRICT_PLUGINS_ENV, "").strip().lower() in ("", "0", "false", "no", "off"):
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
