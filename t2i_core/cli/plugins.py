"""``t2i plugins``: every plugin, its version, what it registers and why it failed to load."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..accelerator import AcceleratorParameter

HELP = "list plugins and what they register"
DESCRIPTION = "List plugins."


def add_arguments(plugins: argparse.ArgumentParser) -> None:
    plugins.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..registry import SLOW_IMPORT_SECONDS, PluginWarning, get_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # listed below, with the plugin they concern
        registry = get_registry()
    plugins = []
    for info in registry.plugins.values():
        entry: dict[str, Any] = {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "source": info.source,
            "entry_point": info.entry_point,
            "module": info.module,
            "location": info.location,
            "import_seconds": None if info.import_seconds is None else round(info.import_seconds, 3),
            "registers": info.registered,
            "warnings": info.warnings,
            "error": info.error,
            "traceback": info.traceback,
        }
        plugins.append(entry)
    families: dict[str, dict[str, Any]] = {
        name: {
            "aliases": dict(provider.aliases),
            "options": [
                {"name": o.name, "default": o.default, "allowed": o.describe(), "help": o.help}
                for o in provider.options
            ],
            "description": provider.description,
        }
        for name, provider in sorted(registry.providers.items())
    }
    conditioners = {
        name: {"families": list(c.families) if c.families is not None else "all", "description": c.description}
        for name, c in sorted(registry.conditioners.items())
    }
    accelerators: dict[str, dict[str, Any]] = {
        name: {
            "phase": a.phase,
            "devices": list(a.devices),
            "description": a.description,
            "parameter": None if a.parameter is None else _parameter(a.parameter),
        }
        for name, a in sorted(registry.accelerators.items())
    }
    presets = {name: {k: list(v) for k, v in p.stacks.items()} for name, p in sorted(registry.presets.items())}
    # what a preset becomes for a kind of denoiser (transformer families), and what it uses only when installed
    preset_denoisers = {
        name: {kind: {k: list(v) for k, v in stacks.items()} for kind, stacks in p.denoisers.items()}
        for name, p in sorted(registry.presets.items())
        if p.denoisers
    }
    preset_optional = {name: list(p.optional) for name, p in sorted(registry.presets.items()) if p.optional}
    executors = {name: {"description": e.description} for name, e in sorted(registry.executors.items())}
    commands = {name: {"help": c.help} for name, c in sorted(registry.commands.items())}
    if args.json:
        document = {
            "plugins": plugins,
            "families": families,
            "conditioners": conditioners,
            "accelerators": accelerators,
            "presets": presets,
            "preset_denoisers": preset_denoisers,
            "preset_optional": preset_optional,
            "executors": executors,
            "commands": commands,
        }
        print(json.dumps(document, indent=2, default=str))
        return 0
    for entry in plugins:
        where = f"{entry['distribution']} {entry['version']}" if entry["distribution"] else "registered in-process"
        tag = "" if entry["source"] == "in-process" else f"  {entry['source']}"
        print(f"{entry['name']}  ({where}){tag}")
        if entry["source"] == "third-party" and entry["location"]:
            print(f"  from {entry['location']}")
        if entry["error"]:
            print(f"  ERROR: {entry['error']}")
            if entry["traceback"] and os.environ.get("T2I_DEBUG"):
                print("    " + entry["traceback"].replace("\n", "\n    "))
        for warning in entry["warnings"]:
            print(f"  WARNING: {warning}")
        seconds = entry["import_seconds"]
        if seconds is not None and seconds > SLOW_IMPORT_SECONDS:
            print(f"  SLOW: importing it took {seconds:.1f} s, which delays every t2i command")
        for item in entry["registers"]:
            print(f"  {item}")
    print()
    print("families:")
    for name, family in families.items():
        aliases = ", ".join(f"{a} -> {t}" for a, t in family["aliases"].items()) or "none"
        print(f"  {name}: {family['description']}; aliases: {aliases}")
        for option in family["options"]:
            print(
                f"    --option {option['name']}=...  ({option['allowed']}; default {option['default']!r}) {option['help']}"
            )
    print("conditioners:")
    for name, conditioner in conditioners.items():
        fams = conditioner["families"] if conditioner["families"] == "all" else ", ".join(conditioner["families"])
        print(f"  {name}: {conditioner['description']}; families: {fams}")
    print("accelerators:")
    for name, accelerator in accelerators.items():
        print(f"  {name} [{accelerator['phase']}; {', '.join(accelerator['devices'])}]: {accelerator['description']}")
        parameter = accelerator["parameter"]
        if parameter is not None:
            meaning = f" ({parameter['description']})" if parameter["description"] else ""
            print(
                f"    {name}@{parameter['name'].upper()}  ({parameter['allowed']}; default {parameter['default']}){meaning}"
            )
    for name, stacks in presets.items():
        rendered = "; ".join(f"{k}: {'+'.join(v) or '-'}" for k, v in stacks.items())
        print(f"  preset {name}: {rendered}")
        for kind, kind_stacks in preset_denoisers.get(name, {}).items():
            rendered = "; ".join(f"{k}: {'+'.join(v) or '-'}" for k, v in kind_stacks.items())
            print(f"    {kind} denoisers: {rendered}")
        if name in preset_optional:
            print(f"    {', '.join(preset_optional[name])} only where a plugin registers them")
    print("batch executors:")
    for name, executor in executors.items():
        print(f"  {name}: {executor['description']}")
    print("commands:")
    for name, command in commands.items():
        print(f"  t2i {name}: {command['help']}")
    return 0


def _parameter(parameter: AcceleratorParameter) -> dict[str, Any]:
    """An accelerator's parameter as ``t2i plugins --json`` shows it."""
    return {
        "name": parameter.name,
        "type": parameter.kind.__name__,
        "default": parameter.format(parameter.default),
        "minimum": parameter.minimum,
        "maximum": parameter.maximum,
        "choices": list(parameter.choices),
        "allowed": parameter.allowed(),
        "description": parameter.description,
    }
