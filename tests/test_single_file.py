"""Single-file checkpoints: ``load("model.safetensors")`` equals raw ``from_single_file``, offline by design.

The single files are the tiny checkpoints written in the original (LDM) layout by
`t2i_core.testing.ldm.write_single_file`; the reference is diffusers' ``<Pipeline>.from_single_file(file,
config=folder)`` for the same file, and the same call.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support import tiny_folder

from t2i_core import GenerationRequest, InvalidRequestError, ModelNotFoundError, load
from t2i_core.cli import main
from t2i_core.testing import assert_images_equal, cpu_generators
from t2i_core.testing.ldm import write_single_file

STEPS = 2
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module")
def single_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single")
    return {family: write_single_file(tiny_folder(family), root / f"{family}.safetensors") for family in PIPELINES}


def raw_single_file(family: str, file: Path, folder: str, seed: int = 5, **call: Any) -> list[Any]:
    import diffusers

    pipeline = getattr(diffusers, PIPELINES[family]).from_single_file(str(file), config=folder)
    pipeline.set_progress_bar_config(disable=True)
    call.setdefault("prompt", "a red fox")
    return list(pipeline(num_inference_steps=STEPS, generator=cpu_generators(seed, 1), **call).images)


@pytest.mark.parametrize("family", list(PIPELINES))
def test_a_single_file_matches_raw_from_single_file(single_files: dict[str, Path], family: str) -> None:
    folder = tiny_folder(family)
    engine = load(single_files[family], config=folder, device="cpu")
    assert engine.family == family
    result = engine.generate(
        GenerationRequest(prompt="a red fox", negative_prompt="fog", num_inference_steps=STEPS, seed=5)
    )
    assert_images_equal(result.images, raw_single_file(family, single_files[family], folder, negative_prompt="fog"))
    # The conversion to the original layout is lossless: every weight is the diffusers folder's.
    import torch

    folder_weights = load(f"tiny:{family}", device="cpu").pipeline
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(engine.pipeline, name, None), getattr(folder_weights, name, None)
        if theirs is None:
            continue
        expected = theirs.state_dict()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"


def test_config_may_be_a_tiny_name_and_the_cache_keys_on_it(single_files: dict[str, Path]) -> None:
    by_name = load(str(single_files["sd15"]), config="tiny:sd15", device="cpu")
    by_folder = load(str(single_files["sd15"]), config=tiny_folder("sd15"), device="cpu")
    assert by_name.pipeline.unet is by_folder.pipeline.unet  # tiny:sd15 is that folder: one load
    with pytest.raises(InvalidRequestError, match=r"config='tiny:sdxl'.*tiny:sd15"):
        load(str(single_files["sd15"]), config="tiny:sdxl", device="cpu")


def test_the_family_comes_from_the_tensor_names(tmp_path: Path, single_files: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelNotFoundError, match="no installed family recognises this single file's tensor names"):
        load(str(other), config="tiny:sd15", device="cpu")
    with pytest.raises(ModelNotFoundError, match="not a single-file sdxl checkpoint"):
        load(str(single_files["sd15"]), family="sdxl", config="tiny:sdxl", device="cpu")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(str(tmp_path / "missing.safetensors"), device="cpu")
    with pytest.raises(InvalidRequestError, match="config='tiny:sd15'.*None unless model is a single-file"):
        load("tiny:sd15", config="tiny:sd15", device="cpu")


def test_without_config_the_default_repository_comes_only_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_files: dict[str, Path]
) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("t2i tried to download although HF_HUB_OFFLINE=1")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as missing:
        load(str(single_files["sd15"]), device="cpu", cache=False)
    text = str(missing.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5, which is not in the local Hugging Face cache" in text
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in text and "config=" in text
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading them"):
        load(str(single_files["sd15"]), config="someone/configs", device="cpu", cache=False)
    # The default repository's configs in the cache (here the tiny ones, standing in for the real ones).
    snapshot = tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_folder("sd15"), snapshot, ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    engine = load(str(single_files["sd15"]), device="cpu", cache=False)
    request = GenerationRequest(prompt="a red fox", num_inference_steps=STEPS, seed=5)
    assert_images_equal(
        engine.generate(request).images, raw_single_file("sd15", single_files["sd15"], tiny_folder("sd15"))
    )


def test_pickled_checkpoints_need_allow_pickle(tmp_path: Path, single_files: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single_files["sd15"]))}, str(ckpt))
    with pytest.raises(ModelNotFoundError, match=r"it is a pickle \(.ckpt\).*allow_pickle=True"):
        load(str(ckpt), config="tiny:sd15", device="cpu")
    engine = load(str(ckpt), config="tiny:sd15", device="cpu", allow_pickle=True)
    request = GenerationRequest(prompt="a red fox", num_inference_steps=STEPS, seed=5)
    assert_images_equal(engine.generate(request).images, raw_single_file("sd15", ckpt, tiny_folder("sd15")))


def test_cli_single_file_with_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], single_files: dict[str, Path]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    out = tmp_path / "fox.png"
    args = ["generate", "a red fox", "--model", str(single_files["sdxl"]), "--config", "tiny:sdxl",
            "--steps", str(STEPS), "--seed", "5", "--device", "cpu", "-o", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    with Image.open(out) as image:
        saved = image.convert("RGB")
    assert_images_equal([saved], raw_single_file("sdxl", single_files["sdxl"], tiny_folder("sdxl")))
    capsys.readouterr()  # raw diffusers' own loading bars (t2i quiets them only while its CLI runs)
    code = main(
        ["generate", "a", "--model", str(single_files["sdxl"]), "--device", "cpu", "-o", str(tmp_path / "x.png")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "hf download stabilityai/stable-diffusion-xl-base-1.0" in err


def test_a_single_file_replaced_on_disk_is_loaded_again(tmp_path: Path, single_files: dict[str, Path]) -> None:
    """Red team: the weights cache was keyed by path, so a checkpoint overwritten on disk gave stale images."""
    import torch
    from safetensors.torch import load_file, save_file

    file = tmp_path / "model.safetensors"
    shutil.copyfile(single_files["sd15"], file)
    request = GenerationRequest(prompt="a red fox", num_inference_steps=STEPS, seed=5)
    before = load(file, config="tiny:sd15", device="cpu")
    assert load(file, config="tiny:sd15", device="cpu").pipeline.unet is before.pipeline.unet  # unchanged: cached
    weights = load_file(str(file))
    name = "model.diffusion_model.out.2.weight"  # the UNet's last convolution, in the LDM layout
    weights[name] = weights[name] + torch.full_like(weights[name], 0.05)
    save_file(weights, str(file))  # a new version of the checkpoint, at the same path
    after = load(file, config="tiny:sd15", device="cpu")
    assert after.pipeline.unet is not before.pipeline.unet
    assert_images_equal(after.generate(request).images, raw_single_file("sd15", file, tiny_folder("sd15")))
    with pytest.raises(AssertionError):
        assert_images_equal(after.generate(request).images, before.generate(request).images)
