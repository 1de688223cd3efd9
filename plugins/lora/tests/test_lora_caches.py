"""LoRAs on a FLUX.1 engine with a step cache equal raw diffusers with the same LoRA and cache, bit for bit.

The reference: ``load_lora_weights`` and ``set_adapters`` (and ``fuse_lora`` for the fused case),
then ``transformer.enable_cache(Config(...))`` and the same call. t2i loads the adapters after
the cache's hooks are in place (at the first request); PEFT adapts the projections inside the
hooked blocks, so the order does not matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from t2i_core import Engine, GenerationRequest, Lora, load
from t2i_core.testing import assert_images_differ, assert_images_equal, cpu_generators, raw_pipeline, require_family

pytest.importorskip("t2i_lora")
from t2i_lora import tiny

PROMPT = "a lighthouse on a cliff"
STEPS = 8
SCALE = 0.8

pytestmark = pytest.mark.filterwarnings("ignore:FasterCache is a purely experimental feature")


def cache_config(spec: str, pipeline: Any) -> Any:
    """What a diffusers user writes for the t2i step cache `spec` (each at its default value)."""
    import diffusers
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    configs = {
        "first-block-cache": lambda: diffusers.FirstBlockCacheConfig(threshold=0.2),
        "taylorseer": lambda: diffusers.TaylorSeerCacheConfig(cache_interval=5),
        "magcache": lambda: diffusers.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=STEPS),
        "faster-cache": lambda: diffusers.FasterCacheConfig(
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,
            current_timestep_callback=lambda: pipeline.current_timestep,
        ),
    }
    return configs[spec]()


@pytest.fixture(scope="module")
def folder(t2i_tiny_cache: Path) -> str:
    require_family("flux")
    return load("tiny:flux", device="cpu", accelerators=("fp32",)).source


@pytest.fixture(scope="module")
def lora(folder: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tiny.lora_file(folder, tmp_path_factory.mktemp("lora-caches") / "style.safetensors", seed=1))


@pytest.fixture
def raw(folder: str, lora: Path) -> Iterator[Any]:
    pipeline = raw_pipeline(folder)
    pipeline.load_lora_weights(str(lora), adapter_name="style")
    pipeline.set_adapters(["style"], adapter_weights=[SCALE])
    yield pipeline


def raw_image(pipeline: Any, spec: str) -> Any:
    pipeline.transformer.enable_cache(cache_config(spec, pipeline))
    try:
        call = {"prompt": PROMPT, "num_inference_steps": STEPS, "height": 64, "width": 64}
        return pipeline(generator=cpu_generators(5, 1), **call).images[0]
    finally:
        pipeline.transformer.disable_cache()


def request(*loras: Lora) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=STEPS, height=64, width=64, loras=loras)


@pytest.mark.parametrize("spec", ["first-block-cache", "taylorseer", "magcache", "faster-cache"])
def test_a_lora_with_a_step_cache_matches_raw_diffusers(spec: str, lora: Path, raw: Any) -> None:
    engine: Engine = load("tiny:flux", device="cpu", accelerators=("fp32", spec), cache=False)
    ours = engine.generate(request(Lora(str(lora), scale=SCALE))).images
    assert_images_equal(ours, [raw_image(raw, spec)])
    assert_images_differ(ours, engine.generate(request()).images, f"the LoRA with {spec}")


def test_fused_loras_with_a_step_cache_match_raw_diffusers_fused(lora: Path, raw: Any) -> None:
    engine = load("tiny:flux", device="cpu", accelerators=("fp32", "fuse_lora", "taylorseer"), cache=False)
    ours = engine.generate(request(Lora(str(lora), scale=SCALE))).images
    raw.fuse_lora(adapter_names=["style"], lora_scale=1.0)
    assert_images_equal(ours, [raw_image(raw, "taylorseer")], "raw diffusers with the LoRA fused")
