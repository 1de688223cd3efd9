"""The tiny-checkpoint cache: its folder, and builds that are atomic, verified and leave no side effects.

A build writes into a staging folder named after its process, renamed into place when complete;
what a killed build leaves is removed by the next `ensure_built`, which knows its builder is gone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .._locks import loading_lock
from ..errors import InvalidRequestError, ModelNotFoundError

#: "building tiny:sd15 ..." when a build starts (INFO): the first use of a tiny checkpoint takes
#: seconds to a minute on a CPU, and ``t2i`` prints this record so that the wait is explained.
logger = logging.getLogger("t2i.tiny")

__all__ = ["CACHE_ENV", "MANIFEST", "STALE_SECONDS", "TINY_PREFIX", "cache_dir", "ensure_built", "seeded"]

TINY_PREFIX = "tiny:"
CACHE_ENV = "T2I_CACHE"


def cache_dir() -> Path:
    """The t2i cache folder: ``$T2I_CACHE``, else ``$XDG_CACHE_HOME/t2i``, else ``~/.cache/t2i``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "t2i"


#: The file a finished build writes last: the size and SHA-256 of every other file of the checkpoint.
MANIFEST = ".complete"
#: A staging folder untouched for this many seconds belongs to a build that died, even where its
#: builder cannot be checked (another machine sharing the cache, a reused process id, older t2i).
STALE_SECONDS = 15 * 60

# A staging folder's name: ".<name>-build-<host>-<pid>-<random>", so that any later build can tell
# whether the process writing it still runs. <host> tells machines sharing the cache apart.
_STAGING = re.compile(r"\.(?P<name>.+)-build-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}")


@functools.cache
def _host() -> str:
    """This machine in a staging folder's name: 8 hex digits of a hash of its host name."""
    import hashlib  # OpenSSL loads with the first build, not with ``import t2i_core.tiny``

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# Write errors that are about the cache folder itself rather than the build.
_CACHE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM}

# Checkpoints whose file contents this process has hashed, by folder and manifest mtime: sizes are
# checked on every use (cheap), contents once per process (a few milliseconds for a tiny model).
_verified: set[tuple[str, int]] = set()


def ensure_built(name: str, version: int, build: Callable[[Path], None]) -> Path:
    """Return the cached folder ``tiny/<name>-v<version>``, building it first if absent or damaged.

    `build` writes into a hidden staging folder that is renamed into place when complete, so a
    crash, a signal or two processes building at once never leave a half-written checkpoint in
    its place. The staging folder is named after the building process: an exception removes it
    on the way out, and what a killed process (SIGTERM, SIGKILL) leaves is removed by the next
    call, here or in any process, once that process is gone. No signal handler, random state or
    logging setting of the process is changed. The checkpoint's last file, ``.complete``, lists
    every file's size and SHA-256: a checkpoint damaged later (a file truncated, changed or
    deleted) is set aside and rebuilt. `build` runs with torch's CPU generator seeded with 0.
    """
    target = cache_dir() / "tiny" / f"{name}-v{version}"
    _remove_leftovers(target.parent, name)
    problem = _damage(target)
    if problem is None:
        return target
    if os.path.lexists(target):
        _set_aside(target, name, problem)
    staging = target.parent / f".{name}-build-{_host()}-{os.getpid()}-{_token()}"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise _unwritable_cache(exc) from None
    logger.info("building tiny:%s (first use: 10 to 40 s on a CPU; then cached in %s)", name, target.parent)
    try:
        # Building models is loading as far as other threads are concerned (see t2i_core._locks).
        with loading_lock, _quiet(), seeded(0):
            build(staging)
        _write_manifest(staging)
        try:
            os.replace(staging, target)
        except OSError as exc:
            # Another process finished first (the target exists and is not empty): use theirs.
            problem = _damage(target)
            if problem is not None:
                raise _unrepairable(name, target, problem, exc) from None
    except OSError as exc:
        if exc.errno not in _CACHE_ERRNOS:
            raise
        raise _unwritable_cache(exc) from None  # e.g. a full disk while the weights were written
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _unwritable_cache(exc: OSError) -> InvalidRequestError:
    return InvalidRequestError(
        f"${CACHE_ENV}", str(cache_dir()), f"a folder t2i can create and write ({exc.strerror or exc})"
    )


