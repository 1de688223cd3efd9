"""GGUF files and quantized single files: ``t2i_core.testing.write_gguf`` against the gguf package's
own reader and diffusers' decoder, the refusals of core's single-file loading, and a quantizing
accelerator's config honoured on a single file (the denoiser quantized as diffusers quantizes it
from a folder). The families that load GGUF files test them against raw diffusers in their own suites.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import tiny_folder

from t2i_core import (
    Accelerator,
    GenerationRequest,
    LoadContext,
    ModelNotFoundError,
    UnsupportedFeatureError,
    hookimpl,
    load,
)
from t2i_core.testing import assert_images_equal, cpu_generators, run_cli, write_gguf
from t2i_core.testing._gguf import quantize_q4_k
from t2i_core.testing.ldm import write_single_file

#: a state dict like a denoiser's: linear weights of whole blocks of 32 or 256 values, and the rest
STATE = {
    "proj.weight": (64, 256),
    "proj.bias": (64,),
    "block.to_q.weight": (32, 32),
    "norm.weight": (32,),
    "odd.weight": (16, 24),
    "pad_token": (1, 32),
    "conv.weight": (32, 16, 2, 2),
}
#: per file type, the type each tensor of STATE is written in
EXPECTED_TYPES = {
    "F32": ["F32", "F32", "F32", "F32", "F32", "F32", "F32"],
    "F16": ["F16", "F32", "F16", "F32", "F16", "F32", "F32"],
    "BF16": ["BF16", "F32", "BF16", "F32", "BF16", "F32", "F32"],
    "Q8_0": ["Q8_0", "F32", "Q8_0", "F32", "F32", "F32", "F32"],
    "Q4_0": ["Q4_0", "F32", "Q4_0", "F32", "F32", "F32", "F32"],
    # llama.cpp's fallback for rows that are not whole blocks of 256
    "Q4_K": ["Q4_K", "F32", "Q5_0", "F32", "F32", "F32", "F32"],
}
#: quantization levels of each type: a value is off by at most one level of its block's range
LEVELS = {"Q8_0": 127, "Q4_0": 7, "Q5_0": 15, "Q4_K": 15, "F16": 1000, "BF16": 100}


def state_dict() -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in STATE.items()}


@pytest.mark.parametrize("qtype", list(EXPECTED_TYPES))
def test_write_gguf_quantizes_linear_weights_and_keeps_the_rest(tmp_path: Path, qtype: str) -> None:
    import gguf
    from gguf.quants import dequantize

    weights = state_dict()
    path = write_gguf(weights, tmp_path / f"model-{qtype}.gguf", qtype, architecture="flux")
    reader = gguf.GGUFReader(str(path))
    assert [tensor.name for tensor in reader.tensors] == list(STATE)
    assert [tensor.tensor_type.name for tensor in reader.tensors] == EXPECTED_TYPES[qtype]
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "flux"
    for tensor in reader.tensors:
        original = weights[tensor.name].numpy()
        decoded = dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
        kind = tensor.tensor_type.name
        if kind == "F32":
            assert np.array_equal(decoded, original), tensor.name
        else:
            level = np.abs(original).max() / LEVELS[kind]
            assert np.abs(decoded - original).max() <= level, (tensor.name, kind)
            assert not np.array_equal(decoded, original), f"{tensor.name} was not quantized"


def test_q4_k_blocks_read_the_same_in_gguf_and_diffusers() -> None:
    """The Q4_K writer is t2i's own (gguf-py only reads it): two independent readers agree on its blocks."""
    import gguf
    import torch
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
    from gguf.quants import dequantize

    rows = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    rows[0, :256] = 0.0  # a block of zeros
    rows[1, :256] = np.abs(rows[1, :256]) + 1.0  # a block with no negative value (its minimum clamps to 0)
    blocks = quantize_q4_k(rows)
    assert blocks.shape == (4, 2 * 144) and blocks.dtype == np.uint8
    kind = gguf.GGMLQuantizationType.Q4_K
    by_gguf = dequantize(blocks, kind)
    assert np.array_equal(by_gguf[0, :256], np.zeros(256, dtype=np.float32))
    assert np.abs(by_gguf - rows).max() <= (rows.max() - rows.min()) / 15
    # diffusers decodes into float16: equal up to its rounding
    by_diffusers = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(blocks), quant_type=kind)).float().numpy()
    np.testing.assert_allclose(by_diffusers, by_gguf, rtol=2e-3, atol=2e-3)


def test_write_gguf_refuses_a_type_it_does_not_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"qtype='Q3_K'.*Q8_0.*Q4_K"):
        write_gguf(state_dict(), tmp_path / "x.gguf", "Q3_K")


# -- loading: refusals ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.5 checkpoint in the original layout, as a GGUF file (its UNet's linear weights Q8_0)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("gguf")
    single = write_single_file(tiny_folder("sd15"), root / "sd15.safetensors")
    return write_gguf(load_file(str(single)), root / "sd15-Q8_0.gguf", "Q8_0", architecture="sd1")


