"""``tiny:z-image``: a random-weight Z-Image checkpoint, built offline.

Every component has Z-Image-Turbo's structure at toy width: a Qwen3 model reads the chat-templated
prompt (its second-to-last hidden state, as the real Qwen3-4B's), a single-stream transformer with
a context refiner, a noise refiner and two main layers, and a VAE with the FLUX.1 VAE's factor of 8,
16 latent channels, scaling and shift (so sizes are multiples of 16, as on the real model).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from t2i_core.tiny import qwen3_config, qwen_tokenizer

#: the image size the tiny checkpoint is made for (the VAE config's sample_size)
TINY_SIZE = 64
#: Z-Image-Turbo's scheduler config: a fixed shift of 3
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
#: Z-Image-Turbo's RoPE table lengths (caption positions, then latent rows and columns in patches),
#: kept at full size so that tiny:z-image has the real checkpoint's limits on prompt length and size
AXES_LENS = (1536, 512, 512)


def build(folder: Path) -> None:
    """Write a tiny ZImagePipeline into `folder`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = qwen_tokenizer(folder / "_tokenizer")
    text_encoder = Qwen3Model(qwen3_config(tokenizer))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=text_encoder.config.hidden_size,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],  # sums to the head width (32 / 2 heads), as Z-Image's (32, 48, 48) sums to 128
        axes_lens=list(AXES_LENS),
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),  # four blocks: a VAE factor of 8, as Z-Image's (FLUX.1's) VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=TINY_SIZE,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer", ignore_errors=True)
