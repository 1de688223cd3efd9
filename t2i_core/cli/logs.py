"""What ``t2i`` prints besides its results: warnings and log records as one line each, a progress bar.

All of it is scoped to one run of `t2i_core.cli.main` (`scoped_output`): calling ``main()`` from
Python leaves ``warnings.showwarning``, the filters and every logger as they were.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

#: The undo stack of the `scoped_output` in progress (None outside ``main()``).
_scope: contextlib.ExitStack | None = None


@contextlib.contextmanager
def scoped_output() -> Iterator[None]:
    """For one ``t2i`` command: warnings and t2i's log records as ``t2i: warning: ...``; all restored after."""
    global _scope
    outer = _scope
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.showwarning = show_warning
        _add_handler(stack, logging.getLogger("t2i"), _OneLine(level=logging.WARNING), propagate=False)
        if sys.stderr.isatty():
            # On a terminal a first tiny build says so ("t2i: building tiny:sd15 ..."), as the progress
            # bar shows the steps; a script's stderr stays as quiet as ever.
            tiny = logging.getLogger("t2i.tiny")
            _add_handler(stack, tiny, _Note(level=logging.INFO, max_level=logging.INFO), propagate=True)
            _set(stack, lambda: tiny.level, tiny.setLevel, logging.INFO)
        for name in IMPORT_CHATTER:
            _raise_level(stack, logging.getLogger(name), logging.ERROR)
        _scope = stack
        try:
            yield
        finally:
            _scope = outer


def quiet_libraries() -> None:
    """Keep library chatter (load bars, optional-dependency notices) out of the terminal.

    Imports diffusers and transformers, so commands call it only once they load a model. Every
    change is undone when the command ends; outside ``main()`` it does nothing.
    """
    stack = _scope
    if stack is None:
        return
    for library in ("diffusers", "transformers", "huggingface_hub", "torch", "accelerate"):
        warnings.filterwarnings("ignore", module=library)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (hub_logging, transformers_logging):
        _set(stack, library_logging.get_verbosity, library_logging.set_verbosity, logging.ERROR)
    for library_logging in (diffusers_logging, transformers_logging):
        _disable_progress_bars(stack, library_logging)
    # diffusers logs (not warns) when a prompt is cut at the text encoder's length: say so, in one line.
    diffusers = logging.getLogger("diffusers")
    _set(stack, diffusers_logging.get_verbosity, diffusers_logging.set_verbosity, logging.WARNING)
    saved = list(diffusers.handlers)
    for old in saved:
        diffusers.removeHandler(old)
    stack.callback(_add_handlers, diffusers, saved)
    _add_handler(stack, diffusers, _TruncationOnly(), propagate=diffusers.propagate)


def _set(stack: contextlib.ExitStack, get: Callable[[], Any], set_: Callable[[Any], None], value: Any) -> None:
    before = get()
    set_(value)
    stack.callback(set_, before)


#: Loggers that speak when a library is imported, not about the user's image: torchao's missing
#: optional kernels, and torch's notice about torchao's pytree registrations. transformers and
#: diffusers import torchao whenever it is installed (t2i-quantize), so every command would print them.
IMPORT_CHATTER = ("torchao", "torch.utils._pytree", "bitsandbytes")


def _raise_level(stack: contextlib.ExitStack, logger: logging.Logger, level: int) -> None:
    before = logger.level
    if before < level:
        logger.setLevel(level)
        stack.callback(logger.setLevel, before)


def _disable_progress_bars(stack: contextlib.ExitStack, library_logging: Any) -> None:
    if library_logging.is_progress_bar_enabled():
        library_logging.disable_progress_bar()
        stack.callback(library_logging.enable_progress_bar)


def _add_handlers(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        logger.addHandler(handler)


def _add_handler(
    stack: contextlib.ExitStack, logger: logging.Logger, handler: logging.Handler, propagate: bool
) -> None:
    before = logger.propagate
    logger.addHandler(handler)
    logger.propagate = propagate

    def restore() -> None:
        logger.removeHandler(handler)
        logger.propagate = before

    stack.callback(restore)


class _OneLine(logging.Handler):
    """Prints t2i's own log records (e.g. an accelerator that changed nothing) as ``t2i: warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno < logging.ERROR else "error"
        print(f"t2i: {level}: {record.getMessage()}", file=sys.stderr)


class _Note(logging.Handler):
    """Prints t2i's notes up to `max_level` as ``t2i: ...`` (warnings and errors go to `_OneLine`)."""

    def __init__(self, level: int, max_level: int) -> None:
        super().__init__(level)
        self.max_level = max_level

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno <= self.max_level:
            print(f"t2i: {record.getMessage()}", file=sys.stderr)


class _TruncationOnly(logging.Handler):
    """Prints diffusers' "part of your input was truncated" records as one line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "truncated" in message:
            head, _, dropped = message.partition(": ")
            if len(dropped) > 80:
                dropped = f"{dropped[:80]!r}... ({len(dropped)} characters)"
            print(f"t2i: warning: {head}: {dropped}", file=sys.stderr)


def show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """Warnings that reach the user (e.g. a truncated prompt) as one line each."""
    print(f"t2i: warning: {message}", file=sys.stderr)


class progress_bar:
    """A tqdm bar over denoising steps on an interactive terminal; nothing otherwise.

    The bar appears at the first step, with the total the pipeline reports: that is the number of
    steps it runs, which is not always the request's (PNDM runs one more, a hires fix two passes),
    so a bar drawn beforehand with `total` would show ``0/30`` and then ``1/31``.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not sys.stderr.isatty():
            return None
        return self._update

    def _update(self, step: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total or self.total, unit="step", file=sys.stderr, leave=False)
        elif total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        self.bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
