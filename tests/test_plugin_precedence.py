"""Plugins cannot hijack or silently remove the core: precedence, clashes, look-alikes, containment.

Every test installs fake distributions the way pip would leave them (a ``*.dist-info`` folder with
``METADATA`` and ``entry_points.txt`` next to the plugin's module) into a folder put on
``sys.path`` (in-process) or ``PYTHONPATH`` (a real ``t2i plugins`` process), so that
``importlib.metadata`` discovers them for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from t2i_core.registry import (
    BUILTIN,
    FIRST_PARTY,
    FIRST_PARTY_DISTRIBUTIONS,
    LOAD_PLUGINS_ENV,
    THIRD_PARTY,
    PluginWarning,
    Registry,
    get_registry,
)

ROOT = Path(__file__).resolve().parent.parent
FAKE_PREFIX = "t2i_fake_"

PLUGIN = """
from t2i_core import Accelerator, Conditioner, ModelProvider, hookimpl


def _provider(family, aliases):
    attributes = {{"name": family, "aliases": aliases, "pipeline_classes": (), "description": "fake"}}
    return type("FakeProvider", (ModelProvider,), attributes)()


@hookimpl
def register_providers(register):
    for family, aliases in {families!r}.items():
        register(_provider(family, aliases))


@hookimpl
def register_accelerators(register):
    for name in {accelerators!r}:
        register(type("FakeAccelerator", (Accelerator,), {{"name": name, "phase": "memory"}})())


@hookimpl
def register_conditioners(register):
    for name in {conditioners!r}:
        register(type("FakeConditioner", (Conditioner,), {{"name": name, "wants": lambda self, r: False}})())
"""


class Site:
    """A folder of installed distributions, as site-packages holds them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)

    def distribution(self, name: str, entry_points: dict[str, str], version: str = "1.0") -> None:
        info = self.root / f"{re.sub(r'[-.]', '_', name)}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "".join(f"{entry} = {target}\n" for entry, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[t2i]\n{lines}")

    def module(self, name: str, source: str) -> None:
        assert name.startswith(FAKE_PREFIX)
        (self.root / f"{name}.py").write_text(source)

    def plugin(
        self,
        name: str,
        families: dict[str, dict[str, str]] | None = None,
        accelerators: tuple[str, ...] = (),
        conditioners: tuple[str, ...] = (),
    ) -> None:
        self.module(name, PLUGIN.format(families=families or {}, accelerators=accelerators, conditioners=conditioners))


@pytest.fixture
def make_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Site]]:
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    yield lambda name: Site(tmp_path / name)
    for module in [m for m in sys.modules if m.startswith(FAKE_PREFIX)]:
        del sys.modules[module]


def load_with(monkeypatch: pytest.MonkeyPatch, *sites: Site) -> Registry:
    """A fresh registry that sees `sites` first on sys.path (the first site first), then the real ones."""
    for site in reversed(sites):
        monkeypatch.syspath_prepend(str(site.root))
    registry = Registry()
    try:
        registry.load_entry_points()
    except BaseException as exc:  # noqa: BLE001 - an escaping SystemExit or KeyboardInterrupt would stop the run
        pytest.fail(f"a plugin took plugin loading down: {type(exc).__name__}: {exc}")
    return registry


def quietly(monkeypatch: pytest.MonkeyPatch, *sites: Site) -> Registry:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        return load_with(monkeypatch, *sites)


def builtin_items() -> tuple[set[str], set[str]]:
    """The accelerators and presets of t2i-core's own plugin, as the real installation registers them."""
    registered = get_registry().plugins["accelerators"].registered
    accelerators = {item.partition(":")[2] for item in registered if item.startswith("accelerator:")}
    presets = {item.partition(":")[2] for item in registered if item.startswith("preset:")}
    return accelerators, presets


