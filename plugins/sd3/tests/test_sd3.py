"""t2i-sd3 passes the conformance kit, and what SD3 adds (T5 or not, skip-layer guidance, the T5
length, sizes) equals raw diffusers' ``StableDiffusion3Pipeline`` bit for bit on CPU."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from t2i_core import (
    Engine,
    GenerationRequest,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    ModelNotFoundError,
    load,
)
from t2i_core.testing import (
    ProviderConformance,
    assert_images_differ,
    assert_images_equal,
    cpu_generators,
    run_cli,
    tiny_folder,
    write_gguf,
)

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
NEGATIVE = "ugly, deformed"
STEPS = 3
GUIDANCE = 3.5


def raw_sd3(folder: str | Path, **components: Any) -> Any:
    """The checkpoint as a diffusers user loads Stable Diffusion 3 (``text_encoder_3=None`` etc. passed on)."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(folder, **components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def raw_images(pipeline: Any, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", GUIDANCE)  # the family's default (diffusers' own is 7.0)
    return list(pipeline(PROMPT, generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


def request(seed: int, **changes: Any) -> GenerationRequest:
    fields: dict[str, Any] = {"prompt": PROMPT, "seed": seed, "num_inference_steps": STEPS, **changes}
    return GenerationRequest(**fields)


class TestStableDiffusion3(ProviderConformance):
    family = "sd3"
    invalid_requests = {
        # Sizes are whole transformer patches of whole latent pixels: multiples of 16, not just of 8.
        "height": {"height": 72},
        "width": {"width": 200},
        "options['max_sequence_length']": {"options": {"max_sequence_length": 513}},
        # tiny:sd3's transformer has 2 blocks: 0 and 1.
        "options['skip_guidance_layers']": {"options": {"skip_guidance_layers": "1,2"}},
        "options['skip_layer_guidance_scale']": {"options": {"skip_layer_guidance_scale": 3.0}},
        "guidance_scale": {"guidance_scale": 1.0, "options": {"skip_guidance_layers": "1"}},
    }

    def reference_pipeline(self, folder: str) -> Any:
        return raw_sd3(folder)


@pytest.fixture(scope="module")
def sd3(t2i_tiny_cache: Path) -> Engine:
    return load("tiny:sd3", device="cpu", accelerators=("fp32",))


@pytest.fixture(scope="module")
def raw(sd3: Engine) -> Any:
    return raw_sd3(sd3.source)


@pytest.fixture(scope="module")
def raw_without_t5(sd3: Engine) -> Any:
    """diffusers' documented way to drop T5: load with ``text_encoder_3=None, tokenizer_3=None``."""
    return raw_sd3(sd3.source, text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="module")
def sd3_without_t5(sd3: Engine) -> Engine:
    return load("tiny:sd3", device="cpu", accelerators=("fp32", "no-t5"))


# -- T5 ------------------------------------------------------------------------------------------


def test_t5_false_equals_diffusers_loaded_without_t5(sd3: Engine, raw_without_t5: Any) -> None:
    """options={'t5': False} on an engine with T5 makes diffusers' images without T5, which differ from with it."""
    result = sd3.generate(request(11, negative_prompt=NEGATIVE, options={"t5": False}))
    assert_images_equal(result.images, raw_images(raw_without_t5, 11, negative_prompt=NEGATIVE))
    with_t5 = sd3.generate(request(11, negative_prompt=NEGATIVE))
    assert_images_differ(result.images, with_t5.images, "T5 reading the prompt too")
    assert sd3.pipeline.text_encoder_3 is not None, "t5=false must not take T5 away from the engine"
    assert_images_equal(sd3.generate(request(11, negative_prompt=NEGATIVE)).images, with_t5.images, "T5 again")


def test_the_no_t5_accelerator_loads_without_t5(sd3_without_t5: Engine, raw_without_t5: Any) -> None:
    """``accelerators=(..., 'no-t5')`` loads no T5 at all; its images are diffusers' without T5, two at once too."""
    assert sd3_without_t5.pipeline.text_encoder_3 is None and sd3_without_t5.pipeline.tokenizer_3 is None
    result = sd3_without_t5.generate(request(5, num_images=2))
    assert_images_equal(result.images, raw_images(raw_without_t5, 5, count=2))
    also = sd3_without_t5.generate(request(5, num_images=2, options={"t5": "false"}))
    assert_images_equal(also.images, result.images, "t5=false on an engine without T5")


def test_t5_true_is_refused_on_an_engine_without_t5(sd3_without_t5: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="loaded without T5") as caught:
        sd3_without_t5.resolve(request(5, options={"t5": True}))
    assert caught.value.field == "options['t5']"


def test_no_t5_is_refused_for_other_families(t2i_tiny_cache: Path) -> None:
    with pytest.raises(IncompatibleAcceleratorsError, match="family 'sd15'"):
        load("tiny:sd15", device="cpu", accelerators=("fp32", "no-t5"), cache=False)


def test_a_checkpoint_saved_without_t5_loads_without_it(
    sd3: Engine, raw_without_t5: Any, tmp_path: Path, t2i_engine_factory: Callable[..., Engine]
) -> None:
    """A local folder without text_encoder_3/ and tokenizer_3/ (model_index.json still lists them) loads without T5."""
    folder = tmp_path / "sd3-without-t5"
    shutil.copytree(sd3.source, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    engine = t2i_engine_factory(str(folder), device="cpu", accelerators=("fp32",), cache=False)
    assert engine.family == "sd3" and engine.pipeline.text_encoder_3 is None
    assert_images_equal(engine.generate(request(8)).images, raw_images(raw_without_t5, 8))


# -- options -------------------------------------------------------------------------------------


def test_max_sequence_length_matches_diffusers(sd3: Engine, raw: Any) -> None:
    result = sd3.generate(request(4, options={"max_sequence_length": 77}))
    assert_images_equal(result.images, raw_images(raw, 4, max_sequence_length=77))
    assert_images_differ(result.images, sd3.generate(request(4)).images, "the default 256 T5 tokens")


def test_skip_layer_guidance_matches_diffusers(sd3: Engine, raw: Any) -> None:
    """3.5 Medium's skip-layer guidance, under diffusers' argument names, with a window that holds steps 1 and 2."""
    options = {"skip_guidance_layers": "1", "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    result = sd3.generate(request(9, num_images=2, options=options))
    expected = raw_images(
        raw,
        9,
        count=2,
        skip_guidance_layers=[1],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
    )
    assert_images_equal(result.images, expected)
    assert_images_differ(result.images[:1], sd3.generate(request(9)).images, "no skip-layer guidance")
    scaled = sd3.generate(
        request(9, options={**options, "skip_guidance_layers": [0, 1], "skip_layer_guidance_scale": 1.5})
    )
    assert_images_equal(
        scaled.images,
        raw_images(
            raw,
            9,
            skip_guidance_layers=[0, 1],
            skip_layer_guidance_scale=1.5,
            skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
        ),
    )


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"skip_guidance_layers": "x"}, "options['skip_guidance_layers']", "comma-separated whole numbers"),
        ({"skip_guidance_layers": "1,1"}, "options['skip_guidance_layers']", "each block index once"),
        ({"skip_guidance_layers": [-1]}, "options['skip_guidance_layers']", "whole numbers >= 0"),
        ({"skip_guidance_layers": "2"}, "options['skip_guidance_layers']", "from 0 to 1"),
        # 3 steps, start 0.01, stop 0.2: diffusers applies SLG at no step (0.03 < i < 0.6 holds none).
        ({"skip_guidance_layers": "1"}, "options['skip_guidance_layers']", "hold none"),
        (
            {"skip_guidance_layers": "1", "skip_layer_guidance_start": 0.5, "skip_layer_guidance_stop": 0.5},
            "options['skip_layer_guidance_stop']",
            "above skip_layer_guidance_start",
        ),
        ({"skip_layer_guidance_stop": 0.5}, "options['skip_layer_guidance_stop']", "unless skip_guidance_layers"),
        ({"max_sequence_length": 0}, "options['max_sequence_length']", "integer in"),
        ({"t5": "maybe"}, "options['t5']", "boolean"),
    ],
)
def test_bad_options_are_refused_before_work(sd3: Engine, options: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words) as caught:
        sd3.resolve(request(1, options=options))
    assert caught.value.field == field


