"""Plugin discovery and registration: entry points, isolation of broken plugins, restriction, hooks."""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import t2i_core
from t2i_core import Conditioner, GenerationRequest, ModelProvider, hookimpl, hookspecs
from t2i_core.registry import LOAD_PLUGINS_ENV, PluginWarning, Registry

ROOT = Path(__file__).resolve().parent.parent


def fresh_registry(monkeypatch: pytest.MonkeyPatch, extra: list[metadata.EntryPoint] = ()) -> Registry:  # type: ignore[assignment]
    real = metadata.entry_points

    def entry_points(group: str) -> Any:
        return [*real(group=group), *extra]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    registry = Registry()
    registry.load_entry_points()
    return registry


def test_builtins_come_through_entry_points(registry: Any) -> None:
    info = registry.plugins["accelerators"]
    assert info.distribution == "t2i-core"
    assert {"accelerator:fp32", "accelerator:fp16", "accelerator:bf16", "accelerator:sdpa"} <= set(info.registered)
    assert registry.plugins["negative_prompt"].registered == ["conditioner:negative-prompt"]
    assert registry.plugins["sd15"].distribution == "t2i-sd15"
    assert registry.plugins["sd15"].registered == ["provider:sd15"]


def test_registry_is_loaded_once() -> None:
    assert t2i_core.get_registry() is t2i_core.get_registry()


