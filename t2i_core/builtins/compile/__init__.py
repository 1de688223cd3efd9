"""The compiling accelerators: torch.compile flavours (`accelerators`), the safe compiled call and
its recompile warnings (`calls`), the compile cache and portable artefacts (`cache`), and
``graph-step``, the whole denoising step in one CUDA graph (`graph_step`).

Nothing here changes process-wide state when it is imported or an engine is loaded: inductor
settings travel with each compiled module, and t2i's compile cache folder is opt-in
(``T2I_COMPILE_CACHE=1``, see `cache`).
"""

from __future__ import annotations

from t2i_core import Accelerator

from . import accelerators, graph_step
from .accelerators import INDUCTOR_TUNING, compile_options, compile_regions, compiler_problem, inductor_options
from .cache import (
    ARTIFACTS_ENV,
    COMPILE_CACHE_ENV,
    activate_compile_cache,
    compile_cache_dir,
    device_key,
    load_compile_artifacts,
    save_compile_artifacts,
)
from .calls import CompiledCall, RecompileWarning, compile_stats, compiled_call, install_compiled

__all__ = [
    "ACCELERATORS",
    "ARTIFACTS_ENV",
    "COMPILE_CACHE_ENV",
    "INDUCTOR_TUNING",
    "CompiledCall",
    "RecompileWarning",
    "activate_compile_cache",
    "compile_cache_dir",
    "compile_options",
    "compile_regions",
    "compile_stats",
    "compiled_call",
    "compiler_problem",
    "device_key",
    "inductor_options",
    "install_compiled",
    "load_compile_artifacts",
    "save_compile_artifacts",
]

#: every compiling accelerator, in registration order
ACCELERATORS: tuple[Accelerator, ...] = (*accelerators.ACCELERATORS, *graph_step.ACCELERATORS)
