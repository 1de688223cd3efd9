"""t2i-quantize: each accelerator equals the raw diffusers call it stands for.

- ``int8``: ``from_pretrained(folder, quantization_config=PipelineQuantizationConfig(quant_mapping=
  {denoiser: TorchAoConfig(Int8WeightOnlyConfig())}))``, bit for bit on CPU, on every family;
- ``fp8-storage``: ``denoiser.enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=
  float32)`` after loading, bit for bit on CPU;
- ``nf4`` and ``fp8`` run on CUDA only: their configs equal the raw ones field by field, they are
  refused on CPU before any weights load, and (``-m gpu``) their images equal raw diffusers' on CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from t2i_core import Engine, GenerationRequest, IncompatibleAcceleratorsError, LoadContext, get_registry, load
from t2i_core.kit import denoiser
from t2i_core.testing import (
    AcceleratorConformance,
    assert_images_equal,
    cpu_generators,
    raw_pipeline,
    require_family,
)

PROMPT = "a lighthouse on a cliff"
STEPS = 2
#: each family's guidance, given to both sides
GUIDANCE = {"flux": 3.5, "sd3": 4.0, "z-image": 0.0, "sd15": 7.5}
FAMILIES = tuple(GUIDANCE)
#: the denoiser each family's model_index.json names
DENOISER = {"flux": "transformer", "sd3": "transformer", "z-image": "transformer", "sd15": "unet"}
#: the text encoders nf4 quantizes besides the denoiser: T5-XXL, Z-Image's Qwen3 (never CLIP)
LARGE_TEXT_ENCODERS = {
    "flux": ("text_encoder_2",),
    "sd3": ("text_encoder_3",),
    "z-image": ("text_encoder",),
    "sd15": (),
}
#: the most levels of 255 an image with int8 / fp8-storage weights was seen to differ from plain fp32
#: on tiny:flux (at most 1 and 5 measured: docs/optimize.md#quantization), with some headroom
INT8_LEVELS = 4
FP8_STORAGE_LEVELS = 10

pytestmark = pytest.mark.filterwarnings(
    "ignore:Mismatch dtype between input and weight",
    "ignore:.*does not implement _stable_hash_for_caching",
)


def request(family: str) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT, seed=5, num_inference_steps=STEPS, height=64, width=64, guidance_scale=GUIDANCE[family]
    )


def raw_images(pipeline: Any, family: str) -> list[Any]:
    call = {"height": 64, "width": 64, "guidance_scale": GUIDANCE[family]}
    return list(pipeline(prompt=PROMPT, num_inference_steps=STEPS, generator=cpu_generators(5, 1), **call).images)


def raw_int8(folder: str, family: str, **kwargs: Any) -> Any:
    """What a diffusers user writes for int8 weights in the denoiser."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    config = PipelineQuantizationConfig(quant_mapping={DENOISER[family]: TorchAoConfig(Int8WeightOnlyConfig())})
    return raw_pipeline(folder, quantization_config=config, **kwargs)


def linear_weights(model: Any) -> dict[str, Any]:
    import torch

    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def context(family: str, *accelerators: str, device: str = "cpu") -> LoadContext:
    """The LoadContext a load of ``tiny:<family>`` with `accelerators` gives the accelerators."""
    from t2i_core.testing import tiny_folder

    registry = get_registry()
    return LoadContext(
        model=f"tiny:{family}",
        source=str(tiny_folder(family)),
        family=family,
        provider=registry.provider(family),
        device=device,
        accelerators=accelerators,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, t2i_tiny_cache: Path) -> str:
    require_family(request.param)
    return str(request.param)


@pytest.fixture(scope="module")
def int8(family: str) -> Engine:
    return load(f"tiny:{family}", device="cpu", accelerators=("fp32", "int8"), cache=False)


# -- int8 ----------------------------------------------------------------------------------------


def test_int8_matches_raw_diffusers(int8: Engine, family: str) -> None:
    """``fp32`` + ``int8`` is from_pretrained with the int8 config in float32, bit for bit."""
    import torch

    ours = int8.generate(request(family)).images
    assert_images_equal(ours, raw_images(raw_int8(int8.source, family, torch_dtype=torch.float32), family))


