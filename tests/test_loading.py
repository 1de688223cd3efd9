"""load(): resolving models and families, devices, accelerators, the tiny and engine caches, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import t2i_core
from t2i_core import (
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    ModelNotFoundError,
    UndetectedFamilyError,
    UnknownAcceleratorError,
    UnknownFamilyError,
    load,
)
from t2i_core.engine.sources import resolve_model as _resolve_model
from t2i_core.testing import assert_images_close
from t2i_core.tiny import ensure_built


def test_unknown_family_lists_known_ones() -> None:
    with pytest.raises(UnknownFamilyError) as caught:
        load("tiny:sd15", family="sd99", device="cpu")
    assert "family='sd99'" in str(caught.value) and "sd15" in str(caught.value)


def test_unknown_tiny_family() -> None:
    with pytest.raises(UnknownFamilyError, match="'nope'.*sd15"):
        load("tiny:nope", device="cpu")


def test_family_must_match_tiny_name() -> None:
    other = next((name for name in t2i_core.get_registry().providers if name != "sd15"), "zzz")
    with pytest.raises((InvalidRequestError, UnknownFamilyError)):
        load("tiny:sd15", family=other, device="cpu")


def test_unknown_accelerator_lists_known_ones() -> None:
    with pytest.raises(UnknownAcceleratorError) as caught:
        load("tiny:sd15", device="cpu", accelerators=["warp-speed"])
    assert "'warp-speed'" in str(caught.value) and "fp16" in str(caught.value)


def test_conflicting_dtypes_are_refused() -> None:
    with pytest.raises(IncompatibleAcceleratorsError, match="fp16.*bf16|bf16.*fp16"):
        load("tiny:sd15", device="cpu", accelerators=["fp16", "bf16"])


def test_missing_local_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as caught:
        load(str(missing), device="cpu")
    assert str(missing) in str(caught.value) and "does not exist" in str(caught.value)


def test_relative_missing_folder() -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load("./models/sd15-finetune", device="cpu")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    # A .safetensors file is taken as a single-file checkpoint (docs/single-file.md): an empty one is unreadable.
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"is not a readable \.safetensors file"):
        load(str(path), device="cpu")
    other = tmp_path / "model.txt"
    other.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load(str(other), device="cpu")


def test_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load(str(tmp_path), device="cpu")


def test_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load("someone/some-model-that-is-not-cached", device="cpu")
    assert "HF_HUB_OFFLINE=1" in str(caught.value)
    assert "someone/some-model-that-is-not-cached" in str(caught.value)


def test_alias_offline_is_a_clear_error() -> None:
    # The alias names the family, so no model_index.json is read: the failure is at load time.
    with pytest.raises(ModelNotFoundError) as caught:
        load("sd15", device="cpu")
    assert "model='sd15'" in str(caught.value)


def test_unrecognised_checkpoint_suggests_family(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FancyNewPipeline"}))
    with pytest.raises(UndetectedFamilyError) as caught:
        load(str(tmp_path), device="cpu")
    message = str(caught.value)
    assert "FancyNewPipeline" in message and "sd15" in message and "--family" in message


def test_detection_reads_only_model_index(sd15_folder: str, tmp_path: Path) -> None:
    # A folder with nothing but model_index.json is detected: detection never opens weights.
    shutil.copy(Path(sd15_folder) / "model_index.json", tmp_path / "model_index.json")
    resolved = _resolve_model(t2i_core.get_registry(), str(tmp_path), None)
    assert resolved.family == "sd15" and resolved.is_local


def test_local_folder_is_detected_and_loaded(sd15_folder: str) -> None:
    engine = load(sd15_folder, device="cpu")
    assert engine.family == "sd15" and engine.source == sd15_folder


@pytest.mark.parametrize("device", ["gpu", "cuda:x", 3])
def test_bad_device(device: Any) -> None:
    with pytest.raises(InvalidRequestError, match="device"):
        load("tiny:sd15", device=device)


def test_cuda_device_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidRequestError, match="no CUDA device"):
        load("tiny:sd15", device="cuda")


def test_accelerators_are_ordered_by_phase() -> None:
    engine = load("tiny:sd15", device="cpu", accelerators=["sdpa", "fp32"], cache=False)
    assert engine.accelerators == ("fp32", "sdpa")


def test_auto_preset_is_the_default_and_is_fp32_on_cpu() -> None:
    engine = load("tiny:sd15", device="cpu")
    assert engine.accelerators == ("fp32",)


def test_tiny_checkpoint_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "model_index.json").write_text("{}")

    first = ensure_built("demo", 1, build)
    second = ensure_built("demo", 1, build)
    assert first == second == tmp_path / "tiny" / "demo-v1"
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["demo-v1"]  # no staging folders left


def test_failed_tiny_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))

    def build(folder: Path) -> None:
        (folder / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ensure_built("broken", 1, build)
    assert list((tmp_path / "tiny").iterdir()) == []


def test_engine_cache_shares_weights_not_schedulers() -> None:
    first = load("tiny:sd15", device="cpu")
    second = load("tiny:sd15", device="cpu")
    assert first is not second
    assert first.pipeline.unet is second.pipeline.unet
    assert first.pipeline.scheduler is not second.pipeline.scheduler
    assert first.pipeline.tokenizer is not second.pipeline.tokenizer  # padding state changes per call
    assert first.pipeline.vae is second.pipeline.vae and first.pipeline.text_encoder is second.pipeline.text_encoder
    fresh = load("tiny:sd15", device="cpu", cache=False)
    assert fresh.pipeline.unet is not first.pipeline.unet


def test_clear_cache_drops_weights() -> None:
    first = load("tiny:sd15", device="cpu")
    t2i_core.clear_cache()
    second = load("tiny:sd15", device="cpu")
    assert first.pipeline.unet is not second.pipeline.unet


def test_clear_cache_of_engines_drops_only_their_weights() -> None:
    sd15 = load("tiny:sd15", device="cpu")
    sdxl = load("tiny:sdxl", device="cpu")
    t2i_core.clear_cache(sd15)
    assert load("tiny:sd15", device="cpu").pipeline.unet is not sd15.pipeline.unet  # loaded again
    assert load("tiny:sdxl", device="cpu").pipeline.unet is sdxl.pipeline.unet  # still cached


def test_pickle_weights_need_consent(sd15_folder: str, tmp_path: Path) -> None:
    """Safetensors only by default; .bin (pickle) weights load with allow_pickle=True."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "pickled"
    shutil.copytree(sd15_folder, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert not list((folder / "unet").glob("*.safetensors"))
    with pytest.raises(ModelNotFoundError) as caught:
        load(str(folder), device="cpu", cache=False)
    assert "allow_pickle=True" in str(caught.value) and str(folder) in str(caught.value)
    engine = load(str(folder), device="cpu", cache=False, allow_pickle=True)
    reference = load(sd15_folder, device="cpu", cache=False)
    # The very same weights ...
    ours, theirs = engine.pipeline.unet.state_dict(), reference.pipeline.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    # ... but not aligned alike in memory: both files are memory-mapped, a .bin file stores its
    # tensors 64-byte aligned and a safetensors file does not, and float32 matmuls may round
    # differently for differently aligned operands on some CPUs (as Kandinsky 2.2's do on an AMD
    # EPYC). So the images agree to one level, not bit for bit.
    request = t2i_core.GenerationRequest(prompt="a cat", seed=2, num_inference_steps=2)
    assert_images_close(
        engine.generate(request).images,
        reference.generate(request).images,
        max_levels=1,
        why="the same weights at other memory addresses",
    )


def test_forcing_another_family_onto_a_checkpoint_is_refused(sd15_folder: str) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load(sd15_folder, family="sdxl", device="cpu", cache=False)
    message = str(caught.value)
    assert "StableDiffusionPipeline" in message and "'sdxl'" in message and "--family" in message


@pytest.mark.parametrize("value", [5, 2.5])
def test_accelerators_must_be_names(value: Any) -> None:
    with pytest.raises(InvalidRequestError, match="accelerators"):
        load("tiny:sd15", device="cpu", accelerators=value)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kandinsky22", "flux", "sd3", "z-image"])
def test_cached_engines_in_threads_make_the_serial_images(family: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    engines = [load(f"tiny:{family}", device="cpu") for _ in range(3)]
    prompts = ["a cat", "a very long and detailed prompt about a lighthouse at dusk " * 3, "x"]
    requests = [t2i_core.GenerationRequest(prompt=p, seed=i, num_inference_steps=2) for i, p in enumerate(prompts)]
    serial = [engines[0].generate(r).images[0].tobytes() for r in requests]

    def work(index: int) -> list[bytes]:
        engine = engines[index]
        return [engine.generate(requests[(index + k) % 3]).images[0].tobytes() for k in range(3)]

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(work, range(3)))
    for index, images in enumerate(results):
        for k, image in enumerate(images):
            assert image == serial[(index + k) % 3], f"engine {index}, request {(index + k) % 3} differs in a thread"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_corrupt_model_index(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "model_index.json").write_bytes(content)
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load(str(tmp_path), device="cpu")


def test_unusable_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    monkeypatch.setenv("T2I_CACHE", str(a_file))
    with pytest.raises(InvalidRequestError, match=r"\$T2I_CACHE=.*a folder t2i can create and write"):
        ensure_built("demo", 1, lambda folder: None)


def test_more_steps_than_the_scheduler_was_trained_with(sd15_engine: Any) -> None:
    request = t2i_core.GenerationRequest(prompt="a", num_inference_steps=1001, scheduler="ddim")
    with pytest.raises(InvalidRequestError, match=r"num_inference_steps=1001.*\[1, 999\]"):
        sd15_engine.generate(request)


def test_path_objects_name_local_folders(sd15_folder: str) -> None:
    assert load(Path(sd15_folder), device="cpu").source == sd15_folder


def test_out_of_memory_is_a_generation_error(sd15_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(sd15_engine.provider, "run", exhausted)
    with pytest.raises(t2i_core.GenerationError, match="out of memory on cpu making 2 image\\(s\\) of 64x64"):
        sd15_engine.generate(t2i_core.GenerationRequest(prompt="a", num_images=2, num_inference_steps=1))
