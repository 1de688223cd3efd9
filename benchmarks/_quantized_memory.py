"""Quantized models on fake tensors, for `estimate_memory.py --quantized`: each scheme as its accelerator applies it.

Call everything here inside ``FakeTensorMode``. Each scheme is applied by the library itself where it
can work on fake tensors, and by a stand-in with the same storage and forward where it cannot:

- ``int8`` and ``fp8``: torchao's own ``quantize_`` on the fake model (``Int8WeightOnlyConfig``:
  int8 weights, a float32 scale per row; ``Float8DynamicActivationFloat8WeightConfig``: float8
  weights, one scale per tensor, and each call's input scaled to float8 — torchao's float8
  hardware check is skipped, nothing is computed); eager torchao dequantizes int8 weights to bf16
  for the product, and makes float32 copies of each input to scale it to float8: both are counted;
- ``fp8-storage``: diffusers' ``enable_layerwise_casting`` picks and casts the layers (its hook
  assigns parameters, since ``module.to`` cannot swap fake tensors); the running layer's bf16 copy
  is counted;
- ``nf4``: bitsandbytes' ``Params4bit`` cannot wrap a fake tensor, so each linear layer the real
  quantizers would take (diffusers': every ``nn.Linear`` outside ``_keep_in_fp32_modules``;
  transformers': not ``_keep_in_fp32_modules`` — T5's ``wo`` — nor tied or output embeddings)
  becomes a stand-in holding the same storage: 4 bits per weight packed in uint8 and a float32
  absmax per block of 64 (no double quantization, as the accelerator configures it), the
  16-entry code table, the bias in bf16; it runs bitsandbytes' own ``dequantize_4bit`` (fake
  kernel) then ``F.linear``, as bitsandbytes does for more rows than its fused kernel takes;
  T5 / Qwen3 in NF4 too;
- GGUF ``Q8_0`` / ``Q4_K_S`` denoiser files: ``GGUFParameter`` cannot wrap a fake tensor either, so
  each linear layer the published files quantize becomes a stand-in holding the file's blocks
  (Q8_0: 34 bytes per 32 weights; Q4_K: 144 bytes per 256), dequantized with diffusers' own
  functions and cast to bf16 on each call, as diffusers' ``GGUFLinear`` does without CUDA kernels.
  The float layers follow city96's converter (FLUX.1: the embedders and final layer; SD3: the
  final layer; Z-Image: none). ``Q4_K_S`` is taken as Q4_K for every quantized weight whose rows
  are whole 256-blocks, else Q5_0 (llama.cpp's fallback; SD3.5 Large's 2432-wide rows mostly fall
  back) — llama.cpp's Q5_K/Q6_K bumps for some LLM tensor names match no diffusion-model name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

GIB = 2**30

#: the denoiser schemes, as the accelerators name them (GGUF: the denoiser file's type)
SCHEMES = ("int8", "fp8", "fp8-storage", "nf4", "gguf-Q8_0", "gguf-Q4_K_S")
#: NF4 as the ``nf4`` accelerator configures it: bitsandbytes' default block of 64, no double quantization
NF4_BLOCK = 64
#: entries of bitsandbytes' NF4 code table, kept (float32) in each layer's quant state
NF4_CODE = 16
#: what llama.cpp writes for a Q4_K tensor whose rows are not whole 256-blocks, as t2i_core.testing does
K_FALLBACK = "Q5_0"
#: Linear weights the published GGUF denoisers keep in float (city96's convert.py blacklist and llama.cpp
#: patch: FLUX's img_in, txt_in, time_in, vector_in, guidance_in, final_layer; SD3's final_layer), by
#: diffusers module name. Z-Image: no rule published; every weight whose rows are whole blocks is quantized.
GGUF_FLOAT = {
    "flux": ("x_embedder", "context_embedder", "time_text_embed.", "norm_out.", "proj_out"),
    "sd3": ("norm_out.", "proj_out"),
    "z-image": (),
}


def nbytes(tensor: Any) -> int:
    """Bytes `tensor` holds, through tensor subclasses (torchao's weight holds int8 data and scales, not its dtype)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(nbytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel() * tensor.element_size())


def resident_bytes(model: Any) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(nbytes(t) for t in tensors.values())


def largest_leaves(model: Any, count: int = 2) -> int:
    """The bytes of the `count` largest leaf modules: what leaf-level group offloading holds on the GPU
    (a tied weight, such as T5's shared embedding, counted once)."""
    seen: set[int] = set()
    sizes = []
    for module in model.modules():
        if list(module.children()):
            continue
        tensors = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if id(t) not in seen]
        seen.update(id(t) for t in tensors)
        sizes.append(sum(nbytes(t) for t in tensors))
    return sum(sorted(sizes, reverse=True)[:count])