def test_int8_quantizes_the_denoiser_and_nothing_else(int8: Engine, family: str) -> None:
    import torch
    from torchao.utils import TorchAOBaseTensor

    weights = linear_weights(denoiser(int8.pipeline))
    assert weights and all(type(w).__name__ == "Int8Tensor" for w in weights.values()), {
        name: type(w).__name__ for name, w in weights.items()
    }
    assert {w.dtype for w in weights.values()} == {torch.float32}
    for name, component in int8.pipeline.components.items():
        if component is not denoiser(int8.pipeline) and hasattr(component, "named_modules"):
            assert not any(isinstance(w, TorchAOBaseTensor) for w in linear_weights(component).values()), name


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_int8_without_a_dtype_loads_in_bf16(name: str, t2i_tiny_cache: Path) -> None:
    """Alone, int8 loads everything in bfloat16 (torchao's dtype), as ``torch_dtype=torch.bfloat16`` does:
    left to diffusers, only the denoiser would be, and SD3's pipeline fails on its float32 latents."""
    import torch

    require_family(name)
    engine = load(f"tiny:{name}", device="cpu", accelerators=("int8",), cache=False)
    assert {m.dtype for m in engine.pipeline.components.values() if isinstance(m, torch.nn.Module)} == {torch.bfloat16}
    raw = raw_int8(engine.source, name, torch_dtype=torch.bfloat16)
    assert_images_equal(engine.generate(request(name)).images, raw_images(raw, name))


def test_int8_is_refused_without_torchao(monkeypatch: pytest.MonkeyPatch, t2i_tiny_cache: Path) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    monkeypatch.setattr(get_registry().provider("sd15"), "load_pipeline", _refuse_loading)
    with pytest.raises(
        IncompatibleAcceleratorsError, match=r"int8.*torchao, which is not installed \(pip install torchao\)"
    ):
        load("tiny:sd15", device="cpu", accelerators=("fp32", "int8"), cache=False)


# -- fp8-storage ---------------------------------------------------------------------------------


def test_fp8_storage_matches_raw_layerwise_casting(family: str) -> None:
    import torch

    engine = load(f"tiny:{family}", device="cpu", accelerators=("fp32", "fp8-storage"), cache=False)
    raw = raw_pipeline(engine.source)
    getattr(raw, DENOISER[family]).enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32
    )
    ours = engine.generate(request(family)).images
    assert_images_equal(ours, raw_images(raw, family))
    stored = {w.dtype for w in linear_weights(denoiser(engine.pipeline)).values()}
    assert torch.float8_e4m3fn in stored, stored


def test_fp8_storage_is_refused_on_kandinsky_whose_unet_casts_inputs_to_its_weights_dtype(
    t2i_tiny_cache: Path,
) -> None:
    """Kandinsky 2.2's UNet projects the image embedding after casting it to its weights' dtype: under
    layerwise casting a float8 input, which raw diffusers fails on mid-image (float8 ``mat1``)."""
    require_family("kandinsky22")
    with pytest.raises(IncompatibleAcceleratorsError, match=r"fp8-storage .*casts its image embedding .*float8"):
        load("tiny:kandinsky22", device="cpu", accelerators=("fp32", "fp8-storage"), cache=False)


# -- nf4 and fp8: their configs, their refusals ---------------------------------------------------


def _same_config(ours: Any, theirs: Any) -> None:
    assert type(ours) is type(theirs)
    assert ours.to_dict() == theirs.to_dict()


def _raw_nf4(family: str, dtype: Any) -> dict[str, Any]:
    from diffusers import BitsAndBytesConfig
    from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig

    nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    mapping: dict[str, Any] = {DENOISER[family]: BitsAndBytesConfig(**nf4)}
    for encoder in LARGE_TEXT_ENCODERS[family]:
        mapping[encoder] = TransformersBitsAndBytesConfig(**nf4)
    return mapping


