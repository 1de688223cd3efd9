"""t2i-zimage: SDK images equal raw diffusers' ZImagePipeline bit for bit (CONTRACT.md, reproducibility).

The conformance kit checks the default request, another size, seed, step count and guidance, two
images in one request and the refusals; the tests below add what Z-Image has of its own: CFG with a
negative prompt (only with guidance > 0), its CFG options and prompt length, the CLI, ``t2i batch``,
``t2i serve``'s native API and single-file transformers, each against raw diffusers or the SDK.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from t2i_core import Engine, GenerationRequest, GenerationResult, InvalidRequestError, load, run_batch
from t2i_core.testing import (
    ProviderConformance,
    assert_images_differ,
    assert_images_equal,
    cpu_generators,
    raw_pipeline,
    run_cli,
    tiny_folder,
    write_gguf,
)

MODEL = "tiny:z-image"
STEPS = 2
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
NEGATIVE = "ugly, deformed"
GUIDANCE = 3.0


class TestZImage(ProviderConformance):
    family = "z-image"
    steps = STEPS
    guidance_scale = GUIDANCE
    invalid_requests: ClassVar[dict[str, dict[str, Any]]] = {
        "height": {"height": 72},
        "width": {"width": 40},
        # the family's default guidance is 0: no CFG, so a negative prompt would be ignored
        "guidance_scale": {"negative_prompt": NEGATIVE},
        "options['cfg_truncation']": {"options": {"cfg_truncation": 0.5}},
        "options['cfg_normalization']": {"guidance_scale": GUIDANCE, "options": {"cfg_normalization": -1.0}},
        "options['max_sequence_length']": {"options": {"max_sequence_length": 1505}},
    }

    def test_honours_the_negative_prompt(self, engine: Engine, base: GenerationResult) -> None:
        """With guidance > 0 (CFG), a negative prompt changes the image, as it does in raw diffusers."""
        guided = engine.generate(self.make_request(guidance_scale=GUIDANCE))
        result = engine.generate(self.make_request(guidance_scale=GUIDANCE, negative_prompt=self.negative_prompt))
        assert_images_differ(result.images, guided.images, "a negative prompt")
        assert_images_equal(result.images, self.raw(engine, result.request))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load(MODEL, device="cpu", accelerators=("fp32",))


@pytest.fixture(scope="module")
def raw() -> Any:
    from diffusers import ZImagePipeline

    return raw_pipeline(tiny_folder("z-image"), ZImagePipeline)


def raw_images(pipeline: Any, seed: int, count: int = 1, **call: Any) -> list[Any]:
    call.setdefault("prompt", PROMPT)
    call.setdefault("num_inference_steps", STEPS)
    call.setdefault("height", 64)
    call.setdefault("width", 64)
    generator = cpu_generators(seed, count)
    return list(pipeline(generator=generator, num_images_per_prompt=count, **call).images)


def request(**fields: Any) -> GenerationRequest:
    fields.setdefault("prompt", PROMPT)
    fields.setdefault("num_inference_steps", STEPS)
    return GenerationRequest(**fields)


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_are_z_image_turbo_s(engine: Engine) -> None:
    """9 steps, guidance 0 (no CFG), the checkpoint's size (tiny: 64), the prompt cut at 512 tokens."""
    resolved, _ = engine.resolve(GenerationRequest(prompt=PROMPT, seed=1))
    assert (resolved.num_inference_steps, resolved.guidance_scale) == (9, 0.0)
    assert (resolved.height, resolved.width) == (64, 64)
    provider = engine.provider
    kwargs = provider.call_kwargs(resolved, provider.check(resolved))
    assert kwargs["max_sequence_length"] == 512 and "cfg_normalization" not in kwargs and "cfg_truncation" not in kwargs
    assert provider.aliases == {"z-image-turbo": "Tongyi-MAI/Z-Image-Turbo"}


