"""The t2i pytest plugin (entry point ``pytest11``): fixtures for testing t2i plugins.

- ``t2i_tiny_cache``: the folder tiny checkpoints are built into for the session
  (``$T2I_TEST_CACHE`` when set, to reuse one between runs; else a fresh temporary folder).
- ``t2i_registry``: a registry of the installed plugins for one test, installed as the
  process-wide one; plugins registered in it are gone afterwards.
- ``t2i_engine_factory``: ``load()`` with test defaults (CPU, float32).

It also hides the deprecation notices (``DeprecationWarning``, ``FutureWarning``) that the
libraries under t2i raise from their own modules, so that a plugin's test run ends with its
own warnings and t2i's, not dozens of lines about diffusers' or transformers' next release.
Loading this plugin imports neither torch nor the rest of t2i's heavy dependencies.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from t2i_core import Engine
    from t2i_core.registry import Registry

#: a folder to build tiny checkpoints into and reuse between test runs
TEST_CACHE_ENV = "T2I_TEST_CACHE"

#: the libraries whose own deprecation notices a kit run hides (matched on the warning's module)
QUIET_LIBRARIES = ("diffusers", "transformers", "torch", "huggingface_hub", "accelerate", "peft", "safetensors")
#: pytest ``filterwarnings`` lines: each library's deprecation notices, by module, nothing else
LIBRARY_WARNING_FILTERS = tuple(
    rf"ignore::{category}:{library}(\.|$)"
    for library in QUIET_LIBRARIES
    for category in ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning")
)


def pytest_configure(config: pytest.Config) -> None:
    """Put the library filters first, so that a project's own ``filterwarnings`` lines override them."""
    lines = config.getini("filterwarnings")
    lines[:0] = [line for line in LIBRARY_WARNING_FILTERS if line not in lines]


@pytest.fixture(scope="session")
def t2i_tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder that ``tiny:<family>`` checkpoints are built into during the session.

    ``$T2I_TEST_CACHE`` when set (reused between runs); otherwise a fresh temporary folder, so
    that every ``build_tiny`` runs once per session. ``T2I_CACHE`` points at it meanwhile.
    """
    reused = os.environ.get(TEST_CACHE_ENV)
    folder = Path(reused) if reused else tmp_path_factory.mktemp("t2i-cache")
    previous = os.environ.get("T2I_CACHE")
    os.environ["T2I_CACHE"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("T2I_CACHE", None)
        else:
            os.environ["T2I_CACHE"] = previous


@pytest.fixture
def t2i_registry() -> Iterator[Registry]:
    """A registry of its own for one test: the installed plugins, loaded afresh.

    It replaces the process-wide registry (what `load()` and ``t2i`` use) until the test ends,
    so plugins registered in it with ``register_plugin`` leave no trace.
    """
    from t2i_core import PluginWarning
    from t2i_core.registry import Registry, using_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # reported when the suite first loaded them
        registry = Registry()
        registry.load_entry_points()
    with using_registry(registry):
        yield registry


@pytest.fixture
def t2i_engine_factory(t2i_tiny_cache: Path) -> Callable[..., Engine]:
    """``make(model, **load_kwargs)``: `t2i_core.load` on CPU in float32 unless told otherwise.

    Float32 on CPU is what raw diffusers does by default, so images compare bit for bit.
    """
    from t2i_core import load

    def make(model: str, **load_kwargs: Any) -> Engine:
        load_kwargs.setdefault("device", "cpu")
        load_kwargs.setdefault("accelerators", ("fp32",))
        return load(model, **load_kwargs)

    return make
