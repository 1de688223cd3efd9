"""Shared fixtures: an isolated tiny-checkpoint cache, offline hub, and raw-diffusers helpers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

# Before anything imports huggingface_hub: the suite never touches the network, and it builds
# every tiny checkpoint afresh into a cache of its own, so a broken build_tiny always fails it
# (T2I_TEST_CACHE names a folder to reuse between runs while developing).
os.environ["HF_HUB_OFFLINE"] = "1"
_OWN_CACHE = None if os.environ.get("T2I_TEST_CACHE") else tempfile.mkdtemp(prefix="t2i-test-cache-")
os.environ["T2I_CACHE"] = os.environ.get("T2I_TEST_CACHE") or str(_OWN_CACHE)
# The conformance kit's t2i_tiny_cache fixture builds into the same folder (it reuses T2I_TEST_CACHE).
os.environ["T2I_TEST_CACHE"] = os.environ["T2I_CACHE"]


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def as_array(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_images_equal(sdk: list[Any], raw: list[Any]) -> None:
    """Bit-for-bit equality of two lists of PIL images."""
    assert len(sdk) == len(raw)
    for index, (ours, theirs) in enumerate(zip(sdk, raw, strict=True)):
        assert ours.size == theirs.size, f"image {index}: size {ours.size} != {theirs.size}"
        difference = np.abs(as_array(ours) - as_array(theirs))
        assert difference.max() == 0, f"image {index} differs from raw diffusers (max {difference.max()} / 255)"


def assert_images_close(sdk: list[Any], raw: list[Any], *, max_levels: int, why: str) -> None:
    """Two lists of PIL images within `max_levels` of 255 per pixel, for two different computations.

    Bit-for-bit equality holds only between runs that do the same floating-point work. Where a
    test compares two paths (a batch against lone runs, offloaded against resident weights...),
    it states `why` they differ and the bound; float32 rounding may differ from one CPU to another.
    """
    assert why, "say why the two sides are not the same computation"
    assert len(sdk) == len(raw)
    for index, (ours, theirs) in enumerate(zip(sdk, raw, strict=True)):
        assert ours.size == theirs.size, f"image {index}: size {ours.size} != {theirs.size}"
        difference = int(np.abs(as_array(ours) - as_array(theirs)).max())
        assert difference <= max_levels, f"image {index} is {difference} levels apart (bound {max_levels}: {why})"


def cpu_generators(seed: int, count: int) -> Any:
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    return generators[0] if count == 1 else generators


def tiny_folder(family: str) -> str:
    from t2i_core import get_registry
    from t2i_core.tiny import ensure_built

    provider = get_registry().provider(family)
    return str(ensure_built(provider.name, provider.tiny_version, provider.build_tiny))


def raw_pipeline(folder: str) -> Any:
    """The checkpoint at `folder` as raw diffusers loads it, the reference of every parity test."""
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def sd15_folder() -> str:
    return tiny_folder("sd15")


@pytest.fixture(scope="session")
def raw_sd15(sd15_folder: str) -> Any:
    return raw_pipeline(sd15_folder)


@pytest.fixture(scope="session")
def sd15_engine() -> Any:
    from t2i_core import load

    return load("tiny:sd15", device="cpu")


@pytest.fixture
def registry() -> Iterator[Any]:
    from t2i_core import get_registry

    yield get_registry()