def test_nf4_without_a_dtype_computes_in_bf16(family: str) -> None:
    import torch

    kwargs = get_registry().accelerator("nf4").load_kwargs(context(family, "nf4", device="cuda"))
    assert kwargs["torch_dtype"] == torch.bfloat16
    for name, raw in _raw_nf4(family, torch.bfloat16).items():
        _same_config(kwargs["quantization_config"].quant_mapping[name], raw)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_nf4_config_is_the_raw_one(family: str, dtype: str) -> None:
    """4-bit NF4 on the denoiser and the T5 / LLM encoders (transformers' config there), in the engine's dtype."""
    import torch
    from diffusers import PipelineQuantizationConfig

    nf4 = get_registry().accelerator("nf4")
    kwargs = nf4.load_kwargs(context(family, dtype, "nf4", device="cuda"))
    config = kwargs["quantization_config"]
    assert isinstance(config, PipelineQuantizationConfig) and "torch_dtype" not in kwargs
    expected = _raw_nf4(family, {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    assert list(config.quant_mapping) == list(expected)
    for name, raw in expected.items():
        _same_config(config.quant_mapping[name], raw)


def test_fp8_config_is_the_raw_one(family: str) -> None:
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    fp8 = get_registry().accelerator("fp8")
    config = fp8.load_kwargs(context(family, "bf16", "fp8", device="cuda"))["quantization_config"]
    assert isinstance(config, PipelineQuantizationConfig)
    assert list(config.quant_mapping) == [DENOISER[family]]
    _same_config(config.quant_mapping[DENOISER[family]], TorchAoConfig(Float8DynamicActivationFloat8WeightConfig()))


def _refuse_loading(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("weights were loaded: the accelerator should have been refused before")


@pytest.mark.parametrize("name", ["nf4", "fp8"])
def test_cuda_only_quantizers_are_refused_on_cpu_before_loading(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    require_family("flux")
    monkeypatch.setattr(get_registry().provider("flux"), "load_pipeline", _refuse_loading)
    with pytest.raises(IncompatibleAcceleratorsError, match=rf"accelerators {name} cannot .*runs on cuda, not on cpu"):
        load("tiny:flux", device="cpu", accelerators=("fp32", name), cache=False)


@pytest.mark.parametrize(
    ("capability", "refused"), [((7, 5), True), ((8, 6), True), ((8, 9), False), ((9, 0), False), ((12, 0), False)]
)
def test_fp8_needs_compute_capability_8_9(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], refused: bool
) -> None:
    """Ampere and older GPUs have no float8 matrix multiplication: refused naming the GPU and its capability."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA Test GPU")
    fp8 = get_registry().accelerator("fp8")
    if refused:
        major, minor = capability
        with pytest.raises(
            IncompatibleAcceleratorsError,
            match=rf"NVIDIA Test GPU \(compute capability {major}\.{minor}\) has no float8 .* needs 8\.9 or newer",
        ):
            fp8.check(context("flux", "bf16", "fp8", device="cuda:0"))
    else:
        fp8.check(context("flux", "bf16", "fp8", device="cuda:0"))


def test_a_checkpoint_without_a_denoiser_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "SomePipeline", "vae": ["diffusers", "AutoencoderKL"]}')
    base = context("sd15", "fp32", "int8")
    odd = LoadContext(
        model="odd", source=str(tmp_path), family="sd15", provider=base.provider, device="cpu", accelerators=()
    )
    for name in ("int8", "fp8-storage"):
        with pytest.raises(IncompatibleAcceleratorsError, match=r"'odd' names no diffusers unet, transformer, prior"):
            get_registry().accelerator(name).check(odd)


# -- on CUDA (opt-in: pytest -m gpu) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nf4", "fp8"])
def test_cuda_quantizers_match_raw_diffusers_on_cuda(name: str, family: str) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.fail("-m gpu needs a CUDA device")
    from t2i_quantize import fp8_problem

    if name == "fp8" and fp8_problem("cuda") is not None:
        pytest.skip(str(fp8_problem("cuda")))
    engine = load(f"tiny:{family}", device="cuda", accelerators=("bf16", name), cache=False)
    accelerator = get_registry().accelerator(name)
    config = accelerator.load_kwargs(context(family, "bf16", name, device="cuda"))["quantization_config"]
    raw = raw_pipeline(engine.source, quantization_config=config, torch_dtype=torch.bfloat16).to("cuda")
    assert_images_equal(engine.generate(request(family)).images, raw_images(raw, family))


# -- the conformance kit -------------------------------------------------------------------------


class TestInt8(AcceleratorConformance):
    accelerator = "int8"
    model = "tiny:flux"
    tolerance = INT8_LEVELS
    why = "int8 weights round each weight to one of 255 steps of its row's scale"

    def effect(self, engine: Engine) -> Any:
        return type(next(iter(linear_weights(denoiser(engine.pipeline)).values()))).__name__


class TestFp8Storage(AcceleratorConformance):
    accelerator = "fp8-storage"
    model = "tiny:flux"
    tolerance = FP8_STORAGE_LEVELS
    why = "float8_e4m3fn keeps 3 bits of each weight's mantissa"

    def effect(self, engine: Engine) -> Any:
        return {str(w.dtype) for w in linear_weights(denoiser(engine.pipeline)).values()}


def test_int8_on_a_single_file_quantizes_its_transformer_as_on_the_folder(t2i_tiny_cache: Path, tmp_path: Path) -> None:
    """A single file's components are read from its config folder: int8 quantizes the file's transformer,
    and the image is that of raw diffusers quantizing the folder's (the file holds the same weights)."""
    import torch
    from diffusers import FluxPipeline, PipelineQuantizationConfig, TorchAoConfig
    from safetensors.torch import save_file
    from torchao.quantization import Int8WeightOnlyConfig

    from t2i_core.testing import tiny_folder

    folder = tiny_folder("flux")
    plain = load("tiny:flux", device="cpu", accelerators=("fp32",), cache=False)
    file = tmp_path / "flux-transformer.safetensors"
    save_file({key: value.contiguous() for key, value in plain.pipeline.transformer.state_dict().items()}, str(file))
    engine = load(str(file), config="tiny:flux", device="cpu", accelerators=("fp32", "int8"), cache=False)
    assert type(denoiser(engine.pipeline).transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    raw = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32, quantization_config=config)
    raw.set_progress_bar_config(disable=True)
    assert_images_equal(engine.generate(request("flux")).images, raw_images(raw, "flux"))
