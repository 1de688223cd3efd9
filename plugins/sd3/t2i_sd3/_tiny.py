"""``tiny:sd3``: a small random-weight Stable Diffusion 3.5 checkpoint, built offline.

Laid out as the real ``stable-diffusion-3.5-*`` repositories (CLIP-L and CLIP-G with projections,
a T5 encoder, an MMDiT transformer, a 16-channel VAE with a factor of 8, flow-match Euler with
shift 3), scaled down after diffusers' own SD3 ``get_dummy_components`` so that a few steps take
well under a second on CPU. The two CLIP encoders have different widths, as the real ones (768
and 1280), and their concatenation is narrower than T5, so the pipeline pads it as it pads 2048
features to T5-XXL's 4096.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from t2i_core.tiny import clip_text_config, clip_tokenizer, t5_encoder_config, t5_tokenizer

CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 40
T5_WIDTH = 96  # joint_attention_dim: the transformer reads T5's width
#: latent pixels per side: 8 x VAE factor 8 = 64x64 images
SAMPLE_SIZE = 8
NUM_LAYERS = 2
#: the largest latent side in patches: 16 x patch 2 x VAE factor 8 = 256 pixels
POS_EMBED_MAX_SIZE = 16


def build(folder: Path) -> None:
    """Write ``tiny:sd3`` into `folder` (a diffusers folder)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    tokenizer = clip_tokenizer(folder / "_tokenizer_src")
    # The real second tokenizer pads with "!" rather than the end-of-text token, as SDXL's.
    tokenizer_2 = clip_tokenizer(folder / "_tokenizer_2_src", pad_token="!")
    tokenizer_3 = t5_tokenizer(folder / "_tokenizer_3_src")
    pipeline = StableDiffusion3Pipeline(
        transformer=_transformer(),
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=_clip(tokenizer, CLIP_L_WIDTH, "quick_gelu"),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, CLIP_G_WIDTH, "gelu"),
        tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(t5_encoder_config(tokenizer_3, d_model=T5_WIDTH)),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(folder)
    for source in ("_tokenizer_src", "_tokenizer_2_src", "_tokenizer_3_src"):
        shutil.rmtree(folder / source, ignore_errors=True)


def _clip(tokenizer: Any, width: int, activation: str) -> Any:
    from transformers import CLIPTextModelWithProjection

    config = clip_text_config(tokenizer, hidden_size=width, projection_dim=width, hidden_act=activation)
    return CLIPTextModelWithProjection(config)


def _transformer() -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=NUM_LAYERS,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=32,  # = heads x head dim, as in the real ones (38 x 64 = 2432 for Large)
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,  # both pooled CLIP outputs, concatenated
        pos_embed_max_size=POS_EMBED_MAX_SIZE,
        # SD3.5 Large's shape: query-key RMS norm, no dual attention (3.5 Medium's MMDiT-X), so that
        # tiny:sd3 gets Large's defaults, the family's (StableDiffusion3.pipeline_defaults).
        qk_norm="rms_norm",
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),  # four blocks: a VAE factor of 8, as SD3's
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=SAMPLE_SIZE * 8,
        # The SD3 VAE's latent statistics, and no (post-)quantisation convolutions, as the real one.
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The scheduler configuration of the real SD3 and SD3.5 checkpoints.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
