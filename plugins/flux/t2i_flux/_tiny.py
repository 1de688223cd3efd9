"""Tiny FLUX.1 checkpoints with random weights, built offline: ``tiny:flux`` (dev-style) and a schnell-style one.

Every component has FLUX.1's structure at toy width: CLIP-L's pooled output and T5's sequence
read the prompt, a transformer with one double-stream and one single-stream block, and a VAE with
FLUX.1's factor of 8 and 16 latent channels (so sizes are multiples of 16, as on the real model).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from t2i_core.tiny import clip_text_config, clip_tokenizer, ensure_built, t5_encoder_config, t5_tokenizer

#: bump when the recipe changes, so that cached schnell-style checkpoints are rebuilt
SCHNELL_VERSION = 1
#: the image size the tiny checkpoints are made for (the VAE config's sample_size)
TINY_SIZE = 64

#: FLUX.1-dev's scheduler config (resolution-dependent shift); schnell's has a fixed shift of 1
DEV_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SCHNELL_SCHEDULER: dict[str, Any] = {**DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def build(folder: Path, *, guidance_embeds: bool) -> None:
    """Write a tiny FluxPipeline into `folder`: dev-style with `guidance_embeds`, schnell-style without."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    tokenizer = clip_tokenizer(folder / "_clip_tokenizer")
    tokenizer_2 = t5_tokenizer(folder / "_t5_tokenizer")
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    text_encoder_2 = T5EncoderModel(t5_encoder_config(tokenizer_2))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as FLUX.1's (16, 56, 56) sums to 128
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),  # four blocks: a VAE factor of 8, as FLUX.1's
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=TINY_SIZE,
        scaling_factor=0.3611,  # FLUX.1's VAE scaling and shift
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance_embeds else SCHNELL_SCHEDULER))
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    for scratch in ("_clip_tokenizer", "_t5_tokenizer"):
        shutil.rmtree(folder / scratch, ignore_errors=True)


def schnell_folder() -> Path:
    """The cached tiny schnell-style checkpoint (no guidance embedding, fixed-shift scheduler), built on first use.

    Load it with ``load(str(schnell_folder()))``: it is a diffusers folder of family ``flux``.
    """
    return ensure_built("flux-schnell", SCHNELL_VERSION, lambda folder: build(folder, guidance_embeds=False))
