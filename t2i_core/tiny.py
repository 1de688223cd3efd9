"""Helpers for ``tiny:<family>`` checkpoints: the cache folder, atomic verified builds, an offline CLIP tokenizer.

Providers build their tiny checkpoint with these so that every family caches the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._locks import loading_lock
from .errors import InvalidRequestError, ModelNotFoundError

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
#: A staging folder untouched for this many seconds belongs to a build that died (SIGKILL, power loss).
STALE_SECONDS = 15 * 60

# Write errors that are about the cache folder itself rather than the build.
_CACHE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM}

# Checkpoints whose file contents this process has hashed, by folder and manifest mtime: sizes are
# checked on every use (cheap), contents once per process (a few milliseconds for a tiny model).
_verified: set[tuple[str, int]] = set()


def ensure_built(name: str, version: int, build: Callable[[Path], None]) -> Path:
    """Return the cached folder ``tiny/<name>-v<version>``, building it first if absent or damaged.

    The build writes into a hidden temporary sibling folder that is renamed into place when
    complete, so a crash, a SIGTERM or two processes building at once never leave a half-written
    checkpoint behind. Its last file, ``.complete``, lists every file's size and SHA-256: a
    checkpoint damaged later (a file truncated, changed or deleted) is set aside and rebuilt.
    """
    target = cache_dir() / "tiny" / f"{name}-v{version}"
    _remove_leftovers(target.parent, name)
    problem = _damage(target)
    if problem is None:
        return target
    if os.path.lexists(target):
        _set_aside(target, name, problem)
    with _sigterm_unwinds(name):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        except OSError as exc:
            raise _unwritable_cache(exc) from None
        try:
            # Building models is loading as far as other threads are concerned (see t2i_core._locks).
            with loading_lock, _quiet(), _seeded(0):
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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set_aside(target: Path, name: str, problem: str) -> None:
    """Move a damaged checkpoint out of the way in one step (readers never see half of it), then delete it."""
    aside = target.parent / f".{name}-damaged-{secrets.token_hex(4)}"
    try:
        os.replace(target, aside)
    except FileNotFoundError:  # another process set it aside first
        return
    except OSError as exc:
        raise _unrepairable(name, target, problem, exc) from None
    _remove(aside)


def _remove_leftovers(folder: Path, name: str) -> None:
    """Delete what died builds of `name` left: damaged folders set aside, and stale staging folders."""
    try:
        with os.scandir(folder) as entries:
            found = [entry.path for entry in entries if entry.name.startswith(f".{name}-")]
    except OSError:
        return
    deadline = time.time() - STALE_SECONDS
    for path in found:
        if os.path.basename(path).startswith(f".{name}-damaged-") or _last_change(path) < deadline:
            _remove(path)


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


class _Terminated(BaseException):
    """Raised by the build's SIGTERM handler, so that the staging folder is removed on the way out."""


@contextlib.contextmanager
def _sigterm_unwinds(name: str) -> Iterator[None]:
    """While a build runs, SIGTERM unwinds it (``finally`` blocks clean up), then acts as it would have.

    Only the main thread may set signal handlers; in other threads, or where SIGTERM is ignored
    or handled outside Python, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or previous == signal.SIG_IGN:
        yield
        return
    received = False

    def unwind(_signum: int, _frame: Any) -> None:
        nonlocal received
        if not received:  # a second SIGTERM must not cut the clean-up short
            received = True
            raise _Terminated

    signal.signal(signal.SIGTERM, unwind)
    interrupted = False
    try:
        yield
    except _Terminated:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        signal.raise_signal(signal.SIGTERM)  # the previous disposition: by default the process ends here
    if interrupted:  # the previous handler let the process live on; the build did not finish
        raise ModelNotFoundError(f"{TINY_PREFIX}{name}", "building it was interrupted by SIGTERM")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()
            transformers_logging.enable_progress_bar()


def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values (as in GPT-2 / CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def clip_tokenizer(folder: Path, *, max_length: int = 77, pad_token: str = "<|endoftext|>") -> Any:
    """Build a CLIP tokenizer without the network: a byte-level vocabulary and no merges.

    Every text tokenizes (one token per byte), so prompts of any language work on tiny models.
    Returns the `transformers.CLIPTokenizer`; `folder` keeps its vocabulary files.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if pad_token not in vocab:
        vocab[pad_token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token=pad_token
    )


def clip_text_config(tokenizer: Any, **overrides: Any) -> Any:
    """A small `CLIPTextConfig` matching `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig

    settings: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "layer_norm_eps": 1e-5,
    }
    settings.update(overrides)
    return CLIPTextConfig(**settings)
