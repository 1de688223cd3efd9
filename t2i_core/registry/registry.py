"""The registry: the pluggy plugin manager and everything the plugins registered, by name.

A name (family, alias, conditioner, accelerator, preset, command, executor) belongs to the plugin
that registered it first; a later plugin's clashing item is refused with a warning while the rest
of that plugin still loads. Every hook is called through pluggy (one plugin at a time, so that
each item is attributed to its plugin), so ``tryfirst``, ``trylast`` and ``specname`` mean what
pluggy says; ``T2I_TRACE_PLUGINS=1`` traces hook calls and registrations on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from .. import hookspecs
from ..accelerator import PHASES, Accelerator, AcceleratorParameter, Preset
from ..command import Command, Commands
from ..conditioner import Conditioner
from ..errors import InvalidRequestError, PluginError, UnknownAcceleratorError, UnknownFamilyError
from ..executor import Executor
from ..provider import ModelProvider
from .discovery import (
    BUILTIN,
    DEBUG_ENV,
    FIRST_PARTY,
    IN_PROCESS,
    Found,
    allowed_plugins,
    discover,
    keyed,
    normalize,
)

#: Set to 1 to trace every hook call and every registered item on stderr (pluggy's tracing).
TRACE_PLUGINS_ENV = "T2I_TRACE_PLUGINS"
#: ``t2i plugins`` flags a plugin whose import takes longer (seconds): it delays every command.
SLOW_IMPORT_SECONDS = 0.5
#: The ``t2i`` subcommands of t2i-core itself: no plugin's command may take these names.
CORE_COMMANDS = ("generate", "plugins", "plugin", "warmup", "batch")
#: What each hook's ``register`` callback accepts (one entry per name in `hookspecs.HOOK_NAMES`).
_EXPECTED: dict[str, tuple[type[Any], ...]] = {
    "register_providers": (ModelProvider,),
    "register_conditioners": (Conditioner,),
    "register_accelerators": (Accelerator, Preset),
    "register_commands": (Command,),
    "register_executors": (Executor,),
}
assert set(_EXPECTED) == set(hookspecs.HOOK_NAMES), "a hook without a registration kind"


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
        self._trace = self.pm.trace.root.get("registry")
        if _enabled(TRACE_PLUGINS_ENV):
            self.pm.trace.root.setwriter(_write_trace)
            self.pm.enable_tracing()
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
        allowed = allowed_plugins()
        for key, found in keyed(discover()):
            if allowed is not None and found.source != BUILTIN and not {key, found.explicit} & allowed:
                continue
            if key in self.plugins:
                continue
            self._load(key, found)

    def _load(self, key: str, found: Found) -> None:
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
            hash(plugin)
        except TypeError:  # pluggy keeps plugins in sets: an unhashable one (a SimpleNamespace) goes in a wrapper
            plugin = _hashable(plugin, info.name)
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
            others = [other for other in self.pm.get_plugins() if other is not plugin]
            for hook_name in hookspecs.HOOK_NAMES:
                impls = [impl for impl in getattr(self.pm.hook, hook_name).get_hookimpls() if impl.plugin is plugin]
                if not impls:
                    continue
                _refuse_wrappers(info.name, hook_name, impls)
                # Through pluggy, one plugin at a time: tryfirst/trylast/specname hold, and every
                # item the hook registers is this plugin's.
                caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
                register = self._collector(hook_name, info.name, pending)
                if hook_name == "register_commands":
                    caller(cli=Commands(register, info.name))
                else:
                    caller(register=register)
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
            refusal = self._refusal(kind, item, info)
            if refusal is not None:
                refusals.append(refusal)
                message = f"{_label(info)}: {refusal}; refused"
                info.warnings.append(message)
                warnings.warn(message, PluginWarning, stacklevel=2)
                continue
            self._table(kind)[item.name] = item
            info.registered.append(f"{kind}:{item.name}")
            self._trace(f"{_label(info)} registered {kind} {item.name!r}")
        if refusals and not info.registered:
            info.error = f"plugin {info.name!r}: nothing registered: {'; '.join(refusals)}"
        return info

    def _collector(self, hook_name: str, plugin: str, pending: list[tuple[str, Any]]) -> Callable[[Any], None]:
        def register(item: Any) -> None:
            kinds = _EXPECTED[hook_name]
            if not isinstance(item, kinds):
                names = " or ".join(t.__name__ for t in kinds)
                raise PluginError(plugin, f"{hook_name} got {item!r}, expected a {names} instance")
            kind_name = "preset" if isinstance(item, Preset) else hook_name.removeprefix("register_").removesuffix("s")
            if kind_name == "accelerator" and item.phase not in PHASES:
                raise PluginError(
                    plugin, f"accelerator {item.name!r} has phase {item.phase!r}; expected one of {PHASES}"
                )
            if kind_name == "accelerator" and not isinstance(item.parameter, (AcceleratorParameter, type(None))):
                raise PluginError(
                    plugin,
                    f"accelerator {item.name!r} has parameter {item.parameter!r}; expected an AcceleratorParameter",
                )
            if kind_name in ("accelerator", "preset") and "@" in item.name:
                raise PluginError(plugin, f"{kind_name} {item.name!r}: a name cannot hold '@' (it starts a NAME@VALUE)")
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

    def _refusal(self, kind: str, item: Any, info: PluginInfo) -> str | None:
        """Why `item` cannot be registered (its name or an alias is taken), naming the owner; None if it can."""
        if kind == "command" and item.name in CORE_COMMANDS and info.source != BUILTIN:
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

    def accelerator(self, spec: str) -> Accelerator:
        """The accelerator `spec` names: ``NAME``, or ``NAME@VALUE`` for a copy configured with VALUE.

        `UnknownAcceleratorError` for an unknown NAME; `InvalidRequestError` naming the accelerator, the
        value and what is allowed when it takes no value or VALUE is not allowed.
        """
        name, value = split_spec(spec)
        try:
            accelerator = self.accelerators[name]
        except KeyError:
            if value is not None and name in self.presets:
                raise InvalidRequestError("accelerators", spec, f"{name} alone: a preset takes no value") from None
            raise UnknownAcceleratorError(name, [*self.accelerators, *self.presets]) from None
        if value is None:
            return accelerator
        if accelerator.parameter is None:
            raise InvalidRequestError("accelerators", spec, f"{name} alone: {name} takes no value")
        return accelerator.with_value(accelerator.parameter.parse(name, value))

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
        raise InvalidRequestError("executor", name, f"one of {known}{self.disabled_hint(name)}")

    def ordered_conditioners(self) -> list[Conditioner]:
        return sorted(self.conditioners.values(), key=lambda c: (c.order, c.name))

    def failures(self) -> list[PluginInfo]:
        return [info for info in self.plugins.values() if info.error]

    def disabled_hint(self, name: str) -> str:
        """`` (plugin X is installed but not loaded: ...)`` when an installed plugin that ``T2I_LOAD_PLUGINS``
        left out looks like the one offering `name`; else ``""``. t2i names no plugin itself: what is
        installed says which one would offer a name."""
        for key, found in keyed(discover()):
            if key in self.plugins or found.source == BUILTIN:
                continue
            entry_name = found.entry_point.name
            names = {normalize(entry_name), normalize(found.project), normalize(found.project.removeprefix("t2i-"))}
            if normalize(name) in names:
                return f" (plugin {key!r} of {found.distribution} is installed but not loaded: add it to $T2I_LOAD_PLUGINS)"
        return ""

    def resolve_accelerators(
        self, specs: Iterable[str], device: str, denoiser: str | None = None
    ) -> tuple[Accelerator, ...]:
        """Expand presets (for `device` and a denoiser of kind `denoiser`, see `Preset.resolve`), configure
        ``NAME@VALUE`` specs and order accelerators by phase (stable within a phase, duplicates dropped);
        the same accelerator twice with different values is refused."""
        expanded: list[str] = []
        for spec in specs:
            if spec in self.presets:
                preset = self.presets[spec]
                expanded.extend(
                    name
                    for name in preset.resolve(device, denoiser)
                    if name not in preset.optional or split_spec(name)[0] in self.accelerators
                )
            else:
                expanded.append(spec)
        chosen: dict[str, Accelerator] = {}
        for spec in expanded:
            accelerator = self.accelerator(spec)
            earlier = chosen.setdefault(accelerator.name, accelerator)
            if earlier.spec != accelerator.spec:
                raise InvalidRequestError(
                    "accelerators", spec, f"one value of {accelerator.name}: {earlier.spec} is asked for as well"
                )
        return tuple(sorted(chosen.values(), key=lambda a: PHASES.index(a.phase)))


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"first-block-cache@0.15"`` → ``("first-block-cache", "0.15")``; ``"fp16"`` → ``("fp16", None)``.

    Split at the last ``@``, as ``--lora SRC@SCALE`` is.
    """
    name, at, value = spec.rpartition("@")
    return (name, value) if at else (spec, None)


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
    wanted = {normalize(family), normalize(f"t2i-{family}")}
    module = (info.module or "").split(":", 1)[0].split(".", 1)[0]
    names = (info.name.rpartition(":")[2], info.entry_point or "", info.distribution or "", module)
    return any(name and normalize(name) in wanted for name in names)


