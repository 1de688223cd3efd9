"""Hires fix on the transformer families (FLUX.1, SD3, Z-Image) equals the two passes on raw diffusers.

FLUX.1's latents come out packed in 2x2 patches: the reference unpacks them as the family does
(``FluxPipeline._unpack_latents``) before interpolating. Z-Image's img2img pipeline takes only
4-channel tensors as latents by default: the reference, like the family, gives its image processor
the VAE's 16 channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from t2i_core import GenerationRequest, HiresFix, InvalidRequestError, load
from t2i_core.testing import assert_images_equal, cpu_generators

PROMPT = "a lighthouse on a cliff"
IMG2IMG = {"flux": "FluxImg2ImgPipeline", "sd3": "StableDiffusion3Img2ImgPipeline", "z-image": "ZImageImg2ImgPipeline"}
#: call arguments the family sets that diffusers' own defaults differ from
EXTRA: dict[str, dict[str, Any]] = {"flux": {"max_sequence_length": 512}, "sd3": {}, "z-image": {}}


def reference(engine: Any, family: str, hires: HiresFix, seed: int, **kwargs: Any) -> list[Any]:
    import diffusers
    import torch
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    pipeline = type(engine.pipeline).from_pretrained(engine.source)
    pipeline.set_progress_bar_config(disable=True)
    size = kwargs.pop("size")
    final = int(size * hires.scale) // 8 * 8
    kwargs.update(EXTRA[family])
    output = "pil" if hires.upscaler == "lanczos" else "latent"
    first = pipeline(height=size, width=size, generator=cpu_generators(seed, 1), output_type=output, **kwargs).images
    if hires.upscaler == "lanczos":
        image: Any = [each.resize((final, final), Image.LANCZOS) for each in first]
    else:
        if family == "flux":
            first = pipeline._unpack_latents(first, size, size, pipeline.vae_scale_factor)
        side = final // pipeline.vae_scale_factor
        mode = "bilinear" if hires.upscaler == "latent" else "nearest-exact"
        image = torch.nn.functional.interpolate(first, size=(side, side), mode=mode, antialias=False)
    img2img = getattr(diffusers, IMG2IMG[family]).from_pipe(pipeline)
    if family == "z-image":
        channels = pipeline.vae.config.latent_channels
        img2img.image_processor = VaeImageProcessor(
            vae_scale_factor=img2img.vae_scale_factor * 2, vae_latent_channels=channels
        )
    return list(
        img2img(
            image=image, strength=hires.strength, height=final, width=final, generator=cpu_generators(seed, 1), **kwargs
        ).images
    )


@pytest.mark.parametrize(
    ("family", "upscaler"), [("flux", "latent"), ("flux", "lanczos"), ("sd3", "latent-nearest"), ("z-image", "latent")]
)
def test_hires_equals_the_two_passes_on_raw_diffusers(t2i_tiny_cache: Path, family: str, upscaler: str) -> None:
    engine = load(f"tiny:{family}", device="cpu", accelerators=("fp32",))
    hires = HiresFix(scale=1.5, upscaler=upscaler, strength=0.6)
    request = GenerationRequest(prompt=PROMPT, seed=8, height=64, width=64, num_inference_steps=3, hires=hires)
    result = engine.generate(request)
    assert result.images[0].size == (96, 96)
    guidance = result.request.guidance_scale
    expected = reference(
        engine, family, hires, 8, prompt=PROMPT, size=64, num_inference_steps=3, guidance_scale=guidance
    )
    assert_images_equal(result.images, expected)


def test_a_final_size_the_family_refuses_names_hires_scale(t2i_tiny_cache: Path) -> None:
    engine = load("tiny:flux", device="cpu", accelerators=("fp32",))
    with pytest.raises(InvalidRequestError) as caught:  # 64 x 1.125 = 72: not whole 2x2 patches of latents
        engine.resolve(GenerationRequest(prompt=PROMPT, height=64, width=64, hires=HiresFix(scale=1.125)))
    assert caught.value.field == "hires.scale" and "72x72" in str(caught.value) and "16" in str(caught.value)


def test_a_step_cache_with_hires_is_refused_before_any_work(t2i_tiny_cache: Path) -> None:
    """diffusers' img2img pipelines open no cache context: a step cache's second pass would fail."""
    from t2i_core import UnsupportedFeatureError

    engine = load("tiny:flux", device="cpu", accelerators=("fp32", "first-block-cache"))
    with pytest.raises(UnsupportedFeatureError) as caught:
        engine.resolve(GenerationRequest(prompt=PROMPT, height=64, width=64, hires=HiresFix()))
    assert "hires" in caught.value.feature and "first-block-cache" in caught.value.feature
    assert engine.resolve(GenerationRequest(prompt=PROMPT, height=64, width=64))  # without hires it runs
