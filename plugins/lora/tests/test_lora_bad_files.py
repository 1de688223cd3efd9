"""Weight files that would only make black images or mislead are refused by name (red team findings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import tiny_folder
from t2i_lora import tiny

from t2i_core import Embedding, GenerationRequest, InvalidRequestError, Lora, load


@pytest.fixture(scope="module")
def engine() -> Any:
    return load("tiny:sd15", device="cpu")


def _poisoned(source: Path, target: Path, key_part: str) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    key = next(key for key in sorted(tensors) if key_part in key)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(target))
    return target


def test_nan_weights_are_refused_naming_the_field_and_the_tensor(tmp_path: Path, engine: Any) -> None:
    folder = tiny_folder("sd15")
    lora = tiny.lora_file(folder, tmp_path / "good.safetensors", seed=1)
    bad_lora = _poisoned(lora, tmp_path / "nan-lora.safetensors", "lora")
    with pytest.raises(
        InvalidRequestError, match=r"loras\[0\].source=.*nan-lora.safetensors: 1 of \d+ tensors hold NaN"
    ):
        engine.resolve(GenerationRequest(prompt="a cat", loras=(Lora(str(bad_lora)),)))
    embedding = tiny.embedding_file(folder, tmp_path / "neg.safetensors", token="<neg>", seed=6)
    bad_embedding = _poisoned(embedding, tmp_path / "nan-embedding.safetensors", "")
    with pytest.raises(InvalidRequestError, match=r"embeddings\[0\].source=.*an embedding with finite weights"):
        engine.resolve(GenerationRequest(prompt="a <neg> cat", embeddings=(Embedding(str(bad_embedding)),)))
    # The good file of the same shapes goes in.
    engine.resolve(GenerationRequest(prompt="a cat", loras=(Lora(str(lora)),)))


def test_broken_links_are_named_as_such(tmp_path: Path, engine: Any) -> None:
    loop = tmp_path / "loop.safetensors"
    other = tmp_path / "other.safetensors"
    loop.symlink_to(other)
    other.symlink_to(loop)
    with pytest.raises(InvalidRequestError, match="is a symbolic link loop"):
        engine.resolve(GenerationRequest(prompt="a cat", loras=(Lora(str(loop)),)))
    dangling = tmp_path / "style.safetensors"
    dangling.symlink_to(tmp_path / "moved-away.safetensors")
    with pytest.raises(
        InvalidRequestError, match=r"is a symbolic link to .*moved-away.safetensors, which does not exist"
    ):
        engine.resolve(GenerationRequest(prompt="a cat", loras=(Lora(str(dangling)),)))
