"""t2i-flux passes the conformance kit, and what FLUX.1 adds is checked against raw diffusers' FluxPipeline.

Dev-style checkpoints are ``tiny:flux``; the schnell-style one (no guidance embedding) is built by
``t2i_flux._tiny.schnell_folder``. Every image is compared bit for bit with raw diffusers on CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from t2i_flux import Flux
from t2i_flux._tiny import schnell_folder

from t2i_core import Engine, GenerationRequest, IncompatibleAcceleratorsError, InvalidRequestError, Lora, load
from t2i_core.testing import (
    ProviderConformance,
    as_array,
    assert_images_differ,
    assert_images_equal,
    cpu_generators,
    run_cli,
    write_gguf,
)

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
STEPS = 2


def raw_flux(folder: str | Path) -> Any:
    """The checkpoint as a diffusers user loads FLUX.1."""
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def raw_images(pipeline: Any, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


class TestFlux(ProviderConformance):
    family = "flux"
    # The tiny VAE has FLUX.1's factor of 8: sizes are whole 2x2 patches of latents, multiples of 16.
    invalid_requests = {
        "height": {"height": 72},
        "width": {"width": 200},
        "options['true_cfg_scale']": {"negative_prompt": "ugly"},
        "options['max_sequence_length']": {"options": {"max_sequence_length": 513}},
    }

    def reference_pipeline(self, folder: str) -> Any:
        return raw_flux(folder)

    def test_honours_the_negative_prompt(self, engine: Engine, base: Any) -> None:
        """A negative prompt with true CFG changes the image, as it does in raw diffusers."""
        request = self.make_request(negative_prompt=self.negative_prompt, options={"true_cfg_scale": 4.0})
        result = engine.generate(request)
        assert_images_differ(result.images, base.images, "a negative prompt with true CFG")
        expected = self.reference(
            engine.source,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            true_cfg_scale=4.0,
            height=result.request.height,
            width=result.request.width,
            num_inference_steps=self.steps,
            guidance_scale=result.request.guidance_scale,
            generator=cpu_generators(self.seed, 1),
        )
        assert_images_equal(result.images, expected)


@pytest.fixture(scope="module")
def flux(t2i_tiny_cache: Path) -> Engine:
    return load("tiny:flux", device="cpu", accelerators=("fp32",))


@pytest.fixture(scope="module")
def raw_dev(flux: Engine) -> Any:
    return raw_flux(flux.source)


@pytest.fixture(scope="module")
def schnell(t2i_tiny_cache: Path) -> Engine:
    return load(str(schnell_folder()), device="cpu", accelerators=("fp32",))


@pytest.fixture(scope="module")
def raw_schnell(schnell: Engine) -> Any:
    return raw_flux(schnell.source)


# -- dev-style ------------------------------------------------------------------------------------


def test_default_request_is_diffusers_defaults(flux: Engine, raw_dev: Any) -> None:
    """Nothing but a prompt and seed: 28 steps, embedded guidance 3.5, 512 T5 tokens, the checkpoint's size."""
    result = flux.generate(GenerationRequest(prompt=PROMPT, seed=3))
    request = result.request
    assert (request.num_inference_steps, request.guidance_scale) == (28, 3.5)
    assert (request.height, request.width) == (64, 64)  # the tiny VAE's sample_size
    # diffusers' own defaults for everything else (its height/width default is FluxPipeline's 128 x factor).
    assert_images_equal(result.images, raw_images(raw_dev, 3, prompt=PROMPT, height=64, width=64))


def test_another_size_and_seed_and_two_images(flux: Engine, raw_dev: Any) -> None:
    request = GenerationRequest(prompt=PROMPT, seed=40, height=48, width=96, num_images=2, num_inference_steps=STEPS)
    result = flux.generate(request)
    assert result.seeds == [40, 41] and result.images[0].size == (96, 48)
    expected = raw_images(raw_dev, 40, 2, prompt=PROMPT, height=48, width=96, num_inference_steps=STEPS)
    assert_images_equal(result.images, expected)