def _unrepairable(name: str, target: Path, problem: str, exc: OSError) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{TINY_PREFIX}{name}",
        f"its cached checkpoint is damaged ({problem}) and cannot be rebuilt ({exc.strerror or exc}); "
        f"delete the folder {target} and try again",
    )


def _read_manifest(folder: Path) -> dict[str, tuple[int, str]]:
    """``{relative path: (size, sha256)}`` from `folder`'s manifest; `ValueError` if malformed."""
    document = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict):
        raise ValueError("not a t2i manifest")
    files = {}
    for relative, entry in document["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise ValueError(f"bad entry for {relative}")
        files[relative] = (entry["size"], entry["sha256"])
    return files


def _damage(folder: Path) -> str | None:
    """What is wrong with the checkpoint in `folder`, or None when it is complete and intact."""
    try:
        files = _read_manifest(folder)
        stamp = (folder / MANIFEST).stat().st_mtime_ns
    except FileNotFoundError:
        return f"{MANIFEST} is missing" if os.path.lexists(folder) else "it is not built yet"
    except (OSError, ValueError):  # includes the plain "ok" of t2i 0.1 caches, rebuilt once
        return f"{MANIFEST} is not a readable manifest"
    for relative, (size, _digest) in files.items():
        try:
            found = (folder / relative).stat().st_size
        except OSError:
            return f"{relative} is missing"
        if found != size:
            return f"{relative} has {found} bytes instead of {size}"
    key = (str(folder), stamp)
    if key not in _verified:
        for relative, (_size, digest) in files.items():
            try:
                if _sha256(folder / relative) != digest:
                    return f"{relative} does not hold the bytes it was built with"
            except OSError as exc:
                return f"{relative} cannot be read ({exc.strerror or exc})"
        _verified.add(key)
    return None


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _token() -> str:
    import secrets

    return secrets.token_hex(4)


def _set_aside(target: Path, name: str, problem: str) -> None:
    """Move a damaged checkpoint out of the way in one step (readers never see half of it), then delete it."""
    aside = target.parent / f".{name}-damaged-{_token()}"
    try:
        os.replace(target, aside)
    except FileNotFoundError:  # another process set it aside first
        return
    except OSError as exc:
        raise _unrepairable(name, target, problem, exc) from None
    _remove(aside)


def _remove_leftovers(folder: Path, name: str) -> None:
    """Delete what died builds left: staging folders of any name whose process is gone, and of
    `name`, damaged folders set aside and staging folders untouched for `STALE_SECONDS`."""
    try:
        with os.scandir(folder) as entries:
            found = [entry.name for entry in entries if entry.name.startswith(".")]
    except OSError:
        return
    deadline = time.time() - STALE_SECONDS
    for entry in found:
        path = os.path.join(folder, entry)
        staging = _STAGING.fullmatch(entry)
        if staging is not None and staging["host"] == _host() and not _process_exists(int(staging["pid"])):
            _remove(path)
        elif entry.startswith(f".{name}-") and (entry.startswith(f".{name}-damaged-") or _last_change(path) < deadline):
            _remove(path)


def _process_exists(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (True where that cannot be told)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill would end the process there; the time rule applies instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists but belongs to someone else
        return True
    return True


def _last_change(path: str) -> float:
    """The newest modification time in the tree at `path` (now, if it cannot be read)."""
    try:
        newest = os.lstat(path).st_mtime
        for root, folders, files in os.walk(path):
            for item in (*folders, *files):
                newest = max(newest, os.lstat(os.path.join(root, item)).st_mtime)
    except OSError:
        return time.time()
    return newest


def _remove(path: str | Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded with `seed`; then every random state is as before.

    Only the CPU generator is seeded (``torch.manual_seed`` would reseed the CUDA generators of
    the whole process too); Python's `random` state is restored as well, in case a builder uses it.
    """
    import torch

    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No download progress bars while building; each library's setting is restored as it was.

    The setting is process-wide, but loading (which is what shows these bars) waits for
    `loading_lock`, which the build holds, so no other thread's load runs quieted.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, enabled, strict=True):
            if was_enabled:
                library.enable_progress_bar()
