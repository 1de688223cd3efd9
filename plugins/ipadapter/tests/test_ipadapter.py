"""t2i-ipadapter: image prompts equal diffusers' load_ip_adapter bit for bit, load once, and leave plain requests plain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from t2i_core import (
    GenerationRequest,
    ImagePrompt,
    InvalidRequestError,
    UnsupportedFeatureError,
    load,
)
from t2i_core.testing import (
    ConditionerConformance,
    as_array,
    assert_images_close,
    assert_images_equal,
    cpu_generators,
    raw_pipeline,
    refuse_to_run,
)

pytest.importorskip("t2i_ipadapter")
from t2i_ipadapter import DEFAULTS, IncompatibleAdapterError, tiny_adapter_folder
from t2i_ipadapter._weights import shared_weights

STEPS = 2
SEED = 3
PROMPT = "a lighthouse at dusk"


def noise_image(seed: int, width: int = 40, height: int = 48) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


REFERENCE = noise_image(0)
OTHER = noise_image(1)


def request(*prompts: ImagePrompt) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, seed=SEED, num_inference_steps=STEPS, image_prompts=prompts)


def raw_with_adapters(family: str, count: int, scales: list[float]) -> Any:
    """diffusers by hand: the tiny checkpoint, then load_ip_adapter from the tiny adapter folder, `count` times."""
    pipeline = raw_pipeline(tiny_folder(family))
    defaults = DEFAULTS[family]
    pipeline.load_ip_adapter(
        str(tiny_adapter_folder(family)), subfolder=defaults.subfolder, weight_name=[defaults.weight_name] * count
    )
    pipeline.set_ip_adapter_scale(scales)
    return pipeline


def raw_call(pipeline: Any, resolved: GenerationRequest, images: Any, **extra: Any) -> list[Any]:
    return list(
        pipeline(
            **extra,
            prompt=resolved.prompt,
            ip_adapter_image=images,
            num_inference_steps=resolved.num_inference_steps,
            guidance_scale=resolved.guidance_scale,
            height=resolved.height,
            width=resolved.width,
            generator=cpu_generators(SEED, 1),
        ).images
    )


def tiny_folder(family: str) -> str:
    from t2i_core import testing

    return str(testing.tiny_folder(family))


@pytest.fixture(scope="module")
def engine() -> Any:
    return load("tiny:sd15", device="cpu")


# -- the conformance kit ----------------------------------------------------------------------------


class TestImagePromptsConformance(ConditionerConformance):
    conditioner = "ip-adapter"
    wanted = {"image_prompts": (ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", scale=0.6),)}
    reference_kwargs = {"ip_adapter_image": REFERENCE}
    refused_requests = {
        "image_prompts[0].image": {"image_prompts": (ImagePrompt("no/such/ref.png", "tiny:ip-adapter-sd15"),)},
        "image_prompts[0].model": {"image_prompts": (ImagePrompt(REFERENCE, "tiny:ip-adapter-nothing"),)},
    }

    def reference_pipeline(self, folder: str) -> Any:
        from diffusers import AutoPipelineForText2Image

        pipeline = AutoPipelineForText2Image.from_pretrained(folder)
        pipeline.load_ip_adapter(
            str(tiny_adapter_folder("sd15")), subfolder="models", weight_name="ip-adapter_sd15.safetensors"
        )
        pipeline.set_ip_adapter_scale(0.6)
        return pipeline


# -- images -------------------------------------------------------------------------------------------


def test_two_image_prompts_equal_diffusers_with_two_adapters(engine: Any, tmp_path: Path) -> None:
    """Two image prompts (one given as a file) are two adapters of one load_ip_adapter call, with a scale each."""
    path = tmp_path / "other.png"
    OTHER.save(path)
    result = engine.generate(
        request(
            ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.5), ImagePrompt(str(path), "tiny:ip-adapter-sd15", 0.8)
        )
    )
    theirs = raw_call(raw_with_adapters("sd15", 2, [0.5, 0.8]), result.request, [REFERENCE, OTHER])
    assert_images_equal(result.images, theirs)


def test_sdxl_equals_diffusers() -> None:
    engine = load("tiny:sdxl", device="cpu")
    result = engine.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sdxl", 0.7)))
    assert_images_equal(result.images, raw_call(raw_with_adapters("sdxl", 1, [0.7]), result.request, REFERENCE))


def test_flux_equals_diffusers_with_its_image_encoder_beside_the_adapter() -> None:
    """FLUX.1 loads through FluxIPAdapterMixin, the image encoder in the transformer's dtype (diffusers' default: float16)."""
    import torch
    from diffusers import FluxPipeline

    engine = load("tiny:flux", device="cpu")
    prompt = ImagePrompt(REFERENCE, "tiny:ip-adapter-flux", 0.7)
    result = engine.generate(request(prompt).evolve(options={"max_sequence_length": 64}))
    folder = tiny_adapter_folder("flux")
    pipeline = raw_pipeline(tiny_folder("flux"), FluxPipeline)
    pipeline.load_ip_adapter(
        str(folder),
        weight_name=DEFAULTS["flux"].weight_name,
        image_encoder_pretrained_model_name_or_path=str(folder / "image_encoder"),
        image_encoder_dtype=torch.float32,
    )
    pipeline.set_ip_adapter_scale(0.7)
    theirs = raw_call(pipeline, result.request, REFERENCE, max_sequence_length=64)
    assert_images_equal(result.images, theirs)
    plain = engine.generate(request())
    assert_images_equal(
        engine.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-flux", 0.0))).images, plain.images
    )


def test_with_a_controlnet_equals_diffusers_controlnet_pipeline(engine: Any) -> None:
    """The ControlNet pipeline gets the image encoder too: controls and image prompts in one call."""
    pytest.importorskip("t2i_controlnet")
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image
    from t2i_controlnet import tiny_controlnet_folder

    from t2i_core import Control

    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (16, 16, 48, 48))
    control = Control(image=edges, model="tiny:controlnet-sd15")
    result = engine.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.7)).evolve(controls=(control,)))
    controlnet = ControlNetModel.from_pretrained(str(tiny_controlnet_folder("sd15")))
    pipeline = raw_pipeline(tiny_folder("sd15"), StableDiffusionControlNetPipeline, controlnet=controlnet)
    pipeline.load_ip_adapter(
        str(tiny_adapter_folder("sd15")), subfolder="models", weight_name="ip-adapter_sd15.safetensors"
    )
    pipeline.set_ip_adapter_scale(0.7)
    assert_images_equal(result.images, raw_call(pipeline, result.request, REFERENCE, image=edges))


def test_with_a_lora_equals_diffusers(engine: Any, tmp_path: Path) -> None:
    """A LoRA (t2i-lora, inside the same UNet) and an image prompt together, as diffusers loads both."""
    pytest.importorskip("t2i_lora")
    from t2i_lora import tiny

    from t2i_core import Lora

    lora = tiny.lora_file(tiny_folder("sd15"), tmp_path / "style.safetensors", seed=1)
    prompt = ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.7)
    result = engine.generate(request(prompt).evolve(loras=(Lora(str(lora), 0.8),)))
    pipeline = raw_pipeline(tiny_folder("sd15"))
    pipeline.load_lora_weights(str(lora), adapter_name="style")
    pipeline.set_adapters(["style"], adapter_weights=[0.8])
    pipeline.load_ip_adapter(
        str(tiny_adapter_folder("sd15")), subfolder="models", weight_name="ip-adapter_sd15.safetensors"
    )
    pipeline.set_ip_adapter_scale(0.7)
    assert_images_equal(result.images, raw_call(pipeline, result.request, REFERENCE))


def test_scale_zero_and_no_image_prompt_give_the_plain_image(engine: Any) -> None:
    """The UNet gets its own attention processors back for a plain request, even after adapters ran."""
    plain = engine.generate(request())
    steered = engine.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.9)))
    again = engine.generate(request())
    zero = engine.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.0)))
    assert_images_equal(again.images, plain.images, "the plain image before any image prompt")
    assert_images_equal(zero.images, plain.images, "the plain image")
    assert not np.array_equal(as_array(steered.images[0]), as_array(plain.images[0])), (
        "the image prompt changed nothing"
    )
    other = engine.generate(request(ImagePrompt(OTHER, "tiny:ip-adapter-sd15", 0.9)))
    assert not np.array_equal(as_array(steered.images[0]), as_array(other.images[0])), "which image made no difference"


def test_adapters_load_once_per_shared_weights(engine: Any) -> None:
    """A second request, and a second engine over the same weights, reuse the loaded adapter and image encoder."""
    prompt = ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.4)
    first = engine.generate(request(prompt))
    shared = shared_weights(engine)
    loads = shared.loads
    twin = load("tiny:sd15", device="cpu")
    assert twin.pipeline.unet is engine.pipeline.unet and shared_weights(twin) is shared
    engine.generate(request())
    second = twin.generate(request(prompt))
    assert shared.loads == loads
    assert_images_equal(second.images, first.images, "the first engine's image")


def test_engines_over_one_unet_take_turns(engine: Any) -> None:
    """Plain and image-prompt requests on two engines over the same UNet, at once, give their lone images."""
    from concurrent.futures import ThreadPoolExecutor

    twin = load("tiny:sd15", device="cpu")
    steered = request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.7))
    alone = [engine.generate(request()).images, twin.generate(steered).images]
    with ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(e.generate, r) for _ in range(2) for e, r in ((engine, request()), (twin, steered))]
        images = [run.result().images for run in runs]
    for index, found in enumerate(images):
        assert_images_equal(found, alone[index % 2], "the lone run")


def test_a_batch_shares_the_image_prompt(engine: Any) -> None:
    prompt = ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.7)
    requests = [request(prompt), request(prompt).evolve(prompt="a harbour at noon", seed=SEED + 5)]
    together = engine.generate_batch(requests)
    for each, result in zip(requests, together, strict=True):
        why = "a batched call against a lone one (float32 rounding)"
        assert_images_close(result.images, engine.generate(each).images, max_levels=1, why=why)


# -- refusals -----------------------------------------------------------------------------------------


def test_other_families_are_refused_naming_image_prompts_and_the_family(monkeypatch: pytest.MonkeyPatch) -> None:
    sd3 = load("tiny:sd3", device="cpu")
    refuse_to_run(monkeypatch, sd3)
    with pytest.raises(UnsupportedFeatureError) as caught:
        sd3.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15")))
    assert "image_prompts" in str(caught.value) and "sd3" in str(caught.value)


def test_an_sdxl_adapter_on_sd15_is_refused_before_loading(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_to_run(monkeypatch, engine)
    with pytest.raises(IncompatibleAdapterError) as caught:
        engine.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sdxl")))
    assert caught.value.field == "image_prompts[0].model"


def test_a_folder_without_the_weights_file_is_refused(engine: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(request(ImagePrompt(REFERENCE, str(tmp_path))))
    assert caught.value.field == "image_prompts[0].model" and "ip-adapter_sd15.safetensors" in str(caught.value)


# -- command line --------------------------------------------------------------------------------------


def _saved(path: Path) -> tuple[dict[str, str], Any]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return dict(image.text), np.asarray(image.convert("RGB"))  # type: ignore[attr-defined]


def test_the_cli_flag_equals_the_sdk_and_from_remakes_it(engine: Any, tmp_path: Path) -> None:
    """``--image-prompt FILE@SCALE --image-prompt-model M`` is the SDK's ImagePrompt; ``--from`` restores it."""
    from t2i_core.cli import main

    reference, first, again = tmp_path / "ref.png", tmp_path / "first.png", tmp_path / "again.png"
    REFERENCE.save(reference)
    assert main([
        "generate", PROMPT, "--model", "tiny:sd15", "--steps", str(STEPS), "--seed", str(SEED), "--device", "cpu",
        "--image-prompt", f"{reference}@0.6", "--image-prompt-model", "tiny:ip-adapter-sd15", "-o", str(first),
    ]) == 0  # fmt: skip
    text, pixels = _saved(first)
    sdk = engine.generate(request(ImagePrompt(str(reference), "tiny:ip-adapter-sd15", 0.6)))
    assert np.array_equal(pixels, as_array(sdk.images[0]))
    assert main(["generate", "--from", str(first), "--device", "cpu", "-o", str(again)]) == 0
    text_again, pixels_again = _saved(again)
    assert '"scale": 0.6' in text["image_prompts"] and text_again == text
    assert np.array_equal(pixels_again, pixels)


