"""The t2i exception hierarchy: one base class and precise subclasses that carry the culprit."""

from __future__ import annotations

from collections.abc import Iterable


class T2IError(Exception):
    """Base class of every error that t2i raises on purpose."""


class InvalidRequestError(T2IError, ValueError):
    """A field of a request (or a CLI argument) has a value that is not allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        """The field (or CLI option) whose value is refused: ``height``, ``controls[0].image``."""
        self.value = value
        """The value refused."""
        self.allowed = allowed
        """What is allowed instead, in words."""
        super().__init__(f"{field}={value!r} is not allowed: expected {allowed}")


def _names(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed) if listed else "(none registered)"


class UnknownFamilyError(T2IError, KeyError):
    """No registered model provider has this family name."""

    def __init__(
        self, family: str, known: Iterable[str], plugin_error: str | None = None, broken_plugins: Iterable[str] = ()
    ) -> None:
        self.family = family
        """The family asked for."""
        self.known = sorted(known)
        """The registered families, sorted."""
        self.plugin_error = plugin_error
        """The load error of the plugin that offers this family, when it failed to load."""
        self.broken_plugins = tuple(broken_plugins)
        """Names of other plugins that failed to load (any of them may have offered it)."""
        super().__init__(family)

    def __str__(self) -> str:
        if self.plugin_error is not None:
            return (
                f"family={self.family!r} is not available: its plugin failed to load: {self.plugin_error} "
                "(t2i plugins lists every plugin; T2I_DEBUG=1 shows the traceback)"
            )
        return (
            f"family={self.family!r} is not a registered model family: expected one of {_names(self.known)}"
            f"{_broken_hint(self.broken_plugins)}"
        )


def _broken_hint(broken: tuple[str, ...]) -> str:
    if not broken:
        return ""
    names = ", ".join(repr(name) for name in broken)
    return f" (plugins that failed to load, and may offer it: {names}; see t2i plugins)"


class UndetectedFamilyError(T2IError):
    """No provider recognises the checkpoint's model_index.json."""

    def __init__(
        self, model: str, class_name: object, known: Iterable[str], broken_plugins: Iterable[str] = ()
    ) -> None:
        self.model = model
        """The model whose family could not be detected."""
        self.class_name = class_name
        """The pipeline class its ``model_index.json`` names."""
        self.known = sorted(known)
        """The registered families, sorted."""
        self.broken_plugins = tuple(broken_plugins)
        """Names of plugins that failed to load (any of them may have recognised it)."""
        super().__init__(
            f"model={model!r} (pipeline class {class_name!r}) matches no registered family: "
            f"known families are {_names(self.known)}; pass --family / family= to choose one"
            f"{_broken_hint(self.broken_plugins)}"
        )


class UnknownAcceleratorError(T2IError, KeyError):
    """An accelerator name that no plugin registered."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        """The accelerator name asked for."""
        self.known = sorted(known)
        """The registered accelerator and preset names, sorted."""
        super().__init__(name)

    def __str__(self) -> str:
        return f"accelerator={self.name!r} is not a registered accelerator: expected one of {_names(self.known)}"


class IncompatibleAcceleratorsError(T2IError):
    """Accelerators that cannot work together, or not on the chosen device."""

    def __init__(self, names: Iterable[str], reason: str) -> None:
        self.names = tuple(names)
        """The accelerators that cannot be used together or here."""
        self.reason = reason
        """Why, in words."""
        super().__init__(f"accelerators {', '.join(self.names)} cannot be used here: {reason}")


class ModelNotFoundError(T2IError):
    """The model cannot be found: a missing local folder, or a hub id that cannot be fetched."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        """The model asked for."""
        self.reason = reason
        """Why it cannot be loaded, and what to do."""
        super().__init__(f"model={model!r} cannot be loaded: {reason}")


class UnsupportedFeatureError(T2IError):
    """The request asks for a feature (a conditioner, an option) that the family cannot honour."""

    def __init__(self, family: str, feature: str, supported: Iterable[str] = (), *, requested: str = "") -> None:
        self.family = family
        """The family that refuses."""
        self.feature = feature
        """The feature refused (``Compel prompt weighting``, ``ControlNet``)."""
        self.supported = tuple(supported)
        """The families that do support it."""
        self.requested = requested
        """What the request asked for, when the refusal can name it ("controls[0].model=... (an sd15
        ControlNet)").
        """
        detail = f" (supported by: {', '.join(self.supported)})" if self.supported else ""
        asked = f"; the request asks for {requested}" if requested else ""
        super().__init__(f"family {family!r} does not support {feature}{detail}{asked}")


class GenerationError(T2IError):
    """Generation could not finish for a reason the request can change (e.g. out of memory)."""


class GenerationCancelled(T2IError):
    """The progress callback stopped a generation (it returned ``False`` or raised this).

    `step` and `total` say where it stopped, when t2i knows. The engine stays usable.
    """

    def __init__(self, message: str = "generation cancelled", *, step: int | None = None, total: int | None = None):
        self.step = step
        """The step at which it stopped; None when not known."""
        self.total = total
        """The steps the generation would have run; None when not known."""
        super().__init__(message)


class PluginError(T2IError):
    """A plugin failed to import, or registered something invalid."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        """The plugin's name."""
        self.message = message
        """What went wrong."""
        super().__init__(f"plugin {plugin!r}: {message}")


class OutputError(T2IError, OSError):
    """An output file cannot be written: a full disk, a read-only folder, a name too long, ...

    t2i writes outputs atomically, so when this is raised nothing is half-written: the file is
    absent, or the file that was there is unchanged. `path` is the output, `reason` what went
    wrong; `errno` is the operating system's error number when there is one (it is an `OSError`).
    """

    def __init__(self, path: str, reason: str, errno: int | None = None) -> None:
        super().__init__(f"output={path!r} cannot be written: {reason}")
        self.path = path
        """The output that cannot be written."""
        self.reason = reason
        """Why, in words."""
        self.errno = errno
        """The operating system's error number, when there is one."""
        self.strerror = reason
        """The same as `reason` (as an `OSError` has it)."""

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[type[OutputError], tuple[str, str, int | None]]:
        return (type(self), (self.path, self.reason, self.errno))