def peak(model: Any, inputs: Any, call: Callable[[Any, Any], Any]) -> dict[str, float]:
    """`call(model, inputs)` under torch's MemTracker: the resident weights, and everything else at the peak.

    "Activations" are the tracker's total at its peak less the weights at rest, so they include what a
    quantized layer makes while it runs (its dequantized weight, float8 activations and their scales).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):  # type: ignore[misc]
        # Quantized weights never require grad, and MemTracker hooks every parameter's gradient.
        def _track_module_params_and_buffers(self, module: Any, install_grad_hooks: bool = True) -> tuple[int, int]:
            sizes: tuple[int, int] = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            return sizes

    resident = resident_bytes(model)
    tracker = Tracker()
    tracker.track_external(model)
    with tracker, torch.no_grad():
        call(model, inputs)
    (device_peaks,) = tracker.get_tracker_snapshot("peak").values()
    return {
        "parameters_gib": round(resident / GIB, 3),
        "activations_gib": round((device_peaks["Total"] - resident) / GIB, 3),
        "two_largest_layers_gib": round(largest_leaves(model) / GIB, 3),
    }


def quantize_denoiser(model: Any, scheme: str, family: str) -> None:
    """Quantize the bf16 denoiser `model` (fake) in place as `scheme` does; one of `SCHEMES`."""
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    elif scheme == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

        with _without_float8_hardware_check():
            quantize_(model, Float8DynamicActivationFloat8WeightConfig())
    elif scheme == "fp8-storage":
        store_in_float8(model)
    elif scheme == "nf4":
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        _swap_linears(model, lambda name, _: not any(key + "." in name or key == name for key in keep), _Nf4Linear)
    elif scheme.startswith("gguf-"):
        qtype, keep = scheme.removeprefix("gguf-"), GGUF_FLOAT[family]
        _swap_linears(
            model,
            lambda name, _: not any(name.startswith(prefix) for prefix in keep),
            lambda linear: _gguf_linear(linear, qtype),
        )
    else:
        raise ValueError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}")


def quantize_text_encoder_nf4(model: Any) -> None:
    """NF4 on a transformers text encoder (T5, Qwen3) as transformers' bitsandbytes quantizer picks the layers:
    not its ``_keep_in_fp32_modules`` (T5's ``wo``, kept in bf16), nor the tied or output embeddings."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, list(getattr(model, "_keep_in_fp32_modules", ())))
    _swap_linears(model, lambda name, _: should_convert_module(name, skip), _Nf4Linear)


def _swap_linears(model: Any, chosen: Callable[[str, Any], bool], make: Callable[[Any], Any]) -> None:
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and chosen(name, module)
    ]
    for name, linear in swaps:
        parent_name, _, child = name.rpartition(".")
        replacement = make(linear)
        if replacement is not None:
            setattr(model.get_submodule(parent_name), child, replacement)


@contextlib.contextmanager
def _without_float8_hardware_check() -> Iterator[None]:
    """torchao refuses float8 without an Ada/Hopper GPU; on fake tensors nothing runs, so let it build."""
    import torchao.quantization.quant_api as quant_api

    saved = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda *args, **kwargs: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = saved


