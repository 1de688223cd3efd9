"""t2i model provider for Stable Diffusion 1.x checkpoints (``StableDiffusionPipeline``)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

from t2i_core import FamilyDefaults, ModelProvider, hookimpl


class StableDiffusion15(ModelProvider):
    name = "sd15"
    aliases = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    pipeline_classes = ("StableDiffusionPipeline",)
    # 512x512 is the checkpoint's native size, read from its UNet config (so tiny:sd15 stays tiny).
    defaults = FamilyDefaults(num_inference_steps=50, guidance_scale=7.5)
    description = "Stable Diffusion 1.x (512x512, 50 steps, guidance 7.5)"
    # Measured with raw diffusers on an H200 (30 steps, fp16, batch 1): regional compile 0.80 s/image
    # (eager 0.78), with CUDA graphs 0.56 s and a 5.5 s first image.
    cuda_graph_regions = True

    def detect_single_file(self, keys: Collection[str]) -> bool:
        # The original SD 1.x layout: a UNet and CLIP-L under cond_stage_model.transformer (SD 2.x has
        # OpenCLIP under cond_stage_model.model, SDXL its two encoders under conditioner.embedders).
        return any(key.startswith("model.diffusion_model.") for key in keys) and any(
            key.startswith("cond_stage_model.transformer.") for key in keys
        )

    def build_tiny(self, folder: Path) -> None:
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        from t2i_core.tiny import clip_text_config, clip_tokenizer, tiny_unet_config, tiny_vae_config

        tokenizer = clip_tokenizer(folder / "_tokenizer_src")
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(clip_text_config(tokenizer))
        # The same scheduler configuration as the real stable-diffusion-v1-5 checkpoint.
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        )
        pipeline = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(folder)
        _remove_tree(folder / "_tokenizer_src")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(StableDiffusion15())
