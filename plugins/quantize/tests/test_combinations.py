"""The quantizers with what they combine with: LoRAs (t2i-lora), fuse_lora, torch.compile.

LoRAs on int8 weights equal raw diffusers' ``load_lora_weights`` + ``set_adapters`` on the same
int8 pipeline, bit for bit (peft wraps torchao's weights in its ``TorchaoLoraLinear``); on
fp8-storage weights they are refused before any work, naming why. The whole tried matrix is in
docs/optimize.md#quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from t2i_core import Engine, GenerationRequest, IncompatibleAcceleratorsError, Lora, load
from t2i_core.testing import (
    assert_images_close,
    assert_images_differ,
    assert_images_equal,
    cpu_generators,
    raw_pipeline,
    refuse_to_run,
    require_family,
)

pytest.importorskip("t2i_lora")
from t2i_lora import tiny

PROMPT = "a lighthouse on a cliff"
STEPS = 2
GUIDANCE = {"flux": 3.5, "sd15": 7.5}
DENOISER = {"flux": "transformer", "sd15": "unet"}
#: fused weights compute W + s·BA once, re-quantized to int8, instead of Wx + s·B(Ax) each step
FUSE_LEVELS = 2
#: inductor's kernels round differently from eager ones (at most 1 level measured on tiny:flux)
COMPILE_LEVELS = 2

pytestmark = pytest.mark.filterwarnings(
    "ignore:Already found a `peft_config`",
    "ignore:Mismatch dtype between input and weight",
    "ignore:.*does not implement _stable_hash_for_caching",
)


def request(family: str, **fields: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT, seed=5, num_inference_steps=STEPS, height=64, width=64, guidance_scale=GUIDANCE[family], **fields
    )


@pytest.fixture(scope="module", params=tuple(GUIDANCE))
def family(request: pytest.FixtureRequest, t2i_tiny_cache: Path) -> str:
    require_family(request.param)
    return str(request.param)


@pytest.fixture(scope="module")
def int8(family: str) -> Engine:
    return load(f"tiny:{family}", device="cpu", accelerators=("fp32", "int8"), cache=False)


@pytest.fixture(scope="module")
def style(int8: Engine, family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.lora_file(int8.source, tmp_path_factory.mktemp("lora") / "style.safetensors", seed=1)


def raw_int8_with_lora(folder: str, family: str, lora: Path | None, scale: float) -> list[Any]:
    """Raw diffusers: the int8 pipeline in float32, the LoRA loaded under a name and set to its scale."""
    import torch
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    config = PipelineQuantizationConfig(quant_mapping={DENOISER[family]: TorchAoConfig(Int8WeightOnlyConfig())})
    pipeline = raw_pipeline(folder, quantization_config=config, torch_dtype=torch.float32)
    if lora is not None:
        pipeline.load_lora_weights(str(lora), adapter_name="style")
        pipeline.set_adapters(["style"], adapter_weights=[scale])
    call = {"height": 64, "width": 64, "guidance_scale": GUIDANCE[family]}
    return list(pipeline(prompt=PROMPT, num_inference_steps=STEPS, generator=cpu_generators(5, 1), **call).images)


def test_a_lora_on_int8_weights_matches_raw_diffusers(int8: Engine, family: str, style: Path) -> None:
    ours = int8.generate(request(family, loras=(Lora(str(style), scale=0.8),))).images
    assert_images_equal(ours, raw_int8_with_lora(int8.source, family, style, 0.8))
    base = int8.generate(request(family)).images
    assert_images_differ(ours, base, "the LoRA")
    assert_images_equal(base, raw_int8_with_lora(int8.source, family, None, 0.0), "raw int8 diffusers without LoRA")


def test_fuse_lora_on_int8_weights_restores_them_exactly(int8: Engine, family: str, style: Path) -> None:
    """t2i-lora's fuse_lora keeps the int8 weights from before fusing, so unfusing gives them back
    exactly (peft's own unmerge re-quantizes them: off by a level)."""
    if family != "flux":
        pytest.skip("one family is enough: the same peft and torchao layers on every one")
    fused = load("tiny:flux", device="cpu", accelerators=("fp32", "int8", "fuse_lora"), cache=False)
    loras = (Lora(str(style), scale=0.8),)
    ours = fused.generate(request(family, loras=loras)).images
    assert_images_close(
        ours,
        int8.generate(request(family, loras=loras)).images,
        max_levels=FUSE_LEVELS,
        why=("fused weights are re-quantized to int8 with the LoRA in them"),
    )
    assert_images_equal(fused.generate(request(family)).images, int8.generate(request(family)).images, "int8 unfused")


def test_loras_on_fp8_storage_are_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch, family: str, style: Path
) -> None:
    engine = load(f"tiny:{family}", device="cpu", accelerators=("fp32", "fp8-storage"))
    refuse_to_run(monkeypatch, engine)
    with pytest.raises(IncompatibleAcceleratorsError, match=r"fp8-storage, loras cannot .*LoRA layers .*float8"):
        engine.generate(request(family, loras=(Lora(str(style)),)))


@pytest.mark.parametrize("compile_mode", ["compile", "compile-regional", "fuse_lora"])
def test_fp8_storage_refuses_compile_and_fuse_lora(family: str, compile_mode: str) -> None:
    """Its casting hooks call ``module.to()`` inside forward, which Dynamo cannot trace."""
    with pytest.raises(IncompatibleAcceleratorsError, match=r"fp8-storage excludes .*" + compile_mode):
        load(f"tiny:{family}", device="cpu", accelerators=("fp32", "fp8-storage", compile_mode), cache=False)


@pytest.mark.parametrize("quantizer", ["int8", "fp8-storage"])
def test_a_step_cache_on_quantized_weights_matches_raw_diffusers(family: str, quantizer: str) -> None:
    """first-block-cache's hooks on an int8 / fp8-storage transformer: raw diffusers' enable_cache on the same."""
    import torch
    from diffusers import FirstBlockCacheConfig, PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    if family != "flux":
        pytest.skip("the step caches run on FLUX.1's transformer (diffusers' CacheMixin)")
    engine = load("tiny:flux", device="cpu", accelerators=("fp32", quantizer, "first-block-cache"), cache=False)
    if quantizer == "int8":
        config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
        raw = raw_pipeline(engine.source, quantization_config=config, torch_dtype=torch.float32)
    else:
        raw = raw_pipeline(engine.source)
        raw.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    raw.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    call = {"height": 64, "width": 64, "guidance_scale": GUIDANCE[family]}
    expected = raw(prompt=PROMPT, num_inference_steps=4, generator=cpu_generators(5, 1), **call).images
    ours = engine.generate(attrs.evolve(request(family), num_inference_steps=4)).images
    assert_images_equal(ours, list(expected))


@pytest.mark.slow
@pytest.mark.parametrize("compile_mode", ["compile", "compile-regional"])
def test_int8_compiles(int8: Engine, family: str, compile_mode: str) -> None:
    """torchao's int8 weights under torch.compile (inductor on CPU: about a minute to compile)."""
    compiled = load(f"tiny:{family}", device="cpu", accelerators=("fp32", "int8", compile_mode), cache=False)
    ours = compiled.generate(request(family)).images
    assert_images_close(
        ours,
        int8.generate(request(family)).images,
        max_levels=COMPILE_LEVELS,
        why=("inductor's fused kernels round differently"),
    )
