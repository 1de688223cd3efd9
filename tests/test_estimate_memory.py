"""The quantized layers `benchmarks/estimate_memory.py --quantized` builds on fake tensors hold what the real
quantized layers hold, are the layers the real quantizers pick, and compute what the real ones compute."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def quantized() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("_quantized_memory")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def estimate() -> Any:
    spec = importlib.util.spec_from_file_location("estimate_memory", BENCHMARKS / "estimate_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_flux() -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    config = {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16}
    config |= {"num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: `.to()` cannot convert fake parameters in place
    try:
        return FluxTransformer2DModel(**config, axes_dims_rope=(4, 4, 8))
    finally:
        torch.set_default_dtype(default)


def flux_inputs() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 4, generator=generator).to(torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator).to(torch.bfloat16),
        "pooled_projections": torch.randn(1, 32, generator=generator).to(torch.bfloat16),
        "timestep": torch.ones(1, dtype=torch.bfloat16),
        "img_ids": torch.zeros(16, 3, dtype=torch.bfloat16),
        "txt_ids": torch.zeros(8, 3, dtype=torch.bfloat16),
        "return_dict": False,
    }


def replaced(model: Any, class_name: str) -> set[str]:
    return {name for name, module in model.named_modules() if type(module).__name__ == class_name}


def test_nf4_layer_holds_what_bitsandbytes_holds_and_computes_as_it_does_for_many_rows(quantized: Any) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    linear = torch.nn.Linear(256, 96, dtype=torch.bfloat16)
    # The nf4 accelerator's config: NF4, blocks of 64, no double quantization (compress_statistics).
    real = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=False)
    real.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False
    )
    real.bias = torch.nn.Parameter(linear.bias.data.clone())
    real = real.to("cpu")  # quantizes
    state = real.weight.quant_state
    real_bytes = quantized.nbytes(real.weight) + quantized.nbytes(state.absmax) + quantized.nbytes(state.code)

    stand_in = quantized._Nf4Linear(linear)
    assert quantized.resident_bytes(stand_in) - quantized.nbytes(linear.bias) == real_bytes
    stand_in.weight.data.copy_(real.weight.data)
    stand_in.absmax.copy_(state.absmax)
    inputs = torch.randn(64, 256).to(torch.bfloat16)
    dequantized = bnb.functional.dequantize_4bit(real.weight.data, state).to(torch.bfloat16)
    assert torch.equal(stand_in(inputs), torch.nn.functional.linear(inputs, dequantized, real.bias))


def test_nf4_replaces_the_layers_the_real_quantizers_replace(quantized: Any) -> None:
    from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
    from diffusers.quantizers.auto import DiffusersAutoQuantizer
    from transformers import BitsAndBytesConfig, T5Config, T5EncoderModel
    from transformers.quantizers.auto import AutoHfQuantizer

    config = T5Config(vocab_size=99, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)
    t5, real_t5 = T5EncoderModel(config), T5EncoderModel(config)
    AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")).preprocess_model(
        real_t5, device_map=None
    )
    quantized.quantize_text_encoder_nf4(t5)
    assert replaced(t5, "_Nf4Linear") == replaced(real_t5, "Linear4bit")
    assert replaced(t5, "Linear") == {f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(2)}

    flux, real_flux = tiny_flux(), tiny_flux()
    DiffusersAutoQuantizer.from_config(
        DiffusersBitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ).preprocess_model(real_flux, device_map=None, keep_in_fp32_modules=[])
    quantized.quantize_denoiser(flux, "nf4", "flux")
    assert replaced(flux, "_Nf4Linear") == replaced(real_flux, "Linear4bit") != set()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_layer_computes_as_diffusers_gguf_linear(quantized: Any, qtype: str) -> None:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    linear = torch.nn.Linear(512, 8, dtype=torch.bfloat16)
    stand_in = quantized._GgufLinear(linear, qtype)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "Q8_0":  # gguf-py's own quantizer: the blocks a converted file holds
        blocks = gguf.quants.quantize(linear.weight.detach().float().numpy(), kind)
        data = torch.from_numpy(blocks.copy())
    else:  # gguf-py only reads Q4_K: random blocks, their two float16 scales made finite
        block_bytes = torch.randint(0, 256, (8 * 2, 144), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        block_bytes[:, :4] = torch.tensor([0.01, 0.002], dtype=torch.float16).view(torch.uint8)
        data = block_bytes.reshape(8, -1)
    assert stand_in.weight.shape == data.shape
    real = GGUFLinear(512, 8, bias=True, compute_dtype=torch.bfloat16)
    real.weight = GGUFParameter(data, quant_type=kind)
    real.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    stand_in.weight.data.copy_(data)
    inputs = torch.randn(5, 512).to(torch.bfloat16)
    assert torch.equal(stand_in(inputs), real.forward_native(inputs))


def test_q4_k_s_falls_back_on_rows_that_are_not_whole_256_blocks(quantized: Any) -> None:
    import gguf

    assert quantized._gguf_linear(torch.nn.Linear(2432, 64), "Q4_K_S").quant_type == gguf.GGMLQuantizationType.Q5_0
    assert quantized._gguf_linear(torch.nn.Linear(9728, 64), "Q4_K_S").quant_type == gguf.GGMLQuantizationType.Q4_K
    assert quantized._gguf_linear(torch.nn.Linear(40, 64), "Q8_0") is None  # not whole 32-blocks: stays bf16


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_torchao_schemes_hold_on_fake_tensors_what_they_hold_on_real_ones(quantized: Any, scheme: str) -> None:
    pytest.importorskip("torchao")
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = tiny_flux()
    with quantized._without_float8_hardware_check():  # quantizing the weights needs no float8 kernel
        quantized.quantize_denoiser(real, scheme, "flux")
    with FakeTensorMode():
        fake = tiny_flux()
        quantized.quantize_denoiser(fake, scheme, "flux")
        fake_bytes = quantized.resident_bytes(fake)
    assert fake_bytes == quantized.resident_bytes(real) < quantized.resident_bytes(tiny_flux())


def test_fp8_storage_casts_the_layers_diffusers_casts_and_computes_the_same(quantized: Any) -> None:
    real = tiny_flux()
    stand_in = copy.deepcopy(real)
    real.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    quantized.store_in_float8(stand_in)
    dtypes = {name: p.dtype for name, p in stand_in.named_parameters()}
    assert dtypes == {name: p.dtype for name, p in real.named_parameters()}
    assert torch.float8_e4m3fn in dtypes.values() and torch.bfloat16 in dtypes.values()  # norms are skipped
    with torch.no_grad():
        assert torch.equal(stand_in(**flux_inputs())[0], real(**flux_inputs())[0])
    assert {name: p.dtype for name, p in stand_in.named_parameters()} == dtypes  # cast back after the call


def test_stacks_quantize_the_denoiser_and_under_nf4_the_large_text_encoder(estimate: Any) -> None:
    def part(name: str, role: str) -> Any:
        return estimate.Part(name, lambda: None, lambda: None, lambda model, inputs: None, role)

    parts = {
        "d": part("transformer", "denoiser"),
        "t": part("t5", "text_encoder"),
        "v": part("vae_decode", "vae"),
        "vt": part("vae_decode_512_tile", "vae_tile"),
    }

    def figures(parameters: float, activations: float) -> dict[str, float]:
        return {"parameters_gib": parameters, "activations_gib": activations, "two_largest_layers_gib": 0.1}

    transformer = {stack: figures(6.0, 0.5) for stack in estimate.STACKS} | {"bf16": figures(22.0, 0.5)}
    components = {
        "transformer": transformer,
        "t5": {"bf16": figures(9.0, 0.3), "nf4": figures(4.0, 0.3)},
        "vae_decode": {"bf16": figures(0.2, 1.5)},
        "vae_decode_512_tile": {"bf16": figures(0.2, 0.4)},
    }
    stacks = estimate._stacks(parts, components)
    assert stacks["bf16"]["none"] == 22.0 + 9.0 + 0.2 + 1.5
    assert stacks["nf4"]["none"] == 6.0 + 4.0 + 0.2 + 1.5
    assert stacks["nf4"]["none+vae_tiling"] == 6.0 + 4.0 + 0.2 + 0.5
    assert stacks["int8"]["cpu_offload"] == 9.0 + 0.3  # T5 stays bf16: its phase is the peak
    assert stacks["nf4"]["cpu_offload"] == 6.0 + 0.5
    assert stacks["nf4"]["group_offload"] == 0.1 + 1.5
    assert stacks["nf4"]["group_offload+vae_tiling"] == 0.1 + 0.5
