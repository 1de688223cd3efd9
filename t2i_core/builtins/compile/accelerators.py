"""torch.compile accelerators, and the persistent compile cache they share across processes.

Three flavours, because accelerator names carry no parameters:

- ``compile``: the whole denoiser; on CUDA with ``mode="reduce-overhead"`` (CUDA graphs) for
  the fastest steady state, at the cost of the longest first image.
- ``compile-regional``: only the repeated blocks of the denoiser (diffusers'
  ``compile_repeated_blocks``), compiled once and reused: a short warm-up.
- ``compile-vae``: the autoencoder's decoder (CUDA graphs on CUDA too); combines with either.

Compilation itself is lazy: it happens during the first image of each new shape.

A compiled denoiser or decoder runs through `CompiledCall`, outside the compiled region, which
makes three promises on every device:

- **CUDA-graph outputs are safe to keep.** With ``mode="reduce-overhead"`` the next replay of a
  CUDA graph overwrites its last output, and schedulers keep model outputs across steps (PNDM's
  ``ets``, the multistep solvers' ``model_outputs``). `CompiledCall` marks each call as a new
  step (``torch.compiler.cudagraph_mark_step_begin``) and hands back a clone of the output.
- **The timestep's dtype never recompiles.** Schedulers give int64 (PNDM, DDIM) or float
  (Euler, DPM-Solver) timesteps; the call casts them to float32 first, which the models' own
  timestep embeddings do anyway, so the numbers are the same.
- **Recompiles are visible.** A call that compiled again warns with `RecompileWarning` naming
  the input that changed (a new size, batch, guidance on/off, embeddings of a new length, a
  ControlNet's extra inputs); `compile_stats()` counts them; reaching torch's recompile limit,
  after which new inputs would run eagerly, is a warning too, never silent.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import warnings
from pathlib import Path
from typing import Any

from t2i_core import Accelerator, IncompatibleAcceleratorsError, LoadContext
from t2i_core.tiny import cache_dir

from ._components import autoencoders, denoisers

#: set to 0 to leave inductor's cache folder alone (it then defaults to /tmp/torchinductor_<user>)
COMPILE_CACHE_ENV = "T2I_COMPILE_CACHE"
#: a file written by ``t2i warmup``: its compiled artefacts are loaded before the first compile
ARTIFACTS_ENV = "T2I_COMPILE_ARTIFACTS"
#: block classes compiled regionally when a denoiser declares no ``_repeated_blocks`` of its own
#: (Kandinsky 2.2's UNet has no transformer blocks; its ResNet and attention blocks repeat; SD3's
#: transformer declares none, and its JointTransformerBlocks repeat)
FALLBACK_REGIONS = ("BasicTransformerBlock", "JointTransformerBlock", "ResnetBlock2D", "Attention")
#: families whose regionally compiled blocks are captured in CUDA graphs on CUDA. Measured with raw
#: diffusers on an H200 (30 steps, fp16, batch 1): SD 1.5 regional default mode 0.80 s/image (eager
#: 0.78), with reduce-overhead 0.56 s and a 5.5 s first image; SDXL regional default mode 1.57 s
#: (eager 1.81), reduce-overhead unmeasured, so SDXL and families not measured keep the default mode.
REGIONAL_CUDA_GRAPH_FAMILIES = frozenset({"sd15"})


class RecompileWarning(UserWarning):
    """A compiled model compiled again for a new kind of input (50-250 s on a large GPU)."""


class CompiledCall:
    """Stands in for a module's ``forward``: the compiled forward, made safe (see the module docstring).

    `normalise_timestep` casts the second positional argument or ``timestep=`` to float32
    (denoisers only). The counters feed `compile_stats`.
    """

    def __init__(self, module: Any, name: str, options: dict[str, Any], *, normalise_timestep: bool) -> None:
        self.name = name
        self.options = dict(options)
        self.cuda_graphs = options.get("mode") == "reduce-overhead"
        self.normalise_timestep = normalise_timestep
        self.compiled = compile_function(module.forward, options)
        self.signatures: list[tuple[Any, ...]] = []
        self.compiles = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.normalise_timestep:
            args, kwargs = _float_timestep(args, kwargs)
        signature = _signature(args, kwargs)
        graphs_before = _compiled_graphs()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        output = self.compiled(*args, **kwargs)
        self.calls += 1
        if _compiled_graphs() > graphs_before:
            self.compiles += 1
            if self.compiles > 1:
                # A new kind of input, or a guard on a value that changed with the same shapes
                # (swapped weights, a Python constant): either way, name the nearest input seen.
                nearest = min(self.signatures or [signature], key=lambda seen: len(_changes(seen, signature)))
                warnings.warn(
                    RecompileWarning(f"{self.name} compiled again: {_difference(nearest, signature)}"), stacklevel=2
                )
        if signature not in self.signatures:
            self.signatures.append(signature)
            limit = int(torch._dynamo.config.recompile_limit)
            if len(self.signatures) == limit + 1:
                warnings.warn(
                    RecompileWarning(
                        f"{self.name} has met {len(self.signatures)} kinds of input, past torch's recompile limit "
                        f"({limit}, torch._dynamo.config.recompile_limit): further new inputs run eagerly"
                    ),
                    stacklevel=2,
                )
        return _clone(output) if self.cuda_graphs else output


def compile_function(function: Any, options: dict[str, Any]) -> Any:
    """``torch.compile(function, **options)``: one place for tests and benchmarks to change the backend."""
    import torch

    return torch.compile(function, **options)


def install_compiled(
    module: Any, name: str, options: dict[str, Any], *, normalise_timestep: bool = False
) -> CompiledCall:
    """Compile `module`'s forward in place, through a `CompiledCall`."""
    call = CompiledCall(module, name, options, normalise_timestep=normalise_timestep)
    module.forward = call
    return call


