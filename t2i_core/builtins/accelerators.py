"""Built-in accelerators and presets, registered through the public ``register_accelerators`` hook.

This module registers every built-in: the weight dtype (fp32, fp16, bf16) and SDPA attention
(here), fused projections and channels-last (`layout`), offloading and VAE tiling/slicing
(`memory`), the step caches (`caches`), and the compiling ones (`compile`: torch.compile flavours
and graph-step); then the presets that stack them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

from t2i_core import Accelerator, IncompatibleAcceleratorsError, LoadContext, Preset, hookimpl
from t2i_core.kit import has_variant as _has_variant

from . import caches, layout, memory
from .compile import ACCELERATORS as COMPILE_ACCELERATORS

DTYPES = ("fp32", "fp16", "bf16")
#: seconds per image against fp32 on a CPU, measured with tiny:sd15 (10 steps at 64x64, one thread
#: on a shared 2-core x86-64 VM, torch 2.13): a CPU emulates float16 arithmetic; bfloat16 less slowly
CPU_COST = {"float16": "about 20 times as long (34 s against 1.7 s)", "bfloat16": "about 1.3 times as long"}
#: the dtypes whose cost on a CPU this process has warned about: once each
_warned_on_cpu: set[str] = set()


class _Dtype(Accelerator):
    phase = "dtype"
    torch_dtype: ClassVar[str]
    #: the weight variant to load when the checkpoint has one
    variant: ClassVar[str | None] = None

    def check(self, context: LoadContext) -> None:
        if self.torch_dtype != "float32":
            problem = dtype_problem(context.device, self.torch_dtype)
            if problem is not None:
                raise IncompatibleAcceleratorsError([self.name], problem)
            if context.device == "cpu" and self.torch_dtype not in _warned_on_cpu:
                _warned_on_cpu.add(self.torch_dtype)
                warnings.warn(
                    f"{self.name} on a CPU is slow: an image took {CPU_COST[self.torch_dtype]} as in fp32 "
                    "(tiny:sd15, measured); leave accelerators out (the auto preset picks fp32 on a CPU) "
                    "unless you need half-precision weights",
                    UserWarning,
                    stacklevel=2,
                )

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, self.torch_dtype)}
        if self.variant is not None and _has_variant(context.source, self.variant):
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


@functools.cache
def dtype_problem(device: str, dtype: str) -> str | None:
    """Why weights of torch `dtype` (``"float16"``, ``"bfloat16"``) cannot run on `device`, or None.

    On CUDA, bfloat16 needs compute capability 8.0 (Ampere) or newer. Elsewhere a probe runs the
    operations a diffusion pipeline needs on a few numbers (milliseconds), so a CPU or MPS
    build that lacks one is refused before any weights load rather than failing mid-image.
    """
    import torch

    kind = device.split(":", 1)[0]
    if kind == "cuda":
        if dtype == "bfloat16":
            index = torch.device(device).index or 0
            major, minor = torch.cuda.get_device_capability(index)
            if (major, minor) < (8, 0):
                name = torch.cuda.get_device_name(index)
                return f"{name} (compute capability {major}.{minor}) has no native bfloat16: it needs 8.0 or newer; use fp16"
        return None
    return _probe(device, getattr(torch, dtype))


def _probe(device: str, dtype: Any) -> str | None:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator("cpu").manual_seed(0)

    def tensor(*shape: int) -> Any:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    image, kernel, tokens, weight = tensor(1, 8, 8, 8), tensor(8, 8, 3, 3), tensor(1, 2, 6, 8), tensor(8, 8)
    operations: dict[str, Callable[[], Any]] = {
        "conv2d": lambda: F.conv2d(image, kernel, padding=1),
        "group_norm": lambda: F.group_norm(image, 4),
        "layer_norm": lambda: F.layer_norm(tokens, (8,)),
        "linear": lambda: F.linear(tokens, weight),
        "silu": lambda: F.silu(image),
        "gelu": lambda: F.gelu(tokens),
        "softmax": lambda: torch.softmax(tokens, dim=-1),
        "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(tokens, tokens, tokens),
        "interpolate": lambda: F.interpolate(image, scale_factor=2.0, mode="nearest"),
    }
    name = str(dtype).removeprefix("torch.")
    for operation, run in operations.items():
        try:
            result = run()
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"{operation} is not implemented for {name} on {device} in torch {torch.__version__} ({detail})"
        if not bool(torch.isfinite(result.float()).all()):
            return f"{operation} in {name} gives non-finite values on {device} in torch {torch.__version__}"
    return None


class Sdpa(Accelerator):
    name = "sdpa"
    phase = "attention"
    description = "torch scaled_dot_product_attention processors on every attention layer"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        from diffusers.models import attention_processor as processors

        # The classic (matmul + softmax) processors and their SDPA equivalents; any other
        # processor (already SDPA, fused, IP-adapter, a user's own) is left as it is.
        upgrades: dict[type, type] = {
            processors.AttnProcessor: processors.AttnProcessor2_0,
            processors.AttnAddedKVProcessor: processors.AttnAddedKVProcessor2_0,
        }
        for module in attention_modules(pipeline):
            current = module.attn_processors
            if any(type(p) in upgrades for p in current.values()):
                module.set_attn_processor(
                    {name: upgrades[type(p)]() if type(p) in upgrades else p for name, p in current.items()}
                )


def attention_modules(pipeline: Any) -> list[Any]:
    """Every component of `pipeline` that takes attention processors (UNet, VAE, prior, ...)."""
    return [
        c for c in pipeline.components.values() if hasattr(c, "set_attn_processor") and hasattr(c, "attn_processors")
    ]


# -- presets ---------------------------------------------------------------------------------
# What each resolves to per device type; docs/optimize.md explains the choices and the figures.

# Transformer families (FLUX.1, SD3, Z-Image, PixArt) are trained and published in bfloat16:
# in float16 their activations overflow (T5 too), so on GPUs their stacks use bf16 where a UNet's use fp16.

AUTO = Preset(
    name="auto",
    description="fp16 + sdpa on CUDA and MPS (bf16 for transformer denoisers), fp32 on CPU (the default)",
    stacks={"cuda": ("fp16", "sdpa"), "mps": ("fp16", "sdpa"), "*": ("fp32",)},
    denoisers={"transformer": {"cuda": ("bf16", "sdpa"), "mps": ("bf16", "sdpa"), "*": ("fp32",)}},
)

FAST = Preset(
    name="fast",
    description="the fastest steady state: full compile with CUDA graphs, fused QKV, channels-last, compiled VAE",
    stacks={
        "cuda": ("fp16", "sdpa", "fuse_qkv", "channels_last", "compile", "compile-vae"),
        "mps": ("fp16", "sdpa", "fuse_qkv"),
        # Measured on CPU: channels-last and fused QKV slower or even, torch.compile at best 6%
        # after a minute of compiling (docs/optimize.md): plain fp32 is the fast stack there.
        "*": ("fp32", "sdpa"),
    },
    denoisers={
        "transformer": {
            "cuda": ("bf16", "sdpa", "fuse_qkv", "compile", "compile-vae"),
            "mps": ("bf16", "sdpa", "fuse_qkv"),
            "*": ("fp32", "sdpa"),
        }
    },
)

QUICK = Preset(
    name="quick",
    description="a short first image that still beats eager: regional compile only",
    stacks={
        "cuda": ("fp16", "sdpa", "fuse_qkv", "channels_last", "compile-regional"),
        "mps": ("fp16", "sdpa"),
        "*": ("fp32", "sdpa"),
    },
    denoisers={
        "transformer": {
            "cuda": ("bf16", "sdpa", "fuse_qkv", "compile-regional"),
            "mps": ("bf16", "sdpa"),
            "*": ("fp32", "sdpa"),
        }
    },
)

LOW_MEMORY = Preset(
    name="low-memory",
    description=(
        "the least memory: leaf-level group offload with prefetch, tiled and sliced VAE decoding; "
        "transformer denoisers also quantized (nf4 on CUDA, int8 on CPU) when t2i-quantize is installed"
    ),
    stacks={
        # Model offload (cpu_offload) keeps a whole UNet on the GPU: 4.8 GiB for SDXL in fp16 before
        # any activation. Group offload keeps about one layer, prefetched on a side stream.
        "cuda": ("fp16", "sdpa", "group_offload", "vae_tiling", "vae_slicing"),
        "mps": ("fp16", "sdpa", "vae_tiling", "vae_slicing"),
        "*": ("fp32", "sdpa", "vae_tiling", "vae_slicing"),
    },
    denoisers={
        # FLUX.1-dev at 1024² (benchmarks/estimate_memory.py, fake tensors): bf16 32.9 GiB, nf4 12.1,
        # nf4 + group offload 1.5 (bf16 + group offload 1.5 too, but it streams 22 GiB of transformer
        # weights from CPU memory each step where nf4 streams 6.2, and holds a 31 GiB model in CPU
        # memory). On a CPU, int8 holds the transformer in a quarter of fp32's memory.
        "transformer": {
            "cuda": ("bf16", "sdpa", "nf4", "group_offload", "vae_tiling", "vae_slicing"),
            "mps": ("bf16", "sdpa", "vae_tiling", "vae_slicing"),
            "*": ("fp32", "sdpa", "int8", "vae_tiling", "vae_slicing"),
        }
    },
    optional=("nf4", "int8"),
)

TURBO = Preset(
    name="turbo",
    description=(
        "fewer denoiser calls: a first-block step cache (lossy) with the compiled VAE on transformer "
        "denoisers that have diffusers' cache hooks (FLUX.1); UNets, which have none, get the fast stack"
    ),
    stacks=FAST.stacks,
    denoisers={
        # The step caches refuse whole-model CUDA-graph compile and regional compile (docs/optimize.md),
        # so on CUDA the VAE is what compiles beside the cache.
        "transformer": {
            "cuda": ("bf16", "sdpa", "first-block-cache", "compile-vae"),
            "mps": ("bf16", "sdpa", "first-block-cache"),
            "*": ("fp32", "sdpa", "first-block-cache"),
        }
    },
    # diffusers 0.42 has cache hooks on FLUX.1's transformer, not on SD3's or Z-Image's: there the
    # cache is left out and turbo is bf16 + the compiled VAE
    optional=("first-block-cache",),
)

ACCELERATORS: tuple[Accelerator, ...] = (
    Fp32(),
    Fp16(),
    Bf16(),
    Sdpa(),
    *layout.ACCELERATORS,
    *memory.ACCELERATORS,
    *caches.ACCELERATORS,
    *COMPILE_ACCELERATORS,
)
PRESETS: tuple[Preset, ...] = (AUTO, FAST, QUICK, LOW_MEMORY, TURBO)


@hookimpl
def register_accelerators(register: Callable[[Accelerator | Preset], None]) -> None:
    items: tuple[Accelerator | Preset, ...] = (*ACCELERATORS, *PRESETS)
    for item in items:
        register(item)


def __getattr__(name: str) -> Any:
    if name == "has_variant":  # here until t2i 0.2; removed in 0.3
        import warnings

        warnings.warn(
            "t2i_core.builtins.accelerators.has_variant is deprecated: import it from t2i_core.kit",
            DeprecationWarning,
            stacklevel=2,
        )
        return _has_variant
    raise AttributeError(f"module 't2i_core.builtins.accelerators' has no attribute {name!r}")
