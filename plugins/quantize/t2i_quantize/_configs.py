"""What the quantizing accelerators quantize, and the diffusers/transformers configs they pass at load.

The components come from the checkpoint's ``model_index.json`` (read once, no weights): the
denoiser (``transformer``, ``unet`` or ``prior``) and, for NF4, every text encoder that is not a
CLIP model (T5-XXL, an LLM such as Z-Image's Qwen3). torchao, bitsandbytes, diffusers and
transformers are imported only by the functions that build a config.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from t2i_core import IncompatibleAcceleratorsError, LoadContext, get_registry
from t2i_core.kit import DENOISER_ATTRIBUTES, read_model_index

#: the pip distribution that provides each quantization library, for the refusal when it is missing
DISTRIBUTIONS = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}


@attrs.frozen
class Components:
    """The components of a checkpoint that quantization acts on, by ``model_index.json`` name."""

    #: the denoiser: ``"transformer"``, ``"unet"`` or ``"prior"``
    denoiser: str
    #: text encoders that are not CLIP (``"text_encoder_2"`` for FLUX.1's T5, ``"text_encoder"`` for Z-Image's Qwen3)
    large_text_encoders: tuple[str, ...]


def components(accelerator: str, context: LoadContext) -> Components:
    """The quantizable components of the checkpoint `context` loads.

    :raises IncompatibleAcceleratorsError: it has no diffusers denoiser (a checkpoint without
        ``model_index.json``, or one laid out otherwise).
    """
    index = _model_index(context)
    denoiser = next((name for name in DENOISER_ATTRIBUTES if _library(index.get(name)) == "diffusers"), None)
    if denoiser is None:
        raise IncompatibleAcceleratorsError(
            [accelerator],
            f"it quantizes the denoiser as it loads, and {context.model!r} names no diffusers "
            f"{', '.join(DENOISER_ATTRIBUTES)} in its model_index.json",
        )
    encoders = tuple(
        name
        for name, entry in index.items()
        if name.startswith("text_encoder")
        and _library(entry) == "transformers"
        and not str(entry[1]).startswith("CLIP")
    )
    return Components(denoiser=denoiser, large_text_encoders=encoders)


def _model_index(context: LoadContext) -> Mapping[str, Any]:
    # a single file's components are those of its config folder (LoadContext.config)
    folder = context.config if context.config is not None else context.source
    return read_model_index(context.model, folder, Path(folder).is_dir())


def _library(entry: Any) -> str | None:
    """``"diffusers"`` for ``["diffusers", "FluxTransformer2DModel"]``; None for an absent component."""
    if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None:
        return str(entry[0])
    return None


def require(accelerator: str, module: str) -> None:
    """Refuse `accelerator` when the library `module` it quantizes with is not installed."""
    if importlib.util.find_spec(module) is None:
        raise IncompatibleAcceleratorsError(
            [accelerator], f"it quantizes with {module}, which is not installed (pip install {DISTRIBUTIONS[module]})"
        )


def load_dtype(context: LoadContext) -> Any:
    """The ``torch_dtype`` the load's dtype accelerator (fp32, fp16, bf16, ...) asks for; None without one."""
    registry = get_registry()
    for name in context.accelerators:
        accelerator = registry.accelerators.get(name)
        if accelerator is not None and accelerator.phase == "dtype":
            dtype = accelerator.load_kwargs(context).get("torch_dtype")
            if dtype is not None:
                return dtype
    return None


def default_dtype() -> Any:
    """The dtype a quantized load runs in when no dtype accelerator chose one: bfloat16, torchao's."""
    import torch

    return torch.bfloat16


# -- the configs, exactly as a diffusers user writes them -----------------------------------------


def int8_config() -> Any:
    """``TorchAoConfig(Int8WeightOnlyConfig())``: int8 weights, per-channel scales, activations as they are."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def fp8_config() -> Any:
    """``TorchAoConfig(Float8DynamicActivationFloat8WeightConfig())``: float8 weights, activations scaled per call."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig())


def nf4_config(compute_dtype: Any, *, transformers: bool = False) -> Any:
    """bitsandbytes 4-bit NF4 (``load_in_4bit=True, bnb_4bit_quant_type="nf4"``), computing in `compute_dtype`.

    :param compute_dtype: the dtype the dequantized weights compute in (the engine's)
    :param transformers: transformers' `BitsAndBytesConfig` (for a text encoder) rather than diffusers'
    """
    if transformers:
        from transformers import BitsAndBytesConfig
    else:
        from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def pipeline_config(quant_mapping: Mapping[str, Any]) -> Any:
    """``PipelineQuantizationConfig(quant_mapping=...)``: what ``from_pretrained(quantization_config=...)`` takes."""
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=dict(quant_mapping))
