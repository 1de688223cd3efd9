"""Fault injection: an interrupt or a failure at each stage leaves t2i usable and exact.

Stages: plugin loading (tests/test_plugin_precedence.py), the tiny build and the cache
(tests/test_atomic.py), model loading, conditioning, denoising, decoding, saving
(tests/test_atomic.py), and corrupt files on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import t2i_core.engine.loading as engine_module
from t2i_core import GenerationRequest, ModelNotFoundError, T2IError, load
from t2i_core.cli import main

REQUEST = GenerationRequest(prompt="a harbour at night", seed=4, num_inference_steps=3, negative_prompt="fog")


@pytest.fixture(scope="module")
def expected() -> bytes:
    return load("tiny:sd15", device="cpu", cache=False).generate(REQUEST).images[0].tobytes()


def test_an_interrupted_load_caches_nothing_and_the_next_load_works(
    monkeypatch: pytest.MonkeyPatch, expected: bytes
) -> None:
    engine_module.clear_cache()
    real = engine_module._load_pipeline

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module, "_load_pipeline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load("tiny:sd15", device="cpu")
    assert not engine_module._cache
    monkeypatch.setattr(engine_module, "_load_pipeline", real)
    assert load("tiny:sd15", device="cpu").generate(REQUEST).images[0].tobytes() == expected


@pytest.mark.parametrize("stage", ["conditioning", "denoising", "decoding"])
def test_an_interrupt_during_generation_leaves_the_engine_exact(
    stage: str, monkeypatch: pytest.MonkeyPatch, expected: bytes
) -> None:
    engine = load("tiny:sd15", device="cpu", cache=False)
    pipeline = engine.pipeline
    targets = {"conditioning": pipeline.text_encoder, "denoising": pipeline.unet, "decoding": pipeline.vae.decoder}
    module = targets[stage]
    calls = {"n": 0}
    real_forward = module.forward

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2 or stage != "denoising":
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(REQUEST)
    monkeypatch.setattr(module, "forward", real_forward)
    # The engine's lock was released and its scheduler state is rebuilt by the next call.
    assert engine.generate(REQUEST).images[0].tobytes() == expected


def test_an_interrupt_in_the_progress_callback_leaves_the_engine_exact(expected: bytes) -> None:
    engine = load("tiny:sd15", device="cpu", cache=False)

    def progress(step: int, total: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(REQUEST, progress=progress)
    assert engine.generate(REQUEST).images[0].tobytes() == expected


@pytest.mark.parametrize(
    ("damage", "expected_text"),
    [
        ("truncate unet weights", "cannot be loaded"),
        ("empty text encoder config", "cannot be loaded"),
        ("delete vae folder", "component folder vae/ is missing"),
        ("garbage scheduler config", "cannot be loaded"),
    ],
)
def test_corrupt_checkpoint_files_are_one_line_errors(
    damage: str, expected_text: str, sd15_folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(sd15_folder, folder)
    if damage == "truncate unet weights":
        weights = next((folder / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "empty text encoder config":
        (folder / "text_encoder" / "config.json").write_text("")
    elif damage == "delete vae folder":
        shutil.rmtree(folder / "vae")
    else:
        (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(T2IError) as caught:
        load(str(folder), device="cpu", cache=False)
    assert isinstance(caught.value, ModelNotFoundError) and expected_text in str(caught.value)
    capsys.readouterr()
    assert main(["generate", "x", "--model", str(folder), "--device", "cpu", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("t2i: error: model="), err
    assert not (tmp_path / "o.png").exists()
