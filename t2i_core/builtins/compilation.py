"""torch.compile accelerators, and the persistent compile cache they share across processes.

Three flavours, because accelerator names carry no parameters:

- ``compile``: the whole denoiser; on CUDA with ``mode="reduce-overhead"`` (CUDA graphs) for
  the fastest steady state, at the cost of the longest first image.
- ``compile-regional``: only the repeated blocks of the denoiser (diffusers'
  ``compile_repeated_blocks``), compiled once and reused: a short warm-up.
- ``compile-vae``: the autoencoder's decoder (CUDA graphs on CUDA too); combines with either.

Compilation itself is lazy: it happens during the first image of each new shape.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

from t2i_core import Accelerator, IncompatibleAcceleratorsError, LoadContext
from t2i_core.tiny import cache_dir

from ._components import autoencoders, denoisers

#: set to 0 to leave inductor's cache folder alone (it then defaults to /tmp/torchinductor_<user>)
COMPILE_CACHE_ENV = "T2I_COMPILE_CACHE"
#: block classes compiled regionally when a denoiser declares no ``_repeated_blocks`` of its own
#: (Kandinsky 2.2's UNet has no transformer blocks; its ResNet and attention blocks repeat)
FALLBACK_REGIONS = ("BasicTransformerBlock", "ResnetBlock2D", "Attention")


def compile_options(device: str) -> dict[str, Any]:
    """``torch.compile`` options of the full flavour on `device`.

    ``dynamic=False``: each (height, width, batch) gets kernels specialised to it, and on CUDA
    a CUDA graph of its own; a new shape compiles once more instead of running slower code.
    """
    mode = "reduce-overhead" if device.split(":", 1)[0] == "cuda" else None
    return {"mode": mode, "fullgraph": False, "dynamic": False}


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
        activate_compile_cache(context.device)
        self.compile(pipeline, context)

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        raise NotImplementedError


class Compile(_Compile):
    name = "compile"
    # CUDA graphs capture fixed device addresses: weights that offloading moves in and out break them.
    conflicts = ("compile-regional", "cpu_offload", "sequential_offload")
    description = 'torch.compile of the whole denoiser (mode="reduce-overhead", CUDA graphs, on CUDA); slow first image'

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        targets = denoisers(pipeline)
        if not targets:
            raise IncompatibleAcceleratorsError(
                [self.name], f"{type(pipeline).__name__} has no denoiser (unet, transformer, prior) to compile"
            )
        for module in targets.values():
            module.compile(**compile_options(context.device))


class CompileRegional(_Compile):
    name = "compile-regional"
    conflicts = ("compile", "sequential_offload")
    description = "torch.compile of the denoiser's repeated blocks only (compile_repeated_blocks): short warm-up"

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        compiled = sum(compile_regions(module) for module in denoisers(pipeline).values())
        if compiled == 0:
            raise IncompatibleAcceleratorsError(
                [self.name], f"no denoiser of {type(pipeline).__name__} has repeated blocks to compile; use compile"
            )


def compile_regions(model: Any) -> int:
    """Compile the repeated blocks of `model` in place; return how many modules were compiled."""
    declared = tuple(getattr(model, "_repeated_blocks", None) or ())
    present = {type(module).__name__ for module in model.modules()}
    if declared and present.intersection(declared):
        model.compile_repeated_blocks(fullgraph=True)
        return sum(1 for module in model.modules() if type(module).__name__ in declared)
    classes = set(FALLBACK_REGIONS)
    count = 0

    def visit(module: Any) -> None:
        nonlocal count
        for child in module.children():
            if type(child).__name__ in classes:
                child.compile()
                count += 1
            else:
                visit(child)

    visit(model)
    return count


class CompileVae(_Compile):
    name = "compile-vae"
    conflicts = ("cpu_offload", "sequential_offload")
    description = "torch.compile of the autoencoder's decoder (CUDA graphs on CUDA): faster image decoding"

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        import torch

        targets = autoencoders(pipeline)
        if not targets:
            raise IncompatibleAcceleratorsError([self.name], f"{type(pipeline).__name__} has no autoencoder to compile")
        # Tiles and slices are decoded one after another and kept until all are done, but a CUDA
        # graph's next replay overwrites its last output: kernels only, without CUDA graphs.
        piecewise = {"vae_tiling", "vae_slicing"}.intersection(context.accelerators)
        for module in targets.values():
            options = compile_options(context.device)
            # SDXL's pipeline casts its fp16 VAE to fp32 and back around every decode: the weights
            # move, so CUDA graphs would be recorded anew each time.
            upcast = module.dtype == torch.float16 and getattr(module.config, "force_upcast", False)
            if piecewise or upcast:
                options["mode"] = None
            module.decoder.compile(**options)


# -- the persistent cache --------------------------------------------------------------------

_active_cache: Path | None = None


def compile_cache_dir(device: str) -> Path:
    """The inductor cache folder for `device`: ``<t2i cache>/compile/torch-<version>-py<x.y>/<device>``.

    Inductor keys every artefact in it by the content of the traced graph (the model's
    architecture, dtypes and the accelerators that changed it), the shapes, strides and dtypes
    of its inputs, and the compiler settings; this folder adds the torch and Python versions
    and the device, so artefacts of another torch or another GPU are never even looked at.
    Weights are graph inputs (inductor's freezing is off), so two checkpoints of one
    architecture share their compiled code, correctly.
    """
    import sys

    import torch

    versions = f"torch-{torch.__version__}-py{sys.version_info.major}.{sys.version_info.minor}"
    return cache_dir() / "compile" / _slug(versions) / _slug(device_key(device))


def device_key(device: str) -> str:
    """A readable name of the hardware `device` compiles for (GPU name and compute capability)."""
    import torch

    kind = device.split(":", 1)[0]
    if kind == "cuda":
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)}-sm{major}{minor}"
    if kind == "cpu":
        return f"cpu-{platform.machine()}-{_cpu_model()}"
    return f"{kind}-{platform.machine()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "unknown"


def activate_compile_cache(device: str) -> Path | None:
    """Point inductor's on-disk caches at `compile_cache_dir(device)`; return the folder in use.

    Inductor reads one cache folder per process, so the first compile accelerator applied picks
    it; a ``TORCHINDUCTOR_CACHE_DIR`` set by the user wins, and ``T2I_COMPILE_CACHE=0`` opts out.
    """
    global _active_cache
    if os.environ.get(COMPILE_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    chosen_by_user = current is not None and Path(current) not in (Path(default_cache_dir()), _active_cache)
    if chosen_by_user:
        return Path(str(current))
    if _active_cache is None:
        folder = compile_cache_dir(device)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        if current is not None:
            # Something compiled in this process already, with inductor's default folder.
            from torch._inductor.utils import clear_caches

            clear_caches()
        _active_cache = folder
    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ:
        functorch_config.enable_autograd_cache = True
    return _active_cache


ACCELERATORS: tuple[Accelerator, ...] = (Compile(), CompileRegional(), CompileVae())
