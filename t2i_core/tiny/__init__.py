"""Helpers for ``tiny:<family>`` checkpoints: the cache folder, atomic verified builds, offline tokenizers, small configs.

Providers build their tiny checkpoint with these so that every family caches the same way and
none needs the hub: `ensure_built` (in `t2i_core.tiny.cache`), the tokenizers of
`t2i_core.tiny.tokenizers` and the model configurations of `t2i_core.tiny.configs`.
"""

from __future__ import annotations

from .cache import CACHE_ENV, MANIFEST, STALE_SECONDS, TINY_PREFIX, cache_dir, ensure_built, seeded
from .configs import clip_text_config, qwen3_config, t5_encoder_config, tiny_unet_config, tiny_vae_config
from .tokenizers import clip_tokenizer, qwen_tokenizer, t5_tokenizer

__all__ = [
    "CACHE_ENV",
    "MANIFEST",
    "STALE_SECONDS",
    "TINY_PREFIX",
    "cache_dir",
    "clip_text_config",
    "clip_tokenizer",
    "ensure_built",
    "qwen3_config",
    "qwen_tokenizer",
    "seeded",
    "t5_encoder_config",
    "t5_tokenizer",
    "tiny_unet_config",
    "tiny_vae_config",
]