def test_broken_plugin_is_reported_and_the_rest_works(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = metadata.EntryPoint(name="broken", value="t2i_no_such_module_xyz", group="t2i")
    registry = fresh_registry(monkeypatch, [broken])
    assert registry.plugins["broken"].error is not None
    assert "t2i_no_such_module_xyz" in registry.plugins["broken"].error
    assert [info.name for info in registry.failures()] == ["broken"]
    assert "sd15" in registry.providers and "fp16" in registry.accelerators


def test_broken_plugin_shows_in_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from t2i_core.cli import main
    from t2i_core.registry import current

    broken = metadata.EntryPoint(name="broken", value="t2i_no_such_module_xyz", group="t2i")
    registry = fresh_registry(monkeypatch, [broken])
    monkeypatch.setattr(current, "_registry", registry)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "ERROR: plugin 'broken': import failed: ModuleNotFoundError" in out
    assert "provider:sd15" in out


@pytest.mark.parametrize(("wanted", "expected"), [("", set()), ("sd15", {"sd15"}), (" sd15 , nothing ", {"sd15"})])
def test_environment_restricts_plugins(monkeypatch: pytest.MonkeyPatch, wanted: str, expected: set[str]) -> None:
    monkeypatch.setenv(LOAD_PLUGINS_ENV, wanted)
    registry = fresh_registry(monkeypatch)
    third_party = {name for name, info in registry.plugins.items() if info.distribution != "t2i-core"}
    assert third_party == expected
    assert "fp32" in registry.accelerators  # the core's own plugins always load


@pytest.fixture
def plugin_registry() -> Iterator[Registry]:
    registry = t2i_core.get_registry()
    before = set(registry.plugins)
    try:
        yield registry
    finally:
        for name in set(registry.plugins) - before:
            registry.unregister_plugin(name)


def test_misspelled_hook_is_caught_and_names_the_plugin(plugin_registry: Registry) -> None:
    plugin = types.SimpleNamespace(register_provider=hookimpl(lambda register: None))
    info = plugin_registry.register_plugin(plugin, "typo-plugin")
    assert info.error is not None and "register_provider" in info.error and "typo-plugin" in info.error
    assert not plugin_registry.pm.has_plugin("typo-plugin")


def test_registering_the_wrong_type_is_an_error(plugin_registry: Registry) -> None:
    plugin = types.SimpleNamespace(register_providers=hookimpl(lambda register: register("sd15")))
    info = plugin_registry.register_plugin(plugin, "wrong-type")
    assert info.error is not None and "expected a ModelProvider" in info.error
    assert plugin_registry.providers["sd15"].__class__.__name__ == "StableDiffusion15"


def test_duplicate_family_is_refused(plugin_registry: Registry) -> None:
    from t2i_sd15 import StableDiffusion15

    plugin = types.SimpleNamespace(register_providers=hookimpl(lambda register: register(StableDiffusion15())))
    with pytest.warns(PluginWarning, match=r"plugin 'copycat' \(registered in-process\).*\(t2i-sd15 0\.1\.0\)"):
        info = plugin_registry.register_plugin(plugin, "copycat")
    assert info.error is not None and "already registered" in info.error
    assert info.registered == [] and len(info.warnings) == 1


def test_third_party_provider_with_its_own_tiny_checkpoint(plugin_registry: Registry) -> None:
    """register_providers: a third-party family, offering tiny:<family>, through the same hook."""
    from t2i_sd15 import StableDiffusion15

    class MyFamily(StableDiffusion15):
        name = "my-sd"
        aliases = {"my-sd": "me/my-sd"}
        pipeline_classes = ()
        description = "a third-party copy of SD 1.x"

    @hookimpl
    def register_providers(register: Callable[[ModelProvider], None]) -> None:
        register(MyFamily())

    info = plugin_registry.register_plugin(types.SimpleNamespace(register_providers=register_providers), "my-plugin")
    assert info.error is None and info.registered == ["provider:my-sd"]
    assert MyFamily().architecture_folder() is None  # ships no architecture/ configs
    assert StableDiffusion15().architecture_folder() is not None
    engine = t2i_core.load("tiny:my-sd", device="cpu")
    assert engine.family == "my-sd"
    result = engine.generate(GenerationRequest(prompt="a cat", seed=1, num_inference_steps=1))
    assert result.family == "my-sd" and result.images[0].size == (64, 64)
    plugin_registry.unregister_plugin("my-plugin")
    assert "my-sd" not in plugin_registry.providers


def test_third_party_conditioner(plugin_registry: Registry, sd15_engine: Any) -> None:
    """register_conditioners: a conditioner edits the call; others in order see its result."""
    seen: list[dict[str, Any]] = []

    class Shout(Conditioner):
        name = "shout"
        order = 50
        description = "upper-cases prompts"

        def wants(self, request: GenerationRequest) -> bool:
            return request.prompt.endswith("!")

        def condition(self, engine: Any, request: GenerationRequest, call: Any) -> None:
            call.kwargs["prompt"] = request.prompt.upper()
            seen.append(dict(call.kwargs))

    @hookimpl
    def register_conditioners(register: Callable[[Conditioner], None]) -> None:
        register(Shout())

    plugin_registry.register_plugin(types.SimpleNamespace(register_conditioners=register_conditioners), "shout")
    shouted = sd15_engine.generate(GenerationRequest(prompt="a cat!", seed=4, num_inference_steps=1))
    upper = sd15_engine.generate(GenerationRequest(prompt="A CAT!", seed=4, num_inference_steps=1))
    assert seen and seen[0]["prompt"] == "A CAT!"
    assert list(shouted.images[0].getdata()) == list(upper.images[0].getdata())
    plain = sd15_engine.generate(GenerationRequest(prompt="a cat", seed=4, num_inference_steps=1))
    assert len(seen) == 2 and plain.request.prompt == "a cat"


def test_family_restricted_conditioner_is_refused_before_work(plugin_registry: Registry, sd15_engine: Any) -> None:
    from t2i_core import UnsupportedFeatureError

    class OnlyXl(Conditioner):
        name = "only-xl"
        families = ("sdxl",)
        weighting = "xl-syntax"
        feature = "XL prompt syntax"

        def wants(self, request: GenerationRequest) -> bool:
            return request.prompt_weighting == "xl-syntax"

        def condition(self, engine: Any, request: GenerationRequest, call: Any) -> None:
            raise AssertionError("must not run")

    plugin_registry.register_plugin(
        types.SimpleNamespace(register_conditioners=hookimpl(lambda register: register(OnlyXl()))), "only-xl"
    )
    with pytest.raises(UnsupportedFeatureError, match="family 'sd15' does not support XL prompt syntax"):
        sd15_engine.generate(GenerationRequest(prompt="a", prompt_weighting="xl-syntax"))


def test_third_party_accelerator_runs_in_its_phase(plugin_registry: Registry) -> None:
    """register_accelerators: accelerators and presets; applied once at load, ordered by phase."""
    applied: list[str] = []

    class Tag(t2i_core.Accelerator):
        name = "tag-unet"
        phase = "memory"
        description = "records that it ran"

        def apply(self, pipeline: Any, context: Any) -> None:
            applied.append(f"{context.accelerators}:{pipeline.unet.dtype}")

    preset = t2i_core.Preset(name="tagged", description="fp32 + tag", stacks={"*": ("tag-unet", "fp32")})

    @hookimpl
    def register_accelerators(register: Callable[[Any], None]) -> None:
        register(Tag())
        register(preset)

    plugin_registry.register_plugin(types.SimpleNamespace(register_accelerators=register_accelerators), "tagger")
    engine = t2i_core.load("tiny:sd15", device="cpu", accelerators=["tagged"], cache=False)
    assert engine.accelerators == ("fp32", "tag-unet")
    assert applied == ["('fp32', 'tag-unet'):torch.float32"]


def test_accelerator_with_unknown_phase_is_refused(plugin_registry: Registry) -> None:
    class Odd(t2i_core.Accelerator):
        name = "odd"
        phase = "whenever"

    info = plugin_registry.register_plugin(
        types.SimpleNamespace(register_accelerators=hookimpl(lambda register: register(Odd()))), "odd"
    )
    assert info.error is not None and "phase 'whenever'" in info.error


def test_third_party_command(plugin_registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    """register_commands: a plugin's subcommand is parsed and run by t2i; t2i-core's names stay its own."""
    from t2i_core.cli import main

    seen: list[Any] = []

    @hookimpl
    def register_commands(cli: t2i_core.Commands) -> None:
        hello = cli.command("hello", run=lambda args: seen.append(args.name) or 3, help="say hello")
        hello.add_argument("--name", default="world")
        cli.command("generate", run=lambda args: 0, help="an impostor")

    with pytest.warns(PluginWarning, match="command 'generate' is one of t2i-core's own commands"):
        info = plugin_registry.register_plugin(types.SimpleNamespace(register_commands=register_commands), "greeter")
    assert info.registered == ["command:hello"] and plugin_registry.commands["hello"].help == "say hello"
    assert main(["hello", "--name", "you"]) == 3 and seen == ["you"]
    assert main(["--help"]) == 0 and "hello" in capsys.readouterr().out
    assert main(["hello", "--nope"]) == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_third_party_executor(plugin_registry: Registry, tmp_path: Path) -> None:
    """register_executors: a third-party executor runs a batch by name; the built-in local one stays."""
    from t2i_core import Executor, ExecutorSettings, Outcome, WorkItem, run_batch

    ran: list[str] = []

    class Spark(Executor):
        name = "spark"
        description = "runs nothing, refuses every job"

        def run(self, items: list[WorkItem], settings: ExecutorSettings) -> Iterator[Outcome]:
            for item in items:
                ran.extend(item.ids)
                yield from (Outcome(id=job_id, ok=False, error_type="Nope", error="no cluster") for job_id in item.ids)

    class Impostor(Spark):
        name = "local"

    @hookimpl
    def register_executors(register: Callable[[Executor], None]) -> None:
        register(Spark())
        register(Impostor())

    with pytest.warns(PluginWarning, match="executor 'local' is already registered by plugin 'executors'"):
        info = plugin_registry.register_plugin(types.SimpleNamespace(register_executors=register_executors), "spark")
    assert info.registered == ["executor:spark"] and type(plugin_registry.executor("local")).__name__ == "LocalExecutor"
    summary = run_batch([{"id": "a", "prompt": "a cat"}], out=tmp_path, model="tiny:sd15", executor="spark")
    assert ran == ["a"] and summary.failed == 1 and "no cluster" in summary.failures[0]


def _hook_names() -> list[str]:
    return [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_every_hook_is_documented_with_its_signature() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    hooks = (
        "register_accelerators",
        "register_commands",
        "register_conditioners",
        "register_executors",
        "register_providers",
    )
    assert set(hooks) <= set(_hook_names())
    for name in _hook_names():
        signature = f"def {name}{inspect.signature(getattr(hookspecs, name))}".replace("'", "")
        assert signature in text, f"docs/plugins.md lacks the signature {signature!r}"


def test_every_hook_has_tests() -> None:
    source = Path(__file__).read_text()
    for name in _hook_names():
        assert re.search(rf"\"\"\"{name}:", source), f"no test documents hook {name}"


def test_plugin_asking_for_the_registry_while_loading_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from t2i_core.registry import current

    module = types.ModuleType("t2i_reentrant_plugin")
    module.__dict__["registry"] = None

    def load_module() -> Any:
        module.registry = t2i_core.get_registry()  # would deadlock or recurse without the guard
        return module

    entry = types.SimpleNamespace(name="reentrant", dist=None, load=load_module)
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda group: [*real(group=group), entry])
    monkeypatch.setattr(current, "_registry", None)
    monkeypatch.setitem(sys.modules, "t2i_reentrant_plugin", module)
    registry = t2i_core.get_registry()
    assert "while plugins were loading" in (registry.plugins["reentrant"].error or "")
    assert "sd15" in registry.providers


def test_a_clash_refuses_only_that_item(plugin_registry: Registry) -> None:
    from t2i_sd15 import StableDiffusion15

    class NewFamily(StableDiffusion15):
        name = "newfam"
        aliases = {}

    def register_providers(register: Callable[[ModelProvider], None]) -> None:
        register(StableDiffusion15())  # a clash: this item is refused, the rest of the plugin loads
        register(NewFamily())

    real = plugin_registry.providers["sd15"]
    with pytest.warns(PluginWarning, match="provider 'sd15' is already registered"):
        info = plugin_registry.register_plugin(
            types.SimpleNamespace(register_providers=hookimpl(register_providers)), "half"
        )
    assert info.error is None and info.registered == ["provider:newfam"]
    assert "plugin 'sd15' (t2i-sd15 0.1.0)" in info.warnings[0]
    assert plugin_registry.providers["sd15"] is real and "newfam" in plugin_registry.providers
    plugin_registry.unregister_plugin("half")
    assert "newfam" not in plugin_registry.providers and plugin_registry.providers["sd15"] is real


def test_a_plugin_failing_halfway_registers_nothing(plugin_registry: Registry) -> None:
    from t2i_sd15 import StableDiffusion15

    class NewFamily(StableDiffusion15):
        name = "newfam"
        aliases = {}

    def register_providers(register: Callable[[ModelProvider], None]) -> None:
        register(NewFamily())
        raise RuntimeError("half done")  # what it meant to offer is unknown: the whole plugin is refused

    info = plugin_registry.register_plugin(
        types.SimpleNamespace(register_providers=hookimpl(register_providers)), "half"
    )
    assert info.error == "plugin 'half': RuntimeError: half done"
    assert "newfam" not in plugin_registry.providers and info.registered == []
    assert not plugin_registry.pm.has_plugin("half")


def test_accelerators_and_presets_share_one_namespace(plugin_registry: Registry) -> None:
    preset = t2i_core.Preset(name="fp32", description="takes an accelerator's name", stacks={"*": ("fp32",)})
    mine = t2i_core.Preset(name="my-stack", description="a free name", stacks={"*": ("fp32",)})

    @hookimpl
    def register_accelerators(register: Callable[[Any], None]) -> None:
        register(preset)
        register(mine)

    with pytest.warns(PluginWarning, match=r"preset 'fp32' is already registered \(as an accelerator\) by plugin"):
        info = plugin_registry.register_plugin(
            types.SimpleNamespace(register_accelerators=register_accelerators), "stacks"
        )
    assert info.registered == ["preset:my-stack"] and "fp32" not in plugin_registry.presets
