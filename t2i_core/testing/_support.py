"""What the conformance classes share: light-import checks, tiny folders, cached references, CLI runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .._manager import Registry, get_registry
from ..provider import ModelProvider

#: modules that registering a plugin, or a conditioner's ``wants()``, must never import
HEAVY_MODULES = ("torch", "diffusers", "transformers", "compel")


def light_import_report(code: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter, then report which heavy modules it imported.

    `code` may set ``report[key] = value`` to return more facts (JSON-serialisable).
    """
    script = (
        "import json, sys\nreport = {}\n"
        f"{code}\n"
        f"report['heavy'] = sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)\n"
        "print('T2I-REPORT ' + json.dumps(report))\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    for line in process.stdout.splitlines():
        if line.startswith("T2I-REPORT "):
            report: dict[str, Any] = json.loads(line.removeprefix("T2I-REPORT "))
            return report
    raise AssertionError(f"the check failed to run (exit {process.returncode}):\n{process.stderr[-3000:]}")


def offers_tiny(provider: ModelProvider) -> bool:
    """Whether `provider` builds a ``tiny:<family>`` checkpoint."""
    return type(provider).build_tiny is not ModelProvider.build_tiny


def tiny_folder(family: str, registry: Registry | None = None) -> Path:
    """The folder of ``tiny:<family>`` in the current cache, built first when needed."""
    from ..tiny import ensure_built

    provider = (registry or get_registry()).provider(family)
    return ensure_built(provider.name, provider.tiny_version, provider.build_tiny)


def shipped_families(exclude: str) -> list[str]:
    """The families that t2i itself ships (first-party plugins) with a tiny checkpoint, but `exclude`."""
    providers = get_registry().first_party("provider")
    return sorted(name for name, provider in providers.items() if name != exclude and offers_tiny(provider))


def read_index(folder: Path) -> dict[str, Any]:
    index: dict[str, Any] = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return index


#: (class, folder) → raw diffusers pipeline: each conformance class loads its reference once
_references: dict[tuple[type, str], Any] = {}


def cached_reference(owner: type, folder: str, load: Any) -> Any:
    key = (owner, folder)
    if key not in _references:
        pipeline = load(folder)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        _references[key] = pipeline
    return _references[key]


def forget_references(owner: type) -> None:
    for key in [key for key in _references if key[0] is owner]:
        del _references[key]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``t2i ARGV`` in this process; return (exit status, stdout, stderr).

    The command quiets library logging for a terminal; the loggers are restored afterwards.
    """
    import logging
    import warnings

    from ..cli import main

    loggers = [logging.getLogger(name) for name in ("t2i", "diffusers", "transformers")]
    saved = [(logger, list(logger.handlers), logger.propagate, logger.level) for logger in loggers]
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, with None, remove) environment variables for a block, then restore them."""
    previous = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
