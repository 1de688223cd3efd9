"""`ModelProvider.run` reports progress through what the pipeline's ``__call__`` offers.

Real tiny diffusers pipelines on both paths: SD 1.5 (``callback_on_step_end``) and PixArt-Sigma,
whose ``__call__`` has only the old ``callback``/``callback_steps`` and swallows unknown keywords.
Each reports (1, n) ... (n, n) for the n steps it runs, can be cancelled, and makes the same
image as the plain call; a pipeline that offers neither is refused, saying to override ``run``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from t2i_core import GenerationCancelled, ModelProvider, UnsupportedFeatureError
from t2i_core.testing import assert_images_equal, cpu_generators, raw_pipeline, require_family, tiny_folder

STEPS = 3
SEED = 31


class KitFamily(ModelProvider):
    """A provider that keeps every default, `run` included."""

    name = "kit-family"


@pytest.fixture(scope="module")
def sd15(t2i_tiny_cache: Path) -> Any:
    require_family("sd15")
    return raw_pipeline(tiny_folder("sd15"))


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny random-weight PixArt-Sigma pipeline, built offline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    from t2i_core.tiny import t5_encoder_config, t5_tokenizer

    tokenizer = t5_tokenizer(tmp_path_factory.mktemp("t5"), vocab_size=300, extra_ids=4)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(t5_encoder_config(tokenizer, num_layers=1))
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )  # fmt: skip
    pipeline = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


CALLS = {
    "sd15": {"prompt": "a lighthouse at dusk", "num_inference_steps": STEPS, "guidance_scale": 5.0},
    "pixart": {
        "prompt": "a lighthouse at dusk",
        "height": 16,
        "width": 16,
        "num_inference_steps": STEPS,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,
        "max_sequence_length": 16,
        "clean_caption": False,
    },
}


@pytest.fixture(params=["sd15", "pixart"])
def family(request: pytest.FixtureRequest) -> tuple[Any, dict[str, Any]]:
    """(pipeline, its call arguments): one pipeline per callback style."""
    pipeline = request.getfixturevalue(request.param)
    return pipeline, dict(CALLS[request.param])


def call(pipeline: Any, kwargs: dict[str, Any], progress: Callable[..., Any] | None = None) -> list[Any]:
    return KitFamily().run(pipeline, {**kwargs, "generator": cpu_generators(SEED, 1)}, progress)


def count_denoiser_calls(pipeline: Any) -> tuple[list[int], Any]:
    """A list that grows at each call of the pipeline's denoiser (once per step with a first-order
    scheduler; SD 1.5's PNDM takes one step more than asked), and the hook's handle to remove."""
    calls: list[int] = []
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    return calls, denoiser.register_forward_hook(lambda *_: calls.append(1))


def test_progress_counts_the_steps_and_leaves_the_image_alone(family: tuple[Any, dict[str, Any]]) -> None:
    pipeline, kwargs = family
    calls: list[tuple[int, int]] = []
    ran, hook = count_denoiser_calls(pipeline)
    try:
        images = call(pipeline, kwargs, lambda step, total: calls.append((step, total)))
    finally:
        hook.remove()
    assert len(ran) >= STEPS
    assert calls == [(step, len(ran)) for step in range(1, len(ran) + 1)]
    assert_images_equal(images, list(pipeline(**kwargs, generator=cpu_generators(SEED, 1)).images), "the plain call")


def test_progress_can_cancel_and_the_pipeline_runs_again(family: tuple[Any, dict[str, Any]]) -> None:
    pipeline, kwargs = family
    with pytest.raises(GenerationCancelled) as caught:
        call(pipeline, kwargs, lambda step, total: step < 2)
    assert caught.value.step == 2 and caught.value.total is not None and caught.value.total >= STEPS
    calls: list[int] = []
    call(pipeline, kwargs, lambda step, total: calls.append(step))
    assert calls == list(range(1, caught.value.total + 1))


def test_a_callback_that_takes_latents_gets_each_step_s(family: tuple[Any, dict[str, Any]]) -> None:
    import torch

    pipeline, kwargs = family
    seen: list[Any] = []
    call(pipeline, kwargs, lambda step, total, latents=None: seen.append(latents))
    assert len(seen) >= STEPS and all(isinstance(latents, torch.Tensor) for latents in seen)


def test_the_old_callback_counts_completed_steps_of_a_second_order_scheduler(pixart: Any) -> None:
    """Heun takes two model calls per step (2n - 1 timesteps); the old callback comes once per step."""
    from diffusers import HeunDiscreteScheduler

    pipeline = type(pixart)(**{**pixart.components, "scheduler": HeunDiscreteScheduler()})
    pipeline.set_progress_bar_config(disable=True)
    calls: list[tuple[int, int]] = []
    call(pipeline, CALLS["pixart"], lambda step, total: calls.append((step, total)))
    assert calls == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_a_pipeline_without_step_callbacks_is_refused_before_it_runs(sd15: Any) -> None:
    from diffusers import StableDiffusionPipeline

    ran: list[bool] = []

    class Silent(StableDiffusionPipeline):  # type: ignore[misc]
        """Takes what t2i passes, and swallows the rest, as PixArt does with callback_on_step_end."""

        def __call__(self, prompt: Any = None, *, num_inference_steps: int = 50, **kwargs: Any) -> Any:
            ran.append(True)
            allowed = {"height", "width", "guidance_scale", "generator"}
            kept = {key: value for key, value in kwargs.items() if key in allowed}
            return super().__call__(prompt, num_inference_steps=num_inference_steps, **kept)

    pipeline = Silent(**sd15.components)
    pipeline.set_progress_bar_config(disable=True)
    with pytest.raises(UnsupportedFeatureError, match=r"override ModelProvider\.run") as caught:
        call(pipeline, CALLS["sd15"], lambda step, total: None)
    assert caught.value.family == "kit-family" and "Silent.__call__" in str(caught.value)
    assert not ran, "the pipeline ran before the refusal"
    assert len(call(pipeline, CALLS["sd15"])) == 1, "without progress it runs"


def test_a_call_that_hands_its_arguments_on_is_seen_through(sd15: Any) -> None:
    """A mixin whose ``__call__(*args, **kwargs)`` calls the pipeline's (the graph-step accelerator's)."""
    from diffusers import StableDiffusionPipeline

    class Forwarding(StableDiffusionPipeline):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(*args, **kwargs)

    pipeline = Forwarding(**sd15.components)
    pipeline.set_progress_bar_config(disable=True)
    calls: list[tuple[int, int]] = []
    call(pipeline, CALLS["sd15"], lambda step, total: calls.append((step, total)))
    assert len(calls) >= STEPS and calls == [(step, len(calls)) for step in range(1, len(calls) + 1)]