def _hashable(plugin: object, name: str) -> object:
    """An unhashable plugin object (a SimpleNamespace) as a module holding its attributes: pluggy keeps
    plugins in sets and reads their hooks statically."""
    module = types.ModuleType(f"t2i_plugin_{name}")
    for attribute in dir(plugin):
        if not attribute.startswith("__"):
            setattr(module, attribute, getattr(plugin, attribute))
    return module


def _enabled(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no", "off")


def _debug() -> bool:
    return _enabled(DEBUG_ENV)


def _write_trace(text: str) -> None:
    sys.stderr.write(f"t2i: trace: {text}" if text.strip() else text)


def _refuse_wrappers(plugin: str, hook_name: str, impls: list[Any]) -> None:
    """Refuse hook wrappers: t2i calls each plugin's ``register_*`` hooks on their own (so that every item is
    attributed to its plugin), so a wrapper could only ever wrap its own plugin's registrations."""
    for impl in impls:
        if impl.wrapper or impl.hookwrapper:
            raise PluginError(
                plugin,
                f"{hook_name} is a hook wrapper ({'wrapper' if impl.wrapper else 'hookwrapper'}=True); t2i calls each "
                "plugin's register hooks on their own, so a wrapper would see only its own plugin: drop the option",
            )


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({'' if exc.code is None else repr(exc.code)})"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: raised by the plugin, or Ctrl-C while it was loading"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