def test_negative_prompt_through_true_cfg_for_two_images(flux: Engine, raw_dev: Any) -> None:
    options = {"true_cfg_scale": 4.0}
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt="blurry", seed=9, num_images=2, num_inference_steps=STEPS, options=options
    )
    result = flux.generate(request)
    kwargs = {"prompt": PROMPT, "negative_prompt": "blurry", "true_cfg_scale": 4.0, "height": 64, "width": 64}
    assert_images_equal(result.images, raw_images(raw_dev, 9, 2, num_inference_steps=STEPS, **kwargs))
    # Without true CFG diffusers would drop the negative prompt: a real change, not the plain image.
    plain = flux.generate(request.evolve(negative_prompt=None, options={}))
    assert not np.array_equal(as_array(plain.images[0]), as_array(result.images[0]))


def test_negative_prompt_without_true_cfg_is_refused_naming_the_option(flux: Engine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        flux.resolve(GenerationRequest(prompt=PROMPT, negative_prompt="blurry"))
    assert caught.value.field == "options['true_cfg_scale']"
    assert "1.0" in str(caught.value) and "> 1" in str(caught.value)
    with pytest.raises(InvalidRequestError) as caught:
        flux.resolve(GenerationRequest(prompt=PROMPT, options={"true_cfg_scale": 3.0}))
    assert caught.value.field == "options['true_cfg_scale']" and "negative_prompt" in str(caught.value)


def test_max_sequence_length_matches_diffusers(flux: Engine, raw_dev: Any) -> None:
    request = GenerationRequest(prompt=PROMPT, seed=4, num_inference_steps=STEPS, options={"max_sequence_length": 8})
    result = flux.generate(request)
    expected = raw_images(
        raw_dev, 4, prompt=PROMPT, height=64, width=64, num_inference_steps=STEPS, max_sequence_length=8
    )
    assert_images_equal(result.images, expected)
    full = flux.generate(request.evolve(options={}))
    assert_images_differ(result.images, full.images, "the whole prompt")


def test_sizes_must_be_multiples_of_16(flux: Engine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        flux.resolve(GenerationRequest(prompt=PROMPT, height=64, width=88))
    assert caught.value.field == "width" and "88" in str(caught.value) and "multiple of 16" in str(caught.value)


def test_flow_euler_is_the_checkpoint_scheduler(flux: Engine, raw_dev: Any) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    result = flux.generate(GenerationRequest(prompt=PROMPT, seed=2, num_inference_steps=STEPS, scheduler="flow-euler"))
    assert type(flux.pipeline.scheduler) is FlowMatchEulerDiscreteScheduler
    assert_images_equal(
        result.images, raw_images(raw_dev, 2, prompt=PROMPT, height=64, width=64, num_inference_steps=STEPS)
    )
    with pytest.raises(InvalidRequestError) as caught:
        flux.resolve(GenerationRequest(prompt=PROMPT, scheduler="euler"))
    assert caught.value.field == "scheduler"


def test_native_size_of_the_full_size_architecture_is_fluxpipelines_default() -> None:
    """FLUX.1's VAE sample_size (read first) equals FluxPipeline's own default, 128 x the VAE factor of 8."""
    folder = Flux().architecture_folder()
    assert folder is not None
    vae = json.loads((folder / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert vae["sample_size"] == 128 * factor == 1024


def test_architecture_configs_load_in_diffusers_and_transformers() -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, T5Config

    folder = Flux().architecture_folder()
    assert folder is not None
    transformer = FluxTransformer2DModel.load_config(folder / "transformer")
    assert transformer["guidance_embeds"] and transformer["joint_attention_dim"] == 4096
    assert AutoencoderKL.load_config(folder / "vae")["latent_channels"] == 16
    FlowMatchEulerDiscreteScheduler.from_config(FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler"))
    assert CLIPTextConfig.from_pretrained(folder / "text_encoder").hidden_size == transformer["pooled_projection_dim"]
    assert T5Config.from_pretrained(folder / "text_encoder_2").d_model == transformer["joint_attention_dim"]


# -- schnell-style ----------------------------------------------------------------------------------


def test_schnell_is_detected_as_flux_and_runs_like_diffusers(schnell: Engine, raw_schnell: Any) -> None:
    """Schnell-style: the same family; 256 T5 tokens unless asked otherwise; guidance is not embedded."""
    assert schnell.family == "flux"
    result = schnell.generate(GenerationRequest(prompt=PROMPT, seed=6, num_inference_steps=4))
    expected = raw_images(
        raw_schnell, 6, prompt=PROMPT, height=64, width=64, num_inference_steps=4, max_sequence_length=256
    )
    assert_images_equal(result.images, expected)
    longer = schnell.generate(
        GenerationRequest(prompt=PROMPT, seed=6, num_inference_steps=4, options={"max_sequence_length": 512})
    )
    assert_images_equal(
        longer.images,
        raw_images(raw_schnell, 6, prompt=PROMPT, height=64, width=64, num_inference_steps=4),
    )


def test_schnell_refuses_a_guidance_scale_it_would_ignore(schnell: Engine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        schnell.resolve(GenerationRequest(prompt=PROMPT, guidance_scale=5.0))
    assert caught.value.field == "guidance_scale"
    assert "5" in str(caught.value) and "no guidance embedding" in str(caught.value)
    for accepted in (None, 0.0):  # unset, or diffusers' schnell example's 0.0
        schnell.resolve(GenerationRequest(prompt=PROMPT, guidance_scale=accepted))


def test_schnell_true_cfg_matches_diffusers(schnell: Engine, raw_schnell: Any) -> None:
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt="blurry", seed=8, num_inference_steps=2, options={"true_cfg_scale": 2.5}
    )
    result = schnell.generate(request)
    expected = raw_images(
        raw_schnell, 8, prompt=PROMPT, negative_prompt="blurry", true_cfg_scale=2.5, height=64, width=64,
        num_inference_steps=2, max_sequence_length=256,
    )  # fmt: skip
    assert_images_equal(result.images, expected)


def test_schnell_pipeline_defaults_are_its_model_cards(schnell: Engine, flux: Engine) -> None:
    provider = Flux()
    schnell_defaults = provider.pipeline_defaults(schnell.pipeline)
    assert (schnell_defaults.num_inference_steps, schnell_defaults.guidance_scale) == (4, 0.0)
    assert provider.pipeline_defaults(flux.pipeline) == Flux.defaults


def test_schnell_defaults_to_four_steps(schnell: Engine) -> None:
    resolved, _ = schnell.resolve(GenerationRequest(prompt=PROMPT, seed=1))
    assert resolved.num_inference_steps == 4


# -- single file, LoRA ----------------------------------------------------------------------------


def test_detects_single_file_transformers_in_both_layouts() -> None:
    provider = Flux()
    bfl = ["img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"]
    assert provider.detect_single_file(bfl)
    assert provider.detect_single_file([f"model.diffusion_model.{key}" for key in bfl])
    diffusers = ["single_transformer_blocks.0.proj_mlp.weight", "time_text_embed.timestep_embedder.linear_1.weight"]
    assert provider.detect_single_file(diffusers)
    assert not provider.detect_single_file(["model.diffusion_model.input_blocks.0.0.weight"])  # SD 1.x


def test_single_file_transformer_with_configs_from_a_folder(flux: Engine, tmp_path: Path) -> None:
    """A transformer saved as one file loads with the rest of ``config``: the same images as the folder."""
    from safetensors.torch import save_file

    file = tmp_path / "flux-transformer.safetensors"
    save_file({key: value.contiguous() for key, value in transformer_weights(flux.source).items()}, str(file))
    engine = load(str(file), config="tiny:flux", device="cpu", accelerators=("fp32",), cache=False)
    assert engine.family == "flux"
    request = GenerationRequest(prompt=PROMPT, seed=12, num_inference_steps=STEPS)
    assert_images_equal(engine.generate(request).images, flux.generate(request).images)


def flux_lora(folder: str, path: Path, rank: int = 4) -> Path:
    """A tiny FLUX.1 LoRA as diffusers' training scripts save it: PEFT adapters on the transformer's attention."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from t2i_core.tiny import seeded

    with seeded(0):
        transformer = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(Path(folder) / "transformer")
        )
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
        transformer = inject_adapter_in_model(config, transformer)
        with torch.no_grad():
            state = {
                key: value.detach().clone().contiguous()
                for key, value in get_peft_model_state_dict(transformer).items()
            }
    FluxPipeline.save_lora_weights(path.parent, weight_name=path.name, transformer_lora_layers=state)
    return path


@pytest.fixture
def raw_dev_lora(raw_dev: Any) -> Iterator[Any]:
    yield raw_dev
    raw_dev.unload_lora_weights()


def test_lora_matches_diffusers_load_lora_weights(flux: Engine, raw_dev_lora: Any, tmp_path: Path) -> None:
    path = flux_lora(flux.source, tmp_path / "style.safetensors")
    request = GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=STEPS, loras=(Lora(str(path), scale=0.8),))
    result = flux.generate(request)
    raw_dev_lora.load_lora_weights(str(path), adapter_name="style")
    raw_dev_lora.set_adapters(["style"], adapter_weights=[0.8])
    expected = raw_images(raw_dev_lora, 5, prompt=PROMPT, height=64, width=64, num_inference_steps=STEPS)
    assert_images_equal(result.images, expected)
    plain = flux.generate(request.evolve(loras=()))
    assert_images_differ(result.images, plain.images, "the LoRA")


# -- CLI, batch, serve ------------------------------------------------------------------------------


def test_cli_image_equals_the_sdk(flux: Engine, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "x.png"
    code, _, err = run_cli(
        "generate", PROMPT, "--model", "tiny:flux", "--steps", "2", "--seed", "21", "--device", "cpu",
        "--negative-prompt", "blurry", "--option", "true_cfg_scale=3.0", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    options = {"true_cfg_scale": 3.0}
    sdk = flux.generate(
        GenerationRequest(prompt=PROMPT, negative_prompt="blurry", seed=21, num_inference_steps=2, options=options)
    )
    with Image.open(out) as image:
        assert image.text["family"] == "flux" and image.text["guidance_scale"] == "3.5"
        assert_images_equal([image.convert("RGB")], sdk.images)


def test_batch_images_equal_the_sdk(flux: Engine, tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from t2i_core import run_batch

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "fox", "prompt": "a red fox", "seed": 7, "num_inference_steps": STEPS}) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a batch worker's thread count: on a CPU it is part of the computation
    try:
        summary = run_batch(jobs, out=tmp_path / "out", model="tiny:flux", device="cpu", accelerators=("fp32",))
        sdk = flux.generate(GenerationRequest(prompt="a red fox", seed=7, num_inference_steps=STEPS))
    finally:
        torch.set_num_threads(threads)
    assert (summary.done, summary.failed) == (1, 0)
    with Image.open(tmp_path / "out" / "fox.png") as image:
        assert image.text["family"] == "flux"
        assert_images_equal([image.convert("RGB")], sdk.images)


def test_serve_native_api_equals_the_sdk(flux: Engine) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("t2i_server")
    from server_support import decode_png, running_server
    from t2i_server import Limits
    from t2i_server._jobs import Service, load_model

    served = load_model("tiny:flux", "tiny:flux", device="cpu")
    fields: dict[str, Any] = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "options": {"true_cfg_scale": 2.0},
        "num_inference_steps": STEPS,
        "seed": 7,
        "num_images": 2,
    }
    with running_server(Service([served], Limits())) as url, httpx.Client(base_url=url, timeout=120.0) as client:
        response = client.post("/v1/generations", json=fields)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["family"] == "flux" and data["seeds"] == [7, 8]
    images = [decode_png(image) for image in data["images"]]
    assert_images_equal(images, flux.generate(GenerationRequest(**fields)).images)


def test_full_size_architecture_builds_flux1_dev(tmp_path: Path) -> None:
    """The benchmarks build FLUX.1-dev from the architecture configs: published parameter counts, 1024x1024."""
    import importlib.util

    import torch

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_accelerators.py"
    spec = importlib.util.spec_from_file_location("bench_accelerators_flux", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = bench.architecture("flux")
    assert bench.architecture_size(folder) == 1024
    parts = bench.components(json.loads((folder / "model_index.json").read_text()))
    # Millions of parameters: FLUX.1-dev's transformer, T5-v1.1-XXL's encoder, CLIP-L's text model, FLUX.1's VAE.
    expected = {"transformer": 11901.4, "text_encoder_2": 4762.3, "text_encoder": 123.06, "vae": 83.8}
    for component, millions in expected.items():
        library, class_name = parts[component]
        config = bench.component_config(folder, component, class_name)
        model = bench._build_component(library, class_name, config, tmp_path / component, "meta")
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert count == pytest.approx(millions, rel=0.002), f"{component}: {count:.1f}M"
        assert next(model.parameters()).device == torch.device("meta")
    tokenizer = bench._build_component(
        *parts["tokenizer_2"], bench.component_config(folder, "tokenizer_2", "T5TokenizerFast"), tmp_path / "t5", "cpu"
    )
    assert tokenizer.model_max_length == 512


# -- GGUF files, quantized single files ------------------------------------------------------------

#: tiny:flux's own size, which diffusers' FluxPipeline does not read from the checkpoint
TINY_SIZE = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def gguf_files(flux: Engine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny:flux's transformer as GGUF files (diffusers' layout), linear weights in Q8_0 and Q4_K."""
    root = tmp_path_factory.mktemp("gguf")
    state = transformer_weights(flux.source)
    return {
        qtype: write_gguf(state, root / f"flux-tiny-{qtype}.gguf", qtype, architecture="flux")
        for qtype in ("Q8_0", "Q4_K")
    }


def transformer_weights(folder: str) -> dict[str, Any]:
    """The checkpoint's transformer weights from its files, not from the shared engine, whose layers a
    LoRA test may have wrapped (peft's ``base_layer``)."""
    from diffusers import FluxTransformer2DModel

    return dict(FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict())


def raw_gguf_flux(file: Path, folder: str, dtype: Any = None) -> Any:
    """A GGUF FLUX.1 transformer as diffusers' docs load one, in the pipeline of `folder`."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

    dtype = dtype or torch.float32
    half = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    transformer = FluxTransformer2DModel.from_single_file(
        str(file),
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        config=folder,
        subfolder="transformer",
        **half,
    )
    pipeline = FluxPipeline.from_pretrained(folder, transformer=transformer, **half)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def gguf_types(engine: Engine) -> set[str]:
    """The GGUF types of the engine's transformer weights that stayed quantized."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    return {
        parameter.quant_type.name
        for parameter in engine.pipeline.transformer.parameters()
        if isinstance(parameter, GGUFParameter)
    }


@pytest.mark.parametrize(("qtype", "types"), [("Q8_0", {"Q8_0"}), ("Q4_K", {"Q4_K", "Q5_0"})])
def test_a_gguf_transformer_matches_diffusers_gguf_loading(
    flux: Engine, gguf_files: dict[str, Path], qtype: str, types: set[str]
) -> None:
    engine = load(str(gguf_files[qtype]), config="tiny:flux", device="cpu", accelerators=("fp32",), cache=False)
    assert engine.family == "flux"
    assert gguf_types(engine) == types  # Q4_K: rows not of whole 256-blocks fell back to Q5_0
    request = GenerationRequest(prompt=PROMPT, seed=12, num_inference_steps=STEPS)
    result = engine.generate(request)
    expected = raw_images(
        raw_gguf_flux(gguf_files[qtype], flux.source), 12, prompt=PROMPT, num_inference_steps=STEPS, **TINY_SIZE
    )
    assert_images_equal(result.images, expected)
    assert_images_differ(result.images, flux.generate(request).images, "the quantized weights")


def test_a_gguf_transformer_computes_in_the_engines_dtype(flux: Engine, gguf_files: dict[str, Path]) -> None:
    """bf16: GGUFQuantizationConfig(compute_dtype=torch.bfloat16), as diffusers' docs load FLUX.1 GGUF files."""
    import torch

    engine = load(str(gguf_files["Q8_0"]), config="tiny:flux", device="cpu", accelerators=("bf16",), cache=False)
    assert engine.pipeline.transformer.dtype == torch.bfloat16 and gguf_types(engine) == {"Q8_0"}
    result = engine.generate(GenerationRequest(prompt=PROMPT, seed=3, num_inference_steps=STEPS))
    raw = raw_gguf_flux(gguf_files["Q8_0"], flux.source, torch.bfloat16)
    assert_images_equal(result.images, raw_images(raw, 3, prompt=PROMPT, num_inference_steps=STEPS, **TINY_SIZE))


def test_cli_generates_from_a_gguf_file(gguf_files: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    file, out = gguf_files["Q4_K"], tmp_path / "gguf.png"
    code, _, err = run_cli(
        "generate", PROMPT, "--model", str(file), "--config", "tiny:flux", "--steps", "2", "--seed", "21",
        "--device", "cpu", "--accelerator", "fp32", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    engine = load(str(file), config="tiny:flux", device="cpu", accelerators=("fp32",))
    sdk = engine.generate(GenerationRequest(prompt=PROMPT, seed=21, num_inference_steps=2))
    with Image.open(out) as image:
        assert image.text["family"] == "flux" and image.text["model"] == str(file)
        assert_images_equal([image.convert("RGB")], sdk.images)


def int8_transformer() -> Any:
    """torchao's int8 weights on the transformer (what t2i-quantize's ``int8`` hands diffusers)."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})


@pytest.fixture
def quantizing(t2i_registry: Any) -> Iterator[dict[str, str]]:
    """Registers ``test-int8`` (int8 transformer as it loads) and ``test-storage`` (quantizes after load)."""
    from t2i_core import Accelerator, LoadContext, hookimpl

    class Int8(Accelerator):
        name, phase, lossless, description = "test-int8", "quantize", False, "int8 transformer (test)"

        def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
            return {"quantization_config": int8_transformer()}

    class Storage(Accelerator):
        name, phase, lossless, description = "test-storage", "quantize", False, "quantizes after load (test)"

    class Plugin:
        @hookimpl
        def register_accelerators(self, register: Any) -> None:
            register(Int8())
            register(Storage())

    t2i_registry.register_plugin(Plugin(), "test-quantizing")
    try:
        yield {"at_load": "test-int8", "after_load": "test-storage"}
    finally:
        t2i_registry.unregister_plugin("test-quantizing")


def test_a_quantizing_accelerator_quantizes_a_single_file_transformer_as_from_pretrained_does(
    flux: Engine, tmp_path: Path, quantizing: dict[str, str]
) -> None:
    """The file holds tiny:flux's transformer: quantized, it equals diffusers quantizing the folder's."""
    import torch
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    file = tmp_path / "flux-transformer.safetensors"
    save_file({key: value.contiguous() for key, value in transformer_weights(flux.source).items()}, str(file))
    accelerators = ("fp32", quantizing["at_load"])
    engine = load(str(file), config="tiny:flux", device="cpu", accelerators=accelerators, cache=False)
    assert type(engine.pipeline.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    result = engine.generate(GenerationRequest(prompt=PROMPT, seed=8, num_inference_steps=STEPS))
    raw = FluxPipeline.from_pretrained(flux.source, torch_dtype=torch.float32, quantization_config=int8_transformer())
    raw.set_progress_bar_config(disable=True)
    assert_images_equal(result.images, raw_images(raw, 8, prompt=PROMPT, num_inference_steps=STEPS, **TINY_SIZE))


def test_a_gguf_file_refuses_quantizing_it_again_and_fusing_its_projections(
    gguf_files: dict[str, Path], quantizing: dict[str, str]
) -> None:
    file = str(gguf_files["Q8_0"])
    for accelerator in (quantizing["at_load"], quantizing["after_load"], "fuse_qkv"):
        with pytest.raises(IncompatibleAcceleratorsError, match="GGUF file") as refused:
            load(file, config="tiny:flux", device="cpu", accelerators=("fp32", accelerator), cache=False)
        assert refused.value.names == (accelerator,)
