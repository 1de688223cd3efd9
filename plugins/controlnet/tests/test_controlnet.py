"""t2i-controlnet: controls equal diffusers' ControlNet pipelines bit for bit, reuse the engine, refuse bad input early."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from support import tiny_folder

from t2i_core import (
    Control,
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedFeatureError,
    hookimpl,
    load,
)
from t2i_core.testing import as_array, assert_images_equal, cpu_generators

STEPS = 2
PROMPT = "a chef in the kitchen"
TINY = "tiny:controlnet-sd15"


# -- helpers and fixtures --------------------------------------------------------------------


def noise_image(seed: int, width: int, height: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def shapes_image(width: int = 96, height: int = 80) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (20, 30, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 6, 60, 70), fill=(220, 180, 40))
    draw.rectangle((50, 20, 90, 50), fill=(30, 160, 220))
    return image


def raw(pipeline: Any, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    """Diffusers called by hand, as a user of the ControlNet pipeline would."""
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("prompt", PROMPT)
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


def run_pipelines(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the pipeline object each `engine.generate` runs."""
    seen: list[Any] = []
    provider = engine.provider
    original = type(provider).run

    def run(pipeline: Any, kwargs: dict[str, Any], progress: Any = None) -> Any:
        seen.append(pipeline)
        return original(provider, pipeline, kwargs, progress)

    monkeypatch.setattr(provider, "run", run)
    return seen


@pytest.fixture
def engine() -> Any:
    """A fresh engine (its own ControlNet state) over the cached tiny SD1.5 weights."""
    return load("tiny:sd15", device="cpu")


@pytest.fixture(scope="module")
def controlnet_folder() -> str:
    from t2i_controlnet import tiny_controlnet_folder

    return str(tiny_controlnet_folder("sd15"))