def t2i_plugins(site: Site, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`t2i plugins ARGS` in a real process whose PYTHONPATH starts with `site`."""
    environment = {k: v for k, v in os.environ.items() if k != LOAD_PLUGINS_ENV}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site.root), os.environ.get("PYTHONPATH")]))
    environment.update(env or {})
    code = "from t2i_core.cli import console_main; console_main()"
    return subprocess.run(
        [sys.executable, "-c", code, "plugins", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=site.root.parent,  # not the repository: its t2i_core.egg-info would come first on sys.path
    )


# -- precedence -----------------------------------------------------------------------------


def test_builtins_and_first_party_load_before_everything_else(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site("site")
    site.distribution("aaa-early", {"aaa": f"{FAKE_PREFIX}early"})
    site.plugin(f"{FAKE_PREFIX}early", families={"early": {}})
    registry = load_with(monkeypatch, site)
    sources = [info.source for info in registry.plugins.values()]
    assert sources == sorted(sources, key=[BUILTIN, FIRST_PARTY, THIRD_PARTY].index)
    assert registry.plugins["accelerators"].source == BUILTIN
    assert registry.plugins["sd15"].source == FIRST_PARTY
    assert registry.plugins["aaa"].source == THIRD_PARTY and registry.plugins["aaa"].distribution == "aaa-early"


def test_a_plugin_sorting_first_cannot_take_a_family(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    from t2i_sd15 import StableDiffusion15

    site = make_site("site")
    site.distribution("aaa-hijack", {"aaa": f"{FAKE_PREFIX}hijack"})
    site.plugin(f"{FAKE_PREFIX}hijack", families={"sd15": {}, "hijack-own": {}})
    with pytest.warns(PluginWarning, match=r"plugin 'aaa' \(aaa-hijack 1.0\).*'sd15'.*\(t2i-sd15 0\.1\.0\)"):
        registry = load_with(monkeypatch, site)
    assert type(registry.providers["sd15"]) is StableDiffusion15
    assert registry.plugins["sd15"].error is None and registry.plugins["sd15"].registered == ["provider:sd15"]
    hijack = registry.plugins["aaa"]
    assert hijack.registered == ["provider:hijack-own"] and hijack.error is None  # only the clashing item is refused
    assert len(hijack.warnings) == 1 and "t2i-sd15" in hijack.warnings[0] and "aaa-hijack" in hijack.warnings[0]


def test_a_plugin_sorting_first_cannot_take_an_alias(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site("site")
    site.distribution("aaa-alias", {"aaa": f"{FAKE_PREFIX}alias"})
    site.plugin(f"{FAKE_PREFIX}alias", families={"aliased": {"sdxl": "someone/else"}})
    with pytest.warns(PluginWarning, match=r"alias 'sdxl' is already registered by family 'sdxl'.*t2i-sdxl"):
        registry = load_with(monkeypatch, site)
    assert registry.plugins["sdxl"].registered == ["provider:sdxl"]
    assert registry.providers["sdxl"].aliases["sdxl"] != "someone/else"
    assert "aliased" not in registry.providers
    assert "nothing registered" in (registry.plugins["aaa"].error or "")


def test_a_plugin_sorting_first_cannot_take_an_accelerator_or_remove_the_builtins(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerators, presets = builtin_items()
    assert len(accelerators) >= 13 and len(presets) >= 4
    site = make_site("site")
    site.distribution("aaa-fast", {"aaa": f"{FAKE_PREFIX}fast"})
    site.plugin(f"{FAKE_PREFIX}fast", accelerators=("fp32", "aaa-turbo"))
    with pytest.warns(PluginWarning, match=r"accelerator 'fp32' is already registered .*\(t2i-core 0\.1\.0\)"):
        registry = load_with(monkeypatch, site)
    assert registry.plugins["accelerators"].error is None
    assert accelerators <= set(registry.accelerators) and presets <= set(registry.presets)
    assert type(registry.accelerators["fp32"]).__module__ == "t2i_core.builtins.accelerators"
    assert registry.plugins["aaa"].registered == ["accelerator:aaa-turbo"]


def test_third_parties_load_by_distribution_then_entry_point_whatever_the_sys_path_order(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = make_site("first"), make_site("second")
    first.distribution("zzz-late", {"a": f"{FAKE_PREFIX}late"})  # sorts first by entry-point name only
    first.plugin(f"{FAKE_PREFIX}late", conditioners=("contested",))
    second.distribution("aaa-early", {"b": f"{FAKE_PREFIX}early"})
    second.plugin(f"{FAKE_PREFIX}early", conditioners=("contested",))
    for order in [(first, second), (second, first)]:
        registry = quietly(monkeypatch, *order)
        assert registry.plugins["b"].registered == ["conditioner:contested"]
        assert registry.plugins["a"].registered == [] and "aaa-early" in registry.plugins["a"].warnings[0]


# -- identity: distribution and name ------------------------------------------------------


def test_an_entry_point_of_the_same_name_does_not_replace_the_real_plugin(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site("site")
    site.distribution("t2i-impostor", {"sd15": f"{FAKE_PREFIX}impostor"})
    site.plugin(f"{FAKE_PREFIX}impostor", families={"impostor": {}})
    registry = load_with(monkeypatch, site)
    assert registry.plugins["sd15"].distribution == "t2i-sd15"
    assert registry.plugins["sd15"].registered == ["provider:sd15"]
    impostor = registry.plugins["t2i-impostor:sd15"]
    assert impostor.distribution == "t2i-impostor" and impostor.entry_point == "sd15"
    assert impostor.source == THIRD_PARTY and impostor.registered == ["provider:impostor"]


@pytest.mark.parametrize(
    ("wanted", "real", "impostor"),
    [
        ("sd15", True, False),
        ("t2i-sd15:sd15", True, False),
        ("t2i-impostor:sd15", False, True),
        ("T2I_Impostor:sd15, sd15", True, True),
        ("", False, False),
    ],
)
def test_load_plugins_names_a_plugin_unambiguously(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch, wanted: str, real: bool, impostor: bool
) -> None:
    site = make_site("site")
    site.distribution("t2i-impostor", {"sd15": f"{FAKE_PREFIX}impostor"})
    site.plugin(f"{FAKE_PREFIX}impostor", families={"impostor": {}})
    monkeypatch.setenv(LOAD_PLUGINS_ENV, wanted)
    registry = load_with(monkeypatch, site)
    assert ("sd15" in registry.providers) is real
    assert ("impostor" in registry.providers) is impostor
    assert "fp32" in registry.accelerators and "negative-prompt" in registry.conditioners


def test_a_distribution_calling_itself_t2i_core_hides_nothing(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site("site")
    # A look-alike first on sys.path hides the real t2i-core from importlib.metadata.entry_points();
    # it repeats one of the real entry points and adds one of its own.
    site.distribution(
        "t2i-core",
        {"accelerators": "t2i_core.builtins.accelerators", "negative_prompt": f"{FAKE_PREFIX}core"},
        version="6.6.6",
    )
    site.plugin(f"{FAKE_PREFIX}core", conditioners=("fake-core",))
    registry = load_with(monkeypatch, site)
    assert "negative-prompt" in registry.conditioners and "fp32" in registry.accelerators
    for name in ("accelerators", "negative_prompt"):
        info = registry.plugins[name]
        assert (info.source, info.distribution, info.version, info.error) == (BUILTIN, "t2i-core", "0.1.0", None)
    fake = registry.plugins["t2i-core:negative_prompt"]
    assert fake.source == THIRD_PARTY and fake.version == "6.6.6" and fake.registered == ["conditioner:fake-core"]


def test_load_plugins_can_exclude_a_distribution_calling_itself_t2i_core(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site("site")
    site.distribution("t2i-core", {"extras": f"{FAKE_PREFIX}core"}, version="6.6.6")
    site.plugin(f"{FAKE_PREFIX}core", conditioners=("fake-core",))
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "")
    registry = load_with(monkeypatch, site)
    assert {info.source for info in registry.plugins.values()} == {BUILTIN}
    assert "negative-prompt" in registry.conditioners and "fake-core" not in registry.conditioners
    assert f"{FAKE_PREFIX}core" not in sys.modules


def test_every_plugin_of_this_repository_is_first_party() -> None:
    tomllib = pytest.importorskip("tomllib")
    shipped = {}
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        packages = {target.partition(":")[0].split(".")[0] for target in project["entry-points"]["t2i"].values()}
        shipped[project["name"]] = packages
    assert shipped and set(shipped) == set(FIRST_PARTY_DISTRIBUTIONS)
    for name, packages in shipped.items():
        assert packages == {FIRST_PARTY_DISTRIBUTIONS[name]}


# -- containment ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("import sys\nsys.exit(3)\n", "import failed: SystemExit: it called sys.exit(3)"),
        ("import sys\nsys.exit()\n", "import failed: SystemExit: it called sys.exit()"),
        ("raise KeyboardInterrupt\n", "import failed: KeyboardInterrupt"),
    ],
)
def test_exit_or_interrupt_at_import_is_contained(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch, source: str, error: str
) -> None:
    site = make_site("site")
    site.distribution("t2i-exits", {"exits": f"{FAKE_PREFIX}exits"})
    site.module(f"{FAKE_PREFIX}exits", source)
    registry = load_with(monkeypatch, site)
    assert error in (registry.plugins["exits"].error or "")
    assert [info.name for info in registry.failures()] == ["exits"]
    assert "sd15" in registry.providers and "negative-prompt" in registry.conditioners


def test_a_malformed_entry_point_is_reported_not_fatal(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site("site")
    site.distribution("t2i-malformed", {"garbled": "not a module!", "empty": ""})
    registry = load_with(monkeypatch, site)
    assert "import failed" in (registry.plugins["garbled"].error or "")
    assert "import failed" in (registry.plugins["empty"].error or "")
    assert "sd15" in registry.providers and "fp32" in registry.accelerators


def test_exit_in_a_registration_hook_is_contained(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site("site")
    site.distribution("t2i-exits", {"exits": f"{FAKE_PREFIX}exits"})
    source = (
        "import sys\nfrom t2i_core import hookimpl\n\n@hookimpl\ndef register_providers(register):\n    sys.exit(4)\n"
    )
    site.module(f"{FAKE_PREFIX}exits", source)
    registry = load_with(monkeypatch, site)
    assert "SystemExit: it called sys.exit(4)" in (registry.plugins["exits"].error or "")
    assert "sd15" in registry.providers


def test_import_time_is_recorded(make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site("site")
    site.distribution("t2i-slow", {"slow": f"{FAKE_PREFIX}slow"})
    site.module(f"{FAKE_PREFIX}slow", "import time\ntime.sleep(0.3)\n")
    registry = load_with(monkeypatch, site)
    assert (registry.plugins["slow"].import_seconds or 0) >= 0.3
    assert registry.plugins["slow"].location == str(site.root / f"{FAKE_PREFIX}slow.py")
    assert all(info.import_seconds is not None for info in registry.plugins.values())


# -- the command line, in a real process ----------------------------------------------------


def test_cli_shows_the_real_plugins_winning_and_the_refusals(make_site: Callable[[str], Site]) -> None:
    accelerators, presets = builtin_items()
    site = make_site("site")
    site.distribution("aaa-hijack", {"aaa": f"{FAKE_PREFIX}hijack"})
    site.plugin(f"{FAKE_PREFIX}hijack", families={"sd15": {}, "evil": {"sdxl": "x/y"}}, accelerators=("fp32",))
    site.distribution("t2i-impostor", {"sd15": f"{FAKE_PREFIX}impostor"})
    site.plugin(f"{FAKE_PREFIX}impostor", families={"impostor": {}})
    site.distribution("t2i-core", {"extras": f"{FAKE_PREFIX}core"}, version="6.6.6")
    site.plugin(f"{FAKE_PREFIX}core", conditioners=("fake-core",))

    proc = t2i_plugins(site, "--json")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    plugins = {plugin["name"]: plugin for plugin in document["plugins"]}
    assert plugins["sd15"]["distribution"] == "t2i-sd15" and plugins["sd15"]["registers"] == ["provider:sd15"]
    assert plugins["t2i-impostor:sd15"]["registers"] == ["provider:impostor"]
    assert plugins["aaa"]["registers"] == [] and len(plugins["aaa"]["warnings"]) == 3
    assert plugins["extras"]["source"] == THIRD_PARTY and plugins["extras"]["version"] == "6.6.6"
    assert accelerators <= set(document["accelerators"]) and presets <= set(document["presets"])
    assert "negative-prompt" in document["conditioners"]
    assert document["families"]["sd15"]["description"].startswith("Stable Diffusion 1")
    assert all(isinstance(plugin["import_seconds"], float) for plugin in document["plugins"])

    proc = t2i_plugins(site)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "aaa  (aaa-hijack 1.0)  third-party" in proc.stdout
    assert "  WARNING: plugin 'aaa' (aaa-hijack 1.0): provider 'sd15' is already registered" in proc.stdout
    assert "by plugin 'sd15' (t2i-sd15 0.1.0); refused" in proc.stdout
    assert "extras  (t2i-core 6.6.6)  third-party" in proc.stdout
    assert "accelerators  (t2i-core 0.1.0)  built-in" in proc.stdout

    proc = t2i_plugins(site, "--json", env={LOAD_PLUGINS_ENV: ""})
    document = json.loads(proc.stdout)
    assert {plugin["source"] for plugin in document["plugins"]} == {BUILTIN}
    assert "negative-prompt" in document["conditioners"]


def test_cli_survives_plugins_that_exit_or_interrupt(make_site: Callable[[str], Site]) -> None:
    site = make_site("site")
    site.distribution("t2i-exits", {"exits": f"{FAKE_PREFIX}exits", "interrupts": f"{FAKE_PREFIX}interrupts"})
    site.module(f"{FAKE_PREFIX}exits", "import sys\nsys.exit(3)\n")
    site.module(f"{FAKE_PREFIX}interrupts", "raise KeyboardInterrupt\n")
    proc = t2i_plugins(site)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "ERROR: plugin 'exits': import failed: SystemExit: it called sys.exit(3)" in proc.stdout
    assert "ERROR: plugin 'interrupts': import failed: KeyboardInterrupt" in proc.stdout
    assert "provider:sd15" in proc.stdout


def test_cli_flags_a_slow_import(make_site: Callable[[str], Site]) -> None:
    site = make_site("site")
    site.distribution("t2i-slow", {"slow": f"{FAKE_PREFIX}slow"})
    site.module(f"{FAKE_PREFIX}slow", "import time\ntime.sleep(0.7)\n")
    proc = t2i_plugins(site)
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("slow  (t2i-slow 1.0)  third-party\n")[1].split("\n\n")[0]
    assert re.search(r"  SLOW: importing it took (0\.[7-9]|[1-9]\.\d) s, which delays every t2i command", block), block
    assert "SLOW" not in proc.stdout.replace(block, "")


def test_slow_import_threshold_in_process(
    make_site: Callable[[str], Site], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from t2i_core import registry as _registry_package
    from t2i_core.cli import main
    from t2i_core.registry import current

    site = make_site("site")
    site.distribution("t2i-slow", {"slow": f"{FAKE_PREFIX}slow"})
    site.module(f"{FAKE_PREFIX}slow", "import time\ntime.sleep(0.2)\n")
    monkeypatch.setattr(_registry_package, "SLOW_IMPORT_SECONDS", 0.1)
    monkeypatch.setattr(current, "_registry", load_with(monkeypatch, site))
    assert main(["plugins"]) == 0
    assert "  SLOW: importing it took 0.2 s" in capsys.readouterr().out
