"""t2i-pixart-sigma passes the t2i conformance kit, and what PixArt-Sigma adds is checked against raw diffusers."""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from t2i_core import Engine, GenerationRequest, ModelNotFoundError
from t2i_core.testing import ProviderConformance, assert_images_differ, assert_images_equal, cpu_generators, tiny_folder

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


def raw_pixart_sigma(folder: str | Path) -> Any:
    """The checkpoint as a diffusers user loads PixArt-Sigma."""
    from diffusers import PixArtSigmaPipeline

    pipeline = PixArtSigmaPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class TestPixArtSigma(ProviderConformance):
    family = "pixart-sigma"
    # What the provider passes on every call: the size asked for, generated at that size, and no caption cleaning.
    reference_kwargs = {"use_resolution_binning": False, "clean_caption": False}
    # Sizes are whole transformer patches of whole latent pixels: multiples of 16, not just of 8.
    invalid_requests = {"height": {"height": 72}, "width": {"width": 200}}

    def reference_pipeline(self, folder: str) -> Any:
        return raw_pixart_sigma(folder)


@pytest.fixture(scope="module")
def pixart(t2i_tiny_cache: Path) -> Engine:
    from t2i_core import load

    return load("tiny:pixart-sigma", device="cpu", accelerators=("fp32",))


@pytest.fixture
def pixart_log() -> Iterator[list[logging.LogRecord]]:
    """What the PixArt-Sigma pipeline logs while the test runs (diffusers' loggers do not propagate to caplog)."""
    handler = logging.handlers.BufferingHandler(capacity=1000)
    logger = logging.getLogger("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma")
    # Another test (a library's logging setup, the CLI's quiet loading) may have raised diffusers'
    # verbosity or disabled the logger: this test reads what the pipeline logs, so it sets both.
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        yield handler.buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


def test_max_sequence_length_matches_diffusers(pixart: Engine) -> None:
    """A shorter T5 sequence cuts the prompt, as max_sequence_length does in diffusers."""
    request = GenerationRequest(prompt=PROMPT, seed=4, num_inference_steps=2, options={"max_sequence_length": 4})
    result = pixart.generate(request)
    raw = raw_pixart_sigma(pixart.source)
    expected = raw(
        PROMPT,
        num_inference_steps=2,
        max_sequence_length=4,
        use_resolution_binning=False,
        generator=cpu_generators(4, 1),
    ).images
    assert_images_equal(result.images, expected)
    full = pixart.generate(GenerationRequest(prompt=PROMPT, seed=4, num_inference_steps=2))
    assert_images_differ(result.images, full.images, "the whole prompt")


def test_captions_are_not_cleaned_and_nothing_is_logged(pixart: Engine, pixart_log: list[logging.LogRecord]) -> None:
    """Without beautifulsoup4 and ftfy, diffusers' default clean_caption=True warns and changes nothing."""
    request = GenerationRequest(prompt=PROMPT, seed=6, num_inference_steps=2)
    result = pixart.generate(request)
    assert [record.getMessage() for record in pixart_log] == []
    if find_spec("bs4") and find_spec("ftfy"):
        return  # with both installed, clean_caption=True does clean captions: the kit's references compare with False
    raw = raw_pixart_sigma(pixart.source)
    expected = raw(PROMPT, num_inference_steps=2, use_resolution_binning=False, generator=cpu_generators(6, 1)).images
    assert any("clean_caption" in record.getMessage() for record in pixart_log)
    assert_images_equal(result.images, expected)


def test_another_family_is_refused_before_its_weights_load(t2i_engine_factory: Callable[..., Engine]) -> None:
    with pytest.raises(ModelNotFoundError, match="it is a StableDiffusionPipeline, not a PixArtSigmaPipeline"):
        t2i_engine_factory(str(tiny_folder("sd15")), family="pixart-sigma", cache=False)