def test_sizes_beyond_the_position_embedding_are_refused(sd3: Engine) -> None:
    """tiny:sd3's position embedding covers 16 patches a side: 256 pixels (SD3.5 Large's: 192, 3072 pixels)."""
    sd3.resolve(request(1, height=256, width=64))
    with pytest.raises(InvalidRequestError, match="at most 256") as caught:
        sd3.resolve(request(1, height=272, width=64))
    assert caught.value.field == "height"


# -- checkpoints and the command line ------------------------------------------------------------


def test_native_size_is_the_transformers_sample_size_times_the_vae_factor(sd3: Engine) -> None:
    transformer, factor = sd3.pipeline.transformer.config, sd3.pipeline.vae_scale_factor
    assert sd3.provider.native_size(sd3.pipeline) == (transformer.sample_size * factor,) * 2 == (64, 64)


def test_another_family_is_refused_before_its_weights_load(t2i_engine_factory: Callable[..., Engine]) -> None:
    with pytest.raises(ModelNotFoundError, match="it is a StableDiffusionPipeline, not a StableDiffusion3Pipeline"):
        t2i_engine_factory(str(tiny_folder("sd15")), family="sd3", cache=False)


def test_cli_image_equals_the_sdk_image(sd3: Engine, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "x.png"
    code, _, err = run_cli(
        "generate", PROMPT, "--model", "tiny:sd3", "--steps", "2", "--seed", "12", "--negative-prompt", NEGATIVE,
        "--option", "t5=false", "--device", "cpu", "--accelerator", "fp32", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    sdk = sd3.generate(request(12, num_inference_steps=2, negative_prompt=NEGATIVE, options={"t5": False}))
    with Image.open(out) as image:
        assert image.text["family"] == "sd3"
        assert_images_equal([image.convert("RGB")], sdk.images)


# -- single files --------------------------------------------------------------------------------


def test_a_single_file_transformer_loads_with_the_configs_of_tiny_sd3(sd3: Engine, tmp_path: Path) -> None:
    """A transformer saved as one file in diffusers' layout (weights of its own) with config=tiny:sd3 equals
    raw diffusers' SD3Transformer2DModel.from_single_file in the pipeline of that folder."""
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    weights = {name: tensor.clone() for name, tensor in transformer_weights(sd3.source).items()}
    with torch.no_grad():
        weights["proj_out.weight"] += 0.05  # not tiny:sd3's own transformer, so the file must be read
    file = tmp_path / "sd3-transformer.safetensors"
    save_file(weights, str(file))
    engine = load(str(file), config="tiny:sd3", device="cpu", accelerators=("fp32",), cache=False)
    assert engine.family == "sd3"
    transformer = SD3Transformer2DModel.from_single_file(
        str(file), config=sd3.source, subfolder="transformer", local_files_only=True
    )
    raw = raw_sd3(sd3.source, transformer=transformer)
    result = engine.generate(request(6, negative_prompt=NEGATIVE))
    assert_images_equal(result.images, raw_images(raw, 6, negative_prompt=NEGATIVE))
    assert_images_differ(result.images, sd3.generate(request(6, negative_prompt=NEGATIVE)).images, "tiny:sd3's own")


@pytest.mark.parametrize(
    ("transformer", "name", "steps", "guidance"),
    [
        ({"qk_norm": "rms_norm", "dual_attention_layers": ()}, "stabilityai/stable-diffusion-3.5-large", 28, 3.5),
        ({"qk_norm": "rms_norm", "dual_attention_layers": ()}, "stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0),
        (
            {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1, 2)},
            "stabilityai/stable-diffusion-3.5-medium",
            40,
            4.5,
        ),
        ({"qk_norm": None, "dual_attention_layers": ()}, "stabilityai/stable-diffusion-3-medium-diffusers", 28, 7.0),
        ({"qk_norm": "rms_norm", "dual_attention_layers": ()}, "/models/My-SD35-Turbo-finetune", 4, 0.0),
    ],
)
def test_each_checkpoint_gets_its_model_cards_defaults(
    sd3: Engine, transformer: dict[str, Any], name: str, steps: int, guidance: float
) -> None:
    from types import SimpleNamespace

    pipeline = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(**transformer)), name_or_path=name)
    defaults = sd3.provider.pipeline_defaults(pipeline)
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (steps, guidance)
    # tiny:sd3 is Large-shaped: the family's own defaults.
    assert sd3.provider.pipeline_defaults(sd3.pipeline) == sd3.provider.defaults


