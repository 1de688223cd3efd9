"""Helpers for ``tiny:<family>`` checkpoints: the cache folder, atomic verified builds, offline tokenizers, small configs.

Providers build their tiny checkpoint with these so that every family caches the same way and
none needs the hub: `ensure_built` (in `t2i_core.tiny.cache`), the tokenizers of
`t2i_core.tiny.tokenizers` and the model configurations of `t2i_core.tiny.configs`.

The names load on first use (PEP 562): a plugin that imports `TINY_PREFIX` at the top of its
module does not pay for the tokenizers and configs, which only a build needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "CACHE_ENV": "cache",
    "MANIFEST": "cache",
    "STALE_SECONDS": "cache",
    "TINY_PREFIX": "cache",
    "cache_dir": "cache",
    "ensure_built": "cache",
    "seeded": "cache",
    "clip_text_config": "configs",
    "qwen3_config": "configs",
    "t5_encoder_config": "configs",
    "tiny_unet_config": "configs",
    "tiny_vae_config": "configs",
    "clip_tokenizer": "tokenizers",
    "qwen_tokenizer": "tokenizers",
    "t5_tokenizer": "tokenizers",
}
_SUBMODULES = frozenset(_EXPORTS.values())


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``t2i_core.tiny.cache`` before anything imported it
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 't2i_core.tiny' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .cache import CACHE_ENV, MANIFEST, STALE_SECONDS, TINY_PREFIX, cache_dir, ensure_built, seeded
    from .configs import clip_text_config, qwen3_config, t5_encoder_config, tiny_unet_config, tiny_vae_config
    from .tokenizers import clip_tokenizer, qwen_tokenizer, t5_tokenizer