def store_in_float8(model: Any) -> None:
    """diffusers' ``enable_layerwise_casting(float8_e4m3fn, bf16)``, with its own choice of layers and skip
    patterns; the hook casts by assigning new parameters (``module.to`` would swap fake tensors in place)."""
    from diffusers.hooks import layerwise_casting

    def cast(module: Any, dtype: Any) -> None:
        for name, tensor in list(module._parameters.items()):
            if tensor is not None and tensor.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)

    class AssigningHook(layerwise_casting.LayerwiseCastingHook):  # type: ignore[misc]
        def initialize_hook(self, module: Any) -> Any:
            cast(module, self.storage_dtype)
            return module

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            cast(module, self.compute_dtype)
            return args, kwargs

        def post_forward(self, module: Any, output: Any) -> Any:
            cast(module, self.storage_dtype)
            return output

    saved = layerwise_casting.LayerwiseCastingHook
    layerwise_casting.LayerwiseCastingHook = AssigningHook
    try:
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    finally:
        layerwise_casting.LayerwiseCastingHook = saved


class _Nf4Linear(torch.nn.Module):  # type: ignore[misc]
    """bitsandbytes' ``Linear4bit`` (NF4, blocks of 64, computing in bf16): the packed weight, the quant state's
    absmax (float32, one per block) and code table, the bias in bf16; forward as bitsandbytes runs it for
    more rows than its fused kernel takes (a whole image's tokens): dequantize to bf16, then ``F.linear``."""

    def __init__(self, linear: Any) -> None:
        super().__init__()
        self.shape = tuple(linear.weight.shape)
        count = linear.weight.numel()
        self.weight = torch.nn.Parameter(torch.empty((count + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
        self.register_buffer("absmax", torch.empty(math.ceil(count / NF4_BLOCK), dtype=torch.float32))
        self.register_buffer("code", torch.empty(NF4_CODE, dtype=torch.float32))
        self.bias = linear.bias

    def forward(self, inputs: Any) -> Any:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes and its fake kernels)

        weight = torch.ops.bitsandbytes.dequantize_4bit(
            self.weight, self.absmax, NF4_BLOCK, "nf4", list(self.shape), torch.bfloat16
        )
        return torch.nn.functional.linear(inputs.to(torch.bfloat16), weight, self.bias)


def _gguf_linear(linear: Any, qtype: str) -> Any:
    """The stand-in for `linear` in a GGUF file of `qtype` (``Q4_K_S``: Q4_K, or `K_FALLBACK` for rows that
    are not whole 256-blocks); None where the weight stays in float (rows not whole blocks of any type)."""
    import gguf

    columns = linear.weight.shape[1]
    candidates = ("Q4_K", K_FALLBACK) if qtype == "Q4_K_S" else (qtype,)
    for candidate in candidates:
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[candidate]]
        if columns % block == 0:
            return _GgufLinear(linear, candidate)
    return None


class _GgufLinear(torch.nn.Module):  # type: ignore[misc]
    """diffusers' ``GGUFLinear`` computing natively (no CUDA kernels package): its weight is the file's blocks
    (uint8), dequantized in full with diffusers' own functions on each call, cast to bf16, then ``F.linear``."""

    def __init__(self, linear: Any, qtype: str) -> None:
        import gguf

        super().__init__()
        self.quant_type = gguf.GGMLQuantizationType[qtype]
        self.block, self.type_size = gguf.GGML_QUANT_SIZES[self.quant_type]
        rows, columns = linear.weight.shape
        self.shape = (rows, columns)
        data = torch.empty(rows, columns // self.block * self.type_size, dtype=torch.uint8)
        self.weight = torch.nn.Parameter(data, requires_grad=False)
        self.bias = linear.bias

    def forward(self, inputs: Any) -> Any:
        from diffusers.quantizers.gguf.utils import dequantize_functions

        blocks = self.weight.reshape(-1, self.type_size)
        weight = dequantize_functions[self.quant_type](blocks, self.block, self.type_size).reshape(self.shape)
        bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
        return torch.nn.functional.linear(inputs, weight.to(torch.bfloat16), bias)
