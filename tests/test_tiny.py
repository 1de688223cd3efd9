"""``t2i_core.tiny``: offline tokenizers and configs for tiny checkpoints, and builds without side effects."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import t2i_core.tiny
from t2i_core.tiny import ensure_built, qwen3_config, qwen_tokenizer, seeded, t5_encoder_config, t5_tokenizer

PROMPT = "A cat sat on the mat, 猫"


def test_the_package_imports_nothing_heavy() -> None:
    code = (
        "import sys, t2i_core.tiny; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'tokenizers'}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"


def test_every_public_name_is_exported() -> None:
    for name in t2i_core.tiny.__all__:
        assert getattr(t2i_core.tiny, name) is not None
    assert {"TINY_PREFIX", "CACHE_ENV", "cache_dir", "ensure_built", "clip_tokenizer", "clip_text_config"} <= set(
        t2i_core.tiny.__all__
    )


# --- T5 ---------------------------------------------------------------------------------------


def test_t5_tokenizer_round_trips_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer, T5TokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = t5_tokenizer(tmp_path / "t5", vocab_size=600, model_max_length=300)
    for loader in (T5TokenizerFast, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path / "t5")
        assert isinstance(loaded, T5TokenizerFast)
        assert loaded.get_vocab() == built.get_vocab()
        assert loaded(PROMPT).input_ids == built(PROMPT).input_ids
        assert loaded.model_max_length == 300
    assert len(built) == 600


def test_t5_tokenizer_has_t5s_special_token_layout(tmp_path: Path) -> None:
    tokenizer = t5_tokenizer(tmp_path)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1  # the sentinels last, as in T5
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == len(tokenizer) - 100
    encoded = tokenizer(PROMPT, padding="max_length", max_length=24)
    ids = encoded.input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    end = ids.index(1)
    assert tokens[0].startswith("▁") and tokens[end - 1] == "<unk>"  # the word-start mark; 猫 is unknown
    assert ids[end + 1 :] == [0] * (24 - end - 1)  # "</s>" once, then padding
    assert encoded.attention_mask == [1] * (end + 1) + [0] * (24 - end - 1)
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "A cat sat on the mat,"


def test_t5_tokenizer_is_deterministic(tmp_path: Path) -> None:
    first = t5_tokenizer(tmp_path / "a")
    second = t5_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first(PROMPT).input_ids == second(PROMPT).input_ids


def test_t5_tokenizer_refuses_a_vocabulary_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least 198"):
        t5_tokenizer(tmp_path, vocab_size=100)


def test_a_tiny_t5_encoder_reads_the_tokenizers_ids(tmp_path: Path) -> None:
    from transformers import T5EncoderModel

    tokenizer = t5_tokenizer(tmp_path)
    config = t5_encoder_config(tokenizer, num_layers=1)
    assert config.vocab_size == len(tokenizer) and config.num_layers == 1
    with seeded(0):
        encoder = T5EncoderModel(config).eval()
    ids = tokenizer([PROMPT, "a dog"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert hidden.shape == (2, 16, config.d_model)
    assert torch.isfinite(hidden).all()


# --- Qwen -------------------------------------------------------------------------------------


def test_qwen_tokenizer_round_trips_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = qwen_tokenizer(tmp_path / "qwen", vocab_size=700)
    for loader in (Qwen2TokenizerFast, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path / "qwen")
        assert isinstance(loaded, Qwen2TokenizerFast)
        assert loaded.get_vocab() == built.get_vocab()
        assert loaded(PROMPT).input_ids == built(PROMPT).input_ids
        assert loaded.chat_template == built.chat_template
    assert len(built) == 700


def test_qwen_tokenizer_renders_the_chat_as_zimage_asks(tmp_path: Path) -> None:
    tokenizer = qwen_tokenizer(tmp_path)
    messages = [{"role": "user", "content": PROMPT}]
    # The call diffusers' ZImagePipeline._encode_prompt makes.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert without == text + "<think>\n\n</think>\n\n"
    encoded = tokenizer([text], padding="max_length", max_length=64, truncation=True)
    ids = encoded.input_ids[0]
    start, end, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token) == (pad, end, None)
    assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 1
    length = sum(encoded.attention_mask[0])
    assert ids[length:] == [pad] * (64 - length)  # padded on the right with <|endoftext|>
    assert tokenizer.decode(ids[:length]) == text  # byte-level: every character survives


def test_qwen_tokenizer_is_deterministic(tmp_path: Path) -> None:
    qwen_tokenizer(tmp_path / "a")
    qwen_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_a_tiny_qwen3_model_reads_the_tokenizers_ids(tmp_path: Path) -> None:
    from transformers import Qwen3Model

    tokenizer = qwen_tokenizer(tmp_path)
    config = qwen3_config(tokenizer)
    assert config.vocab_size == len(tokenizer)
    with seeded(0):
        model = Qwen3Model(config).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    ids = tokenizer([text], padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask.bool(), output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 48, config.hidden_size)  # what ZImagePipeline reads
    assert torch.isfinite(out.hidden_states[-2]).all()


# --- builds without process-wide side effects -------------------------------------------------


def _demo_build(folder: Path) -> None:
    (folder / "weights").write_bytes(torch.randn(8).numpy().tobytes())
    random.random()  # a builder may use Python's generator too


def test_a_build_restores_every_random_state_and_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    reseeded: list[Any] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    transformers_logging.disable_progress_bar()  # the two libraries set differently: each comes back as it was
    diffusers_logging.enable_progress_bar()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        torch.manual_seed(1234)
        random.seed(1234)
        reseeded.clear()
        expected_torch, expected_python = torch.rand(3), random.random()
        torch.manual_seed(1234)
        random.seed(1234)
        reseeded.clear()
        ensure_built("demo", 1, _demo_build)
        assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_python
        assert reseeded == []  # no CUDA generator of the process is reseeded
        assert diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        transformers_logging.enable_progress_bar()
    # and the build itself saw torch's CPU generator seeded with 0
    with seeded(0):
        expected = torch.randn(8).numpy().tobytes()
    assert (tmp_path / "tiny" / "demo-v1" / "weights").read_bytes() == expected


def _staging_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name a build of this process gives its staging folder."""
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "probe"))
    seen: list[str] = []

    def build(folder: Path) -> None:
        seen.append(folder.name)
        _demo_build(folder)

    ensure_built("probe", 1, build)
    return seen[0]


def test_leftovers_of_builders_that_are_gone_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = _staging_name(tmp_path, monkeypatch)
    parts = re.fullmatch(r"\.probe-build-([0-9a-f]{8})-(\d+)-([0-9a-f]{8})", own)
    assert parts is not None, own
    host, pid, suffix = parts.groups()
    assert int(pid) == os.getpid()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = gone.stdout.strip()
    tiny = tmp_path / "tiny"
    leftovers = {
        f".other-build-{host}-{dead}-{suffix}": False,  # its builder is gone: removed, whatever the name
        f".demo-build-{host}-{pid}-{suffix}": True,  # this process is building it
        f".demo-build-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}-{suffix}": True,  # another machine's
    }
    for name in leftovers:
        (tiny / name).mkdir(parents=True)
        (tiny / name / "weights").write_bytes(b"x")
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    ensure_built("demo", 1, _demo_build)
    assert sorted(os.listdir(tiny)) == sorted([name for name, kept in leftovers.items() if kept] + ["demo-v1"])
