"""Offline tokenizers for tiny checkpoints: CLIP (byte-level BPE), T5 (Unigram), Qwen (byte-level BPE).

Each vocabulary is made in code, deterministically, so a tiny checkpoint needs no hub. Each
builder writes the tokenizer's files into `folder` and returns the `transformers` tokenizer,
ready to hand to a pipeline (whose ``save_pretrained`` writes its own copy).
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["clip_tokenizer", "qwen_tokenizer", "t5_tokenizer"]


def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values (as in GPT-2 / CLIP / Qwen)."""
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


# --- T5 ---------------------------------------------------------------------------------------

#: T5's fixed ids: ``<pad>`` (also the decoder's start), ``</s>`` (appended to every text), ``<unk>``.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_METASPACE = "▁"  # SentencePiece's word-start mark


def t5_tokenizer(folder: Path, *, vocab_size: int = 1000, model_max_length: int = 512, extra_ids: int = 100) -> Any:
    """Build a T5 tokenizer without the network, saved in `folder` as a ``T5TokenizerFast``.

    Laid out as T5's: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then SentencePiece pieces
    (``▁`` marks a word start; every printable ASCII character, then ever longer lower-case
    pieces up to `vocab_size`), and the `extra_ids` sentinels last, ``<extra_id_0>`` highest.
    Text is split as SentencePiece does (Metaspace), characters outside the vocabulary become
    ``<unk>``, and ``</s>`` ends every encoded text. `vocab_size` counts every token, sentinels
    included. ``T5TokenizerFast.from_pretrained(folder)`` and ``AutoTokenizer`` load it offline.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    characters = [character for character in string.printable if not character.isspace()]
    smallest = len(T5_SPECIALS) + 1 + len(characters) + extra_ids
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be at least {smallest} for {extra_ids} extra ids, not {vocab_size}")
    sentinels = [f"<extra_id_{index}>" for index in range(extra_ids)]
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in T5_SPECIALS]
    pieces.append((_METASPACE, -2.0))
    pieces += [(character, -10.0) for character in characters]
    # Longer pieces score better than the characters they join, so the longest known piece wins.
    longer = itertools.islice(_t5_pieces(), vocab_size - len(pieces) - extra_ids)
    pieces += [(piece, -10.0 - rank / 100_000) for rank, piece in enumerate(longer)]
    pieces += [(sentinel, 0.0) for sentinel in reversed(sentinels)]

    backend = Tokenizer(Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    backend.add_special_tokens([AddedToken(token, special=True) for token in (*T5_SPECIALS, *sentinels)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=extra_ids,
        model_max_length=model_max_length,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _t5_pieces() -> Iterator[str]:
    """Word-start letters and digits, then lower-case pieces of growing length, with and without ``▁``."""
    yield from (_METASPACE + character for character in string.ascii_letters + string.digits)
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            piece = "".join(letters)
            yield piece
            yield _METASPACE + piece


# --- Qwen -------------------------------------------------------------------------------------

#: Qwen2 / Qwen3's special tokens, in their order: end of text (also padding), start and end of a turn.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen3's reasoning markers, added (not special) tokens as in the real vocabulary.
QWEN_THINK = ("<think>", "</think>")
_SPACE = "Ġ"  # byte-level BPE's stand-in for a space
# Qwen2's pre-tokenizer split: words with one leading non-letter, single digits, punctuation runs, spaces.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen3's chat template for what a text-to-image pipeline asks of it (ZImagePipeline:
#: one user turn, ``add_generation_prompt=True``): ``enable_thinking=False`` adds the empty
#: reasoning block, as the real template does.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def qwen_tokenizer(folder: Path, *, vocab_size: int = 1000, model_max_length: int = 512) -> Any:
    """Build a Qwen2/Qwen3 tokenizer without the network, saved in `folder` as a ``Qwen2TokenizerFast``.

    A byte-level BPE as Qwen's: the 256 byte symbols, then merges (a space and a letter, then ever
    longer lower-case pieces) up to `vocab_size` tokens in all, then ``<|endoftext|>`` (padding),
    ``<|im_start|>``, ``<|im_end|>`` (the end of a turn, so ``eos_token``) and ``<think>``,
    ``</think>``. No token is added around a text. Its chat template renders messages as Qwen3's
    does, enough for diffusers' ``ZImagePipeline``. Every text tokenizes (bytes at worst).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import Qwen2TokenizerFast

    symbols = _byte_symbols()
    added = (*QWEN_SPECIALS, *QWEN_THINK)
    if vocab_size < len(symbols) + len(added):
        raise ValueError(f"vocab_size must be at least {len(symbols) + len(added)}, not {vocab_size}")
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges = list(itertools.islice(_qwen_merges(), vocab_size - len(symbols) - len(added)))
    for left, right in merges:
        vocab[left + right] = len(vocab)

    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIALS])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN_THINK])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=model_max_length,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _qwen_merges() -> Iterator[tuple[str, str]]:
    """A space and a letter, then lower-case pieces of growing length, with and without a leading space."""
    yield from ((_SPACE, letter) for letter in string.ascii_letters)
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            stem = "".join(letters)
            for letter in string.ascii_lowercase:
                yield stem, letter
                yield _SPACE + stem, letter
