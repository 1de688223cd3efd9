"""Finding plugins: every ``t2i`` entry point once, in precedence order, and what the user allows.

Precedence does not depend on installation order or entry-point names: t2i-core's own built-ins
come first, then the plugins shipped from this repository, then every other plugin by
distribution and entry-point name (see docs/plugin-security.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import attrs

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
    "t2i-flux": "t2i_flux",
    "t2i-sd3": "t2i_sd3",
    "t2i-zimage": "t2i_zimage",
    "t2i-compel": "t2i_compel",
    "t2i-controlnet": "t2i_controlnet",
    "t2i-ipadapter": "t2i_ipadapter",
    "t2i-lora": "t2i_lora",
    "t2i-quantize": "t2i_quantize",
    "t2i-server": "t2i_server",
    "t2i-ray": "t2i_ray",
}
#: Where a plugin comes from (``PluginInfo.source``), in the order plugins load.
BUILTIN = "built-in"  # an entry point of the installed t2i-core into its own package
FIRST_PARTY = "first-party"  # one of FIRST_PARTY_DISTRIBUTIONS
THIRD_PARTY = "third-party"  # any other entry point
IN_PROCESS = "in-process"  # Registry.register_plugin
_PRECEDENCE = (BUILTIN, FIRST_PARTY, THIRD_PARTY)
_CORE_PACKAGE = Path(__file__).resolve().parent.parent


@attrs.frozen
class Found:
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


def discover() -> list[Found]:
    """Every ``t2i`` entry point once, in precedence order."""
    entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    # entry_points() shows only the first distribution of each name on sys.path: look at every
    # copy of the core and of the first-party plugins too, so that a look-alike cannot hide them.
    for project in (CORE_DISTRIBUTION, *FIRST_PARTY_DISTRIBUTIONS):
        for dist in metadata.distributions(name=project):
            entry_points.extend(ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP)
    unique: dict[tuple[str, str, str], Found] = {}
    for found in sorted(map(_classify, entry_points), key=Found.precedence):
        unique.setdefault(found.precedence()[1:], found)  # the same entry point seen twice
    return list(unique.values())


def _classify(entry_point: Any) -> Found:
    dist = getattr(entry_point, "dist", None)
    distribution, version = _name_and_version(dist) if dist is not None else (None, None)
    project = normalize(distribution) if distribution else "?"
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
    return Found(entry_point=entry_point, distribution=distribution, version=version, project=project, source=source)


def _name_and_version(dist: metadata.Distribution) -> tuple[str | None, str | None]:
    """``dist.name`` and ``dist.version``, from the headers of its metadata file read once: importlib
    parses the whole file (the README included) with the email package for each of them."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or dist.read_text("") or ""
    headers: dict[str, str] = {}
    for line in text.splitlines():
        if not line:  # the headers end at the first empty line
            break
        key, colon, value = line.partition(":")
        if colon and not key[:1].isspace():
            headers.setdefault(key.strip().lower(), value.strip())
    if "name" not in headers:  # not plain headers: let importlib read it
        return dist.name, dist.version
    return headers["name"], headers.get("version")


def normalize(name: str) -> str:
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


def keyed(found: Iterable[Found]) -> list[tuple[str, Found]]:
    """Each entry point with its key in ``Registry.plugins``: its name, or ``distribution:name``
    when an entry point earlier in precedence has that name (so a clash never hides a plugin)."""
    keyed: list[tuple[str, Found]] = []
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


def allowed_plugins() -> set[str] | None:
    """LOAD_PLUGINS_ENV as a set of keys and ``distribution:name`` forms; None when unset."""
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    if wanted is None:
        return None
    allowed: set[str] = set()
    for token in (t.strip() for t in wanted.split(",")):
        project, colon, name = token.partition(":")
        if colon:
            allowed.add(f"{normalize(project.strip())}:{name.strip()}")
        elif token:
            allowed.add(token)
    return allowed