def test_architecture_configs_build_sd35_large() -> None:
    """architecture/ is diffusers' layout of stabilityai/stable-diffusion-3.5-large, minus weights: 8.06 B transformer."""
    import json

    import torch
    from diffusers import SD3Transformer2DModel

    from t2i_core import get_registry

    folder = get_registry().provider("sd3").architecture_folder()
    assert folder is not None
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for name, (library, _) in ((k, v) for k, v in index.items() if not k.startswith("_") and v[0] is not None):
        assert (folder / name).is_dir(), f"{name}/ is missing ({library})"
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(folder / "transformer")))
    assert sum(p.numel() for p in transformer.parameters()) / 1e9 == pytest.approx(8.06, abs=0.01)


# -- GGUF files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_gguf_transformer_matches_diffusers_gguf_loading(sd3: Engine, tmp_path: Path, qtype: str) -> None:
    """tiny:sd3's transformer written as GGUF (diffusers' layout) with config=tiny:sd3 equals raw diffusers'
    SD3Transformer2DModel.from_single_file(..., quantization_config=GGUFQuantizationConfig(...)), kept quantized."""
    import torch
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFParameter

    file = write_gguf(transformer_weights(sd3.source), tmp_path / f"sd3-{qtype}.gguf", qtype, architecture="sd3")
    engine = load(str(file), config="tiny:sd3", device="cpu", accelerators=("fp32",), cache=False)
    assert engine.family == "sd3"
    quantized = [p for p in engine.pipeline.transformer.parameters() if isinstance(p, GGUFParameter)]
    assert quantized and qtype in {p.quant_type.name for p in quantized}
    transformer = SD3Transformer2DModel.from_single_file(
        str(file),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=sd3.source,
        subfolder="transformer",
        local_files_only=True,
    )
    result = engine.generate(request(6, negative_prompt=NEGATIVE))
    assert_images_equal(
        result.images, raw_images(raw_sd3(sd3.source, transformer=transformer), 6, negative_prompt=NEGATIVE)
    )
    assert_images_differ(
        result.images, sd3.generate(request(6, negative_prompt=NEGATIVE)).images, "the quantized weights"
    )


def transformer_weights(folder: str) -> dict[str, Any]:
    """The checkpoint's transformer weights from its files, not from the shared engine, whose layers a
    LoRA test may have wrapped (peft's ``base_layer``)."""
    from diffusers import SD3Transformer2DModel

    return dict(SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict())
