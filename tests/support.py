"""Helpers that core's and the plugins' test files import (``from support import ...``).

What a plugin author also needs lives in ``t2i_core.testing`` (image comparisons, seeded
generators, tiny folders, raw pipelines, ``refuse_to_run``); this module only adds what the suite's
own files use differently: tiny folders as strings, and the CLI run on the test's own streams.
pytest puts this folder on ``sys.path`` (``pythonpath`` in pyproject.toml), so plugin test folders
import it too.
"""

from __future__ import annotations

from t2i_core import testing


def tiny_folder(family: str) -> str:
    """The folder of ``tiny:<family>`` in the suite's cache (built on first use), as a string."""
    return str(testing.tiny_folder(family))


def run_cli(*args: str) -> int:
    """Run ``t2i ARGS`` in this process and return its exit status.

    Unlike ``t2i_core.testing.run_cli``, which captures the output, the command writes to the
    test's own ``sys.stdout`` and ``sys.stderr``: ``capsys`` reads them, or a test swaps in a terminal.
    """
    from t2i_core.cli import main

    return main(list(args))