def compiled_call(module: Any) -> CompiledCall | None:
    """The `CompiledCall` installed on `module`, if any."""
    call = module.__dict__.get("forward")
    return call if isinstance(call, CompiledCall) else None


def compile_stats(pipeline: Any) -> dict[str, dict[str, int]]:
    """Per compiled component: calls, compiles and distinct input kinds seen (for benchmarks and logs)."""
    stats = {}
    for component, module in _compiled_modules(pipeline):
        call = compiled_call(module)
        if call is not None:
            stats[component] = {"calls": call.calls, "compiles": call.compiles, "input_kinds": len(call.signatures)}
    return stats


def _compiled_modules(pipeline: Any) -> list[tuple[str, Any]]:
    found = [(name, module) for name, module in denoisers(pipeline).items()]
    found += [(f"{name}.decoder", module.decoder) for name, module in autoencoders(pipeline).items()]
    return found


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _float_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype != torch.float32:
            return value.to(torch.float32)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float32)
        return value

    if "timestep" in kwargs:
        kwargs = {**kwargs, "timestep": cast(kwargs["timestep"])}
    elif len(args) >= 2:
        args = (args[0], cast(args[1]), *args[2:])
    return args, kwargs


def _describe(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype).removeprefix("torch."))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _describe(item)) for key, item in value.items()))
    if value is None or isinstance(value, (bool, str)):
        return value
    return type(value).__name__


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return (
        tuple((f"argument {index}", _describe(a)) for index, a in enumerate(args)),
        tuple(sorted((k, _describe(v)) for k, v in kwargs.items())),
    )


def _changes(old: tuple[Any, ...], new: tuple[Any, ...]) -> list[str]:
    before = dict(old[0] + old[1])
    after = dict(new[0] + new[1])
    return [
        f"{key} {_render(before.get(key, 'absent'))} -> {_render(after.get(key, 'absent'))}"
        for key in sorted(set(before) | set(after), key=str)
        if before.get(key, "absent") != after.get(key, "absent")
    ]


def _difference(old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    """What changed from `old` to `new`, the input kinds of two calls, in words."""
    return "; ".join(_changes(old, new)) or "the same input kinds (a guard on a value changed)"


def _render(description: Any) -> str:
    if isinstance(description, tuple) and len(description) == 3 and description[0] == "tensor":
        return f"{list(description[1])} {description[2]}"
    return str(description)


def _clone(output: Any) -> Any:
    """A copy of `output` (tensors, tuples, lists, diffusers' output dataclasses) that no CUDA graph owns."""
    import torch

    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(_clone(item) for item in output)
    if isinstance(output, list):
        return [_clone(item) for item in output]
    if isinstance(output, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(output)(**{key: _clone(value) for key, value in output.items()})
    return output


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
        if context.device.split(":", 1)[0] == "cuda":
            tune_inductor_for_diffusion()
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
    description = 'torch.compile of the whole denoiser (mode="reduce-overhead", CUDA graphs, on CUDA); slow first image'

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        targets = denoisers(pipeline)
        if not targets:
            raise IncompatibleAcceleratorsError(
                [self.name], f"{type(pipeline).__name__} has no denoiser (unet, transformer, prior) to compile"
            )
        for name, module in targets.items():
            install_compiled(module, name, compile_options(context.device), normalise_timestep=True)


class CompileRegional(_Compile):
    name = "compile-regional"
    conflicts = ("compile", "sequential_offload")
    description = "torch.compile of the denoiser's repeated blocks only (compile_repeated_blocks): short warm-up"

    def compile(self, pipeline: Any, context: LoadContext) -> None:
        mode = regional_mode(context.family, context.device)
        targets = denoisers(pipeline)
        compiled = sum(compile_regions(module, mode=mode) for module in targets.values())
        if compiled == 0:
            raise IncompatibleAcceleratorsError(
                [self.name], f"no denoiser of {type(pipeline).__name__} has repeated blocks to compile; use compile"
            )
        if mode == "reduce-overhead":
            # The blocks' CUDA graphs chain within one denoiser call: each block's output feeds eager
            # code and the next block at once, and the denoiser's own output comes from an eager
            # layer. A new call starts a new generation of graphs, so outputs of the last are freed.
            for module in targets.values():
                module.register_forward_pre_hook(_mark_step_begin)


#: inductor settings diffusers' own speed guide uses for its UNets and VAEs on CUDA: 1x1
#: convolutions as matrix multiplies, a coordinate-descent search of kernel launch settings, and
#: no epilogue fusion, which otherwise costs the tuned matmuls more than it saves
INDUCTOR_TUNING = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


def tune_inductor_for_diffusion() -> None:
    """Apply `INDUCTOR_TUNING` (process-wide, as inductor's config is); only values torch knows are set."""
    import torch._inductor.config as inductor_config

    for name, value in INDUCTOR_TUNING.items():
        if hasattr(inductor_config, name):
            setattr(inductor_config, name, value)


def regional_mode(family: str, device: str) -> str | None:
    """``"reduce-overhead"`` for the families measured faster with regional CUDA graphs, on CUDA."""
    on_cuda = device.split(":", 1)[0] == "cuda"
    return "reduce-overhead" if on_cuda and family in REGIONAL_CUDA_GRAPH_FAMILIES else None


def _mark_step_begin(_module: Any, _args: Any) -> None:
    import torch

    torch.compiler.cudagraph_mark_step_begin()


def compile_regions(model: Any, *, mode: str | None = None) -> int:
    """Compile the repeated blocks of `model` in place; return how many modules were compiled."""
    declared = tuple(getattr(model, "_repeated_blocks", None) or ())
    present = {type(module).__name__ for module in model.modules()}
    options = {"mode": mode} if mode else {}
    if declared and present.intersection(declared):
        model.compile_repeated_blocks(fullgraph=True, **options)
        return sum(1 for module in model.modules() if type(module).__name__ in declared)
    classes = set(FALLBACK_REGIONS)
    count = 0

    def visit(module: Any) -> None:
        nonlocal count
        for child in module.children():
            if type(child).__name__ in classes:
                child.compile(**options)
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
        for name, module in targets.items():
            options = compile_options(context.device)
            # SDXL's pipeline casts its fp16 VAE to fp32 and back around every decode: the weights
            # move, so CUDA graphs would be recorded anew each time. Decided by what the pipeline
            # does: SD 1.5's config inherits force_upcast=True from diffusers' default, but its
            # pipeline has no upcast_vae() and never casts, so it keeps CUDA graphs.
            upcast = (
                module.dtype == torch.float16
                and getattr(module.config, "force_upcast", False)
                and hasattr(pipeline, "upcast_vae")
            )
            if piecewise or upcast:
                options["mode"] = None
            install_compiled(module.decoder, f"{name}.decoder", options)


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


# -- portable compile artefacts (torch's "mega-cache") ------------------------------------------

_loaded_artifacts: set[str] = set()


def save_compile_artifacts(path: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, int]:
    """Write every compiled artefact this process made or used to `path` (atomically).

    The file is torch's portable cache (``torch.compiler.save_cache_artifacts``): inductor's FX
    graphs and kernels, AOTAutograd graphs, and on CUDA triton kernels and autotuning results. A
    later process, on this machine or another with the same GPU, torch and model, loads it with
    `load_compile_artifacts` (or ``T2I_COMPILE_ARTIFACTS``) and skips code generation.
    Returns the number of artefacts of each kind; raises `GenerationError` when nothing was compiled.
    """
    import torch

    from t2i_core import GenerationError
    from t2i_core._files import write_atomically

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise GenerationError("nothing was compiled in this process: no compile artefacts to save")
    data, info = saved

    def write(handle: Any) -> None:
        handle.write(data)

    write_atomically(path, write, overwrite=overwrite)
    return {kind: len(keys) for kind, keys in info.artifacts.items()}


def load_compile_artifacts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Load a file from `save_compile_artifacts` into this process's compile caches (once per file).

    Call it before the first compiled call; the compile accelerators do when ``T2I_COMPILE_ARTIFACTS``
    names the file. Artefacts of another torch, GPU or model are never used: torch keys each one
    by its graph, inputs and compiler, so they only miss.
    """
    import torch

    from t2i_core import ModelNotFoundError

    key = os.path.abspath(path)
    if key in _loaded_artifacts:
        return {}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelNotFoundError(
            str(path), f"the compile artefacts file cannot be read ({exc.strerror or exc})"
        ) from None
    activate_compile_cache(_device_of_artifacts())
    torch_log = logging.getLogger("torch.compiler._cache")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # torch logs a traceback for a damaged file, then returns None
    try:
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as exc:  # noqa: BLE001 - torch raises its own types for foreign or damaged files
        info, reason = None, f"{type(exc).__name__}: {exc}"
    else:
        reason = "damaged, or written by another torch"
    finally:
        torch_log.setLevel(level)
    if info is None:
        raise ModelNotFoundError(str(path), f"not a compile artefacts file of this torch ({reason})")
    _loaded_artifacts.add(key)
    return {kind: len(keys) for kind, keys in info.artifacts.items()}


def _device_of_artifacts() -> str:
    # The cache folder is keyed by device; the first activation in a process picks it, and the
    # compile accelerators activate before loading, so this only matters for a direct call.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
