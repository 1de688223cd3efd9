"""The models a server may serve: loaded on first use, the least recently used evicted under a memory cap.

Every model has a public name and a source (what `t2i_core.load` takes). Models named at start-up
with ``--model`` and those ``--pin`` names are loaded at once; those found in ``--models-dir`` when a
request first names them. With ``--max-memory``, a load first evicts the least recently used
models that are neither pinned, the default, nor busy (a job queued or running on them) until the
new one fits, by its weights' bytes per device: known exactly once it has been loaded, estimated
from its files before.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import InvalidRequestError

from ._errors import Problem

if TYPE_CHECKING:
    from ._jobs import ServedModel

logger = logging.getLogger("t2i.server")

#: a size: bytes, or a number with a unit (``512MiB``, ``12GB``, ``1.5 GiB``)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
#: weight files counted to estimate a model's size before it is loaded
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".ckpt", ".pt", ".pth")
#: variant infixes: ``unet/diffusion_pytorch_model.fp16.safetensors`` beside the full-precision file
_VARIANTS = (".fp16", ".bf16", ".fp8")
#: seconds a load waits for busy models to finish so that it fits, before a 503
WAIT_FOR_MEMORY = 120.0
#: a public model name: letters, digits, ``.``, ``_``, ``-`` and ``:``
NAME = re.compile(r"^[A-Za-z0-9][\w.:-]*$")


def parse_size(text: str) -> int:
    """``--max-memory``'s SIZE in bytes: a plain integer, or a number with a unit (``512MiB``, ``12GB``)."""
    found = _SIZE.match(text)
    if found is None or float(found.group(1)) <= 0:
        raise InvalidRequestError("--max-memory", text, "a size in bytes, or with a unit: 512MiB, 12GB, 1.5GiB")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "").lower()])


def scan_folder(folder: str, *, allow_pickle: bool = False) -> dict[str, str]:
    """The models in `folder`: diffusers folders (with ``model_index.json``) by folder name, single files
    (``.safetensors``, ``.gguf``; ``.ckpt`` with `allow_pickle`) by file name without suffix."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidRequestError("--models-dir", folder, "an existing folder of models")
    suffixes = (".safetensors", ".gguf", *((".ckpt",) if allow_pickle else ()))
    found: dict[str, str] = {}
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() and (child / "model_index.json").is_file():
            name = child.name
        elif child.is_file() and child.suffix.lower() in suffixes:
            name = child.stem
        else:
            continue
        if not NAME.match(name):
            logger.warning("t2i serve: %s is not served: its name is not letters, digits, '.', '_', '-'", child)
            continue
        found[name] = str(child)
    return found


def estimate_bytes(source: str) -> int:
    """The bytes of `source`'s weight files on disk (0 when not a local file or folder): a variant's files
    are not counted beside the full-precision ones they stand for."""
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _WEIGHTS]
    names = {str(p) for p in files}
    total = 0
    for file in files:
        plain = next((str(file).replace(v, "", 1) for v in _VARIANTS if v in file.name), None)
        if plain is not None and plain in names:
            continue  # an fp16 copy beside the full file: one of the two is loaded
        total += file.stat().st_size
    return total


def weights_bytes(pipeline: Any) -> int:
    """The bytes of a loaded pipeline's parameters and buffers (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for component in (getattr(pipeline, "components", None) or {}).values():
        if not hasattr(component, "parameters"):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@attrs.define
class ModelEntry:
    """One model the server may serve, and its state."""

    name: str
    source: str
    pinned: bool = False
    served: ServedModel | None = None
    #: its weights' bytes once loaded; before, the estimate from its files
    nbytes: int | None = None
    last_used: float = 0.0
    #: jobs queued or running on it: a busy model is never evicted
    busy: int = 0
    loads: int = 0


