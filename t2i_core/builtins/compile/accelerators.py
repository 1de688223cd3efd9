"""The torch.compile accelerators: ``compile``, ``compile-regional`` and ``compile-vae``.

Three flavours, because accelerator names carry no parameters:

- ``compile``: the whole denoiser; on CUDA with CUDA graphs (``mode="reduce-overhead"``) for
  the fastest steady state, at the cost of the longest first image.
- ``compile-regional``: only the repeated blocks of the denoiser (diffusers'
  ``compile_repeated_blocks``), compiled once and reused: a short warm-up.
- ``compile-vae``: the autoencoder's decoder (CUDA graphs on CUDA too); combines with either.

Compilation itself is lazy: it happens during the first image of each new shape. Every setting
travels with the compiled module (``torch.compile(..., options=...)``): inductor applies it while
compiling that module only, and its process-wide config is never changed.
"""

from __future__ import annotations

import os
from typing import Any

from t2i_core import Accelerator, IncompatibleAcceleratorsError, LoadContext, ModelProvider

from .._components import autoencoders, denoisers
from .cache import ARTIFACTS_ENV, activate_compile_cache, compile_cache_wanted, load_compile_artifacts
from .calls import install_compiled

#: block classes compiled regionally when a denoiser declares no ``_repeated_blocks`` of its own
#: (Kandinsky 2.2's UNet has no transformer blocks; its ResNet and attention blocks repeat; SD3's
#: transformer declares none, and its JointTransformerBlocks repeat)
FALLBACK_REGIONS = ("BasicTransformerBlock", "JointTransformerBlock", "ResnetBlock2D", "Attention")

#: inductor settings diffusers' own speed guide uses for its UNets and VAEs on CUDA: 1x1
#: convolutions as matrix multiplies, a coordinate-descent search of kernel launch settings, and
#: no epilogue fusion, which otherwise costs the tuned matmuls more than it saves
INDUCTOR_TUNING = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


def on_cuda(device: str) -> bool:
    return device.split(":", 1)[0] == "cuda"


def inductor_options(device: str, *, cuda_graphs: bool) -> dict[str, Any]:
    """Inductor settings for one compiled module on `device` (``torch.compile``'s ``options``).

    On CUDA: `INDUCTOR_TUNING` (the settings this torch knows) and CUDA graphs on or off
    (``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets). Elsewhere none.
    """
    if not on_cuda(device):
        return {}
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    return {**{k: v for k, v in INDUCTOR_TUNING.items() if k in known}, "triton.cudagraphs": cuda_graphs}


def compile_options(device: str, *, cuda_graphs: bool = True) -> dict[str, Any]:
    """``torch.compile`` keyword arguments of a whole model on `device`; CUDA graphs on CUDA unless turned off.

    ``dynamic=False``: each (height, width, batch) gets kernels specialised to it, and on CUDA
    a CUDA graph of its own; a new shape compiles once more instead of running slower code.
    """
    options: dict[str, Any] = {"fullgraph": False, "dynamic": False}
    inductor = inductor_options(device, cuda_graphs=cuda_graphs)
    if inductor:
        options["options"] = inductor
    return options


def compiler_problem(device: str) -> str | None:
    """Why torch.compile cannot run on `device` here, or None when it can."""
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile on CUDA needs triton (pip install triton)"
    if kind == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:  # noqa: BLE001 - inductor raises its own error types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"torch.compile on CPU needs a C++ compiler (install g++ or clang++, or set CXX): {reason}"
        return None
    return f"torch.compile is not supported on {device} by t2i"


class _Compile(Accelerator):
    phase = "compile"
    devices = ("cpu", "cuda")

    def check(self, context: LoadContext) -> None:
        problem = compiler_problem(context.device)
        if problem is not None:
            raise IncompatibleAcceleratorsError([self.name], problem)

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        if compile_cache_wanted():
            activate_compile_cache(context.device)
        artifacts = os.environ.get(ARTIFACTS_ENV)
        if artifacts:
            load_compile_artifacts(artifacts)
        self.compile(pipeline, context)

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        raise NotImplementedError


