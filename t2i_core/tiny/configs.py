"""Small model configurations that tiny checkpoints share: UNet, VAE, and text encoders sized to a tokenizer.

The UNet and VAE settings are keyword arguments for diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` (plain dicts, so this module imports nothing heavy); the text-encoder
configurations are `transformers` config objects. Overrides replace or add settings. A change
here changes every tiny checkpoint built from it: the families that use it bump their
``tiny_version`` then.
"""

from __future__ import annotations

from typing import Any

__all__ = ["clip_text_config", "qwen3_config", "t5_encoder_config", "tiny_unet_config", "tiny_vae_config"]


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """``UNet2DConditionModel`` settings of a two-level 32x32 UNet with cross-attention at the second level.

    Diffusers' own Stable Diffusion dummy components, as ``tiny:sd15`` uses them; SDXL and
    Kandinsky 2.2 override the attention and conditioning settings.
    """
    settings: dict[str, Any] = {
        "sample_size": 32,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    settings.update(overrides)
    return settings


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """``AutoencoderKL`` settings of a two-level VAE with 4 latent channels (a factor of 2 between image and latents)."""
    settings: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
    }
    settings.update(overrides)
    return settings


def clip_text_config(tokenizer: Any, **overrides: Any) -> Any:
    """A small `CLIPTextConfig` matching `tokenizer`'s vocabulary (see `clip_tokenizer`)."""
    from transformers import CLIPTextConfig

    settings: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "layer_norm_eps": 1e-5,
    }
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def t5_encoder_config(tokenizer: Any, **overrides: Any) -> Any:
    """A small `T5Config` for a ``T5EncoderModel`` reading `tokenizer`'s ids (see `t5_tokenizer`).

    T5 v1.1's design, as the T5-XXL encoder of PixArt, Flux and Stable Diffusion 3: gated GELU
    feed-forward layers and relative position buckets, so any sequence length works.
    """
    from transformers import T5Config

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    settings.update(overrides)
    return T5Config(**settings)


def qwen3_config(tokenizer: Any, **overrides: Any) -> Any:
    """A small `Qwen3Config` for a ``Qwen3Model`` reading `tokenizer`'s ids (see `qwen_tokenizer`).

    Grouped-query attention (4 heads sharing 2 key/value heads) as the real model has; 2 layers,
    because pipelines such as ``ZImagePipeline`` read the second-to-last hidden state.
    """
    from transformers import Qwen3Config

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": tokenizer.model_max_length,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
    }
    settings.update(overrides)
    return Qwen3Config(**settings)