def test_a_gguf_file_of_a_family_that_loads_none_is_refused_naming_those_that_do(sd15_gguf: Path) -> None:
    with pytest.raises(UnsupportedFeatureError) as refused:
        load(str(sd15_gguf), config="tiny:sd15", device="cpu")
    assert refused.value.family == "sd15" and refused.value.feature == "GGUF single files"
    assert {"flux", "sd3", "z-image"} <= set(refused.value.supported)


def test_a_damaged_gguf_file_is_refused(tmp_path: Path) -> None:
    damaged = tmp_path / "model-Q4_K_S.gguf"
    damaged.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelNotFoundError, match="it is not a readable GGUF file"):
        load(str(damaged), config="tiny:flux", device="cpu")


def test_without_the_gguf_package_the_error_says_how_to_install_it(
    sd15_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ModelNotFoundError, match=r"needs the gguf package: python -m pip install gguf"):
        load(str(sd15_gguf), config="tiny:sd15", device="cpu")
    code, _, err = run_cli("generate", "x", "--model", str(sd15_gguf), "--config", "tiny:sd15", "--device", "cpu")
    assert code == 2
    assert err.strip().count("\n") == 0 and "python -m pip install gguf" in err


# -- a quantizing accelerator on a single file -------------------------------------------------------


def int8(component: str) -> Any:
    """torchao's int8 weights (what t2i-quantize's ``int8`` asks for) on `component` of a pipeline."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return PipelineQuantizationConfig(quant_mapping={component: TorchAoConfig(Int8WeightOnlyConfig())})


@pytest.fixture
def quantizers(t2i_registry: Any) -> Iterator[Callable[[str, str], str]]:
    """``add(name, component)``: registers accelerator `name`, quantizing `component` as it loads."""
    added: list[str] = []

    def add(name: str, component: str) -> str:
        class Quantize(Accelerator):
            phase = "quantize"
            lossless = False
            description = f"int8 weights in the {component} (test)"

            def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
                return {"quantization_config": int8(component)}

        Quantize.name = name

        class Plugin:
            @hookimpl
            def register_accelerators(self, register: Callable[[Any], None]) -> None:
                register(Quantize())

        t2i_registry.register_plugin(Plugin(), name)
        added.append(name)
        return name

    try:
        yield add
    finally:
        for name in added:
            t2i_registry.unregister_plugin(name)


def test_a_quantizing_accelerator_quantizes_the_unet_of_a_single_file_as_from_pretrained_does(
    tmp_path: Path, quantizers: Callable[[str, str], str]
) -> None:
    """The file is the tiny folder's checkpoint: its int8 UNet equals diffusers' from the folder, bit for bit."""
    import torch
    from diffusers import StableDiffusionPipeline

    folder = tiny_folder("sd15")
    file = write_single_file(folder, tmp_path / "sd15.safetensors")
    name = quantizers("test-int8-unet", "unet")
    engine = load(str(file), config=folder, device="cpu", accelerators=("fp32", name), cache=False)
    linear = next(module for module in engine.pipeline.unet.modules() if isinstance(module, torch.nn.Linear))
    assert type(linear.weight).__name__ == "Int8Tensor"
    request = GenerationRequest(prompt="a red fox", seed=4, num_inference_steps=2)
    result = engine.generate(request)
    raw = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, quantization_config=int8("unet"))
    raw.set_progress_bar_config(disable=True)
    expected = raw(
        prompt="a red fox",
        num_inference_steps=2,
        guidance_scale=result.request.guidance_scale,
        height=result.request.height,
        width=result.request.width,
        generator=cpu_generators(4, 1),
    ).images
    assert_images_equal(result.images, expected)


def test_quantizing_another_component_of_a_single_file_is_refused(
    tmp_path: Path, quantizers: Callable[[str, str], str]
) -> None:
    folder = tiny_folder("sd15")
    file = write_single_file(folder, tmp_path / "sd15.safetensors")
    name = quantizers("test-int8-encoder", "text_encoder")
    with pytest.raises(UnsupportedFeatureError, match=r"quantizing text_encoder of a single file"):
        load(str(file), config=folder, device="cpu", accelerators=("fp32", name), cache=False)


def test_an_accelerator_sees_the_config_folder_of_a_single_file(tmp_path: Path, t2i_registry: Any) -> None:
    """``LoadContext.config``: where a quantizer reads the components of a single file's pipeline."""
    seen: list[LoadContext] = []

    class Recorder(Accelerator):
        name, phase, description = "test-context", "memory", "records its load context (test)"

        def check(self, context: LoadContext) -> None:
            seen.append(context)

    class Plugin:
        @hookimpl
        def register_accelerators(self, register: Callable[[Any], None]) -> None:
            register(Recorder())

    folder = tiny_folder("sd15")
    file = write_single_file(folder, tmp_path / "sd15.safetensors")
    t2i_registry.register_plugin(Plugin(), "test-context")
    try:
        load(str(file), config=folder, device="cpu", accelerators=("fp32", "test-context"), cache=False)
        load(folder, device="cpu", accelerators=("fp32", "test-context"), cache=False)
    finally:
        t2i_registry.unregister_plugin("test-context")
    assert [(context.source, context.config) for context in seen] == [(str(file), folder), (folder, None)]
