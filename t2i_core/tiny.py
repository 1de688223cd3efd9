"""Helpers for ``tiny:<family>`` checkpoints: the cache folder, atomic builds, an offline CLIP tokenizer.

Providers build their tiny checkpoint with these so that every family caches the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError

TINY_PREFIX = "tiny:"
CACHE_ENV = "T2I_CACHE"


def cache_dir() -> Path:
    """The t2i cache folder: ``$T2I_CACHE``, else ``$XDG_CACHE_HOME/t2i``, else ``~/.cache/t2i``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "t2i"


def ensure_built(name: str, version: int, build: Callable[[Path], None]) -> Path:
    """Return the cached folder ``tiny/<name>-v<version>``, building it first if absent.

    The build writes into a temporary sibling folder that is renamed into place, so a crash or
    two processes building at once never leave a half-written checkpoint behind.
    """
    target = cache_dir() / "tiny" / f"{name}-v{version}"
    if (target / ".complete").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError as exc:
        raise InvalidRequestError(
            f"${CACHE_ENV}", str(cache_dir()), f"a folder t2i can create and write ({exc.strerror or exc})"
        ) from None
    try:
        with _quiet(), _seeded(0):
            build(staging)
        (staging / ".complete").write_text("ok\n")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (the target exists and is not empty): use theirs.
            if not (target / ".complete").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()
            transformers_logging.enable_progress_bar()


def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values (as in GPT-2 / CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def clip_tokenizer(folder: Path, *, max_length: int = 77, pad_token: str = "<|endoftext|>") -> Any:
    """Build a CLIP tokenizer without the network: a byte-level vocabulary and no merges.

    Every text tokenizes (one token per byte), so prompts of any language work on tiny models.
    Returns the `transformers.CLIPTokenizer`; `folder` keeps its vocabulary files.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if pad_token not in vocab:
        vocab[pad_token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token=pad_token
    )


def clip_text_config(tokenizer: Any, **overrides: Any) -> Any:
    """A small `CLIPTextConfig` matching `tokenizer`'s vocabulary."""
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