class Compile(_Compile):
    name = "compile"
    # CUDA graphs capture fixed device addresses: weights that offloading moves in and out break them.
    conflicts = ("compile-regional", "cpu_offload", "sequential_offload")
    compiles = ("denoiser",)
    description = 'torch.compile of the whole denoiser (mode="reduce-overhead", CUDA graphs, on CUDA); slow first image'

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        targets = denoisers(pipeline)
        if not targets:
            raise IncompatibleAcceleratorsError(
                [self.name], f"{type(pipeline).__name__} has no denoiser (unet, transformer, prior) to compile"
            )
        for name, module in targets.items():
            install_compiled(module, name, compile_options(context.device), normalise_timestep=True)


def regional_cuda_graphs(provider: ModelProvider, device: str) -> bool:
    """Whether regionally compiled blocks are captured in CUDA graphs: on CUDA, when the provider
    declares `ModelProvider.cuda_graph_regions` (measured faster for its family)."""
    return on_cuda(device) and provider.cuda_graph_regions


class CompileRegional(_Compile):
    name = "compile-regional"
    conflicts = ("compile", "sequential_offload")
    compiles = ("denoiser",)
    description = "torch.compile of the denoiser's repeated blocks only (compile_repeated_blocks): short warm-up"

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        cuda_graphs = regional_cuda_graphs(context.provider, context.device)
        options = inductor_options(context.device, cuda_graphs=cuda_graphs)
        targets = denoisers(pipeline)
        compiled = sum(compile_regions(module, options=options) for module in targets.values())
        if compiled == 0:
            raise IncompatibleAcceleratorsError(
                [self.name], f"no denoiser of {type(pipeline).__name__} has repeated blocks to compile; use compile"
            )
        if cuda_graphs:
            # The blocks' CUDA graphs chain within one denoiser call: each block's output feeds eager
            # code and the next block at once, and the denoiser's own output comes from an eager
            # layer. A new call starts a new generation of graphs, so outputs of the last are freed.
            for module in targets.values():
                module.register_forward_pre_hook(_mark_step_begin)


def _mark_step_begin(_module: Any, _args: Any) -> None:
    import torch

    torch.compiler.cudagraph_mark_step_begin()


def compile_regions(model: Any, *, options: dict[str, Any] | None = None) -> int:
    """Compile the repeated blocks of `model` in place, with inductor `options`; return how many modules were compiled."""
    declared = tuple(getattr(model, "_repeated_blocks", None) or ())
    present = {type(module).__name__ for module in model.modules()}

    def compile_kwargs() -> dict[str, Any]:
        # a copy per call: torch.compile pops keys of the dict it is given
        return {"options": dict(options)} if options else {}

    if declared and present.intersection(declared):
        model.compile_repeated_blocks(fullgraph=True, **compile_kwargs())
        return sum(1 for module in model.modules() if type(module).__name__ in declared)
    classes = set(FALLBACK_REGIONS)
    count = 0

    def visit(module: Any) -> None:
        nonlocal count
        for child in module.children():
            if type(child).__name__ in classes:
                child.compile(**compile_kwargs())
                count += 1
            else:
                visit(child)

    visit(model)
    return count


class CompileVae(_Compile):
    name = "compile-vae"
    conflicts = ("cpu_offload", "sequential_offload")
    compiles = ("decoder",)
    description = "torch.compile of the autoencoder's decoder (CUDA graphs on CUDA): faster image decoding"

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        import torch

        targets = autoencoders(pipeline)
        if not targets:
            raise IncompatibleAcceleratorsError([self.name], f"{type(pipeline).__name__} has no autoencoder to compile")
        # Tiles and slices are decoded one after another and kept until all are done, but a CUDA
        # graph's next replay overwrites its last output: kernels only, without CUDA graphs.
        piecewise = {"vae_tiling", "vae_slicing"}.intersection(context.accelerators)
        for name, module in targets.items():
            # SDXL's pipeline casts its fp16 VAE to fp32 and back around every decode: the weights
            # move, so CUDA graphs would be recorded anew each time. Decided by what the pipeline
            # does: SD 1.5's config inherits force_upcast=True from diffusers' default, but its
            # pipeline has no upcast_vae() and never casts, so it keeps CUDA graphs.
            upcast = (
                module.dtype == torch.float16
                and getattr(module.config, "force_upcast", False)
                and hasattr(pipeline, "upcast_vae")
            )
            options = compile_options(context.device, cuda_graphs=not (piecewise or upcast))
            install_compiled(module.decoder, f"{name}.decoder", options)


ACCELERATORS: tuple[Accelerator, ...] = (Compile(), CompileRegional(), CompileVae())