def test_the_default_request_matches_raw_diffusers_defaults(engine: Engine, raw: Any) -> None:
    """No steps, guidance or size given: diffusers called with Z-Image-Turbo's card (9 steps, guidance 0)."""
    result = engine.generate(GenerationRequest(prompt=PROMPT, seed=11))
    assert_images_equal(result.images, raw_images(raw, 11, num_inference_steps=9, guidance_scale=0.0))


# -- classifier-free guidance --------------------------------------------------------------------


def test_two_guided_images_with_a_negative_prompt_match_raw(engine: Engine, raw: Any) -> None:
    """CFG, a negative prompt, another size and two images (one CPU generator each) equal raw diffusers'."""
    fields = {"negative_prompt": NEGATIVE, "guidance_scale": GUIDANCE, "height": 48, "width": 80}
    result = engine.generate(request(seed=21, num_images=2, **fields))
    assert result.seeds == [21, 22]
    expected = raw_images(raw, 21, 2, **fields)
    assert_images_equal(result.images, expected)


def test_cfg_options_match_raw_and_change_the_image(engine: Engine, raw: Any) -> None:
    """cfg_normalization (1.0 is diffusers' True) and cfg_truncation are diffusers' arguments."""
    guided = {"negative_prompt": NEGATIVE, "guidance_scale": 6.0}
    plain = engine.generate(request(seed=3, num_inference_steps=4, **guided))
    for options, call in (
        ({"cfg_normalization": 1.0}, {"cfg_normalization": True}),
        # Turbo's shifted schedule at 4 steps is at normalized times 0, 0.1, 0.25, 0.5: the last two go unguided
        ({"cfg_truncation": 0.2}, {"cfg_truncation": 0.2}),
        ({"cfg_normalization": 1.5, "cfg_truncation": 0.3}, {"cfg_normalization": 1.5, "cfg_truncation": 0.3}),
    ):
        result = engine.generate(request(seed=3, num_inference_steps=4, options=options, **guided))
        assert_images_differ(result.images, plain.images, f"options {options}")
        assert_images_equal(result.images, raw_images(raw, 3, num_inference_steps=4, **guided, **call))


def test_max_sequence_length_matches_raw(engine: Engine, raw: Any) -> None:
    """A shorter prompt length cuts the chat-templated prompt, as diffusers' max_sequence_length does."""
    result = engine.generate(request(seed=4, options={"max_sequence_length": 8}))
    assert_images_differ(result.images, engine.generate(request(seed=4)).images, "max_sequence_length=8")
    assert_images_equal(result.images, raw_images(raw, 4, guidance_scale=0.0, max_sequence_length=8))


def test_the_longest_prompt_length_runs(engine: Engine) -> None:
    """max_sequence_length 1504 fits the transformer's caption positions even for a prompt that fills it."""
    long_prompt = " ".join(f"w{index}" for index in range(1600))
    result = engine.generate(
        request(prompt=long_prompt, seed=1, num_inference_steps=1, options={"max_sequence_length": 1504})
    )
    assert len(result.images) == 1


# -- refusals ------------------------------------------------------------------------------------


