"""t2i accelerators: quantized weights, as they load (``int8``, ``fp8``, ``nf4``) or stored in float8 (``fp8-storage``).

``int8``, ``fp8`` and ``nf4`` hand diffusers a ``PipelineQuantizationConfig`` at load, so the
weights are quantized as they are read and never sit in memory in full precision:

- ``int8``: torchao ``Int8WeightOnlyConfig()`` on the denoiser (CPU and CUDA);
- ``fp8``: torchao ``Float8DynamicActivationFloat8WeightConfig()`` on the denoiser (CUDA with
  compute capability 8.9 or newer: Ada, Hopper, Blackwell);
- ``nf4``: bitsandbytes 4-bit NF4 on the denoiser and on the T5 / LLM text encoders (CUDA).

``fp8-storage`` is diffusers' layerwise casting on the loaded denoiser: weights stored in
``float8_e4m3fn``, each layer cast back to the engine's dtype while it runs. See ``docs/optimize.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from t2i_core import Accelerator, IncompatibleAcceleratorsError, LoadContext, Preset, hookimpl
from t2i_core.kit import denoiser

from ._configs import (
    components,
    default_dtype,
    fp8_config,
    int8_config,
    load_dtype,
    nf4_config,
    pipeline_config,
    require,
)

__all__ = ["Fp8", "Fp8Storage", "Int8", "Nf4", "fp8_problem", "register_accelerators"]

#: every quantizing accelerator of this plugin: each excludes the others (weights are quantized once)
QUANTIZERS = ("int8", "fp8", "nf4", "fp8-storage")
#: the least CUDA compute capability with float8 matrix multiplication (Ada Lovelace)
FP8_CAPABILITY = (8, 9)


class _AtLoad(Accelerator):
    """Quantizes with a diffusers quantization config passed to ``from_pretrained``."""

    phase = "quantize"
    lossless = False
    #: the library it quantizes with (must be importable)
    library: ClassVar[str]

    def check(self, context: LoadContext) -> None:
        require(self.name, self.library)
        components(self.name, context)

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"quantization_config": pipeline_config(self.quant_mapping(context))}
        if load_dtype(context) is None:
            # Without a dtype, torchao and bitsandbytes would load the denoiser alone in a half
            # dtype and leave the rest in float32, which SD3's pipeline cannot run: all in bf16.
            kwargs["torch_dtype"] = default_dtype()
        return kwargs

    def quant_mapping(self, context: LoadContext) -> dict[str, Any]:
        """Component name → the diffusers or transformers quantization config it loads with."""
        raise NotImplementedError


class Int8(_AtLoad):
    name = "int8"
    library = "torchao"
    # torchao's int8 kernels are CPU and CUDA ones.
    devices = ("cpu", "cuda")
    conflicts = tuple(q for q in QUANTIZERS if q != "int8")
    description = (
        "int8 weights in the denoiser's linear layers (torchao Int8WeightOnlyConfig, quantized as they load): "
        "half the memory of bf16 weights"
    )

    def quant_mapping(self, context: LoadContext) -> dict[str, Any]:
        return {components(self.name, context).denoiser: int8_config()}


class Fp8(_AtLoad):
    name = "fp8"
    library = "torchao"
    devices = ("cuda",)
    conflicts = tuple(q for q in QUANTIZERS if q != "fp8")
    description = (
        "float8 weights and activations in the denoiser (torchao Float8DynamicActivationFloat8WeightConfig); "
        "CUDA with compute capability 8.9 or newer"
    )

    def check(self, context: LoadContext) -> None:
        problem = fp8_problem(context.device)
        if problem is not None:
            raise IncompatibleAcceleratorsError([self.name], problem)
        super().check(context)

    def quant_mapping(self, context: LoadContext) -> dict[str, Any]:
        return {components(self.name, context).denoiser: fp8_config()}


def fp8_problem(device: str) -> str | None:
    """Why float8 matrix multiplication cannot run on `device`, or None when it can."""
    if device.split(":", 1)[0] != "cuda":
        return f"float8 matrix multiplication needs a CUDA GPU of compute capability 8.9 or newer, not {device}"
    import torch

    index = torch.device(device).index or 0
    capability = torch.cuda.get_device_capability(index)
    if capability < FP8_CAPABILITY:
        major, minor = capability
        return (
            f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) has no float8 matrix "
            "multiplication: it needs 8.9 or newer (Ada, Hopper); use int8 or nf4"
        )
    return None


class Nf4(_AtLoad):
    name = "nf4"
    library = "bitsandbytes"
    # diffusers' bitsandbytes quantizer asks for a GPU before it loads anything.
    devices = ("cuda",)
    # t2i-lora's fuse_lora restores exact copies of the unfused weights; 4-bit weights are
    # re-quantized when a LoRA is merged into them, so unfusing could not give them back.
    conflicts = (*(q for q in QUANTIZERS if q != "nf4"), "fuse_lora")
    description = (
        "4-bit NF4 weights (bitsandbytes) in the denoiser and the T5 / LLM text encoders, "
        "computing in the engine's dtype; CUDA"
    )

    def quant_mapping(self, context: LoadContext) -> dict[str, Any]:
        found = components(self.name, context)
        dtype = load_dtype(context) or default_dtype()
        mapping = {found.denoiser: nf4_config(dtype)}
        for encoder in found.large_text_encoders:
            mapping[encoder] = nf4_config(dtype, transformers=True)
        return mapping


class Fp8Storage(Accelerator):
    name = "fp8-storage"
    phase = "quantize"
    # torch has no float8 on MPS.
    devices = ("cpu", "cuda")
    # Its casting hooks move weights between dtypes inside forward, which torch.compile cannot trace;
    # and LoRAs cannot go onto its weights (below): there is nothing to fuse.
    conflicts = (*(q for q in QUANTIZERS if q != "fp8-storage"), "compile", "compile-regional", "fuse_lora")
    lossless = False
    refuses = {
        "loras": "peft makes LoRA layers in the dtype of the weights they adapt, float8 here, which cannot compute"
    }
    description = (
        "stores the denoiser's weights (not its norms and embeddings) in float8_e4m3fn and casts each layer "
        "to the engine's dtype as it runs (diffusers layerwise casting); refuses LoRAs"
    )

    def check(self, context: LoadContext) -> None:
        components(self.name, context)

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        import torch

        model = denoiser(pipeline)
        # Layerwise casting leaves inputs alone, so a layer that casts its input to its own weights'
        # dtype gets float8 inputs, which nothing computes (diffusers documents the limitation).
        if getattr(model.config, "encoder_hid_dim_type", None) == "image_proj":
            raise IncompatibleAcceleratorsError(
                [self.name],
                f"{type(model).__name__} of family {context.family!r} casts its image embedding to its weights' "
                "dtype, which layerwise casting makes float8, and float8 inputs cannot compute",
            )
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype)


ACCELERATORS: tuple[Accelerator, ...] = (Int8(), Fp8(), Nf4(), Fp8Storage())


@hookimpl
def register_accelerators(register: Callable[[Accelerator | Preset], None]) -> None:
    for accelerator in ACCELERATORS:
        register(accelerator)
