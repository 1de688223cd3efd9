"""The suite's session: an isolated tiny-checkpoint cache, an offline hub, and the shared reference fixtures.

At the root so that core's tests (tests/), each plugin's (plugins/<name>/tests) and the tutorial
example's share one cache and one reference pipeline per checkpoint. Helpers that test files import
come from ``t2i_core.testing`` (the plugin author's kit) and ``tests/support.py``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

# Before anything imports huggingface_hub: the suite never touches the network, and it builds
# every tiny checkpoint afresh into a cache of its own, so a broken build_tiny always fails it
# (T2I_TEST_CACHE names a folder to reuse between runs while developing).
os.environ["HF_HUB_OFFLINE"] = "1"
_OWN_CACHE = None if os.environ.get("T2I_TEST_CACHE") else tempfile.mkdtemp(prefix="t2i-test-cache-")
os.environ["T2I_CACHE"] = os.environ.get("T2I_TEST_CACHE") or str(_OWN_CACHE)
# The conformance kit's t2i_tiny_cache fixture builds into the same folder (it reuses T2I_TEST_CACHE).
os.environ["T2I_TEST_CACHE"] = os.environ["T2I_CACHE"]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def sd15_folder() -> str:
    from support import tiny_folder

    return tiny_folder("sd15")


@pytest.fixture(scope="session")
def raw_sd15(sd15_folder: str) -> Any:
    from t2i_core.testing import raw_pipeline

    return raw_pipeline(sd15_folder)


@pytest.fixture(scope="session")
def sd15_engine() -> Any:
    from t2i_core import load

    return load("tiny:sd15", device="cpu")


@pytest.fixture(scope="session")
def sdxl_folder() -> str:
    from support import tiny_folder

    pytest.importorskip("t2i_sdxl")
    return tiny_folder("sdxl")


@pytest.fixture(scope="session")
def raw_sdxl(sdxl_folder: str) -> Any:
    """The tiny SDXL checkpoint as raw diffusers loads it (t2i-sdxl's and t2i-compel's reference)."""
    from t2i_core.testing import raw_pipeline

    return raw_pipeline(sdxl_folder)


@pytest.fixture
def registry() -> Iterator[Any]:
    from t2i_core import get_registry

    yield get_registry()
