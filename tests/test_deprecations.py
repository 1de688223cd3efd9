"""Plugins written against t2i 0.1 keep working: every internal name a first-party plugin imported before
`t2i_core.kit` existed still imports from its old path, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import t2i_core.kit as kit

#: (old module, name) -> the kit name it now is
OLD_PATHS = [
    ("t2i_core.engine", "is_hub_id"),
    ("t2i_core.engine", "hub_offline"),
    ("t2i_core.engine", "read_model_index"),
    ("t2i_core.provider", "private_components"),
    ("t2i_core.provider", "report_progress"),
    ("t2i_core.provider", "ProgressCallback"),
    ("t2i_core.accelerator", "is_offloaded"),
    ("t2i_core.builtins.accelerators", "has_variant"),
]
#: modules that moved whole: old name -> new name
MOVED_MODULES = {
    "t2i_core._weights": "t2i_core._weight_files",
    "t2i_core._jobs": "t2i_core.batch.jobs",
    "t2i_core._manifest": "t2i_core.batch.manifest",
    "t2i_core._single_file": "t2i_core.engine.single_file",
}


@pytest.mark.parametrize(("module", "name"), OLD_PATHS, ids=lambda value: str(value))
def test_an_old_path_warns_and_gives_the_kit_name(module: str, name: str) -> None:
    old = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} is deprecated.*t2i_core\.kit"):
        value = getattr(old, name)
    assert value is getattr(kit, name)


@pytest.mark.parametrize(("old", "new"), MOVED_MODULES.items())
def test_a_moved_module_warns_and_is_the_new_module(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_old_registry_module_still_offers_its_names() -> None:
    sys.modules.pop("t2i_core._manager", None)
    with pytest.warns(DeprecationWarning, match="t2i_core._manager is deprecated"):
        from t2i_core._manager import PluginWarning, Registry, get_registry  # noqa: F401
    import t2i_core

    assert get_registry is t2i_core.get_registry


def test_the_kit_itself_warns_about_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in kit.__all__:
            getattr(kit, name)
