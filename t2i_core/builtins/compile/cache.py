"""Where compiled code is kept between processes: t2i's compile cache folder and torch's portable artefacts.

Loading an engine changes nothing process-wide. Inductor keeps its caches in one folder per
process, named only by ``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``), so
pointing it at t2i's own folder (`compile_cache_dir`, kept with t2i's other caches and keyed by
torch, Python and device) changes the environment: that happens only when the user opts in with
``T2I_COMPILE_CACHE=1``, or an application calls `activate_compile_cache` itself.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

#: set to 1 to keep inductor's caches in t2i's folder (`compile_cache_dir`) instead of inductor's default
COMPILE_CACHE_ENV = "T2I_COMPILE_CACHE"
#: a file written by ``t2i warmup``: its compiled artefacts are loaded before the first compile
ARTIFACTS_ENV = "T2I_COMPILE_ARTIFACTS"

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

    from t2i_core.tiny import cache_dir

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


def compile_cache_wanted() -> bool:
    """Whether the user opted in to t2i's compile cache folder (``T2I_COMPILE_CACHE=1``)."""
    return os.environ.get(COMPILE_CACHE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def activate_compile_cache(device: str) -> Path:
    """Point inductor's on-disk caches at `compile_cache_dir(device)`; return the folder in use.

    Process-wide by nature: inductor reads its folder from ``TORCHINDUCTOR_CACHE_DIR`` alone, so
    this sets that variable. The compile accelerators call it only under ``T2I_COMPILE_CACHE=1``.
    The first activation in a process picks the folder; a ``TORCHINDUCTOR_CACHE_DIR`` the user
    set wins and is returned unchanged.
    """
    global _active_cache
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
    return _active_cache


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
    from t2i_core.kit import write_atomically

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
    if compile_cache_wanted():
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
