"""Writing an output file so that nobody ever sees half of it: a hidden temporary file, then a rename.

A crash, an interrupt or a full disk leaves either the complete new file or nothing (and, when
replacing, the old file untouched); a file that exists is replaced only when asked.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from typing import BinaryIO

from .errors import OutputError

#: Characters a temporary name adds to the final one: ``.`` + name + ``.`` + 8 random + ``.tmp``.
_TEMP_EXTRA = 1 + 1 + 8 + len(".tmp")

_REASONS = {
    getattr(errno, "EDQUOT", errno.ENOSPC): "the disk quota is exhausted",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.ENOENT: "its folder does not exist",
    errno.ENOTDIR: "a part of its folder path is not a folder",
    errno.EISDIR: "it is a folder",
}


def write_atomically(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, overwrite: bool, through_links: bool = True
) -> None:
    """Call `write(handle)` on a hidden temporary file beside `path`, sync it, and move it into place.

    Without `overwrite` an existing `path` (even a dangling symbolic link) is never replaced:
    raises `FileExistsError`, also when the file appears while `write` runs. With `overwrite`
    the old file is swapped for the new one in one step, keeping its permission bits; a
    symbolic link is written through, as ``open(path, "wb")`` would — or, with `through_links`
    false, replaced itself (its target untouched: for files a program owns, such as a batch's
    images, where a link put in their place must not redirect the write). Any failure, including
    ``KeyboardInterrupt``, removes the temporary file; an `OSError` becomes `OutputError`.
    """
    shown = os.fspath(path)
    target = os.path.realpath(shown) if overwrite and through_links and os.path.islink(shown) else shown
    folder, name = os.path.split(target)
    folder = folder or os.curdir
    temp = None
    placed = False
    try:
        temp, descriptor = _create_temp(folder, name)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            _keep_mode(target, temp)
            os.replace(temp, target)
        else:
            _place_exclusively(temp, target)
        placed = True
        sync_folder(folder)
    except FileExistsError:
        raise
    except OSError as exc:
        unchanged = "the existing file is unchanged" if os.path.lexists(target) else "nothing was written"
        reason = _REASONS.get(exc.errno or 0) or exc.strerror or str(exc)
        raise OutputError(shown, f"{reason}; {unchanged}", exc.errno) from exc
    finally:
        if temp is not None and not placed:
            _remove(temp)


def _create_temp(folder: str, name: str) -> tuple[str, int]:
    """A new hidden ``.name.<random>.tmp`` in `folder`, made with the usual permissions (umask)."""
    short = name
    limit = _name_max(folder) - _TEMP_EXTRA
    while short and len(os.fsencode(short)) > limit:  # keep the temporary name legal for a long `name`
        short = short[:-1]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = os.path.join(folder, f".{short}.{secrets.token_hex(4)}.tmp")
        try:
            return temp, os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder)


def _name_max(folder: str) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
        return 255


def _place_exclusively(temp: str, target: str) -> None:
    """Give `temp` the name `target` unless something has that name: `FileExistsError` then.

    A hard link fails atomically when the name is taken. On file systems without hard links
    (FAT, some network shares) the name is claimed with ``O_EXCL`` and then replaced; if that
    is interrupted, the empty claim is removed.
    """
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError:
        claim = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(claim)
        try:
            os.replace(temp, target)
        except BaseException:
            _remove(target)
            raise
    else:
        _remove(temp)


def _keep_mode(target: str, temp: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:  # nothing to replace yet
        return
    os.chmod(temp, mode)


def sync_folder(folder: str) -> None:
    """Make the rename itself durable; best effort (not every platform can open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
