"""Deprecated: the compile accelerators moved to `t2i_core.builtins.compile`; this name goes in 0.4.

Re-exports what ``t2i_core.builtins.compilation`` offered. Patching an attribute here (e.g.
``compile_function``) no longer reaches the compiled call: patch `t2i_core.builtins.compile.calls`.
"""

from __future__ import annotations

import warnings

from .compile import (
    ARTIFACTS_ENV,
    COMPILE_CACHE_ENV,
    INDUCTOR_TUNING,
    CompiledCall,
    RecompileWarning,
    activate_compile_cache,
    compile_cache_dir,
    compile_options,
    compile_regions,
    compile_stats,
    compiled_call,
    compiler_problem,
    device_key,
    install_compiled,
    load_compile_artifacts,
    save_compile_artifacts,
)
from .compile.accelerators import ACCELERATORS, FALLBACK_REGIONS, Compile, CompileRegional, CompileVae
from .compile.calls import compile_function

__all__ = [
    "ACCELERATORS",
    "ARTIFACTS_ENV",
    "COMPILE_CACHE_ENV",
    "FALLBACK_REGIONS",
    "INDUCTOR_TUNING",
    "Compile",
    "CompileRegional",
    "CompileVae",
    "CompiledCall",
    "RecompileWarning",
    "activate_compile_cache",
    "compile_cache_dir",
    "compile_function",
    "compile_options",
    "compile_regions",
    "compile_stats",
    "compiled_call",
    "compiler_problem",
    "device_key",
    "install_compiled",
    "load_compile_artifacts",
    "save_compile_artifacts",
]

warnings.warn(
    "t2i_core.builtins.compilation is deprecated: import from t2i_core.builtins.compile",
    DeprecationWarning,
    stacklevel=2,
)