def refusal(engine: Engine, **fields: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        engine.resolve(request(**fields))
    return caught.value


def test_a_negative_prompt_without_guidance_is_refused_naming_guidance_scale(engine: Engine) -> None:
    error = refusal(engine, negative_prompt=NEGATIVE, guidance_scale=0.0)
    assert error.field == "guidance_scale" and "classifier-free guidance" in str(error)
    assert "> 0" in str(error)


@pytest.mark.parametrize("option", ["cfg_normalization", "cfg_truncation"])
def test_cfg_options_without_guidance_are_refused(engine: Engine, option: str) -> None:
    error = refusal(engine, options={option: 0.5})
    assert error.field == f"options[{option!r}]" and "guidance_scale > 0" in str(error)


def test_bad_sizes_and_option_values_are_refused_naming_them(engine: Engine) -> None:
    error = refusal(engine, height=72)
    assert error.field == "height" and "multiple of 16" in str(error)
    # 8208 x 256 is within the pixel limit, but 513 patches high: past the transformer's 512 row positions
    error = refusal(engine, height=8208, width=256)
    assert error.field == "height" and "8192" in str(error)
    for options in ({"cfg_truncation": 1.5}, {"cfg_normalization": -0.5}, {"max_sequence_length": 0}):
        (name,) = options
        error = refusal(engine, guidance_scale=GUIDANCE, options=options)
        assert error.field == f"options[{name!r}]", error


def test_embeddings_and_compel_are_refused_naming_the_family(engine: Engine) -> None:
    """Textual inversion and Compel serve the CLIP families: refused before any work, not ignored (LoRAs run: t2i-lora)."""
    from t2i_core import Embedding, UnsupportedFeatureError

    for fields in (
        {"embeddings": (Embedding("negative.safetensors", token="<neg>"),)},
        {"prompt_weighting": "compel"},
    ):
        with pytest.raises(UnsupportedFeatureError, match="z-image"):
            engine.resolve(request(**fields))


# -- the command line, t2i batch, t2i serve ------------------------------------------------------


def test_the_cli_image_is_the_sdk_image(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    code, _, err = run_cli(
        "generate", PROMPT, "--model", MODEL, "--steps", str(STEPS), "--seed", "5", "--device", "cpu",
        "--negative-prompt", NEGATIVE, "--guidance-scale", "2.5", "--option", "cfg_truncation=0.5", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    sdk = engine.generate(
        request(seed=5, negative_prompt=NEGATIVE, guidance_scale=2.5, options={"cfg_truncation": 0.5})
    )
    with Image.open(out) as image:
        assert image.text["family"] == "z-image" and image.text["guidance_scale"] == "2.5"  # type: ignore[attr-defined]
        assert_images_equal([image.convert("RGB")], sdk.images, "the SDK")


def test_cli_refuses_a_negative_prompt_without_guidance(tmp_path: Path) -> None:
    code, _, err = run_cli(
        "generate", PROMPT, "--model", MODEL, "--negative-prompt", NEGATIVE, "--device", "cpu",
        "-o", str(tmp_path / "x.png"),
    )  # fmt: skip
    assert code == 2 and "guidance_scale" in err and "Traceback" not in err


def test_t2i_batch_writes_the_sdk_images(engine: Engine, tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every batch worker: on a CPU the thread count is part of the computation
    try:
        jobs = [
            {"id": "plain", "prompt": "a red fox", "seed": 7},
            {"id": "guided", "prompt": "a red fox", "seed": 8, "negative_prompt": "fog", "guidance_scale": 2.0},
        ]
        out = tmp_path / "out"
        summary = run_batch(jobs, out=out, model=MODEL, defaults={"num_inference_steps": STEPS}, device="cpu")
        assert (summary.done, summary.failed, summary.invalid) == (2, 0, 0)
        for job in jobs:
            fields = {key: value for key, value in job.items() if key != "id"}
            result = engine.generate(request(**fields))
            assert (out / f"{job['id']}.png").read_bytes() == result.png(0), job["id"]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    from server_support import running_server
    from t2i_server import Limits
    from t2i_server._jobs import Service, load_model

    service = Service([load_model(MODEL, MODEL, device="cpu")], Limits())
    with running_server(service) as url:
        yield url


def test_t2i_serve_native_generations_are_the_sdk_images(server: str) -> None:
    import httpx
    from server_support import decode_png

    sdk_engine = load(MODEL, device="cpu")
    fields = {
        "prompt": "a red fox",
        "negative_prompt": "fog",
        "guidance_scale": 2.0,
        "num_inference_steps": STEPS,
        "seed": 7,
        "num_images": 2,
        "options": {"cfg_truncation": 0.5},
    }
    with httpx.Client(base_url=server, timeout=httpx.Timeout(120.0, connect=10.0)) as client:
        response = client.post("/v1/generations", json=fields)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["family"] == "z-image" and data["seeds"] == [7, 8]
        assert_images_equal(
            [decode_png(image) for image in data["images"]], sdk_engine.generate(request(**fields)).images
        )
        refused = client.post("/v1/generations", json={**fields, "guidance_scale": 0.0})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "guidance_scale"


# -- single-file transformers ----------------------------------------------------------------------

#: diffusers' ZImageTransformer2DModel names → the original layout's, which diffusers converts back
_ORIGINAL_NAMES = {
    "all_final_layer.2-1.": "final_layer.",
    "all_x_embedder.2-1.": "x_embedder.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_k.": ".attention.k_norm.",
    ".attention.norm_q.": ".attention.q_norm.",
}


def original_transformer(folder: str, prefix: str = "model.diffusion_model.") -> dict[str, Any]:
    """The tiny transformer's weights in the original (ComfyUI) layout: fused q/k/v, original names."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))
    original: dict[str, Any] = {}
    for key, value in weights.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [weights[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            original[prefix + key.replace("to_q", "qkv")] = torch.cat(parts).contiguous()
            continue
        for new, old in _ORIGINAL_NAMES.items():
            key = key.replace(new, old)
        original[prefix + key] = value.contiguous()
    return original


def write_original_transformer(folder: str, path: Path) -> Path:
    """The tiny transformer as one file in the original (ComfyUI) layout."""
    from safetensors.torch import save_file

    save_file(original_transformer(folder), str(path))
    return path


def test_a_single_file_transformer_matches_raw_from_single_file(engine: Engine, tmp_path: Path) -> None:
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    folder = str(tiny_folder("z-image"))
    file = write_original_transformer(folder, tmp_path / "z_image_tiny.safetensors")
    single = load(str(file), config=MODEL, device="cpu", accelerators=("fp32",), cache=False)
    assert single.family == "z-image"
    fields = {"seed": 9, "negative_prompt": NEGATIVE, "guidance_scale": GUIDANCE}
    result = single.generate(request(**fields))
    transformer = ZImageTransformer2DModel.from_single_file(str(file), config=folder, subfolder="transformer")
    pipeline = ZImagePipeline.from_pretrained(folder, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    assert_images_equal(result.images, raw_images(pipeline, 9, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE))
    # The conversion is lossless: the folder's checkpoint makes the same image.
    assert_images_equal(result.images, engine.generate(request(**fields)).images, "the diffusers folder")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_gguf_transformer_matches_diffusers_gguf_loading(engine: Engine, tmp_path: Path, qtype: str) -> None:
    """The original layout without a prefix, as published GGUF files have it: diffusers converts the
    quantized weights (splitting the fused q/k/v blocks), kept quantized, bit for bit with raw diffusers."""
    import torch
    from diffusers import GGUFQuantizationConfig, ZImagePipeline, ZImageTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFParameter

    folder = str(tiny_folder("z-image"))
    file = write_gguf(original_transformer(folder, prefix=""), tmp_path / f"z-image-{qtype}.gguf", qtype)
    single = load(str(file), config=MODEL, device="cpu", accelerators=("fp32",), cache=False)
    assert single.family == "z-image"
    to_q = single.pipeline.transformer.layers[0].attention.to_q.weight
    assert isinstance(to_q, GGUFParameter)
    assert qtype in {
        p.quant_type.name for p in single.pipeline.transformer.parameters() if isinstance(p, GGUFParameter)
    }
    fields = {"seed": 9, "negative_prompt": NEGATIVE, "guidance_scale": GUIDANCE}
    result = single.generate(request(**fields))
    transformer = ZImageTransformer2DModel.from_single_file(
        str(file),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=folder,
        subfolder="transformer",
    )
    pipeline = ZImagePipeline.from_pretrained(folder, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    assert_images_equal(result.images, raw_images(pipeline, 9, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE))
    assert_images_differ(result.images, engine.generate(request(**fields)).images, "the quantized weights")
