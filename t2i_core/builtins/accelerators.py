"""Built-in accelerators: the weight dtype (fp32, fp16, bf16), explicit SDPA attention, and presets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from t2i_core import Accelerator, LoadContext, Preset, hookimpl

DTYPES = ("fp32", "fp16", "bf16")


class _Dtype(Accelerator):
    phase = "dtype"
    torch_dtype: ClassVar[str]
    #: the weight variant to load when the checkpoint has one
    variant: ClassVar[str | None] = None

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, self.torch_dtype)}
        if self.variant is not None and has_variant(context.source, self.variant):
            kwargs["variant"] = self.variant
        return kwargs


class Fp32(_Dtype):
    name = "fp32"
    torch_dtype = "float32"
    conflicts = ("fp16", "bf16")
    description = "full-precision float32 weights (exact reference)"


class Fp16(_Dtype):
    name = "fp16"
    torch_dtype = "float16"
    variant = "fp16"
    conflicts = ("fp32", "bf16")
    lossless = False
    description = "float16 weights; loads the checkpoint's fp16 variant when it has one"


class Bf16(_Dtype):
    name = "bf16"
    torch_dtype = "bfloat16"
    conflicts = ("fp32", "fp16")
    lossless = False
    description = "bfloat16 weights"


class Sdpa(Accelerator):
    name = "sdpa"
    phase = "attention"
    description = "torch scaled_dot_product_attention processors on every attention layer"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        for module in attention_modules(pipeline):
            module.set_attn_processor(AttnProcessor2_0())


def attention_modules(pipeline: Any) -> list[Any]:
    """Every component of `pipeline` that takes attention processors (UNet, VAE, prior, ...)."""
    return [c for c in pipeline.components.values() if hasattr(c, "set_attn_processor") and hasattr(c, "attn_processors")]


def has_variant(source: str, variant: str) -> bool:
    """Whether the checkpoint at `source` (folder or hub id) ships weights of `variant`."""
    folder = Path(source)
    pattern = f"*.{variant}.*"
    if folder.is_dir():
        return any(folder.glob(f"*/{pattern}")) or any(folder.glob(pattern))
    try:
        from huggingface_hub import list_repo_files

        return any(f".{variant}." in name for name in list_repo_files(source))
    except Exception:  # noqa: BLE001 - offline or unknown: load the default weights
        return False


AUTO = Preset(
    name="auto",
    description="fp16 + sdpa on CUDA and MPS, fp32 on CPU (the default)",
    stacks={"cuda": ("fp16", "sdpa"), "mps": ("fp16", "sdpa"), "*": ("fp32",)},
)


@hookimpl
def register_accelerators(register: Callable[[Accelerator | Preset], None]) -> None:
    for accelerator in (Fp32(), Fp16(), Bf16(), Sdpa()):
        register(accelerator)
    register(AUTO)
