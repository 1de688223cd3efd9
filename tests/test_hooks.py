"""Hooks are called through pluggy: hookimpl options mean what pluggy says, or are refused clearly;
one list of hook names; ``T2I_TRACE_PLUGINS=1`` traces hook calls and registrations."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable

import pytest

from t2i_core import FamilyDefaults, ModelProvider, hookimpl, hookspecs
from t2i_core.registry import Registry


def _provider(name: str) -> ModelProvider:
    return type(f"P_{name}", (ModelProvider,), {"name": name, "defaults": FamilyDefaults()})()


def test_one_list_of_hook_names_matches_the_specs() -> None:
    specs = {name for name in dir(hookspecs) if name.startswith("register_") and callable(getattr(hookspecs, name))}
    assert set(hookspecs.HOOK_NAMES) == specs
    assert len(hookspecs.HOOK_NAMES) == len(specs)


def test_specname_and_tryfirst_work_within_a_plugin() -> None:
    """Two implementations of one hook in one plugin (pluggy's ``specname``), ordered by ``tryfirst``/``trylast``."""
    plugin = types.ModuleType("t2i_two_impls")
    order: list[str] = []

    @hookimpl(specname="register_providers", trylast=True)
    def late(register: Callable[[ModelProvider], None]) -> None:
        order.append("late")
        register(_provider("hook-late"))

    @hookimpl(specname="register_providers", tryfirst=True)
    def early(register: Callable[[ModelProvider], None]) -> None:
        order.append("early")
        register(_provider("hook-early"))

    plugin.late, plugin.early = late, early  # type: ignore[attr-defined]
    registry = Registry()
    info = registry.register_plugin(plugin, "two-impls")
    assert info.error is None, info.error
    assert order == ["early", "late"]
    assert info.registered == ["provider:hook-early", "provider:hook-late"]


def test_a_register_hook_wrapper_is_refused_naming_the_option() -> None:
    module = types.ModuleType("t2i_wrapping_plugin")

    @hookimpl(wrapper=True)
    def register_providers(register: Callable[[ModelProvider], None]):  # type: ignore[no-untyped-def]
        register(_provider("wrapped"))
        return (yield)

    module.register_providers = register_providers  # type: ignore[attr-defined]
    registry = Registry()
    info = registry.register_plugin(module, "wrapping")
    assert info.error is not None and "register_providers is a hook wrapper (wrapper=True)" in info.error
    assert "wrapped" not in registry.providers


def test_an_unhashable_plugin_object_registers_too() -> None:
    @hookimpl
    def register_providers(register: Callable[[ModelProvider], None]) -> None:
        register(_provider("from-namespace"))

    registry = Registry()
    info = registry.register_plugin(types.SimpleNamespace(register_providers=register_providers), "namespace")
    assert info.error is None and info.registered == ["provider:from-namespace"]
    registry.unregister_plugin("namespace")
    assert "from-namespace" not in registry.providers


def test_only_the_plugins_own_hooks_run_for_it() -> None:
    """Registering a second plugin does not call the first plugin's hooks again."""
    calls: list[str] = []

    def plugin(name: str) -> types.ModuleType:
        @hookimpl
        def register_providers(register: Callable[[ModelProvider], None]) -> None:
            calls.append(name)
            register(_provider(f"own-{name}"))

        module = types.ModuleType(f"t2i_own_{name}")
        module.register_providers = register_providers  # type: ignore[attr-defined]
        return module

    registry = Registry()
    registry.register_plugin(plugin("a"), "a")
    registry.register_plugin(plugin("b"), "b")
    assert calls == ["a", "b"]
    assert registry.plugins["b"].registered == ["provider:own-b"]


def test_trace_plugins_traces_hook_calls_and_registrations() -> None:
    code = "import t2i_core; t2i_core.get_registry()"
    env = {"T2I_TRACE_PLUGINS": "1", "T2I_LOAD_PLUGINS": "sd15", "PATH": ""}
    import os

    env = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "t2i: trace: plugin 'sd15' (t2i-sd15" in done.stderr
    assert "registered provider 'sd15' [registry]" in done.stderr
    assert "register_providers" in done.stderr  # pluggy's trace of the hook call
    quiet = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "T2I_TRACE_PLUGINS": ""}, check=True
    )
    assert "trace" not in quiet.stderr


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_is_documented_with_its_signature(name: str) -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "hooks.md").read_text(encoding="utf-8")
    assert name in page