class Models:
    """The served models by name, loaded on demand, evicted least recently used first under `max_memory`."""

    def __init__(
        self,
        sources: Iterable[tuple[str, str]],
        loader: Callable[[str, str], ServedModel],
        *,
        max_memory: int | None = None,
        pinned: Iterable[str] = (),
    ) -> None:
        self.entries: dict[str, ModelEntry] = {}
        for name, source in sources:
            if name in self.entries:
                raise InvalidRequestError("--model", name, "each model name once (--model and --models-dir)")
            self.entries[name] = ModelEntry(name, source)
        for name in pinned:
            if name not in self.entries:
                raise InvalidRequestError("--pin", name, "the name of a served model: " + ", ".join(self.entries))
            self.entries[name].pinned = True
        self.loader = loader
        self.max_memory = max_memory
        #: the model requests get when they name none: never evicted
        self.default: str | None = next(iter(self.entries), None)
        self._lock = threading.Condition()
        self._loading = threading.Lock()  # one load at a time: the memory check sees every load before it

    def add(self, served: ServedModel) -> None:
        """A model loaded by the caller, served as it is."""
        entry = self.entries.setdefault(served.name, ModelEntry(served.name, served.engine.source))
        entry.served = served
        entry.nbytes = weights_bytes(served.engine.pipeline)
        entry.last_used = time.monotonic()
        if self.default is None:
            self.default = served.name

    def resident(self) -> dict[str, ServedModel]:
        with self._lock:
            return {name: e.served for name, e in self.entries.items() if e.served is not None}

    def get(self, name: str) -> ServedModel:
        """The loaded model `name`: loaded now if it is not (evicting others to make room)."""
        entry = self.entries[name]
        with self._lock:
            entry.last_used = time.monotonic()
            if entry.served is not None:
                return entry.served
        with self._loading:
            with self._lock:
                if entry.served is not None:
                    return entry.served
            if entry.nbytes is not None:
                self._make_room(entry, entry.nbytes, measured=True)
            else:
                self._make_room(entry, estimate_bytes(entry.source), measured=False)
            started = time.perf_counter()
            served = self.loader(entry.name, entry.source)
            with self._lock:
                entry.served, entry.nbytes, entry.loads = served, weights_bytes(served.engine.pipeline), entry.loads + 1
                entry.last_used = time.monotonic()
            logger.info("t2i serve: loaded %s in %.1f s", name, time.perf_counter() - started)
            self._make_room(entry, 0, measured=True)  # measured now: evict more if the estimate was low
            return served

    def hold(self, name: str) -> None:
        """A job on `name` is queued: it stays loaded until `release`."""
        with self._lock:
            self.entries[name].busy += 1

    def release(self, name: str) -> None:
        with self._lock:
            entry = self.entries.get(name)
            if entry is not None:
                entry.busy = max(0, entry.busy - 1)
                self._lock.notify_all()

    def used(self, device: str, but: ModelEntry | None = None) -> int:
        with self._lock:
            return sum(
                e.nbytes or 0
                for e in self.entries.values()
                if e.served is not None and e is not but and e.served.engine.device == device
            )

    def _make_room(self, entry: ModelEntry, needed: int, *, measured: bool) -> None:
        """Evict idle models, least recently used first, until `entry` fits under the cap.

        Before a load `needed` is its size (`measured` from an earlier load, else estimated from its
        files); after it, 0 (its measured size is counted as loaded). A load waits for busy models to
        finish (a 503 after `WAIT_FOR_MEMORY` s); a model that cannot fit beside the pinned ones and the
        default one is refused.
        """
        if self.max_memory is None:
            return
        if measured and needed > self.max_memory:
            raise InvalidRequestError(
                "model", entry.name, f"a model that fits --max-memory={self.max_memory} bytes (it needs {needed})"
            )
        device = entry.served.engine.device if entry.served is not None else self._device()
        evicted = []
        deadline = time.monotonic() + WAIT_FOR_MEMORY
        with self._lock:
            while self.used(device, but=None if entry.served is not None else entry) + needed > self.max_memory:
                candidates = [
                    e
                    for e in self.entries.values()
                    if e.served is not None
                    and e is not entry
                    and not e.pinned
                    and e.name != self.default
                    and e.served.engine.device == device
                ]
                idle = [e for e in candidates if e.busy == 0]
                if idle:
                    victim = min(idle, key=lambda e: e.last_used)
                    evicted.append(victim.served)
                    victim.served = None
                    logger.info("t2i serve: evicted %s (least recently used) for %s", victim.name, entry.name)
                    continue
                if candidates and entry.served is not None:
                    break  # loaded: over the cap by what busy models hold, until their jobs end
                if candidates and time.monotonic() < deadline:
                    self._lock.wait(1.0)  # until a job ends and its model can go
                    continue
                if candidates:
                    raise Problem(
                        503,
                        "no_memory",
                        f"model {entry.name} does not fit --max-memory while the loaded models are busy; retry later",
                        headers={"Retry-After": "10"},
                    )
                if not measured and entry.served is None:
                    break  # only an estimate: load it, and let its measured size decide
                kept = self.used(device, but=entry)
                if entry.served is not None:  # loaded, and it does not fit: it goes again
                    evicted.append(entry.served)
                    entry.served = None
                raise InvalidRequestError(
                    "model",
                    entry.name,
                    f"a model that fits --max-memory={self.max_memory} bytes beside the pinned and default models "
                    f"({kept} bytes; it needs {entry.nbytes or needed})",
                )
        if evicted:
            _free(evicted)

    def _device(self) -> str:
        with self._lock:
            devices = [e.served.engine.device for e in self.entries.values() if e.served is not None]
        return devices[0] if devices else "cpu"


def _free(models: list[Any]) -> None:
    """Drop evicted models' weights: the engine cache's references, then the memory itself."""
    from t2i_core import clear_cache

    clear_cache(*[engine for served in models for engine in (served.engine, served.checker)])
    models.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