def test_image_prompt_flag_syntax() -> None:
    from t2i_core.cli.flags import DEFAULT_IMAGE_PROMPT_MODEL, image_prompts

    (plain, scaled) = image_prompts(["a.png", "b.png@0.25"], None)
    assert (plain.image, plain.model, plain.scale) == ("a.png", DEFAULT_IMAGE_PROMPT_MODEL, 1.0)
    assert (scaled.image, scaled.scale) == ("b.png", 0.25)
    with pytest.raises(InvalidRequestError) as caught:
        image_prompts(["b.png@strong"], "tiny:ip-adapter-sd15")
    assert caught.value.field == "--image-prompt"


def test_a_jsonl_batch_job_takes_image_prompts(engine: Any, tmp_path: Path) -> None:
    import json

    from t2i_core.cli import main

    reference, jobs, out = tmp_path / "ref.png", tmp_path / "jobs.jsonl", tmp_path / "out"
    REFERENCE.save(reference)
    prompt = {"image": str(reference), "model": "tiny:ip-adapter-sd15", "scale": 0.6}
    job = {"id": "ip", "prompt": PROMPT, "seed": SEED, "num_inference_steps": STEPS, "image_prompts": [prompt]}
    jobs.write_text(json.dumps(job) + "\n")
    assert main(["batch", str(jobs), "--model", "tiny:sd15", "--out", str(out), "--device", "cpu"]) == 0
    _, pixels = _saved(out / "ip.png")
    sdk = engine.generate(request(ImagePrompt(str(reference), "tiny:ip-adapter-sd15", 0.6)))
    assert np.array_equal(pixels, as_array(sdk.images[0]))


def test_from_refuses_a_png_whose_image_prompt_was_in_memory(
    engine: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from t2i_core.cli import main

    saved = tmp_path / "memory.png"
    engine.generate(request(ImagePrompt(REFERENCE, "tiny:ip-adapter-sd15", 0.6))).save(saved)
    assert main(["generate", "--from", str(saved), "--device", "cpu", "-o", str(tmp_path / "again.png")]) == 2
    assert "image_prompts[0] was an image in memory" in capsys.readouterr().err


def test_pickled_adapters_are_refused(engine: Any, tmp_path: Path) -> None:
    pickled = tmp_path / "ip-adapter.bin"
    pickled.write_bytes(b"not read")
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(request(ImagePrompt(REFERENCE, str(pickled))))
    assert caught.value.field == "image_prompts[0].model" and "pickle" in str(caught.value)
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(request(ImagePrompt(REFERENCE, "h94/IP-Adapter", weight_name="ip-adapter_sd15.bin")))
    assert caught.value.field == "image_prompts[0].weight_name"
