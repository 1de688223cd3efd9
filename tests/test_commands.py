"""Subcommands from plugins (the ``register_commands`` hook): parsing, precedence, failures, import cost."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

import t2i_core
from t2i_core import hookimpl
from t2i_core.cli import main
from t2i_core.cli.commands import COMMANDS
from t2i_core.registry import PluginWarning, Registry


@pytest.fixture
def plugin_registry() -> Iterator[Registry]:
    registry = t2i_core.get_registry()
    before = set(registry.plugins)
    try:
        yield registry
    finally:
        for name in set(registry.plugins) - before:
            registry.unregister_plugin(name)


def test_core_commands_are_registered_like_any_plugin_command() -> None:
    """t2i-core's own subcommands come from its built-in plugin ``commands``, through `register_commands`."""
    registry = t2i_core.get_registry()
    info = registry.plugins["commands"]
    assert info.source == "built-in" and info.error is None and info.warnings == []
    assert info.registered == [f"command:{name}" for name in COMMANDS]
    assert list(registry.commands)[: len(COMMANDS)] == list(COMMANDS)  # built-ins first: none can be taken


def test_a_plugin_cannot_take_a_core_command(plugin_registry: Registry) -> None:
    @hookimpl
    def register_commands(cli: Any) -> None:
        cli.command("generate", run=lambda args: 0, help="an impostor")

    with pytest.warns(PluginWarning, match=r"command 'generate'"):
        info = plugin_registry.register_plugin(types.SimpleNamespace(register_commands=register_commands), "impostor")
    assert info.registered == [] and plugin_registry.commands["generate"].help == "generate images from a prompt"


def test_a_broken_command_plugin_does_not_break_help(
    plugin_registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    @hookimpl
    def register_commands(cli: Any) -> None:
        cli.command("fine-before-the-crash", run=lambda args: 0, help="never registered")
        raise RuntimeError("boom")

    info = plugin_registry.register_plugin(types.SimpleNamespace(register_commands=register_commands), "crashing")
    assert (
        info.error == "plugin 'crashing': RuntimeError: boom"
        and "fine-before-the-crash" not in plugin_registry.commands
    )

    @hookimpl
    def conflicting(cli: Any) -> None:
        cli.command("helpful", run=lambda args: 0, help="x").add_argument("-h", "--hat")

    info = plugin_registry.register_plugin(types.SimpleNamespace(register_commands=conflicting), "conflicting")
    assert info.error is not None and "command 'helpful' has unusable arguments" in info.error

    for bad_name in ("Serve", "two words", ""):
        bad = hookimpl(lambda cli, name=bad_name: cli.command(name, run=print, help="x"))
        info = plugin_registry.register_plugin(types.SimpleNamespace(register_commands=bad), f"bad-{len(bad_name)}")
        assert info.error is not None and "is not lower-case words joined by hyphens" in info.error

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "plugins that failed to load:" in out and "crashing" in out
    assert main(["plugins"]) == 0
    assert "ERROR: plugin 'crashing': RuntimeError: boom" in capsys.readouterr().out


def test_a_later_plugin_cannot_take_a_command(plugin_registry: Registry) -> None:
    @hookimpl
    def register_commands(cli: Any) -> None:
        cli.command("serve", run=lambda args: 0, help="an impostor")

    with pytest.warns(PluginWarning, match=r"command 'serve' is already registered by plugin 'server' \(t2i-server"):
        info = plugin_registry.register_plugin(types.SimpleNamespace(register_commands=register_commands), "impostor")
    assert plugin_registry.commands["serve"].help.startswith("serve models over HTTP")
    assert info.registered == [] and info.error is not None


def test_strict_plugins_make_plugin_commands_fail_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from t2i_core import PluginError, registry

    def strict() -> Registry:
        raise PluginError("broken", "it failed to load and $T2I_STRICT_PLUGINS is set: ImportError")

    monkeypatch.setattr(registry, "get_registry", strict)
    assert main(["serve", "--model", "tiny:sd15"]) == 2
    assert capsys.readouterr().err == (
        "t2i: error: plugin 'broken': it failed to load and $T2I_STRICT_PLUGINS is set: ImportError\n"
    )
    assert main(["--help"]) == 0  # help still works, and says why no command is available
    assert "no command is available: plugin 'broken'" in capsys.readouterr().out


def test_help_imports_no_torch_and_no_web_framework() -> None:
    """``t2i --help`` and ``t2i serve --help`` list the plugins' commands without importing what they run."""
    code = (
        "import sys\n"
        "from t2i_core.cli import main\n"
        "assert main(['--help']) == 0\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and "t2i serve" in done.stdout and "--max-body-bytes" in done.stdout
