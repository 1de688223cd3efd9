"""The ``t2i`` command line, one module per command.

`main` runs it from Python (``main(["generate", "a cat", "--model", "tiny:sd15"])`` returns the
exit status); `console_main` is the ``t2i`` executable. The commands are registered through
`register_commands` (t2i-core's own in `commands`), so ``t2i --help`` imports no heavy library.
"""

from __future__ import annotations

from .main import console_main, main

__all__ = ["console_main", "main"]
