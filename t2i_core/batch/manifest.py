"""A batch's output folder: its manifest (``manifest.jsonl``, append-only, synced), its lock, and verification.

The manifest holds one JSON object per line, one per finished job (done, failed or invalid);
the last line for a job id is its state. Each line is written whole, then flushed and synced,
after the job's images are in place, so a crash loses at most the job it was recording, and a
torn last line is skipped when the manifest is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .._files import sync_folder
from ..errors import InvalidRequestError, OutputError

MANIFEST = "manifest.jsonl"
LOCK = ".t2i-batch.lock"
#: `t2i_core._files.write_atomically`'s temporary names: ``.NAME.<8 hex>.tmp``.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def read_records(folder: Path) -> dict[str, dict[str, Any]]:
    """The last record of each job id in `folder`'s manifest; unreadable (torn) lines are skipped."""
    path = folder / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidRequestError(
            "--out", str(folder), f"a folder whose {MANIFEST} can be read ({exc.strerror})"
        ) from None
    records: dict[str, dict[str, Any]] = {}
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records[record["id"]] = record
    return records


def is_complete(folder: Path, record: Mapping[str, Any] | None, digest: str) -> bool:
    """Whether `record` says the job `digest` is done and every file it names is intact (size and SHA-256)."""
    if not record or record.get("status") != "done" or record.get("job") != digest:
        return False
    files = record.get("files")
    if not isinstance(files, list) or not files:
        return False
    for entry in files:
        try:
            path = folder / entry["name"]
            if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Manifest:
    """Appends records to ``manifest.jsonl``: each one whole, flushed and synced before `append` returns."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MANIFEST
        self._handle: BinaryIO | None = None

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode(
            "utf-8", "surrogatepass"
        )
        try:
            handle = self._open()
            handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputError(
                str(self.path), f"the manifest cannot be written ({exc.strerror or exc})", exc.errno
            ) from exc

    def _open(self) -> BinaryIO:
        if self._handle is None:
            created = not self.path.exists()
            handle = open(self.path, "ab")
            if handle.tell() > 0 and not _ends_with_newline(self.path):
                handle.write(b"\n")  # a torn last line from a crash stays a line of its own
            if created:
                sync_folder(str(self.path.parent))
            self._handle = handle
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold `folder`'s batch lock (one batch writes a folder at a time); the system frees it if the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one batch per folder is the user's to keep
        yield
        return
    try:
        handle = open(folder / LOCK, "a")
    except OSError as exc:
        raise OutputError(
            str(folder), f"the batch's lock file cannot be made ({exc.strerror or exc})", exc.errno
        ) from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InvalidRequestError(
                "--out", str(folder), "a folder that no other t2i batch is writing to (one is running on it now)"
            ) from None
        yield
    finally:
        handle.close()


def remove_temporaries(folder: Path) -> int:
    """Delete the temporary files a killed batch left behind (never a finished file); how many there were."""
    removed = 0
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and _TEMPORARY.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed
