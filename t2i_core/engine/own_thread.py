"""Each engine runs its generations on one thread of its own; callers, on any thread, wait for them.

torch runs a CPU operator on a pool of OpenMP threads that belongs to the thread calling it, so
one engine called in turn from many threads kept many pools, and every switch made the new pool
compete with the old one's spinning threads: 0.59x the throughput of one caller
(``benchmarks/bench_threads.py``). On its own thread an engine's work always meets the same pool.

What a caller sees is unchanged: the result or the exception, its torch thread count (carried
over), progress callbacks (called on the engine's thread), cancellation, and t2i's warnings, raised again in the caller's thread so that
they point at its line. Ctrl-C in a caller cancels the run at its next step (where the call has a
progress callback) and raises `KeyboardInterrupt` at once.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .._progress import ProgressCallback
from ..errors import GenerationCancelled

T = TypeVar("T")

#: the warnings t2i raised on an engine's thread during the current call, raised again by its caller
_deferred = threading.local()


def warn(warning: Warning, stacklevel: int) -> None:
    """`warnings.warn`, or, on an engine's thread, kept to be raised in the calling thread."""
    pending: list[Warning] | None = getattr(_deferred, "warnings", None)
    if pending is not None:
        pending.append(warning)
        return
    warnings.warn(warning, stacklevel=stacklevel + 1)


def _torch_threads() -> int | None:
    """The CPU threads torch uses for the calling thread (None before torch is imported).

    OpenMP keeps this setting per thread: ``torch.set_num_threads(1)`` in a caller does not reach
    the engine's thread, so each call carries the caller's over (a different count can round
    differently, and callers expect their setting to hold).
    """
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


class OwnThread:
    """The thread an engine runs its work on, made on its first call."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._ident: int | None = None
        self._made = threading.Lock()
        #: set when a caller was interrupted: the run stops at its next step
        self._interrupted = threading.Event()

    def call(self, work: Callable[[], T], *, stacklevel: int = 3) -> T:
        """`work()` on the engine's thread; its t2i warnings are raised here at `stacklevel`."""
        if threading.get_ident() == self._ident:
            return work()  # from the engine's own thread (a progress callback calling again)
        with self._made:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2i-engine")
        context = contextvars.copy_context()
        pending: list[Warning] = []
        threads = _torch_threads()

        def run() -> T:
            self._ident = threading.get_ident()
            self._interrupted.clear()
            if threads is not None and _torch_threads() != threads:
                _set_torch_threads(threads)
            _deferred.warnings = pending
            try:
                return context.run(work)
            finally:
                _deferred.warnings = None

        future = self._pool.submit(run)
        try:
            return future.result()
        except KeyboardInterrupt:
            self._interrupted.set()  # the run stops at its next step; this caller leaves now
            future.cancel()
            raise
        finally:
            for warning in pending:
                warnings.warn(warning, stacklevel=stacklevel)

    def cancellable(self, progress: ProgressCallback | None) -> ProgressCallback | None:
        """`progress`, made to stop the run when a caller was interrupted (None stays None)."""
        if progress is None:
            return None
        from .._progress import takes_latents

        interrupted = self._interrupted

        def check() -> None:
            if interrupted.is_set():
                raise GenerationCancelled("interrupted (Ctrl-C)")

        if takes_latents(progress):  # it gets each step's latents: so does its wrapper

            def with_latents(step: int, total: int, latents: Any = None) -> Any:
                check()
                return progress(step, total) if latents is None else progress(step, total, latents=latents)  # type: ignore[call-arg]

            return with_latents

        def plain(step: int, total: int) -> Any:
            check()
            return progress(step, total)

        return plain