@pytest.fixture(scope="module")
def second_controlnet_folder(controlnet_folder: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another SD1.5 ControlNet in a local folder: the tiny one with a different conditioning embedding."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(controlnet_folder)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        weight = controlnet.controlnet_cond_embedding.conv_out.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 10.0)
    folder = tmp_path_factory.mktemp("controlnet") / "second"
    controlnet.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def raw_controlnet(controlnet_folder: str) -> Any:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_folder("sd15"), controlnet=ControlNetModel.from_pretrained(controlnet_folder)
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def raw_multi(controlnet_folder: str, second_controlnet_folder: str) -> Any:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnets = [ControlNetModel.from_pretrained(f) for f in (controlnet_folder, second_controlnet_folder)]
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(tiny_folder("sd15"), controlnet=controlnets)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# -- parity with diffusers (SD1.5) -----------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2])
def test_one_control_equals_the_controlnet_pipeline(engine: Any, raw_controlnet: Any, count: int) -> None:
    image = shapes_image()  # 96x80: sized to the request the way diffusers sizes it
    control = Control(image=image, model=TINY, scale=0.7, start=0.1, end=0.8)
    result = engine.generate(
        GenerationRequest(prompt=PROMPT, seed=21, num_images=count, num_inference_steps=STEPS, controls=(control,))
    )
    expected = raw(
        raw_controlnet,
        21,
        count,
        image=image,
        height=64,
        width=64,
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.1,
        control_guidance_end=0.8,
    )
    assert_images_equal(result.images, expected)


def test_two_controls_equal_multi_controlnet(
    engine: Any, raw_multi: Any, second_controlnet_folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import MultiControlNetModel

    first, second = shapes_image(), noise_image(3, 64, 64)
    path = tmp_path / "first.png"
    first.save(path)
    controls = (
        Control(image=path, model=TINY, scale=0.8),
        Control(image=second, model=second_controlnet_folder, scale=0.5, start=0.2, end=0.9),
    )
    ran = run_pipelines(engine, monkeypatch)
    result = engine.generate(
        GenerationRequest(prompt=PROMPT, negative_prompt="blurry", seed=4, num_inference_steps=STEPS, controls=controls)
    )
    expected = raw(
        raw_multi,
        4,
        negative_prompt="blurry",
        image=[first, second],
        height=64,
        width=64,
        controlnet_conditioning_scale=[0.8, 0.5],
        control_guidance_start=[0.0, 0.2],
        control_guidance_end=[1.0, 0.9],
    )
    assert_images_equal(result.images, expected)
    assert isinstance(ran[0].controlnet, MultiControlNetModel)


def test_guess_mode_equals_diffusers_guess_mode(engine: Any, raw_controlnet: Any) -> None:
    image = noise_image(5, 64, 64)
    request = GenerationRequest(
        prompt=PROMPT, seed=8, num_inference_steps=STEPS, controls=(Control(image=image, model=TINY, guess_mode=True),)
    )
    guessed = engine.generate(request)
    assert_images_equal(guessed.images, raw(raw_controlnet, 8, image=image, guess_mode=True))
    plain_mode = engine.generate(request.evolve(controls=(Control(image=image, model=TINY),)))
    assert not np.array_equal(as_array(guessed.images[0]), as_array(plain_mode.images[0]))


def test_canny_preprocessing_feeds_the_edge_map(engine: Any, raw_controlnet: Any) -> None:
    from PIL import Image
    from t2i_controlnet.canny import canny

    photo = shapes_image()
    request = GenerationRequest(
        prompt=PROMPT,
        seed=12,
        num_inference_steps=STEPS,
        controls=(Control(image=photo, model=TINY, preprocess="canny:50:150"),),
    )
    result = engine.generate(request)
    # Edges are found after sizing, at the output resolution.
    edges = canny(photo.resize((64, 64), resample=Image.Resampling.LANCZOS), 50, 150)
    assert_images_equal(result.images, raw(raw_controlnet, 12, image=edges))
    unprocessed = engine.generate(request.evolve(controls=(Control(image=photo, model=TINY),)))
    assert not np.array_equal(as_array(result.images[0]), as_array(unprocessed.images[0]))


def test_control_image_path_in_any_mode_is_read_as_rgb(engine: Any, raw_controlnet: Any, tmp_path: Path) -> None:
    from PIL import Image

    grey = shapes_image(64, 64).convert("L")
    path = tmp_path / "grey.png"
    grey.save(path)
    result = engine.generate(
        GenerationRequest(
            prompt=PROMPT, seed=6, num_inference_steps=STEPS, controls=(Control(image=str(path), model=TINY),)
        )
    )
    assert_images_equal(result.images, raw(raw_controlnet, 6, image=Image.open(path).convert("RGB")))


def test_request_scheduler_drives_the_controlnet_pipeline(engine: Any, controlnet_folder: str) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from t2i_core import schedulers

    image = noise_image(9, 64, 64)
    request = GenerationRequest(
        prompt=PROMPT,
        seed=2,
        num_inference_steps=STEPS,
        scheduler="euler",
        controls=(Control(image=image, model=TINY),),
    )
    euler = engine.generate(request)
    default = engine.generate(request.evolve(scheduler=None))
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_folder("sd15"), controlnet=ControlNetModel.from_pretrained(controlnet_folder)
    )
    pipeline.set_progress_bar_config(disable=True)
    default_scheduler = pipeline.scheduler
    pipeline.scheduler = schedulers.build("euler", default_scheduler.config)
    assert_images_equal(euler.images, raw(pipeline, 2, image=image))
    pipeline.scheduler = default_scheduler
    assert_images_equal(default.images, raw(pipeline, 2, image=image))


def test_scale_zero_gives_the_plain_image(engine: Any) -> None:
    request = GenerationRequest(prompt=PROMPT, seed=13, num_inference_steps=STEPS)
    plain = engine.generate(request)
    off = engine.generate(request.evolve(controls=(Control(image=noise_image(1, 64, 64), model=TINY, scale=0.0),)))
    on = engine.generate(request.evolve(controls=(Control(image=noise_image(1, 64, 64), model=TINY),)))
    assert_images_equal(off.images, plain.images)
    assert not np.array_equal(as_array(on.images[0]), as_array(plain.images[0]))


def test_what_the_control_image_shows_changes_the_result(engine: Any) -> None:
    request = GenerationRequest(prompt=PROMPT, seed=13, num_inference_steps=STEPS)
    one = engine.generate(request.evolve(controls=(Control(image=noise_image(1, 64, 64), model=TINY),)))
    other = engine.generate(request.evolve(controls=(Control(image=shapes_image(64, 64), model=TINY),)))
    assert np.abs(as_array(one.images[0]) - as_array(other.images[0])).max() > 8


# -- one engine, shared components -----------------------------------------------------------


def test_plain_after_controlled_reuses_components_and_is_bit_exact(
    engine: Any, raw_sd15: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = run_pipelines(engine, monkeypatch)
    request = GenerationRequest(prompt=PROMPT, seed=31, num_inference_steps=STEPS)
    engine.generate(request.evolve(controls=(Control(image=noise_image(2, 64, 64), model=TINY),)))
    plain = engine.generate(request)
    controlled_pipeline, plain_pipeline = ran
    assert plain_pipeline is engine.pipeline
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(controlled_pipeline, name) is getattr(engine.pipeline, name), name
    assert_images_equal(plain.images, raw(raw_sd15, 31))


def test_controlnets_and_their_pipelines_are_made_once_per_engine(
    engine: Any, second_controlnet_folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = run_pipelines(engine, monkeypatch)
    request = GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=1)
    image = noise_image(4, 64, 64)
    single = (Control(image=image, model=TINY),)
    pair = (Control(image=image, model=TINY), Control(image=image, model=second_controlnet_folder))
    for controls in (single, pair, single, pair):
        engine.generate(request.evolve(controls=controls))
    first_single, first_pair, again_single, again_pair = ran
    assert again_single is first_single
    assert again_pair is first_pair
    # The multi-ControlNet holds the very ControlNet the single-control pipeline uses.
    assert first_pair.controlnet.nets[0] is first_single.controlnet
    assert first_pair.unet is first_single.unet is engine.pipeline.unet
    other_engine = load("tiny:sd15", device="cpu")
    other_ran = run_pipelines(other_engine, monkeypatch)
    other_engine.generate(request.evolve(controls=single))
    assert other_ran[0] is not first_single  # state is per engine


def test_controlnet_takes_the_base_dtype_and_leaves_the_base_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    engine = load("tiny:sd15", device="cpu", accelerators=["fp16"], cache=False)
    ran = run_pipelines(engine, monkeypatch)
    request = GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=1)
    engine.generate(request.evolve(controls=(Control(image=noise_image(0, 64, 64), model=TINY),)))
    assert ran[0].controlnet.dtype == torch.float16
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(engine.pipeline, name).dtype == torch.float16, name


# -- refused before any work -----------------------------------------------------------------


def refusal(engine: Any, monkeypatch: pytest.MonkeyPatch, *controls: Control) -> InvalidRequestError:
    """The error `engine.generate` raises, checking that nothing was loaded or run first."""
    import diffusers

    def no_loading(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a ControlNet was loaded before the request was refused")

    monkeypatch.setattr(diffusers.ControlNetModel, "from_pretrained", no_loading)
    ran = run_pipelines(engine, monkeypatch)
    with pytest.raises((InvalidRequestError, ModelNotFoundError)) as caught:
        engine.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=1, controls=controls))
    assert ran == []
    return caught.value  # type: ignore[return-value]


def test_missing_image_is_refused_naming_the_field(
    engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.png"
    error = refusal(engine, monkeypatch, Control(image=missing, model=TINY))
    assert error.field == "controls[0].image"
    assert str(missing) in str(error) and "no such file" in str(error)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.png", b"not an image at all", "PIL cannot read it"),
        ("cut.png", None, "truncated"),
        ("folder", "dir", "not a file"),
    ],
)
def test_unreadable_image_is_refused(
    engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, content: Any, reason: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is None:
        noise_image(0, 64, 64).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    good = Control(image=noise_image(0, 64, 64), model=TINY)
    error = refusal(engine, monkeypatch, good, Control(image=path, model=TINY))
    assert error.field == "controls[1].image"
    assert reason in str(error) and "a PIL image or the path of an image file" in str(error)


@pytest.mark.parametrize(
    "preprocess", ["sobel", "canny:100", "canny:a:b", "canny:200:100", "canny:-1:5", "canny:1:2:3"]
)
def test_bad_preprocess_is_refused(engine: Any, monkeypatch: pytest.MonkeyPatch, preprocess: str) -> None:
    error = refusal(engine, monkeypatch, Control(image=noise_image(0, 8, 8), model=TINY, preprocess=preprocess))
    assert error.field == "controls[0].preprocess"
    assert error.value == preprocess and '"canny:LOW:HIGH"' in error.allowed


def test_model_sources_that_are_not_controlnets_are_refused(
    engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    image = noise_image(0, 8, 8)
    cases = {
        "tiny:controlnet-kandinsky22": "tiny:controlnet-sd15",
        "tiny:sd15": "tiny:controlnet-sd15",
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path): "has no config.json",
        tiny_folder("sd15"): "has no config.json",  # a whole pipeline, not a ControlNet
        str(Path(tiny_folder("sd15")) / "unet"): "UNet2DConditionModel",
    }
    for model, reason in cases.items():
        error = refusal(engine, monkeypatch, Control(image=image, model=model))
        assert error.field == "controls[0].model", model
        assert error.value == model and reason in str(error), str(error)


def test_unreachable_hub_controlnet_is_refused(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    error = refusal(engine, monkeypatch, Control(image=noise_image(0, 8, 8), model="nobody/no-such-controlnet"))
    assert isinstance(error, ModelNotFoundError)
    assert "nobody/no-such-controlnet" in str(error) and "controls[0].model" in str(error)
    assert "HF_HUB_OFFLINE" in str(error)


def sdxl_like_controlnet(folder: Path) -> str:
    """A ControlNet with SDXL's conditioning (time ids, wider text features) in the tiny SD1.5 shape."""
    from diffusers import ControlNetModel

    ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        conditioning_embedding_out_channels=(16, 32),
    ).save_pretrained(folder)
    return str(folder)


def test_controlnet_for_another_base_is_refused(engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from t2i_controlnet import IncompatibleControlNetError

    model = sdxl_like_controlnet(tmp_path / "sdxl-like")
    error = refusal(engine, monkeypatch, Control(image=noise_image(0, 8, 8), model=model))
    assert isinstance(error, IncompatibleControlNetError)
    assert error.field == "controls[0].model" and error.value == model
    assert "an SDXL ControlNet" in str(error) and "cross_attention_dim=64" in str(error)
    assert "this sd15 model (cross_attention_dim=32" in str(error)


def test_controlnet_with_other_depth_is_refused(engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from diffusers import ControlNetModel
    from t2i_controlnet import IncompatibleControlNetError

    base = dict(engine.pipeline.unet.config)
    folder = tmp_path / "deeper"
    ControlNetModel(
        block_out_channels=base["block_out_channels"],
        layers_per_block=base["layers_per_block"] + 1,
        down_block_types=base["down_block_types"],
        cross_attention_dim=base["cross_attention_dim"],
        attention_head_dim=base["attention_head_dim"],
        norm_num_groups=base["norm_num_groups"],
        conditioning_embedding_out_channels=(16, 32),
    ).save_pretrained(folder)
    error = refusal(engine, monkeypatch, Control(image=noise_image(0, 8, 8), model=str(folder)))
    assert isinstance(error, IncompatibleControlNetError)
    assert f"layers_per_block={base['layers_per_block'] + 1}" in str(error)


def test_tiny_sdxl_controlnet_on_sd15_is_refused(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("t2i_sdxl")
    from t2i_controlnet import IncompatibleControlNetError

    error = refusal(engine, monkeypatch, Control(image=noise_image(0, 8, 8), model="tiny:controlnet-sdxl"))
    assert isinstance(error, IncompatibleControlNetError)
    assert "an SDXL ControlNet" in str(error)


def test_guess_mode_must_agree_across_controls(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    image = noise_image(0, 8, 8)
    error = refusal(
        engine, monkeypatch, Control(image=image, model=TINY), Control(image=image, model=TINY, guess_mode=True)
    )
    assert error.field == "controls[1].guess_mode"
    with pytest.raises(InvalidRequestError, match="guess_mode='yes'"):
        Control(image=image, model=TINY, guess_mode="yes")  # type: ignore[arg-type]


def test_family_without_controlnet_support_is_refused(registry: Any) -> None:
    from t2i_sd15 import StableDiffusion15

    class Other(StableDiffusion15):
        name = "other-sd"
        aliases: ClassVar[dict[str, str]] = {}
        pipeline_classes = ()

    plugin = types.SimpleNamespace(register_providers=hookimpl(lambda register: register(Other())))
    registry.register_plugin(plugin, "test-other-family")
    try:
        engine = load(tiny_folder("sd15"), family="other-sd", device="cpu")
        request = GenerationRequest(prompt=PROMPT, controls=(Control(image=noise_image(0, 8, 8), model=TINY),))
        with pytest.raises(UnsupportedFeatureError, match="'other-sd' does not support ControlNet.*sd15, sdxl"):
            engine.generate(request)
    finally:
        registry.unregister_plugin("test-other-family")


@pytest.mark.parametrize(
    ("config", "described"),
    [
        ({"_class_name": "ControlNetModel", "cross_attention_dim": 768}, "an sd15 ControlNet"),
        ({"_class_name": "ControlNetModel", "cross_attention_dim": 1024}, "an SD 2.x ControlNet"),
        ({"_class_name": "ControlNetModel", "addition_embed_type": "text_time"}, "an sdxl ControlNet"),
        ({"_class_name": "FluxControlNetModel"}, "a FluxControlNetModel"),
    ],
)
def test_a_refusal_names_the_kind_of_controlnet_from_its_config(
    tmp_path: Path, config: dict[str, Any], described: str
) -> None:
    """What a family that takes no ControlNet reports: the ControlNet's kind, read from config.json alone."""
    from t2i_controlnet import ControlNet

    (tmp_path / "config.json").write_text(json.dumps(config))
    image = noise_image(0, 8, 8)
    request = GenerationRequest(
        prompt=PROMPT, controls=(Control(image=image, model=TINY), Control(image=image, model=str(tmp_path)))
    )
    assert ControlNet().describe_request(request) == (
        f"controls[0].model={TINY!r} (an sd15 ControlNet), controls[1].model={str(tmp_path)!r} ({described})"
    )
    # A hub id that is not in the local cache is named as given: nothing is downloaded to tell more.
    unknown = GenerationRequest(prompt=PROMPT, controls=(Control(image=image, model="someone/not-cached"),))
    assert ControlNet().describe_request(unknown) == "controls[0].model='someone/not-cached'"


# -- command line and discovery --------------------------------------------------------------


def test_cli_control_equals_the_python_api(engine: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from t2i_core.cli import main

    control_path = tmp_path / "pose.png"
    shapes_image().save(control_path)
    output = tmp_path / "out.png"
    args = ["generate", PROMPT, "--model", "tiny:sd15", "--device", "cpu", "--steps", "2", "--seed", "17"]
    assert main([*args, "--control", f"{control_path}={TINY}@0.7", "-o", str(output)]) == 0
    expected = engine.generate(
        GenerationRequest(
            prompt=PROMPT,
            seed=17,
            num_inference_steps=2,
            controls=(Control(image=control_path, model=TINY, scale=0.7),),
        )
    )
    assert_images_equal([Image.open(output).convert("RGB")], expected.images)

    capsys.readouterr()
    missing = tmp_path / "missing.png"
    assert main([*args, "--control", f"{missing}={TINY}", "-o", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"t2i: error: controls[0].image={str(missing)!r} is not allowed")
    assert not (tmp_path / "never.png").exists()


def test_plugins_listing_shows_the_conditioner_and_its_families(capsys: pytest.CaptureFixture[str]) -> None:
    from t2i_core.cli import main

    assert main(["plugins", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["conditioners"]["controlnet"]["families"] == ["sd15", "sdxl"]
    (plugin,) = [p for p in document["plugins"] if p["name"] == "controlnet"]
    assert plugin["distribution"] == "t2i-controlnet" and plugin["error"] is None


# -- Canny -----------------------------------------------------------------------------------


def edge_mask(image: Any, low: int, high: int) -> np.ndarray:
    from t2i_controlnet.canny import canny

    edges = np.asarray(canny(image, low, high))
    assert edges.shape == (image.size[1], image.size[0], 3)
    assert set(np.unique(edges)) <= {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 1] == edges[..., 2]).all()
    return edges[..., 0] > 0


def test_canny_traces_the_outline_of_a_square() -> None:
    from PIL import Image

    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[10:30, 10:30] = 255
    mask = edge_mask(Image.fromarray(pixels), 100, 200)
    rows, cols = np.nonzero(mask)
    assert len(rows) > 0
    on_border = (np.isin(rows, [9, 10, 29, 30]) & (cols >= 9) & (cols <= 30)) | (
        np.isin(cols, [9, 10, 29, 30]) & (rows >= 9) & (rows <= 30)
    )
    assert on_border.all(), "every edge pixel lies on the square's outline"
    for index in range(12, 28):  # each side is traced along its whole length, one pixel thick
        assert mask[index, 8:12].sum() == 1 and mask[index, 28:32].sum() == 1
        assert mask[8:12, index].sum() == 1 and mask[28:32, index].sum() == 1


def test_canny_finds_nothing_in_flat_images_or_above_the_thresholds() -> None:
    from PIL import Image

    assert not edge_mask(Image.new("RGB", (16, 16), (90, 120, 200)), 0, 0).any()
    step = np.zeros((16, 16, 3), dtype=np.uint8)
    step[:, 8:] = 255
    assert edge_mask(Image.fromarray(step), 100, 200).any()
    # The strongest 3x3 Sobel response (L1) to a 0-255 step is 4 * 255 = 1020.
    assert not edge_mask(Image.fromarray(step), 1020, 1020).any()


def test_canny_hysteresis_keeps_weak_edges_only_when_connected_to_strong_ones() -> None:
    from PIL import Image

    # A 0 -> 40 step has |Sobel| = 4 * 40 = 160: above a low threshold of 100, below a high one of 200.
    weak = np.zeros((40, 40, 3), dtype=np.uint8)
    weak[:, 20:] = 40
    assert not edge_mask(Image.fromarray(weak), 100, 200).any(), "a weak edge alone is dropped"
    assert edge_mask(Image.fromarray(weak), 100, 159)[2:38].any(axis=1).all(), "...kept once it counts as strong"
    joined = weak.copy()
    joined[:10, 20:] = 255  # the same edge, strong over its top quarter
    mask = edge_mask(Image.fromarray(joined), 100, 200)
    assert mask[12:38, 17:23].any(axis=1).all(), "the weak part is kept: it touches the strong part"


def test_canny_reads_every_colour_channel() -> None:
    from PIL import Image

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:] = (0, 0, 255)  # luminance differs by only ~47, but each channel steps by 255
    assert edge_mask(Image.fromarray(pixels), 600, 1000)[:, 6:10].any(axis=1).all()


def test_canny_rejects_crossed_thresholds() -> None:
    from t2i_controlnet.canny import canny

    with pytest.raises(ValueError, match="low=9 must not exceed high=3"):
        canny(noise_image(0, 8, 8), 9, 3)


# -- SDXL ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_parts() -> tuple[Any, str]:
    pytest.importorskip("t2i_sdxl")
    from t2i_controlnet import tiny_controlnet_folder

    return load("tiny:sdxl", device="cpu"), str(tiny_controlnet_folder("sdxl"))


def raw_sdxl(*controlnet_folders: str) -> Any:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    controlnets = [ControlNetModel.from_pretrained(f) for f in controlnet_folders]
    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_folder("sdxl"), controlnet=controlnets[0] if len(controlnets) == 1 else controlnets
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_sdxl_one_control_equals_the_controlnet_pipeline(sdxl_parts: tuple[Any, str]) -> None:
    engine, folder = sdxl_parts
    image = shapes_image()
    request = GenerationRequest(
        prompt=PROMPT,
        seed=3,
        num_inference_steps=STEPS,
        controls=(Control(image=image, model="tiny:controlnet-sdxl", scale=0.6, end=0.7),),
    )
    result = engine.generate(request)
    size = result.request.height, result.request.width
    expected = raw(
        raw_sdxl(folder),
        3,
        image=image,
        height=size[0],
        width=size[1],
        controlnet_conditioning_scale=0.6,
        control_guidance_end=0.7,
    )
    assert_images_equal(result.images, expected)
    plain = engine.generate(request.evolve(controls=()))
    assert not np.array_equal(as_array(plain.images[0]), as_array(result.images[0]))


def test_sdxl_two_controls_equal_multi_controlnet(sdxl_parts: tuple[Any, str]) -> None:
    from PIL import Image
    from t2i_controlnet.canny import canny

    engine, folder = sdxl_parts
    first, second = noise_image(1, 64, 64), shapes_image()
    controls = (
        Control(image=first, model="tiny:controlnet-sdxl", scale=0.9),
        Control(image=second, model="tiny:controlnet-sdxl", scale=0.4, start=0.5, preprocess="canny"),
    )
    result = engine.generate(GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=STEPS, controls=controls))
    height, width = result.request.height, result.request.width
    edges = canny(second.resize((width, height), resample=Image.Resampling.LANCZOS))
    expected = raw(
        raw_sdxl(folder, folder),
        5,
        image=[first, edges],
        height=height,
        width=width,
        controlnet_conditioning_scale=[0.9, 0.4],
        control_guidance_start=[0.0, 0.5],
        control_guidance_end=[1.0, 1.0],
    )
    assert_images_equal(result.images, expected)


def test_sd15_controlnet_on_sdxl_is_refused(sdxl_parts: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _folder = sdxl_parts
    error = refusal(engine, monkeypatch, Control(image=noise_image(0, 8, 8), model=TINY))
    assert error.field == "controls[0].model" and "not SDXL" in str(error)


def test_offloaded_engine_is_refused_naming_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    from t2i_core import IncompatibleAcceleratorsError

    engine = load("tiny:sd15", device="cpu", cache=False)  # weights of its own: the hook stays on them
    add_hook_to_module(engine.pipeline.unet, ModelHook())  # what CPU offloading attaches to each model
    monkeypatch.setattr(engine, "accelerators", ("fp32", "cpu_offload"))
    try:
        with pytest.raises(IncompatibleAcceleratorsError, match="accelerators cpu_offload cannot be used here"):
            engine.resolve(
                GenerationRequest(prompt=PROMPT, controls=(Control(image=noise_image(0, 8, 8), model=TINY),))
            )
    finally:
        remove_hook_from_module(engine.pipeline.unet)


def test_engines_over_shared_base_weights_share_controlnet_weights() -> None:
    from t2i_core import load

    one, two = load("tiny:sd15", device="cpu"), load("tiny:sd15", device="cpu")
    assert one.pipeline.unet is two.pipeline.unet
    request = GenerationRequest(
        prompt="a cat", seed=1, num_inference_steps=1, controls=(Control(image=noise_image(0, 8, 8), model=TINY),)
    )
    first, second = one.generate(request), two.generate(request)
    assert first.images[0].tobytes() == second.images[0].tobytes()
    assert one.state["controlnet"].models == two.state["controlnet"].models  # the very same model objects
    (model,) = one.state["controlnet"].models.values()
    assert model is next(iter(two.state["controlnet"].models.values()))
    assert one.state["controlnet"].pipelines is not two.state["controlnet"].pipelines
